"""The ``onnxruntime`` backend: a standard ONNX file that loads in a stock ``onnxruntime``.

Takes a Program of kind ``onnx``. The artifact is serialized once by the writer (stack
traces and doc strings stripped, provenance stamped) and the executable runs exactly
those bytes, so what is measured is what is saved.

``sparse_initializers=True`` (``sparse_initializers = true`` in a recipe's ``[[backend]]``)
writes mostly-zero weights, such as pruned ones, in ONNX's sparse tensor form (see
``graphopt.onnx_io.sparse_initializer_hook``; ``sparse_form`` picks Constant nodes, the
default, which pass the ONNX full check, or the graph's ``sparse_initializer`` field): a
smaller file; ONNX Runtime densifies them at load, so memory use and speed do not change.
``notes`` says what was made sparse.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from graphopt.backend import Backend, Executable, provenance
from graphopt.onnx_io import (SPARSE_NOTE, SparseForm, artifact_proto, needs_external_data, sparse_initializer_hook,
                              write_with_external_data)
from graphopt.onnx_runtime import OptimizationLevel, create_session, run_session, session_options
from graphopt.program import Program

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeExecutable"]

logger = logging.getLogger(__name__)


class OnnxRuntimeExecutable(Executable):
    """The artifact's ``ModelProto`` (serialized once when under 2 GiB) and a lazy ORT session.

    Models whose initializers exceed protobuf's 2 GiB limit are written as ``model.onnx``
    plus ``model.onnx.data`` and the session is created from the written file.
    """

    artifact_name = "model.onnx"

    def __init__(self, proto: onnx.ModelProto, *, external_data: bool, threads: int | None,
                 optimization: OptimizationLevel, spinning: bool) -> None:
        self.proto = proto
        self.external_data = external_data
        self.model_bytes = b"" if external_data else proto.SerializeToString(deterministic=True)
        self._options = dict(threads=threads, optimization=optimization, spinning=spinning)
        self._session = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        #: What the backend did beyond lowering (sparse initializers), for the report.
        self.notes: dict[str, Any] = {}

    @property
    def session(self):
        if self._session is None:
            source: bytes | str = self.model_bytes
            if self.external_data:
                self._folder = tempfile.TemporaryDirectory(prefix="graphopt-ort-")
                source = str(self.write_into(Path(self._folder.name))[0])
            self._session = create_session(source, session_options(**self._options))
        return self._session

    def __call__(self, **inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ...]:
        return run_session(self.session, inputs)

    def artifact_bytes(self) -> int:
        """The serialized model; with external data, the initializers' bytes (the graph is small beside them)."""
        if not self.external_data:
            return len(self.model_bytes)
        return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in self.proto.graph.initializer)

    def write_into(self, folder: Path) -> list[Path]:
        path = folder / self.artifact_name
        if self.external_data:
            return write_with_external_data(self.proto, path)
        path.write_bytes(self.model_bytes)
        return [path]


class OnnxRuntimeBackend(Backend):
    """Lowers an ONNX program to an ONNX Runtime session and a ``model.onnx`` artifact."""

    name = "onnxruntime"
    kind = "onnx"

    def compile(self, program: Program, *, threads: int | None = None, optimization: OptimizationLevel = "all",
                spinning: bool = False, sparse_initializers: bool = False, sparse_form: SparseForm = "constant",
                **options: Any) -> OnnxRuntimeExecutable:
        """Args: threads (intra-op; default one per core), optimization level, spinning,
        sparse_initializers (write mostly-zero weights sparse), sparse_form ("constant": Constant
        nodes with sparse_value, pass the ONNX full check; "initializer": the graph's
        sparse_initializer field)."""
        if options:
            raise TypeError(f"unknown onnxruntime backend options: {', '.join(sorted(options))}")
        sparse: list[dict[str, Any]] = []
        hooks = (sparse_initializer_hook(sparse, form=sparse_form),) if sparse_initializers else ()
        proto = artifact_proto(program.ir, provenance(program), hooks)
        executable = OnnxRuntimeExecutable(proto, external_data=needs_external_data(program.ir), threads=threads,
                                           optimization=optimization, spinning=spinning)
        if sparse_initializers:
            executable.notes["sparse_initializers"] = {
                "count": len(sparse), "form": sparse_form, "dense_bytes": sum(r["dense_bytes"] for r in sparse),
                "sparse_bytes": sum(r["sparse_bytes"] for r in sparse), "note": SPARSE_NOTE, "initializers": sparse}
            logger.info("onnxruntime: %d sparse initializers, %d -> %d bytes", len(sparse),
                        executable.notes["sparse_initializers"]["dense_bytes"],
                        executable.notes["sparse_initializers"]["sparse_bytes"])
        return executable
