"""The ``onnxruntime`` backend: a standard ONNX file that loads in a stock ``onnxruntime``.

Takes a Program of kind ``onnx``. The artifact is serialized once by the writer (stack
traces and doc strings stripped, provenance stamped) and the executable runs exactly
those bytes, so what is measured is what is saved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.backend import Backend, Executable, provenance
from graphopt.onnx_io import serialize_model
from graphopt.onnx_runtime import OptimizationLevel, create_session, run_session, session_options
from graphopt.program import Program

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeExecutable"]

logger = logging.getLogger(__name__)


class OnnxRuntimeExecutable(Executable):
    """Serialized ONNX bytes and a lazily created ONNX Runtime session on them."""

    artifact_name = "model.onnx"

    def __init__(self, model_bytes: bytes, *, threads: int | None, optimization: OptimizationLevel,
                 spinning: bool) -> None:
        self.model_bytes = model_bytes
        self._options = dict(threads=threads, optimization=optimization, spinning=spinning)
        self._session = None

    @property
    def session(self):
        if self._session is None:
            self._session = create_session(self.model_bytes, session_options(**self._options))
        return self._session

    def __call__(self, **inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ...]:
        return run_session(self.session, inputs)

    def write_into(self, folder: Path) -> list[Path]:
        path = folder / self.artifact_name
        path.write_bytes(self.model_bytes)
        return [path]


class OnnxRuntimeBackend(Backend):
    """Lowers an ONNX program to an ONNX Runtime session and a ``model.onnx`` artifact."""

    name = "onnxruntime"
    kind = "onnx"

    def compile(self, program: Program, *, threads: int | None = None, optimization: OptimizationLevel = "all",
                spinning: bool = False, **options: Any) -> OnnxRuntimeExecutable:
        """Args: threads (intra-op; default one per core), optimization level, spinning."""
        if options:
            raise TypeError(f"unknown onnxruntime backend options: {', '.join(sorted(options))}")
        data = serialize_model(program.ir, provenance(program))
        return OnnxRuntimeExecutable(data, threads=threads, optimization=optimization, spinning=spinning)
