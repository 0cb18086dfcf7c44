"""The ``torch`` backend: the eager reference, the ground truth every artifact is checked against.

Takes a Program of kind ``module`` and runs it under ``torch.inference_mode``. Saving
exports it with ``torch.export`` (dynamic ``batch`` and ``sequence``) to ``model.pt2``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphopt.backend import Backend, Executable
from graphopt.program import Program, flatten_outputs

__all__ = ["TorchBackend", "TorchExecutable"]

logger = logging.getLogger(__name__)


class TorchExecutable(Executable):
    """An eager module and the example inputs used when exporting it."""

    artifact_name = "model.pt2"

    def __init__(self, module: nn.Module, example_inputs: dict[str, torch.Tensor]) -> None:
        self.module = module.eval()
        self.example_inputs = example_inputs

    def __call__(self, **inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ...]:
        tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
        with torch.inference_mode():
            return tuple(t.float().numpy() for t in flatten_outputs(self.module(**tensors)))

    def artifact_bytes(self) -> int:
        """The module's parameters and buffers (the exported graph is small beside them)."""
        tensors = {id(t): t for t in (*self.module.parameters(), *self.module.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def write_into(self, folder: Path) -> list[Path]:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = {k: {0: batch, 1: sequence} if v.dim() >= 2 else {} for k, v in self.example_inputs.items()}
        exported = torch.export.export(self.module, (), kwargs=self.example_inputs, dynamic_shapes=dynamic)
        path = folder / self.artifact_name
        torch.export.save(exported, str(path))
        return [path]


class TorchBackend(Backend):
    """Runs the module program eagerly; the reference for every other backend."""

    name = "torch"
    kind = "module"

    def compile(self, program: Program, **options: Any) -> TorchExecutable:
        if options:
            raise TypeError(f"the torch backend takes no options, got {', '.join(sorted(options))}")
        return TorchExecutable(program.ir, program.example_inputs)
