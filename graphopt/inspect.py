"""What is in an ONNX file: ops by domain, weights by dtype, opsets, dynamic axes, provenance.

``inspect_onnx`` reads the file the safe way (``read_onnx``: external data checked, never
followed out of the model's folder) and returns a JSON-serialisable dict; ``graphopt
inspect FILE`` prints it, ``--json`` as is. Nothing is run.

Example::

    info = inspect_onnx("out/model.onnx")
    info["ops"]["com.microsoft::Attention"]      # 6
    info["inputs"][0]["dynamic_axes"]            # {"0": "batch", "1": "sequence"}
    info["graphopt"]["passes"][1]["name"]        # "ort-fusions"
"""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt.onnx_io import read_onnx

__all__ = ["inspect_onnx", "INSPECT_SCHEMA"]

logger = logging.getLogger(__name__)

#: Version of the dict layout (and of ``--json``); bump it when a key changes meaning.
INSPECT_SCHEMA = 1

_PROVENANCE_PREFIX = "graphopt."


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _value_info(value: ir.Value) -> dict[str, Any]:
    dims = list(value.shape) if value.shape is not None else None
    return {
        "name": value.name,
        "dtype": value.dtype.name.lower() if value.dtype is not None else None,
        "shape": None if dims is None else [d if isinstance(d, int) else (d.value if d.value is not None else "?")
                                            for d in dims],
        "dynamic_axes": {} if dims is None else {str(i): (d.value if d.value is not None else "?")
                                                  for i, d in enumerate(dims) if not isinstance(d, int)},
    }


def _provenance(metadata: dict[str, str]) -> dict[str, Any]:
    result = {}
    for key, value in sorted(metadata.items()):
        if key.startswith(_PROVENANCE_PREFIX):
            try:
                result[key[len(_PROVENANCE_PREFIX):]] = json.loads(value)
            except ValueError:
                result[key[len(_PROVENANCE_PREFIX):]] = value
    return result


def inspect_onnx(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarises an ONNX file without running it.

    Returns:
        ``{"file", "file_bytes", "ir_version", "producer", "opsets", "inputs", "outputs",
        "nodes", "ops", "parameters", "graphopt", "metadata"}``; ``ops`` counts every node,
        subgraphs included, as ``domain::op_type`` (plain ``op_type`` for the ONNX domain),
        most frequent first; ``parameters`` gives initializer count and bytes by dtype.

    Raises:
        FormatError: the file is missing or not ONNX; ``ExternalDataError`` for unsafe data paths.
    """
    path = Path(path)
    proto = read_onnx(path)
    model = ir.from_proto(proto)
    graph = model.graph
    ops = collections.Counter(_op_name(node) for node in ir.traversal.RecursiveGraphIterator(graph))
    by_dtype: dict[str, dict[str, int]] = {}
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        row = by_dtype.setdefault(tensor.dtype.name.lower(), {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += int(tensor.size)
        row["bytes"] += int(tensor.nbytes)
    metadata = dict(model.metadata_props)
    return {
        "graphopt_inspect": INSPECT_SCHEMA,
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "ir_version": model.ir_version,
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "opsets": {(domain or "ai.onnx"): version for domain, version in sorted(model.opset_imports.items())},
        "inputs": [_value_info(v) for v in graph.inputs if v.name not in graph.initializers],
        "outputs": [_value_info(v) for v in graph.outputs],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "parameters": {"tensors": sum(r["tensors"] for r in by_dtype.values()),
                       "bytes": sum(r["bytes"] for r in by_dtype.values()),
                       "by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"]))},
        "graphopt": _provenance(metadata),
        "metadata": {k: v for k, v in sorted(metadata.items()) if not k.startswith(_PROVENANCE_PREFIX)},
    }
