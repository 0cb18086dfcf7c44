"""quantize: the spec becomes the patterns ONNX Runtime runs as integer kernels, matching the fake-quant module."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

import graphopt
from graphopt import registry
from graphopt.errors import PassError, PreconditionError
from graphopt.onnx_runtime import create_session, run_onnx_model, session_options
from graphopt.program import Program
from graphopt.quantization import get_specs, swap_fake_quant
from graphopt.testing import assert_rewrite


pytestmark = pytest.mark.usefixtures("one_thread")


def ort_runs(program: Program, tmp_path, name: str = "optimized.onnx") -> collections.Counter[str]:
    """Op types in the graph ONNX Runtime actually runs (its optimized_model_filepath)."""
    path = tmp_path / name
    create_session(ir.to_proto(program.ir).SerializeToString(), session_options(optimized_model_path=str(path)))
    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.node)


@pytest.fixture(scope="module")
def _fused_tiny(_tiny_onnx: Program) -> Program:
    fusions = registry.passes.get("ort-fusions")(pack_qkv=False, embed_layer_norm=False)
    return fusions(_tiny_onnx.clone()).program


def annotated(fused: Program, module_program: Program, **calibrate_options) -> Program:
    """The fused ONNX program carrying the specs calibrate writes on the (unchanged) module program."""
    calibrated = registry.passes.get("calibrate")(batches=2, batch_size=8, **calibrate_options)(module_program).program
    return dataclasses.replace(fused.clone(), annotations=calibrated.annotations)


def quantize(**options):
    return registry.passes.get("quantize")(**options)


CASES = {
    "dynamic": ({"mode": "dynamic"}, {}, {"MatMulInteger": 12, "DynamicQuantizeLinear": 8},
                {"com.microsoft::MatMulIntegerToFloat", "com.microsoft::DynamicQuantizeMatMul"}, 25.0),
    "static": ({"mode": "static"}, {}, {"QuantizeLinear": 8, "DequantizeLinear": 20},
               {"com.microsoft::MatMulIntegerToFloat"}, 25.0),
    "int8-weight-only": ({"mode": "weight-only", "block_size": 32}, {}, {"com.microsoft::MatMulNBits": 12},
                         {"com.microsoft::MatMulNBits"}, 30.0),
    "int4-weight-only": ({"mode": "weight-only", "weight_bits": 4, "weight_scheme": "asymmetric", "block_size": 32},
                         {}, {"com.microsoft::MatMulNBits": 12}, {"com.microsoft::MatMulNBits"}, 15.0),
    "int4-dequantize": ({"mode": "weight-only", "weight_bits": 4, "weight_scheme": "asymmetric", "block_size": 32},
                        {"weight_only_format": "dequantize"}, {"DequantizeLinear": 12},
                        {"com.microsoft::MatMulNBits"}, 15.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mode_lowers_to_the_integer_kernels_ort_runs(case, _fused_tiny, tiny_program, tmp_path):
    calibrate_options, options, written, kernels, floor = CASES[case]
    program = annotated(_fused_tiny, tiny_program, embeddings=("*word_embeddings",), **calibrate_options)
    written = {**written, "com.microsoft::GatherBlockQuantized": 1}
    after = assert_rewrite(quantize(**options), program, expect_ops=written,
                           absent_ops=["MatMul"] if case != "static" and case != "int4-dequantize" else [],
                           sqnr_floor=floor)
    runs = ort_runs(after, tmp_path)
    assert kernels <= set(runs), f"{case}: ORT runs {dict(runs)}"
    # Every projection reaches an integer kernel: no float MatMul/Gemm is left reading a weight.
    assert runs["MatMul"] == 0 and runs["Gemm"] == 0 and runs["com.microsoft::FusedMatMul"] == 0, dict(runs)
    assert runs["com.microsoft::GatherBlockQuantized"] == 1
    assert after.parameter_bytes() < 0.5 * program.parameter_bytes()


def test_accuracy_level_is_written_into_matmulnbits(_fused_tiny, tiny_program):
    program = annotated(_fused_tiny, tiny_program, mode="weight-only", block_size=32)
    after = quantize(accuracy_level=1)(program).program
    levels = {n.attributes.get_int("accuracy_level") for n in after.ir.graph if n.op_type == "MatMulNBits"}
    assert levels == {1}


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture(scope="module")
def one_linear() -> tuple[OneLinear, dict[str, torch.Tensor], Program]:
    """A single nn.Linear fed an outlier input (full-range s8 weights would overflow ORT's int16 pair
    sums on CPUs without VNNI), exported once."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64) * 2
    x[0, 0, 0] = 25.0
    model = OneLinear()
    exported = graphopt.Pipeline([registry.passes.get("export")()], measure=False).run(graphopt.trace(model, {"x": x}))
    return model, {"x": x}, exported


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_materialised_onnx_matches_the_fake_quant_module_within_one_step(mode, one_linear):
    model, inputs, exported = one_linear
    module_program = graphopt.trace(model, inputs)
    program = quantize()(annotated(exported, module_program, mode=mode)).program
    spec = get_specs(program)["fc"]
    with swap_fake_quant(module_program.ir, {"fc": spec}):
        fake = module_program.run()[0]
    got = run_onnx_model(program.ir, inputs, optimization="all")[0]  # the integer kernels
    x = inputs["x"]
    x_scale = float(spec.input.scale) if mode == "static" else (x.max() - x.min()).item() / 255
    w_max = float(np.abs(spec.weight.scale).max()) * spec.weight.qmax
    step = x_scale * w_max  # what one input code more or less changes in one output
    assert np.abs(got - fake).max() <= step
    assert np.abs(got - fake).max() < 0.01 * np.abs(fake - module_program.reference_output[0]).max()


