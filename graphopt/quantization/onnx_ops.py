"""ONNX-side helpers for materialising a ``QuantSpec``: finding layers, packing weights, building nodes.

- ``name_scopes``/``find_linear``/``find_gather``: map a module name back to the ONNX nodes
  the exporter made from it, through the ``pkg.torch.onnx.name_scopes`` node metadata.
- ``integer_weight``: a layer's ONNX weight ``[in, out]`` (the exporter folds ``Wᵀ``) as
  integer codes under the layer's spec, quantized exactly as the module side fake-quantizes.
- ``pack_nbits``/``unsigned_codes``: the byte layouts ``MatMulNBits`` and
  ``GatherBlockQuantized`` take: unsigned codes, two 4-bit values per byte, low nibble first.
"""

from __future__ import annotations

import ast
import logging

import numpy as np
import onnx_ir as ir
import torch

from graphopt.quantization.spec import TensorQuant, quantize

__all__ = ["SCOPES_KEY", "name_scopes", "find_linear", "find_gather", "integer_weight", "unsigned_codes",
           "pack_nbits", "add_initializer", "ensure_opset"]

logger = logging.getLogger(__name__)

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def name_scopes(node: ir.Node) -> tuple[str, ...]:
    """The module names the exporter recorded for ``node`` (outermost first); empty if none."""
    raw = node.metadata_props.get(SCOPES_KEY)
    if not raw:
        return ()
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return ()
    return tuple(s for s in scopes if isinstance(s, str))


def _const_2d(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    array = value.const_value.numpy()
    return array if array.ndim == 2 and array.dtype == np.float32 else None


def find_linear(graph: ir.Graph, module_name: str, weight_shape: tuple[int, ...]) -> list[ir.Node]:
    """The float ``MatMul`` nodes of layer ``module_name``: its scope, a ``[in, out]`` weight initializer."""
    out_features, in_features = weight_shape
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or module_name not in name_scopes(node):
            continue
        weight = _const_2d(node.inputs[1])
        if weight is not None and weight.shape == (in_features, out_features):
            found.append(node)
    return found


def find_gather(graph: ir.Graph, module_name: str, weight_shape: tuple[int, ...]) -> list[ir.Node]:
    """The ``Gather`` nodes (axis 0) reading table ``module_name`` of shape ``weight_shape``."""
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or module_name not in name_scopes(node):
            continue
        table = _const_2d(node.inputs[0])
        if table is not None and table.shape == tuple(weight_shape) and node.attributes.get_int("axis", 0) == 0:
            found.append(node)
    return found


def integer_weight(onnx_weight: np.ndarray, tq: TensorQuant) -> np.ndarray:
    """Codes of an ONNX ``[in, out]`` weight under ``tq`` (a format over the torch ``[out, in]``).

    Returns ``[out, in]`` int32 codes, the torch layout, so per-block rows are output channels.
    """
    return quantize(torch.from_numpy(np.array(onnx_weight.T, copy=True)), tq).numpy()


def unsigned_codes(codes: np.ndarray, zero_point: np.ndarray, tq: TensorQuant) -> tuple[np.ndarray, np.ndarray]:
    """Shifts signed codes and zero points to the unsigned range (``q + 2^(bits-1)``), as uint8."""
    shift = 2 ** (tq.bits - 1) if tq.signed else 0
    return (codes + shift).astype(np.uint8), (zero_point + shift).astype(np.uint8)


def pack_nbits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned codes ``[rows, n]`` into bytes along the last axis: 4-bit pairs low nibble first."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Registers a new initializer under a name not yet used in ``graph``."""
    taken = set(graph.initializers)
    unique, index = name, 1
    while unique in taken:
        unique, index = f"{name}_{index}", index + 1
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(np.ascontiguousarray(array), name=unique)
    tensor.name = unique
    value = ir.Value(name=unique, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    """Declares ``domain`` at ``version`` or above."""
    if model.opset_imports.get(domain, 0) < version:
        model.opset_imports[domain] = version
