"""Reading ONNX files safely, and serializing ONNX programs reproducibly.

Reading: external-data locations are checked before any byte is read. A location must be
relative, stay inside the model's folder, and name a regular file that is neither a
symlink nor a hard link (ONNX Runtime 1.32 follows a hard link out of the folder,
measured); its offset and length must lie within the file. Sparse initializers are
densified here, because ``onnx_ir`` drops them on load (measured).

Writing: ``serialize_model`` strips the exporter's per-node stack traces and doc strings
(they hold absolute source paths and break byte-identity, measured), stamps provenance
into ``metadata_props``, and serializes deterministically, so the same recipe, seed and
inputs give the same bytes.

Sparse initializers (``sparse_initializer_hook``, the ``onnxruntime`` backend's
``sparse_initializers = true``): a last rewrite of the ``ModelProto``, because ``onnx_ir`` drops
``sparse_initializer`` (measured). The rule needs no layer names, since the exporter stores a
Linear's weight transposed and renamed (``val_34``): every numeric initializer of at least
``SPARSE_MIN_ELEMENTS`` elements with at least ``SPARSE_MIN_ZERO_FRACTION`` exact zeros, that
is not a graph input, is stored as its nonzero values plus their int64 linear indices (the
ONNX checker rejects int32 ones), where that is smaller than the dense tensor: at fp32 an
index and a value take 12 bytes, so below about 33% density (a 90%-sparse 1536×384 weight:
2.36 MB → 0.71 MB). The encoding is lossless. ONNX Runtime densifies sparse initializers when
it loads the model, so memory use and speed are those of the dense model: only the file shrinks.

Two containers hold the sparse tensor (``form``):

* ``"constant"`` (default): a ``Constant`` node whose ``sparse_value`` attribute is the tensor.
  It passes ``onnx.checker.check_model(full_check=True)``: the Constant's output is a dense
  tensor, typed as such.
* ``"initializer"``: the graph's ``sparse_initializer`` field. It passes the structural checker,
  but not the full check: ONNX shape inference types a sparse initializer as ``sparse_tensor``,
  which no standard op accepts (MatMul: "wrong rank (0)"), while ONNX Runtime treats it as a
  dense tensor (measured, onnx 1.23; onnxruntime issue #31730 is the same split).

Reading densifies both (``onnx_ir`` drops ``sparse_initializer`` and refuses ``sparse_value``).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from graphopt.errors import ExternalDataError, FormatError

__all__ = ["read_onnx", "artifact_proto", "serialize_model", "needs_external_data", "write_with_external_data",
           "STRIPPED_METADATA", "MAX_SUBGRAPH_DEPTH", "ProtoHook", "sparse_initializer_hook", "sparsify_initializers",
           "SPARSE_MIN_ELEMENTS", "SPARSE_MIN_ZERO_FRACTION", "SparseForm"]

logger = logging.getLogger(__name__)

#: Node metadata the writer removes: stack traces hold absolute paths of the exporting machine.
STRIPPED_METADATA = ("pkg.torch.onnx.stack_trace",)

#: Deepest If/Loop/Scan nesting graphopt reads.
MAX_SUBGRAPH_DEPTH = 64

#: Above this many bytes of initializers, models are written with external data (protobuf's
#: hard limit for one message is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

#: A last rewrite of the ``ModelProto`` before serialization (e.g. sparse initializers).
ProtoHook = Callable[[onnx.ModelProto], None]

#: Smallest initializer (elements) and least share of exact zeros written as a sparse initializer.
SPARSE_MIN_ELEMENTS = 4096
SPARSE_MIN_ZERO_FRACTION = 0.5
_SPARSE_DTYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                            onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                            onnx.TensorProto.INT32, onnx.TensorProto.INT64})
#: What ``sparse_initializer_hook`` tells about ONNX Runtime, in the artifact and the report.
SparseForm = Literal["constant", "initializer"]
SPARSE_NOTE = ("ONNX Runtime densifies sparse initializers when it loads the model: memory use and speed are "
               "those of the dense model; only the file is smaller")


def read_onnx(path: Path) -> onnx.ModelProto:
    """Loads an ONNX file with its external data checked and sparse initializers densified.

    Raises:
        FormatError: missing file, not a file, not parseable as ONNX.
        ExternalDataError: an external-data location that leaves the model's folder.
    """
    if not path.exists():
        raise FormatError(f"{path}: no such file; give the path of an .onnx model")
    if not path.is_file():
        raise FormatError(f"{path}: not a regular file; give the path of an .onnx model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise FormatError(f"{path}: not an ONNX model or truncated ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not proto.HasField("graph"):
        raise FormatError(f"{path}: the file parses but holds no graph; is it an ONNX model?")
    depth = _subgraph_depth(proto.graph)
    if depth > MAX_SUBGRAPH_DEPTH:
        raise FormatError(f"{path}: subgraphs nest {depth} deep, over graphopt's limit of {MAX_SUBGRAPH_DEPTH}")
    tensors = [t for t in _all_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in tensors:
        _load_external(tensor, path)
    try:
        _densify_sparse_initializers(proto.graph)
    except ValueError as error:
        raise FormatError(f"{path}: {error}") from error
    return proto


def _subgraph_depth(graph: onnx.GraphProto) -> int:
    """Deepest nesting of If/Loop/Scan bodies, walked iteratively (no recursion limit to hit)."""
    deepest, stack = 1, [(graph, 1)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SUBGRAPH_DEPTH:
            break
        for node in current.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append((attr.g, depth + 1))
                stack.extend((sub, depth + 1) for sub in attr.graphs)
    return deepest


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _load_external(tensor: onnx.TensorProto, model_path: Path) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    folder = model_path.resolve().parent
    where = f"{model_path}: initializer {tensor.name!r} external data {location!r}"
    if not location or os.path.isabs(location) or ".." in Path(location).parts or location.startswith(("/", "\\")):
        raise ExternalDataError(f"{where}: locations must be relative paths inside the model's folder")
    target = folder / location
    try:
        st = os.lstat(target)
    except OSError as error:
        raise ExternalDataError(f"{where}: cannot read it ({error.strerror}); keep the data file beside the model") from error
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ExternalDataError(f"{where}: is a symlink or not a regular file; copy the data into the model's folder")
    if st.st_nlink > 1:
        raise ExternalDataError(f"{where}: is a hard link (link count {st.st_nlink}); it may point outside the "
                                "model's folder, so it is refused: copy the file instead")
    if target.resolve().parent != folder and folder not in target.resolve().parents:
        raise ExternalDataError(f"{where}: resolves outside the model's folder")
    offset, length = int(info.get("offset", 0) or 0), info.get("length")
    length = st.st_size - offset if length is None else int(length)
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise ExternalDataError(f"{where}: offset {offset} + length {length} exceeds the file's {st.st_size} bytes")
    expected = _expected_nbytes(tensor)
    if expected is not None and expected != length:
        raise ExternalDataError(f"{where}: holds {length} bytes but the tensor's shape and type need {expected}")
    with open(target, "rb") as handle:
        handle.seek(offset)
        tensor.raw_data = handle.read(length)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        return None
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (int(np.prod(tensor.dims, dtype=np.int64)) + 1) // 2
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _densify_sparse_initializers(graph: onnx.GraphProto) -> None:
    for sparse in list(graph.sparse_initializer):
        graph.initializer.append(numpy_helper.from_array(_dense(sparse), sparse.values.name))
    del graph.sparse_initializer[:]
    stack = [graph]
    while stack:  # Constant(sparse_value) -> Constant(value), in every subgraph too
        current = stack.pop()
        for node in current.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and attr.name == "sparse_value":
                    attr.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(_dense(attr.sparse_tensor))))
                stack.extend([attr.g] if attr.HasField("g") else [])
                stack.extend(attr.graphs)


#: Most elements a sparse tensor may densify to (8 GiB of fp32): a hostile file cannot ask for more.
MAX_DENSIFIED_ELEMENTS = 2**31


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a sparse tensor. Raises ValueError on bad dims or indices out of range."""
    name, size = sparse.values.name or "<sparse constant>", int(np.prod(sparse.dims, dtype=np.int64))
    if any(d < 0 for d in sparse.dims) or size > MAX_DENSIFIED_ELEMENTS:
        raise ValueError(f"sparse tensor {name!r}: dims {list(sparse.dims)} are negative or over "
                         f"{MAX_DENSIFIED_ELEMENTS} elements")
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    rank, count = len(sparse.dims), (indices.shape[0] if indices.ndim else 0)
    bounds = np.asarray(sparse.dims, dtype=np.int64) if indices.ndim == 2 else size
    if (indices.ndim not in (1, 2) or count != values.size or (indices.ndim == 2 and indices.shape[1] != rank)
            or (indices.size and (indices.min() < 0 or bool(np.any(indices >= bounds))))):
        raise ValueError(f"sparse tensor {name!r}: indices of shape {list(indices.shape)} do not fit "
                         f"{values.size} values in dims {list(sparse.dims)}")
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 2:  # [nnz, rank] coordinates
        dense[tuple(indices.T)] = values
    else:  # linear indices into the flattened tensor
        dense.reshape(-1)[indices] = values
    return dense


