"""mixed-precision and round-weights: modes chosen from measured sensitivity; GPTQ weights exact under their spec."""

from __future__ import annotations

import pytest
import torch

from graphopt import registry
from graphopt.errors import PreconditionError
from graphopt.quantization import dequantize, get_specs, quantize
from graphopt.testing import assert_rewrite


pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(program, **options):
    return registry.passes.get("calibrate")(batches=1, batch_size=8, **options)(program).program


def select(**options):
    return registry.passes.get("mixed-precision")(batches=1, batch_size=8, **options)


def test_a_loose_budget_keeps_every_layer_in_the_first_candidate(tiny_program):
    program = calibrated(tiny_program)
    pass_ = select(min_mean_cosine=-1.0, min_worst_cosine=-1.0)
    after = assert_rewrite(pass_, program, atol=0.0)  # the module itself is untouched
    specs = get_specs(after)
    assert {s.mode for s in specs.values()} == {"static"}
    notes = pass_(program.clone()).notes
    assert notes["met"] and notes["moves"] == [] and notes["modes"]["static"] == 12
    layer = notes["layers"]["layers.1.ffn.output"]
    assert layer["reason"].endswith("within budget") and 0.9 < layer["sensitivity"]["static"]["mean_cosine"] <= 1


def test_an_impossible_budget_ends_in_float_and_says_so(tiny_program):
    pass_ = select(min_mean_cosine=1.0, min_worst_cosine=1.0, candidates=("static", "float"))
    notes = pass_(calibrated(tiny_program)).notes
    assert not notes["met"] and notes["modes"] == {"static": 0, "float": 12} and len(notes["moves"]) == 12


def test_the_most_sensitive_layer_moves_first(tiny_program):
    program = calibrated(tiny_program)
    result = select(min_mean_cosine=1.0, min_worst_cosine=1.0, candidates=("static", "dynamic", "float"))(program)
    layers = result.notes["layers"]

    def drift(name):  # the pass ranks by the drift of mean plus worst cosine (same budget for both here)
        static = layers[name]["sensitivity"]["static"]
        return 2 - static["mean_cosine"] - static["worst_cosine"]

    first = result.notes["moves"][0].split(":")[0]
    assert result.notes["moves"][0].startswith(f"{first}: static -> ")
    assert drift(first) >= max(drift(n) for n in layers) - 2e-6  # notes round to 6 digits
    assert layers[first]["mode"] == "float"
    assert "was the most sensitive layer left over budget" in layers[first]["reason"]


def test_static_candidate_needs_calibrated_inputs(tiny_program):
    with pytest.raises(PreconditionError, match="mode = \"static\""):
        select()(calibrated(tiny_program, mode="dynamic"))


def test_gptq_rounding_is_exact_under_the_spec_and_beats_round_to_nearest(tiny_program):
    program = calibrated(tiny_program, mode="weight-only", weight_bits=4, weight_scheme="asymmetric", block_size=32)
    pass_ = registry.passes.get("round-weights")(batches=1, batch_size=8)
    result = pass_(program)
    for name, spec in get_specs(result.program).items():
        weight = result.program.ir.get_submodule(name).weight.detach()
        torch.testing.assert_close(dequantize(quantize(weight, spec.weight), spec.weight), weight, rtol=0, atol=1e-6)
    ratios = [layer["ratio"] for layer in result.notes["layers"].values()]
    assert len(ratios) == 12 and sum(ratios) / len(ratios) < 0.9
