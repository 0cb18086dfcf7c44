"""Fuse transformer subgraphs into ONNX Runtime's com.microsoft kernels.

Before -> after (kind ``onnx`` -> ``onnx``), each family on by default and switchable:

* ``embed_layer_norm``: LayerNorm(Gather(W, ids) + Gather(P, arange) + Gather(T, seg))
  -> ``EmbedLayerNormalization``
* ``layer_norm``: LayerNorm(x + skip [+ bias]) -> ``SkipLayerNormalization`` (and the RMS forms)
* ``attention``: MatMul·Reshape·Transpose·Softmax chains -> ``MultiHeadAttention``, and with
  ``pack_qkv`` the three projections -> one ``Attention`` with a packed [D, 3D] weight
* ``gelu``: erf/tanh Gelu -> ``Gelu``/``FastGelu``, Add(bias) + Gelu -> ``BiasGelu``
* ``fused_matmul``: Transpose/scale into MatMul -> ``FusedMatMul`` (with onnxscript's other
  ORT pattern rules: fp16 softmax upcast, instance -> group norm)

The fusions are onnxscript's ``ort_fusions`` run in ``optimize_for_ort``'s order, plus
``ort_fusion_rules`` where onnxscript falls short on our exports (embedding layer norm; the
``Shape`` use that kept MultiHeadAttention from becoming Attention). Measured on MiniLM:
268 -> 66 nodes (EmbedLayerNormalization 1, SkipLayerNormalization 12, Attention 6,
BiasGelu 6), max diff 2e-7 against the unfused graph.

Invariant: exact within ``tolerance`` (fp32 summation order only). Graph inputs and outputs
keep their names, dtypes and dims (dynamic ``batch``/``sequence`` stay dynamic); checked
after the rewrite. The result needs ONNX Runtime (com.microsoft ops), no other runtime.

Constant folding (onnxscript's optimizer, run between the fusions) is capped: a node whose
result would exceed ``FOLD_OUTPUT_LIMIT`` elements and be larger than its inputs is left
unfolded, decided from its inferred shape *before* it is evaluated (see ``_fold_guard``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize_ir
from onnxscript.rewriter import pattern, rewrite
from onnxscript.rewriter.ort_fusions import (attention, bias_gelu, cos_sin_cache, erfgelu, fused_matmul_rule_sets,
                                             gelu, gqa, gqa_packed_qkv, instance_to_group_normalization, mha,
                                             mha_bias, mha_scale, rms_normalization, rotary_embedding, sdpa,
                                             sdpa_via_mha, shape_optimization, skip_normalization, softmax)
from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

from graphopt.errors import PassError
from graphopt.pass_base import Pass, PassResult
from graphopt.passes.ort_fusion_rules import embed_layer_norm_rules, flat_attention_output_rules, shape_hoist_rules
from graphopt.program import Program

__all__ = ["OrtFusionsPass"]

logger = logging.getLogger(__name__)

# Constant-folding caps, in elements. onnxscript evaluates a foldable node in numpy first and
# checks the result's size after, so a hostile file (Expand, Tile or ConstantOfShape of a
# one-element constant to 2**28 elements) would allocate gigabytes before being refused.
# Both limits are onnxscript's defaults made explicit; FOLD_OUTPUT_LIMIT is also enforced
# before evaluation by ``_fold_guard``. A result larger than this that is no larger than the
# node's inputs (a transposed weight) may still fold: it creates no new memory.
FOLD_INPUT_LIMIT = 8192
FOLD_OUTPUT_LIMIT = 512 * 512
# Ops whose result can be far larger than their inputs. Their result size is computed from
# the constant inputs themselves (a file's declared shapes may lie); where it cannot be, the
# node is not folded.
_GROWING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                          "CenterCropPad"})
_BROADCASTING_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Sum", "Max", "Min", "Mean", "Where",
                               "And", "Or", "Xor", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
                               "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "PRelu"})


@dataclasses.dataclass(frozen=True)
class FusionOptions:
    """Args: each flag turns one fusion family on or off (see the module docstring).
    pack_qkv: with ``attention``, pack Q/K/V into one ``Attention`` (else ``MultiHeadAttention``
    keeps three MatMuls, which a later per-layer quantization pass may want)."""

    embed_layer_norm: bool = True
    layer_norm: bool = True
    attention: bool = True
    pack_qkv: bool = True
    gelu: bool = True
    fused_matmul: bool = True


Interface = tuple[list[tuple[str, str, list[str]]], list[tuple[str, str, list[str]]]]


def _interface(model: ir.Model) -> Interface:
    """(name, dtype, dims) of every graph input and output."""
    def row(v: ir.Value) -> tuple[str, str, list[str]]:
        return v.name, str(v.dtype), [str(d) for d in (v.shape or [])]
    return [row(v) for v in model.graph.inputs], [row(v) for v in model.graph.outputs]


def _interface_change(before: Interface, model: ir.Model) -> str | None:
    """Why the graph's interface changed, or None. Inputs stay identical; outputs keep names,
    dtypes and rank, and every output dim that was static or named like an input dim stays so
    (shape inference may still refine other dims, e.g. an unnamed hidden size to 64)."""
    inputs, outputs = _interface(model)
    if inputs != before[0]:
        return f"inputs {before[0]} became {inputs}"
    input_dims = {d for _, _, dims in inputs for d in dims if not d.isdigit()}
    for (name, dtype, dims), (new_name, new_dtype, new_dims) in zip(before[1], outputs):
        if (name, dtype, len(dims)) != (new_name, new_dtype, len(new_dims)):
            return f"output {name!r} {dtype}{dims} became {new_name!r} {new_dtype}{new_dims}"
        for i, (old, new) in enumerate(zip(dims, new_dims)):
            if (old.isdigit() or old in input_dims) and old != new:
                return f"output {name!r} dim {i} changed from {old} to {new}"
    return None if len(outputs) == len(before[1]) else f"{len(before[1])} outputs became {len(outputs)}"


class OrtFusionsPass(Pass):
    """Fuses attention, layer norms, GELU and embeddings into ONNX Runtime contrib ops."""

    name = "ort-fusions"
    kind_in = "onnx"
    kind_out = "onnx"
    exact = True
    # Measured ≤ 1e-6 on MiniLM and the tiny HF models (tests assert 2e-6 / 1e-5). The guard is
    # absolute and fused kernels reorder fp32 sums, so LM logits in the hundreds can move ~1e-5.
    tolerance = 1e-4
    Options = FusionOptions

    def call(self, program: Program) -> PassResult:
        model, o = program.ir, self.options
        before, nodes_before = _interface(model), len(model.graph)
        counts: dict[str, int] = {}

        def fuse(name: str, apply: Callable[[ir.Model], int]) -> None:
            counts[name] = counts.get(name, 0) + apply(model)

        rewrite(model, [_gemm_to_matmul_add.gemm_to_matmul_add_rule])
        common_passes.ShapeInferencePass()(model)
        _optimize(model)
        shape_optimization.rules.apply_to_model(model)
        _optimize(model)
        if o.embed_layer_norm:
            fuse("embed_layer_norm", embed_layer_norm_rules().apply_to_model)
        if o.gelu:
            fuse("erf_gelu", erfgelu.fuse_erfgelu)
        if o.layer_norm:
            fuse("rms_normalization", rms_normalization.fuse_rms_normalization)
            fuse("skip_layer_normalization", skip_normalization.fuse_skip_layer_normalization)
            fuse("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization)
        if o.attention:
            self._fuse_attention(model, fuse)
        if o.gelu:
            fuse("gelu", gelu.fuse_gelu)
            fuse("bias_gelu", bias_gelu.fuse_bias_gelu)
        _optimize(model)  # inlines any intermediate fusion function left unconsumed
        if o.fused_matmul:
            fuse("fused_matmul", pattern.RewriteRuleSet([
                *softmax.rules.rules, *instance_to_group_normalization.rules.rules,
                *fused_matmul_rule_sets.fused_matmul_rule_sets()]).apply_to_model)
        counts["packed_weights"] = _fold_weight_concats(model)
        common_passes.CommonSubexpressionEliminationPass()(model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
        common_passes.RemoveInitializersFromInputsPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.ShapeInferencePass()(model)
        if (changed := _interface_change(before, model)) is not None:
            raise PassError(f"pass {self.name!r} changed the graph's interface: {changed}")
        notes = {"fusions": {k: v for k, v in counts.items() if v}, "contrib_ops": _contrib_ops(model)}
        logger.info("ort-fusions: %d -> %d nodes, %s", nodes_before, len(model.graph), notes["fusions"])
        return PassResult(program, modified=len(model.graph) != nodes_before or bool(notes["fusions"]), notes=notes)

    def _fuse_attention(self, model: ir.Model, fuse: Callable[[str, Callable[[ir.Model], int]], None]) -> None:
        fuse("rotary_embedding", rotary_embedding.fuse_rotary_embedding)
        fuse("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache)
        common_passes.CommonSubexpressionEliminationPass()(model)
        fuse("partial_rotary_embedding", rotary_embedding.fuse_partial_rotary_embedding)
        # New nodes from some SDPA patterns need shapes for the MHA checks that follow.
        fuse("sdpa", lambda m: sdpa.fuse_sdpa(m, apply_shape_inference=True))
        fuse("gqa", gqa.fuse_gqa)
        fuse("packed_qkv_gqa", gqa_packed_qkv.fuse_qkv_gqa)
        fuse("flat_attention_output", flat_attention_output_rules().apply_to_model)
        fuse("mha", mha.fuse_mha1)
        fuse("mha", mha.fuse_mha2)
        fuse("mha_scale", mha_scale.fuse_mha_scale)
        # Frees the query projection from the mask broadcast's Shape (see ort_fusion_rules).
        fuse("shape_hoist", shape_hoist_rules().apply_to_model)
        common_passes.CommonSubexpressionEliminationPass()(model)
        fuse("mha_bias", mha_bias.fuse_mha_bias)
        if self.options.pack_qkv:
            fuse("attention", attention.fuse_attention)
        fuse("sdpa_via_mha", sdpa_via_mha.replace_sdpa_by_mha)


def _elements(value: ir.Value | None) -> int | None:
    """Elements of ``value`` from its static shape, or None when unknown."""
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape.dims):
        return None
    return math.prod(int(d) for d in value.shape.dims)


def _small_ints(value: ir.Value | None) -> list[int] | None:
    """The constant ``value``'s entries as Python ints if it is a small (shape-like) tensor, else None."""
    if value is None or value.const_value is None or value.const_value.size > 64:
        return None
    return [int(x) for x in value.const_value.numpy().reshape(-1)]


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def _computed_elements(node: ir.Node) -> int | None:
    """Elements of the result of a growing or broadcasting op, from its constant inputs (not from
    declared shapes, which a file may get wrong), or None when it cannot be told. Python ints, so
    a hostile shape cannot wrap around to a small number."""
    shapes = [tuple(int(d) for d in v.const_value.shape.dims) if v is not None and v.const_value is not None
              else None for v in node.inputs]
    try:
        if node.op_type in _BROADCASTING_OPS and shapes and all(s is not None for s in shapes):
            return math.prod(np.broadcast_shapes(*shapes))  # type: ignore[arg-type]
        if node.op_type == "ConstantOfShape" and (dims := _small_ints(node.inputs[0])) is not None:
            return math.prod(dims)
        if node.op_type == "Expand" and shapes[0] is not None and (dims := _small_ints(node.inputs[1])) is not None:
            return math.prod(np.broadcast_shapes(shapes[0], tuple(dims)))
        if node.op_type == "Tile" and shapes[0] is not None and (reps := _small_ints(node.inputs[1])) is not None:
            return math.prod(d * r for d, r in zip(shapes[0], reps)) if len(reps) == len(shapes[0]) else None
        if node.op_type == "Range" and len(node.inputs) == 3:
            start, limit, delta = (_scalar(v) for v in node.inputs)
            if start is not None and limit is not None and delta:
                return max(math.ceil((limit - start) / delta), 0)
    except (ValueError, TypeError, OverflowError, IndexError):
        return None
    return None


