"""calibrate: one QuantSpec per selected layer, the module untouched, calibration data only."""

from __future__ import annotations

import pytest
import torch

from graphopt import registry
from graphopt.data import load_sentences, split_of
from graphopt.errors import PassError, RecipeError
from graphopt.quantization import QuantSpec, get_specs
from graphopt.recipe import Recipe
from graphopt.testing import assert_rewrite


pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = 12  # tiny encoder: 2 layers × (query, key, value, output, intermediate, ffn output)


def calibrate(**options):
    return registry.passes.get("calibrate")(batches=2, batch_size=8, **options)


def test_static_calibration_writes_a_spec_per_linear_and_leaves_the_module_exact(tiny_program):
    after = assert_rewrite(calibrate(), tiny_program, atol=0.0)
    specs = get_specs(after)
    assert len(specs) == LINEARS
    spec = specs["layers.0.ffn.intermediate"]
    assert isinstance(spec, QuantSpec) and spec.mode == "static" and spec.weight_shape == (128, 64)
    assert spec.weight.describe() == "s8 (7-bit range) symmetric per-channel" and spec.weight.scale.shape == (128,)
    assert spec.input.describe() == "u8 asymmetric per-tensor" and spec.input.scale.shape == ()
    # The input scale covers what the layer saw: a LayerNorm output, so a few units either side.
    assert 1e-3 < float(spec.input.scale) < 0.2


def test_include_exclude_globs_and_embeddings(tiny_program):
    result = calibrate(mode="dynamic", include=("layers.0.*",), exclude=("*.key",),
                       embeddings=("embeddings.word_embeddings",), embedding_bits=4)(tiny_program)
    specs = get_specs(result.program)
    assert sorted(specs) == ["embeddings.word_embeddings", "layers.0.attention.output", "layers.0.attention.query",
                             "layers.0.attention.value", "layers.0.ffn.intermediate", "layers.0.ffn.output"]
    table = specs["embeddings.word_embeddings"]
    assert table.mode == "weight-only" and table.weight.describe() == "u4 asymmetric per-block(32)"
    assert table.weight.scale.shape == (1000, 2)
    assert specs["layers.0.ffn.output"].input.scale is None  # dynamic: the format only


def test_weight_only_int4_blocks(tiny_program):
    result = calibrate(mode="weight-only", weight_bits=4, weight_scheme="asymmetric", block_size=32)(tiny_program)
    spec = get_specs(result.program)["layers.1.ffn.output"]
    assert spec.input is None and spec.weight.describe() == "u4 asymmetric per-block(32)"
    assert spec.weight.scale.shape == (64, 4)  # [out 64, in 128 / 32]


def test_a_glob_that_matches_nothing_is_refused_naming_the_layers(tiny_program):
    with pytest.raises(PassError, match=r"include glob 'layers\.\*\.atention\.\*' matches no nn\.Linear layer; "
                                        r"the layers are: layers\.0\.attention\.query"):
        calibrate(include=("layers.*.atention.*",))(tiny_program)
    with pytest.raises(PassError, match="exclude glob 'nope' matches no"):
        calibrate(exclude=("nope",))(tiny_program)


@pytest.mark.parametrize("options, message", [
    ({"weight_bits": 3}, "weight_bits=3 is not supported; use one of (4, 8)"),
    ({"activation_observer": "histogramm"}, "unknown observer 'histogramm'"),
    ({"weight_bits": 4}, "4-bit weights run only weight-only"),
    ({"mode": "weight-only"}, "set block_size"),
    ({"mode": "weight-only", "block_size": 48}, "block_size=48: use a power of two >= 16"),
])
def test_a_bad_recipe_is_refused_with_a_clear_message(options, message):
    data = {"model": "tiny", "pipeline": [{"pass": "calibrate", **options}, {"pass": "export"}]}
    with pytest.raises(RecipeError) as error:
        Recipe.from_dict(data)
    assert message in str(error.value) and "pipeline[0]" in str(error.value)


class RecordingTokenizer:
    """Wraps a tokenizer and remembers every sentence it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, sentences, **kwargs):
        self.seen.extend(sentences)
        return self.inner(sentences, **kwargs)


def test_calibration_sees_only_calibration_sentences(tiny_program):
    tiny_program.tokenizer = RecordingTokenizer(tiny_program.tokenizer)
    progress = []
    pass_ = calibrate()
    pass_.progress = lambda done, total: progress.append((done, total))
    pass_(tiny_program)
    seen = tiny_program.tokenizer.seen
    assert len(seen) == 16 and {split_of(s) for s in seen} == {"calibration"}
    assert not set(seen) & set(load_sentences("heldout"))
    assert progress == [(1, 2), (2, 2)]


def test_held_out_data_is_refused(tiny_program, monkeypatch):
    import graphopt.quantization.calibration as calibration

    monkeypatch.setattr(calibration, "load_sentences", lambda split: load_sentences("heldout"))
    with pytest.raises(PassError, match="calibrate was given the heldout split"):
        calibrate()(tiny_program)


def test_padding_is_not_observed():
    """capture_inputs hands the observer only the positions the attention mask marks as real."""
    import torch

    from graphopt.quantization import capture_inputs

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.ones(2, 3, 4)
    x[1, 2] = 1000.0  # a padded position with an extreme value
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    seen = []
    with capture_inputs(model, ["0"], lambda name, value: seen.append(value)) as set_mask:
        set_mask(mask)
        model(x)
    assert seen[0].shape == (5, 4) and float(seen[0].max()) == 1.0


def test_smoothing_shares_factors_between_layers_reading_one_tensor(tiny_program):
    result = calibrate(smoothing=0.5, smooth=("*.query", "*.key", "*.value", "*.intermediate"))(tiny_program)
    specs = get_specs(result.program)
    q, k, v = (specs[f"layers.0.attention.{n}"] for n in ("query", "key", "value"))
    assert q.smoothed and (q.smoothing == k.smoothing).all() and (q.smoothing == v.smoothing).all()
    assert specs["layers.0.ffn.intermediate"].smoothed and specs["layers.0.ffn.output"].smoothing is None
    assert not (q.smoothing == specs["layers.0.ffn.intermediate"].smoothing).all()
    # The weight's scales are those of W · diag(s): row amax over 63 (7-bit range).
    weight = result.program.ir.get_submodule("layers.0.ffn.intermediate").weight.detach()
    scaled = weight * torch.from_numpy(specs["layers.0.ffn.intermediate"].smoothing)
    torch.testing.assert_close(torch.from_numpy(specs["layers.0.ffn.intermediate"].weight.scale),
                               scaled.abs().amax(1) / 63)
    assert result.notes["smoothed"] == [n for n in specs if n.endswith(("query", "key", "value", "intermediate"))]


def test_smoothing_is_refused_for_weight_only():
    with pytest.raises(RecipeError, match="not weight-only ones"):
        Recipe.from_dict({"model": "tiny", "pipeline": [{"pass": "calibrate", "mode": "weight-only", "block_size": 32,
                                                          "smoothing": 0.5}, {"pass": "export"}]})