def test_packed_attention_is_refused_with_the_fix(_tiny_onnx, tiny_program):
    packed = registry.passes.get("ort-fusions")()(_tiny_onnx.clone()).program
    program = annotated(packed, tiny_program, mode="dynamic", include=("*.query",))
    with pytest.raises(PassError, match="pack_qkv = false"):
        quantize()(program)


def test_without_a_spec_the_pass_says_to_calibrate(_fused_tiny):
    with pytest.raises(PreconditionError, match="put 'calibrate'"):
        quantize()(_fused_tiny.clone())


def test_float_layers_can_store_fp16_weights_that_ort_folds(_fused_tiny, tiny_program, tmp_path):
    program = annotated(_fused_tiny, tiny_program, mode="static")
    program.annotations = {n: {"quant": f["quant"].replace(mode="float")} for n, f in program.annotations.items()}
    after = assert_rewrite(quantize(float_weights="fp16"), program, expect_ops={"Cast": 13}, atol=1e-4)
    linear_bytes = 2 * (4 * 64 * 64 + 2 * 64 * 128) * 4  # 2 layers of fp32 projections
    assert program.parameter_bytes() - after.parameter_bytes() == linear_bytes // 2
    runs = ort_runs(after, tmp_path)
    assert runs["MatMul"] == 12 and runs["Cast"] == 1  # the weight casts are folded at load; the mask cast stays


def test_smoothed_layers_get_a_shared_mul_and_still_run_integer_kernels(_fused_tiny, tiny_program, tmp_path):
    program = annotated(_fused_tiny, tiny_program, mode="static", smoothing=0.5,
                        smooth=("*.query", "*.key", "*.value", "*.intermediate"))
    # 2 Muls of the graph itself + one per smoothed input: Q/K/V share one, the intermediate has one.
    after = assert_rewrite(quantize(), program, expect_ops={"Mul": 2 + 4, "QuantizeLinear": 8}, sqnr_floor=25.0)
    runs = ort_runs(after, tmp_path)
    assert runs["com.microsoft::MatMulIntegerToFloat"] == 12 and runs["MatMul"] == 0
    specs = get_specs(after)
    with swap_fake_quant(tiny_program.ir, specs):
        fake = tiny_program.run()[0]
    got = run_onnx_model(after.ir, tiny_program.example_inputs, optimization="all")[0]
    assert np.abs(got - fake).max() < 0.05 * np.abs(fake - tiny_program.reference_output[0]).max()


@pytest.mark.slow
def test_minilm_int8_static_end_to_end(minilm_bundle, minilm_onnx, tmp_path):
    """The real model: calibrated static int8 runs integer kernels in a stock ORT and keeps the embeddings."""
    from graphopt.data import load_sentences
    from graphopt.evaluate import embed, evaluate_embeddings

    module_program = graphopt.trace(minilm_bundle)
    fused = registry.passes.get("ort-fusions")(pack_qkv=False, embed_layer_norm=False)(minilm_onnx.clone()).program
    program = annotated(fused, module_program, mode="static", embeddings=("embeddings.word_embeddings",))
    program = quantize()(program).program
    runs = ort_runs(program, tmp_path)
    assert runs["com.microsoft::MatMulIntegerToFloat"] == 36 and runs["MatMul"] == 0
    path = tmp_path / "model.onnx"
    ir.save(program.ir, path)
    assert path.stat().st_size < 0.3 * 90e6
    session = create_session(str(path), session_options(threads=1))
    sentences = load_sentences("heldout")[:32]
    reference = embed(lambda **kw: minilm_bundle.module(**kw), minilm_bundle.tokenizer, sentences)
    candidate = embed(lambda **kw: session.run(None, {k: v.numpy() for k, v in kw.items()})[0],
                      minilm_bundle.tokenizer, sentences)
    assert evaluate_embeddings(candidate, reference).mean_cosine > 0.985