def _fold_guard(node: ir.Node) -> bool | None:
    """onnxscript's ``should_fold``: False (keep the node) when folding would allocate a result over
    ``FOLD_OUTPUT_LIMIT`` elements that is larger than the node's constant inputs, or when a growing
    op's result size cannot be told; None (onnxscript's own rules) otherwise. onnxscript calls it
    after the node's shape inference and before evaluating it, only for all-constant nodes."""
    standard = node.domain in ("", "ai.onnx")
    computed = _computed_elements(node) if standard else None
    if computed is None and standard and node.op_type in _GROWING_OPS:
        return False
    declared = [_elements(v) for v in node.outputs]
    output = max(computed or 0, sum(size or 0 for size in declared))
    inputs = sum(v.const_value.size for v in node.inputs if v is not None and v.const_value is not None)
    if output > FOLD_OUTPUT_LIMIT and output > inputs:
        logger.info("not folding %s %r: its result would have %d elements, its inputs %d",
                    node.op_type, node.name, output, inputs)
        return False
    return None


def _optimize(model: ir.Model) -> None:
    """onnxscript's ``optimize`` (folding, dead code, inlining) with graphopt's explicit folding caps."""
    optimize_ir(model, input_size_limit=FOLD_INPUT_LIMIT, output_size_limit=FOLD_OUTPUT_LIMIT,
                should_fold=_fold_guard)


