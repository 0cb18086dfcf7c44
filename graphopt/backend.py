"""The backend interface: ``compile(program, **options) -> Executable``.

A backend declares the program kind it takes (``onnxruntime`` takes ``onnx``; ``torch``
and ``cpp`` take ``module``) and returns an ``Executable`` that runs on named inputs and
saves itself. Backends register through the ``graphopt.backends`` entry-point group;
``graphopt.compile`` looks them up by name, so the core never imports one.

Example::

    program = graphopt.Pipeline(passes).run(graphopt.trace(model, inputs))
    executable = graphopt.compile(program, backend="onnxruntime", threads=2)
    embeddings = executable(**inputs)[0]
    executable.save("out")          # out/model.onnx, written atomically
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from graphopt.errors import BackendError
from graphopt.program import Kind, Program
from graphopt.writer import atomic_output_dir

__all__ = ["Backend", "Executable", "compile", "provenance"]


class Executable(abc.ABC):
    """A compiled program: call it on named inputs, save it as an artifact."""

    #: File name of the main artifact this executable writes (``model.onnx``, ``model.pt2``).
    artifact_name: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, **inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ...]:
        """Runs on named inputs and returns the outputs as numpy arrays."""

    @abc.abstractmethod
    def write_into(self, folder: Path) -> list[Path]:
        """Writes the artifact's files into an existing (staging) folder; returns their paths."""

    def artifact_bytes(self) -> int | None:
        """About how many bytes ``write_into`` writes, or None if unknown; named when the disk fills up."""
        return None

    def save(self, out: str | os.PathLike[str]) -> Path:
        """Writes the artifact into folder ``out`` atomically and returns the main file's path."""
        with atomic_output_dir(out, expected_bytes=self.artifact_bytes()) as staging:
            self.write_into(staging)
        return Path(out) / self.artifact_name


class Backend(abc.ABC):
    """Lowers a Program of kind ``kind`` to an Executable."""

    name: ClassVar[str]
    kind: ClassVar[Kind]

    @abc.abstractmethod
    def compile(self, program: Program, **options: Any) -> Executable:
        """Lowers ``program``; options are backend-specific (threads, ...)."""


def compile(program: Program, backend: str = "onnxruntime", **options: Any) -> Executable:  # noqa: A001
    """Compiles ``program`` with the backend registered under ``backend``.

    Raises:
        BackendError: the program's kind is not the one the backend takes.
        PluginError: no backend of that name is registered.
    """
    from graphopt import registry

    backend_cls = registry.backends.get(backend)
    if program.kind != backend_cls.kind:
        raise BackendError(f"backend {backend!r} takes a program of kind {backend_cls.kind!r}, got "
                           f"{program.kind!r}" + (": add the 'export' pass to the pipeline"
                                                  if backend_cls.kind == "onnx" else ""))
    return backend_cls().compile(program, **options)


def provenance(program: Program) -> dict[str, str]:
    """Provenance for an artifact's metadata: version, recipe, passes with options, drift.

    No timings: the same recipe, seed and inputs must give the same bytes. Drift figures
    are rounded to 3 significant digits for the same reason.
    """
    from graphopt import __version__

    passes = [{"name": r.name, "options": r.options} for r in program.history]
    drift = program.history[-1].total_drift if program.history and program.history[-1].total_drift else None
    meta = {
        "graphopt.version": __version__,
        "graphopt.model": str(program.info.get("model", "")),
        "graphopt.recipe": str(program.info.get("recipe", "")),
        "graphopt.passes": json.dumps(passes, sort_keys=True, default=str),
    }
    if drift is not None:
        meta["graphopt.drift"] = json.dumps({"max_abs": float(f"{drift.max_abs:.3g}"),
                                             "min_cosine": float(f"{drift.min_cosine:.6g}")}, sort_keys=True)
    return meta
