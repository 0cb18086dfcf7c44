"""qat: straight-through and LSQ gradients, learned scales, drift won back, and an export that runs in ORT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt import registry
from graphopt.data import load_sentences
from graphopt.errors import PreconditionError
from graphopt.onnx_runtime import run_onnx_model
from graphopt.program import Program
from graphopt.quantization import (
    QuantSpec,
    TensorQuant,
    get_specs,
    qparams,
    swap_fake_quant,
    weight_format,
)
from graphopt.quantization.qat import QatLinear, lsq_fake_quantize
from graphopt.testing import op_types


def calibrate(**options):
    return registry.passes.get("calibrate")(batches=2, batch_size=8, **options)


def qat(**options):
    defaults = {"steps": 50, "batch_size": 8, "max_length": 32, "warmup_steps": 5,
                "data": ("sentences",), "evaluate": False}
    return registry.passes.get("qat")(**{**defaults, **options})


def test_straight_through_and_lsq_gradients_by_hand() -> None:
    # scale 0.5, zero 0, codes in [-2, 2]: the representable range is [-1, 1].
    x = torch.tensor([-2.0, -0.4, 0.3, 0.74, 1.6], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    y = lsq_fake_quantize(x, scale, torch.tensor(0.0), -2, 2)
    y.sum().backward()
    assert y.tolist() == pytest.approx([-1.0, -0.5, 0.5, 0.5, 1.0])
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # passes inside the range, stops outside
    # d/ds: the clamped code outside (-2, +2), round(x/s) - x/s inside: (-1 + 0.8) + (1 - 0.6) + (1 - 1.48).
    assert scale.grad.item() == pytest.approx(-2 + (-1 + 0.8) + (1 - 0.6) + (1 - 1.48) + 2)
    # Forward and the x-gradient are those of torch's own fake-quant op.
    x2 = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(x2, 0.5, 0, -2, 2).sum().backward()
    assert torch.equal(x2.grad, x.grad)


def test_qat_linear_learns_per_block_scales_that_stay_positive() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8)
    tq = weight_format(4, "asymmetric", "per-block", 32)
    blocks = linear.weight.detach().reshape(8, 2, 32)
    tq = tq.with_params(*qparams(blocks.amin(-1), blocks.amax(-1), tq))
    layer = QatLinear(linear, QuantSpec("weight-only", "linear", (8, 64), weight=tq), learn_scales=True)
    optimizer = torch.optim.SGD([layer.weight_quant.log_scale], lr=50.0)  # a step far too large on purpose
    x = torch.randn(16, 64)
    for _ in range(5):
        loss = (layer(x) - 3 * linear(x).detach()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = layer.spec_after().weight
    assert after.scale.shape == tq.scale.shape and (after.scale > 0).all()
    assert not np.allclose(after.scale, tq.scale)
    assert (after.zero_point == tq.zero_point).all()


def test_observing_static_input_follows_the_batches_then_freezes() -> None:
    linear = torch.nn.Linear(4, 2)
    u8 = TensorQuant(8, False, "asymmetric", "per-tensor")
    spec = QuantSpec("static", "linear", (2, 4), weight=weight_format(8).with_params(
        *qparams(linear.weight.detach().amin(1), linear.weight.detach().amax(1), weight_format(8))),
        input=u8.with_params(*qparams(-1.0, 1.0, u8)))
    layer = QatLinear(linear, spec, learn_scales=False).train()
    layer.observing = True
    layer(torch.full((3, 4), 2.0) * torch.tensor([-1.0, 1.0, 1.0, 1.0]))  # range [-2, 2]
    observed = float(layer.spec_after().input.scale)
    assert observed > float(spec.input.scale)  # 0.1 of the way from [-1, 1] to [-2, 2]
    layer.observing = False
    layer(torch.full((3, 4), 100.0))
    assert float(layer.spec_after().input.scale) == observed


@pytest.fixture(scope="module")
def ptq_program(tiny_bundle) -> Program:
    """The tiny encoder with a coarse PTQ spec: 4-bit weights in blocks of 32, where QAT has the most to win."""
    program = graphopt.trace(tiny_bundle)
    return calibrate(mode="weight-only", weight_bits=4, weight_scheme="asymmetric", block_size=32)(program).program


def _relative_error(module: torch.nn.Module, specs, float_model: torch.nn.Module, tokenizer) -> float:
    """Mean squared difference of the fake-quantized module's held-out embeddings from the float
    model's, over their mean square (evaluation sentences only; the tiny random encoder's cosines
    all sit near 1, so they would hide the drift)."""
    batch = tokenizer(list(load_sentences("heldout"))[:64], max_length=64)
    with torch.no_grad(), swap_fake_quant(module, specs):
        got = module(**batch)
        want = float_model(**batch)
    return float(((got - want) ** 2).mean() / (want**2).mean())


def test_qat_reduces_the_ptq_drift_by_a_third_in_50_steps(ptq_program: Program, tiny_bundle) -> None:
    float_model = graphopt.trace(tiny_bundle).ir
    before = _relative_error(ptq_program.ir, get_specs(ptq_program), float_model, ptq_program.tokenizer)
    result = qat()(ptq_program.clone())
    after_specs = get_specs(result.program)
    after = _relative_error(result.program.ir, after_specs, float_model, ptq_program.tokenizer)
    assert before > 1e-6, "the PTQ model must drift for this test to mean anything"
    assert after <= before * 2 / 3, (before, after)
    assert result.notes["scale_change"]["median"] > 0  # learned scales moved
    assert all((s.weight.scale > 0).all() for s in after_specs.values())
    # Every spec kept its mode and format; the module is plain nn.Linear again.
    for name, spec in get_specs(ptq_program).items():
        assert after_specs[name].mode == spec.mode and after_specs[name].weight.describe() == spec.weight.describe()
        assert type(result.program.ir.get_submodule(name)) is torch.nn.Linear


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_qat_model_exports_and_ort_matches_the_fake_quant_module(tiny_bundle, mode: str) -> None:
    extra = {"block_size": 32, "weight_bits": 4, "weight_scheme": "asymmetric"} if mode == "weight-only" else {}
    program = calibrate(mode=mode, **extra)(graphopt.trace(tiny_bundle)).program
    trained = qat(steps=10)(program).program
    specs = get_specs(trained)
    with swap_fake_quant(trained.ir, specs):
        fake = trained.run()[0]
    passes = [registry.passes.get("export")(),
              registry.passes.get("ort-fusions")(pack_qkv=False, embed_layer_norm=False),
              registry.passes.get("quantize")()]
    onnx_program = graphopt.Pipeline(passes, measure=False).run(trained)
    if mode == "static":  # Q, K and V learned one shared input scale: still one QuantizeLinear per input
        assert op_types(onnx_program)["QuantizeLinear"] == 8
    got = run_onnx_model(onnx_program.ir, trained.example_inputs, optimization="all")[0]
    # ORT's integer kernels reproduce the trained fake-quant module: their difference is a small
    # fraction of what quantization itself changes (at most about one code step per layer).
    float_out = trained.run()[0]
    assert np.abs(got - fake).max() < 0.05 * np.abs(fake - float_out).max(), (
        np.abs(got - fake).max(), np.abs(fake - float_out).max())


def test_qat_without_a_spec_says_to_calibrate_first(tiny_program: Program) -> None:
    with pytest.raises(PreconditionError, match="put 'calibrate'"):
        graphopt.Pipeline([qat()]).run(tiny_program)


def test_qat_options_are_checked() -> None:
    with pytest.raises(ValueError, match="observe_steps"):
        qat(steps=10, observe_steps=20)
    with pytest.raises(ValueError, match="scale_lr"):
        qat(scale_lr=0)

