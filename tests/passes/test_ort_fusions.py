"""ort-fusions: op types after the pass, validity, ORT numerics against the unfused graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import registry
from graphopt.onnx_runtime import run_onnx_model
from graphopt.passes.ort_fusion_rules import shape_hoist_rules
from graphopt.program import Program
from graphopt.recipe import Recipe, load_recipe
from graphopt.testing import assert_rewrite, op_types
from graphopt.trace import synthesize_inputs

FUSIONS = registry.passes.get("ort-fusions")
MS = "com.microsoft::"

#: The tiny encoder (2 layers) after the default pass: the whole op list, so any change shows.
TINY_FUSED = {
    f"{MS}EmbedLayerNormalization": 1, f"{MS}SkipLayerNormalization": 4, f"{MS}Attention": 2,
    f"{MS}BiasGelu": 2, "MatMul": 6, "Cast": 3, "Shape": 3, "Expand": 3, "Concat": 2, "Unsqueeze": 2,
    "Sub": 1, "Mul": 2, "ReduceSum": 2, "Clip": 2, "Div": 2, "ReduceL2": 1,
}
UNFUSED = ["LayerNormalization", "Softmax", "Gelu", "Transpose", "Reshape", "Gather"]


def _program(model: ir.Model) -> Program:
    inputs = synthesize_inputs(model)
    return Program("onnx", model, inputs, run_onnx_model(model, inputs), tuple(v.name for v in model.graph.outputs))


def test_default_fuses_every_family(tiny_onnx_program: Program) -> None:
    after = assert_rewrite(FUSIONS(), tiny_onnx_program, absent_ops=UNFUSED, atol=2e-6)
    assert dict(op_types(after)) == TINY_FUSED
    for value in after.ir.graph.inputs:  # dynamic axes survive, by name
        assert [str(d) for d in value.shape] == ["batch", "sequence"]


@pytest.mark.parametrize(("option", "present", "absent"), [
    ("attention", {"Softmax": 2, f"{MS}SkipLayerNormalization": 4}, [f"{MS}Attention", f"{MS}MultiHeadAttention"]),
    ("pack_qkv", {f"{MS}MultiHeadAttention": 2, "MatMul": 12}, [f"{MS}Attention"]),
    ("embed_layer_norm", {f"{MS}SkipLayerNormalization": 5, "Gather": 3}, [f"{MS}EmbedLayerNormalization"]),
    ("layer_norm", {"LayerNormalization": 4, f"{MS}EmbedLayerNormalization": 1}, [f"{MS}SkipLayerNormalization"]),
    ("gelu", {"Gelu": 2, f"{MS}Attention": 2}, [f"{MS}BiasGelu"]),
])
def test_each_family_can_be_turned_off(tiny_onnx_program: Program, option: str, present: dict[str, int],
                                       absent: list[str]) -> None:
    assert_rewrite(FUSIONS(**{option: False}), tiny_onnx_program, expect_ops=present, absent_ops=absent, atol=2e-6)


def test_fused_graph_keeps_dynamic_batch_and_sequence(tiny_onnx_program: Program) -> None:
    fused = FUSIONS()(tiny_onnx_program.clone()).program
    for batch, sequence in ((1, 16), (8, 128), (1, 128), (8, 16)):
        inputs = synthesize_inputs(tiny_onnx_program.ir, batch=batch, sequence=sequence)
        inputs["attention_mask"][0, sequence // 2:] = 0  # padding exercises the mask path
        want = run_onnx_model(tiny_onnx_program.ir, inputs)
        for level in ("disabled", "all"):  # ORT's own optimizer on top must not break the contrib ops
            got = run_onnx_model(fused.ir, inputs, optimization=level)
            np.testing.assert_allclose(got[0], want[0], rtol=0, atol=2e-6, err_msg=f"batch {batch} seq {sequence} {level}")


@pytest.mark.slow
def test_minilm_counts_and_numerics(minilm_onnx: Program) -> None:
    nodes = len(minilm_onnx.ir.graph)
    after = assert_rewrite(FUSIONS(), minilm_onnx, absent_ops=UNFUSED, atol=1e-5, expect_ops={
        f"{MS}Attention": 6, f"{MS}SkipLayerNormalization": 12, f"{MS}BiasGelu": 6,
        f"{MS}EmbedLayerNormalization": 1})
    assert nodes > 250 and len(after.ir.graph) <= 70
    for batch, sequence in ((1, 128), (8, 128)):
        inputs = synthesize_inputs(minilm_onnx.ir, batch=batch, sequence=sequence)
        inputs["attention_mask"][-1, 100:] = 0
        np.testing.assert_allclose(run_onnx_model(after.ir, inputs, "all")[0],
                                   run_onnx_model(minilm_onnx.ir, inputs)[0], rtol=0, atol=1e-5)


def _embedding_model(positions: str) -> ir.Model:
    """LayerNorm(word[ids] + pos[positions] + type[zeros]), as our BertEncoder exports it."""
    rng = np.random.default_rng(0)
    tensors = {"W": rng.standard_normal((100, 8)), "P": rng.standard_normal((20, 8)), "T": rng.standard_normal((2, 8)),
               "gamma": rng.standard_normal(8), "beta": rng.standard_normal(8)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()]
    inits += [numpy_helper.from_array(np.arange(20, dtype=np.int64)[None], "arange"),
              numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array(0, np.int64), "zero_scalar")]
    nodes = [helper.make_node("Shape", ["input_ids"], ["seq"], start=1, end=2),
             helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
             helper.make_node("Expand", ["zero_scalar", "ids_shape"], ["segments"]),
             helper.make_node("Gather", ["W", "input_ids"], ["word"]),
             helper.make_node("Gather", ["P", "positions"], ["position"]),
             helper.make_node("Gather", ["T", "segments"], ["segment"]),
             helper.make_node("Add", ["word", "position"], ["sum1"]), helper.make_node("Add", ["sum1", "segment"], ["sum2"]),
             helper.make_node("LayerNormalization", ["sum2", "gamma", "beta"], ["hidden"], axis=-1, epsilon=1e-12)]
    graph_inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    if positions == "arange":
        nodes.insert(2, helper.make_node("Slice", ["arange", "zero", "seq", "one", "one"], ["positions"]))
    else:  # positions fed by the caller: EmbedLayerNormalization cannot take them as computed
        graph_inputs.append(helper.make_tensor_value_info("positions", TensorProto.INT64, ["batch", "sequence"]))
    graph = helper.make_graph(nodes, "embeddings", graph_inputs,
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", 8])], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_embed_layer_norm_rule() -> None:
    program = _program(_embedding_model("arange"))
    after = assert_rewrite(FUSIONS(), program, atol=2e-6, absent_ops=["Gather", "LayerNormalization"],
                           expect_ops={f"{MS}EmbedLayerNormalization": 1})
    inputs = synthesize_inputs(after.ir, batch=3, sequence=20)  # the longest the position table allows
    np.testing.assert_allclose(run_onnx_model(after.ir, inputs)[0], run_onnx_model(program.ir, inputs)[0], atol=2e-6)


def test_embed_layer_norm_rule_refuses_positions_it_cannot_compute() -> None:
    program = _program(_embedding_model("input"))
    program.example_inputs["positions"] = program.example_inputs["positions"] % 20
    program.reference_output = run_onnx_model(program.ir, program.example_inputs)
    assert_rewrite(FUSIONS(), program, absent_ops=[f"{MS}EmbedLayerNormalization"], atol=2e-6,
                   expect_ops={f"{MS}SkipLayerNormalization": 1})


def test_shape_hoist_rule_frees_the_projection() -> None:
    model = ir.from_onnx_text("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[batch, sequence, 4] x) => (float[batch, sequence, 4] y, int64[1] s) {
            w = Constant <value = float[4, 4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> ()
            b = Constant <value = float[4] {1, 2, 3, 4}> ()
            m = MatMul (x, w)
            y = Add (m, b)
            s = Shape <start = 1, end = 2> (y)
        }""")
    common_passes.ShapeInferencePass()(model)
    assert shape_hoist_rules().apply_to_model(model) == 1
    shape = next(n for n in model.graph if n.op_type == "Shape")
    assert shape.inputs[0].name == "x" and shape.attributes.get_int("end") == 2
    y_value = next(v for v in model.graph.outputs if v.name == "y")
    assert len(y_value.uses()) == 0  # y now only feeds the graph output


def test_fp32_recipe_runs_fusions_and_each_can_be_turned_off() -> None:
    names = [p.name for p in load_recipe("fp32").pipeline]
    assert names == ["export", "ort-fusions"]
    recipe = Recipe.from_dict({"model": "minilm", "pipeline": [
        {"pass": "export"}, {"pass": "ort-fusions", "attention": False, "embed_layer_norm": False}]})
    fusions = recipe.passes()[1]
    assert not fusions.options.attention and not fusions.options.embed_layer_norm and fusions.options.gelu