def sparsify_initializers(proto: onnx.ModelProto, *, form: SparseForm = "constant",
                          min_elements: int = SPARSE_MIN_ELEMENTS,
                          min_zero_fraction: float = SPARSE_MIN_ZERO_FRACTION) -> list[dict[str, Any]]:
    """Rewrites mostly-zero initializers of the main graph in sparse form, in place.

    Args:
        form: ``"constant"`` (a Constant node with ``sparse_value``, passes the full check) or
            ``"initializer"`` (the graph's ``sparse_initializer``).

    Returns:
        One row per initializer made sparse: name, shape, zero fraction, dense and sparse bytes.
    """
    if form not in ("constant", "initializer"):
        raise ValueError(f"sparse form must be 'constant' or 'initializer', got {form!r}")
    graph = proto.graph
    inputs = {value.name for value in graph.input}
    kept, rows, constants = [], [], []
    for tensor in graph.initializer:
        eligible = (tensor.data_type in _SPARSE_DTYPES and tensor.name not in inputs
                    and int(np.prod(tensor.dims, dtype=np.int64)) >= min_elements)
        sparse = _sparse_form(tensor, min_zero_fraction) if eligible else None
        if sparse is None:
            kept.append(tensor)
            continue
        if form == "initializer":
            graph.sparse_initializer.append(sparse)
        else:
            constants.append(onnx.helper.make_node("Constant", [], [tensor.name], f"{tensor.name}.sparse",
                                                   sparse_value=sparse))
        nnz, size = int(sparse.indices.dims[0]), int(np.prod(tensor.dims))
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        rows.append({"name": tensor.name, "shape": list(tensor.dims), "zero_fraction": round(1 - nnz / size, 4),
                     "dense_bytes": size * itemsize, "sparse_bytes": nnz * (itemsize + 8)})
    if rows:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = [*constants, *graph.node]  # constants take no input: first is topological
        del graph.node[:]
        graph.node.extend(nodes)
    return rows


