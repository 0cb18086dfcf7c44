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
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from graphopt.errors import ExternalDataError, FormatError

__all__ = ["read_onnx", "artifact_proto", "serialize_model", "needs_external_data", "write_with_external_data",
           "STRIPPED_METADATA", "MAX_SUBGRAPH_DEPTH", "ProtoHook"]

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
    _densify_sparse_initializers(proto.graph)
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
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
        if indices.ndim == 2:  # [nnz, rank] coordinates
            dense[tuple(indices.T)] = values
        else:  # linear indices into the flattened tensor
            dense.reshape(-1)[indices] = values
        graph.initializer.append(numpy_helper.from_array(dense, sparse.values.name))
    del graph.sparse_initializer[:]


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