def _fold_weight_concats(model: ir.Model) -> int:
    """Concat of constant initializers (the packed QKV weight) -> one initializer.

    onnxscript's constant folding stops at 256k elements, so the packed weight would stay a
    Concat that runs (or is folded by ORT) at every session start, and the file would keep
    three weights where ORT uses one.
    """
    folded = 0
    for node in list(model.graph):
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        inputs = list(node.inputs)
        # Only weights used here alone: folding a shared (tied) one would store it twice.
        if not inputs or any(v is None or v.const_value is None or not v.is_initializer() or len(v.uses()) != 1
                             for v in inputs):
            continue
        axis = node.attributes.get_int("axis", 0)
        array = np.concatenate([v.const_value.numpy() for v in inputs], axis=axis)
        output = node.outputs[0]
        if output.is_graph_output():
            continue
        packed = ir.Value(name=f"{output.name}_packed", shape=ir.Shape(array.shape), type=output.type,
                          const_value=ir.tensor(array, name=f"{output.name}_packed"))
        model.graph.register_initializer(packed)
        ir.convenience.replace_all_uses_with(output, packed)
        model.graph.remove(node, safe=True)
        folded += 1
    return folded


def _contrib_ops(model: ir.Model) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in model.graph:
        if node.domain == "com.microsoft":
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(sorted(ops.items()))
