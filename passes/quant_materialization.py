"""Materialise the quantization spec: float MatMul/Gather of each annotated layer -> integer kernels ORT runs.

Per layer mode (the layer found through the exporter's ``name_scopes`` metadata):

* dynamic: ``MatMul(x, W)`` -> ``DynamicQuantizeLinear(x)`` (shared by the layers that read
  ``x``) -> ``MatMulInteger(x_q, W_q[in, out] s8)`` -> ``Cast`` -> ``Mul(x_s · w_s[out])``;
  ORT runs ``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul``. *(measured, ORT 1.32: a
  weight-only ``DequantizeLinear(W_q, axis=1)`` into ``MatMul`` is turned into an 8-bit
  ``MatMulNBits`` instead, slower than fp32 at batch 8, so dynamic layers are written explicitly.)*
* static: ``MatMul(DQ(Q(x; s, zp)), DQ(W_q, w_s, axis=1))``, the Q/DQ of ``x`` shared; ORT
  runs ``QuantizeLinear`` + ``MatMulIntegerToFloat``. The output stays float: every consumer
  in a fused encoder (SkipLayerNormalization, MultiHeadAttention, BiasGelu) is a float kernel,
  and the bias the module's output includes is folded into those, not into the MatMul.
* smoothed static/dynamic layers (SmoothQuant factors ``s`` in the spec): ``Mul(x, 1/s)``
  (shared by the layers that read ``x``) before the quantization, and ``diag(s)·W`` quantized.
* weight-only: ``MatMulNBits`` (com.microsoft) with the ``accuracy_level`` of the recipe, or
  with ``weight_only_format = "dequantize"`` a blocked ``DequantizeLinear`` (opset 21) into the
  MatMul, which ORT fuses into ``MatMulNBits`` at the session's own accuracy level.
* embedding tables: ``Gather(table, ids)`` -> ``GatherBlockQuantized`` (8- or 4-bit rows).
* float layers, with ``float_weights = "fp16"``: the weight stored as fp16 behind a ``Cast``
  to fp32, which ORT folds into an fp32 initializer when the session loads: half the file
  bytes, fp32 compute.

Invariant: each rewritten layer computes what the module side's ``QuantLinear`` /
``QuantEmbedding`` computes for the same spec, up to float summation order (integer codes
are made by the same ``quantize``). Graph inputs and outputs are unchanged. Lossy: the drift
is the quantization error and is reported.

Preconditions: kind ``onnx``; the program carries ``QuantSpec`` annotations (``calibrate``
ran before ``export``); Q/K/V are separate MatMuls (``ort-fusions`` with ``pack_qkv = false``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt.errors import PassError, PreconditionError
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program
from graphopt.quantization import QuantSpec, get_specs
from graphopt.quantization.onnx_ops import (add_initializer, ensure_opset, find_gather, find_linear,
                                            integer_weight, name_scopes, pack_nbits, unsigned_codes)

__all__ = ["QuantMaterializationPass"]

logger = logging.getLogger(__name__)

MS = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """Args: accuracy_level: MatMulNBits compute type for weight-only layers (0 unset, 1 fp32,
    2 fp16, 3 bf16, 4 int8 activations). weight_only_format: write MatMulNBits, or a blocked
    DequantizeLinear that ORT fuses. float_weights: how float-mode layers store their weight
    (fp16 is cast to fp32 at load). require_all: refuse a spec whose layer is not in the graph."""

    accuracy_level: int = 4
    weight_only_format: Literal["matmulnbits", "dequantize"] = "matmulnbits"
    float_weights: Literal["fp32", "fp16"] = "fp32"
    require_all: bool = True

    def __post_init__(self) -> None:
        if self.accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")


class QuantMaterializationPass(Pass):
    """Writes each layer's ``QuantSpec`` into the ONNX graph as the pattern ORT runs as an integer kernel."""

    name = "quantize"
    kind_in = "onnx"
    kind_out = "onnx"
    exact = False
    tolerance = None
    Options = QuantizeOptions

    def requires(self, program: Program) -> None:
        if not get_specs(program):
            raise PreconditionError(f"pass {self.name!r}: the program carries no quantization spec; put 'calibrate' "
                                    "(kind module) before 'export' in the recipe")

    def call(self, program: Program) -> PassResult:
        graph = program.ir.graph
        shared: dict[tuple, tuple[ir.Value, ...]] = {}
        layers, missing = {}, []
        for name, spec in sorted(get_specs(program).items()):
            if spec.mode == "float" and self.options.float_weights == "fp32":
                layers[name] = {"mode": "float"}
                continue
            finder = find_gather if spec.kind == "embedding" else find_linear
            nodes = finder(graph, name, spec.weight_shape)
            if not nodes:
                missing.append(name)
                continue
            for node in nodes:
                op = self._lower(graph, node, spec, shared)
            layers[name] = {"mode": spec.mode, "op": op, "weight": spec.weight.describe() if spec.weight else None}
        if missing and self.options.require_all:
            raise PassError(self._missing_message(graph, missing, get_specs(program)))
        common_passes.RemoveUnusedNodesPass()(program.ir)
        common_passes.TopologicalSortPass()(program.ir)
        if any(n.domain == MS for n in graph):
            ensure_opset(program.ir, MS, 1)
        ensure_opset(program.ir, "", 21)
        ops = collections.Counter(v["op"] for v in layers.values() if "op" in v)
        notes = {"layers": layers, "ops": dict(ops), "missing": missing}
        logger.info("quantize: %s", dict(ops))
        return PassResult(program, modified=bool(ops), notes=notes)

    def _lower(self, graph: ir.Graph, node: ir.Node, spec: QuantSpec, shared: dict) -> str:
        if spec.mode == "float":
            return self._fp16_storage(graph, node)
        if spec.kind == "embedding":
            return self._gather(graph, node, spec)
        if spec.mode == "dynamic":
            return self._dynamic(graph, node, spec, shared)
        if spec.mode == "static":
            return self._static(graph, node, spec, shared)
        return self._weight_only(graph, node, spec)

    def _smoothed_input(self, graph: ir.Graph, node: ir.Node, spec: QuantSpec, shared: dict) -> ir.Value:
        """``x``, or ``Mul(x, 1/s)`` (shared) when the layer is smoothed."""
        x = node.inputs[0]
        if not spec.smoothed:
            return x
        key = ("smooth", x, spec.smoothing.tobytes())
        if key not in shared:
            inverse = add_initializer(graph, f"{x.name}_smoothing", (1.0 / spec.smoothing).astype(np.float32))
            mul = ir.node("Mul", [x, inverse], name=f"{x.name}_smooth")
            graph.insert_before(node, mul)
            shared[key] = (mul.outputs[0],)
        return shared[key][0]

    @staticmethod
    def _weight_codes(weight: ir.Value, spec: QuantSpec) -> np.ndarray:
        """The layer's integer weight ``[in, out]``, of ``diag(s)·W`` when smoothed."""
        onnx_weight = weight.const_value.numpy()
        if spec.smoothed:
            onnx_weight = onnx_weight * spec.smoothing[:, None]
        return integer_weight(onnx_weight, spec.weight).T

    def _dynamic(self, graph: ir.Graph, node: ir.Node, spec: QuantSpec, shared: dict) -> str:
        x, weight = self._smoothed_input(graph, node, spec, shared), node.inputs[1]
        tq = spec.weight
        if ("dynamic", x) not in shared:
            dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{x.name}_dynamic_quant")
            graph.insert_before(node, dql)
            shared[("dynamic", x)] = tuple(dql.outputs)
        x_q, x_scale, x_zero = shared[("dynamic", x)]
        codes = self._weight_codes(weight, spec)
        dtype = np.int8 if tq.signed else np.uint8
        w_q = add_initializer(graph, f"{weight.name}_quantized", codes.astype(dtype))
        w_zero = add_initializer(graph, f"{weight.name}_zero_point", tq.zero_point.reshape(-1).astype(dtype))
        w_scale = add_initializer(graph, f"{weight.name}_scale", tq.scale.reshape(-1))
        matmul = ir.node("MatMulInteger", [x_q, w_q, x_zero, w_zero], name=f"{node.name}_integer")
        cast = ir.node("Cast", [matmul.outputs[0]], attributes={"to": ir.DataType.FLOAT})
        scale = ir.node("Mul", [x_scale, w_scale])
        out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{node.name}_dequant")
        self._replace(graph, node, [matmul, cast, scale, out])
        return "MatMulInteger"

    def _static(self, graph: ir.Graph, node: ir.Node, spec: QuantSpec, shared: dict) -> str:
        x, weight = self._smoothed_input(graph, node, spec, shared), node.inputs[1]
        tq, xq = spec.weight, spec.input
        key = ("static", x, float(xq.scale), int(xq.zero_point), xq.signed)
        if key not in shared:
            # Layers reading one tensor share its quantization when their scales agree (calibration);
            # after QAT learned them apart, each distinct scale gets its own, distinctly named, pair.
            variant = sum(1 for k in shared if k[:2] == ("static", x))
            suffix = f"_{variant}" if variant else ""
            x_dtype = np.int8 if xq.signed else np.uint8
            s = add_initializer(graph, f"{x.name}_scale", xq.scale.reshape(()).astype(np.float32))
            z = add_initializer(graph, f"{x.name}_zero_point", xq.zero_point.reshape(()).astype(x_dtype))
            q = ir.node("QuantizeLinear", [x, s, z], name=f"{x.name}_quantize{suffix}")
            dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{x.name}_dequantize{suffix}")
            graph.insert_before(node, [q, dq])
            shared[key] = (dq.outputs[0],)
        codes = self._weight_codes(weight, spec)
        dtype = np.int8 if tq.signed else np.uint8
        w_q = add_initializer(graph, f"{weight.name}_quantized", codes.astype(dtype))
        w_scale = add_initializer(graph, f"{weight.name}_scale", tq.scale.reshape(-1))
        w_zero = add_initializer(graph, f"{weight.name}_zero_point", tq.zero_point.reshape(-1).astype(dtype))
        dq_w = ir.node("DequantizeLinear", [w_q, w_scale, w_zero], attributes={"axis": 1})
        matmul = ir.node("MatMul", [shared[key][0], dq_w.outputs[0]], name=node.name)
        self._replace(graph, node, [dq_w, matmul])
        return "QDQ MatMul"

    def _weight_only(self, graph: ir.Graph, node: ir.Node, spec: QuantSpec) -> str:
        x, weight = node.inputs[0], node.inputs[1]
        tq = spec.weight
        if tq.granularity != "per-block":
            raise PassError(f"layer {name_scopes(node)[-2:]}: weight-only layers need a per-block format "
                            f"(calibrate block_size), got {tq.describe()}")
        k, n = weight.shape
        block, blocks = tq.block_size, -(-k // tq.block_size)
        codes, zero = unsigned_codes(integer_weight(weight.const_value.numpy(), tq), tq.zero_point, tq)
        if self.options.weight_only_format == "dequantize":
            dtype = {4: ml_dtypes.uint4, 8: np.uint8}[tq.bits]
            w_q = add_initializer(graph, f"{weight.name}_quantized", ir.tensor(codes.T.astype(dtype)))
            z = add_initializer(graph, f"{weight.name}_zero_point", ir.tensor(zero.T.astype(dtype)))
            s = add_initializer(graph, f"{weight.name}_scale", np.ascontiguousarray(tq.scale.T))
            dq = ir.node("DequantizeLinear", [w_q, s, z], attributes={"axis": 0, "block_size": block})
            self._replace(graph, node, [dq, ir.node("MatMul", [x, dq.outputs[0]], name=node.name)])
            return "DequantizeLinear(blocked) MatMul"
        padded = np.pad(codes, ((0, 0), (0, blocks * block - k)), constant_values=0)
        b = pack_nbits(padded, tq.bits).reshape(n, blocks, block * tq.bits // 8)
        inputs = [x, add_initializer(graph, f"{weight.name}_nbits", b),
                  add_initializer(graph, f"{weight.name}_scale", tq.scale.reshape(-1)),
                  add_initializer(graph, f"{weight.name}_zero_point", pack_nbits(zero, tq.bits).reshape(-1))]
        attrs = {"K": k, "N": n, "bits": tq.bits, "block_size": block, "accuracy_level": self.options.accuracy_level}
        self._replace(graph, node, [ir.node("MatMulNBits", inputs, attributes=attrs, domain=MS, name=node.name)])
        return "MatMulNBits"

    def _gather(self, graph: ir.Graph, node: ir.Node, spec: QuantSpec) -> str:
        table, ids = node.inputs[0], node.inputs[1]
        tq = spec.weight
        codes, zero = unsigned_codes(integer_weight(table.const_value.numpy().T, tq), tq.zero_point, tq)
        inputs = [add_initializer(graph, f"{table.name}_quantized", pack_nbits(codes, tq.bits)), ids,
                  add_initializer(graph, f"{table.name}_scale", tq.scale),
                  add_initializer(graph, f"{table.name}_zero_point", pack_nbits(zero, tq.bits))]
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": tq.block_size, "bits": tq.bits}
        self._replace(graph, node, [ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS,
                                            name=node.name)])
        return "GatherBlockQuantized"

    def _fp16_storage(self, graph: ir.Graph, node: ir.Node) -> str:
        weight = node.inputs[1] if node.op_type == "MatMul" else node.inputs[0]
        half = add_initializer(graph, f"{weight.name}_fp16", weight.const_value.numpy().astype(np.float16))
        cast = ir.node("Cast", [half], attributes={"to": ir.DataType.FLOAT}, name=f"{weight.name}_to_fp32")
        graph.insert_before(node, cast)
        node.replace_input_with(1 if node.op_type == "MatMul" else 0, cast.outputs[0])
        return "fp16 weight"

    @staticmethod
    def _replace(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node]) -> None:
        """Puts ``new_nodes`` where ``node`` was; the last one's output takes over ``node``'s output."""
        for new in new_nodes:
            new.metadata_props.update(node.metadata_props)
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]],
                                                [new_nodes[-1].outputs[0]])

    @staticmethod
    def _missing_message(graph: ir.Graph, missing: list[str], specs: dict[str, QuantSpec]) -> str:
        name = missing[0]
        scoped = collections.Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in graph
                                     if any(s == name or name.startswith(s + ".") for s in name_scopes(n)[-3:]))
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else ""
        return (f"pass 'quantize': layer {name!r} ({specs[name].mode}) has no float "
                f"{'Gather' if specs[name].kind == 'embedding' else 'MatMul'} with its weight in the ONNX graph"
                f"{more}; ops in or around its scope: {dict(scoped) or 'none'}. If 'ort-fusions' packed Q/K/V into "
                "one Attention node or the embeddings into EmbedLayerNormalization, run it with pack_qkv = false "
                "and embed_layer_norm = false before 'quantize', or exclude the layer in 'calibrate'")