def _sparse_form(tensor: onnx.TensorProto, min_zero_fraction: float) -> onnx.SparseTensorProto | None:
    """The sparse form of ``tensor`` (values + int64 linear indices), or None if not sparse or not smaller."""
    flat = numpy_helper.to_array(tensor).reshape(-1)
    nonzero = np.flatnonzero(flat)
    if 1 - len(nonzero) / flat.size < min_zero_fraction or len(nonzero) * (flat.itemsize + 8) >= flat.nbytes:
        return None
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(numpy_helper.from_array(flat[nonzero], tensor.name))
    sparse.indices.CopyFrom(numpy_helper.from_array(nonzero.astype(np.int64), f"{tensor.name}.indices"))
    sparse.dims.extend(tensor.dims)
    return sparse


def sparse_initializer_hook(record: list[dict[str, Any]] | None = None, *, form: SparseForm = "constant",
                            min_elements: int = SPARSE_MIN_ELEMENTS,
                            min_zero_fraction: float = SPARSE_MIN_ZERO_FRACTION) -> ProtoHook:
    """A ``ProtoHook`` running ``sparsify_initializers``; what it did is appended to ``record``.

    It stamps ``graphopt.sparse_initializers`` into ``metadata_props`` (count, bytes, and that
    ONNX Runtime densifies them at load), so the artifact says what was done to it.
    """
    def hook(proto: onnx.ModelProto) -> None:
        rows = sparsify_initializers(proto, form=form, min_elements=min_elements, min_zero_fraction=min_zero_fraction)
        if record is not None:
            record.extend(rows)
        if rows:
            summary = {"count": len(rows), "form": form, "dense_bytes": sum(r["dense_bytes"] for r in rows),
                       "sparse_bytes": sum(r["sparse_bytes"] for r in rows), "note": SPARSE_NOTE}
            proto.metadata_props.add(key="graphopt.sparse_initializers", value=json.dumps(summary, sort_keys=True))
    return hook


def artifact_proto(model: ir.Model, provenance: Mapping[str, str] | None = None,
                   hooks: tuple[ProtoHook, ...] = ()) -> onnx.ModelProto:
    """The ``ModelProto`` of an artifact: stripped, stamped, hooks applied, no trailing ``""`` inputs."""
    proto = ir.to_proto(model)
    _strip(proto.graph)
    proto.doc_string = ""
    if provenance:
        existing = {p.key: p for p in proto.metadata_props}
        for key, value in sorted(provenance.items()):
            if key in existing:
                existing[key].value = value
            else:
                proto.metadata_props.add(key=key, value=value)
    for hook in hooks:
        hook(proto)
    return proto


def serialize_model(model: ir.Model, provenance: Mapping[str, str] | None = None,
                    hooks: tuple[ProtoHook, ...] = ()) -> bytes:
    """Serializes an artifact deterministically (same model and provenance → same bytes)."""
    return artifact_proto(model, provenance, hooks).SerializeToString(deterministic=True)


def needs_external_data(model: ir.Model) -> bool:
    """True when the initializers alone would break protobuf's 2 GiB message limit."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return total > EXTERNAL_DATA_THRESHOLD


def write_with_external_data(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """Writes ``path`` plus ``path.data`` holding every initializer (for models over 2 GiB)."""
    data_name = path.name + ".data"
    proto = _copy(proto)  # save_model moves the tensors out of the proto it is given
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [path, path.with_name(data_name)]


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(proto)
    return copied


def _strip(graph: onnx.GraphProto) -> None:
    graph.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
        # An explicit empty trailing optional input is legal ONNX, but a LayerNormalization
        # with bias "" crashes ONNX Runtime's optimizer (measured): never write one.
        while node.input and node.input[-1] == "":
            node.input.pop()
        keep = [p for p in node.metadata_props if p.key not in STRIPPED_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip(attr.g)
            for sub in attr.graphs:
                _strip(sub)
