"""Export a module program to ONNX: nn.Module -> onnx_ir.Model (torch.export, once).

Invariant: the ONNX model computes the module's outputs within ``tolerance`` (max abs) on
the example inputs; input names are the example inputs' names, output names the
program's; every input's dims 0 and 1 are dynamic and named ``batch`` and ``sequence``.
Annotations are carried over unchanged, and node metadata keeps the exporter's
``pkg.torch.onnx.name_scopes`` so ONNX passes can map nodes back to module names.

Preconditions: kind ``module``; example inputs with batch and sequence of at least 2
(``torch.export`` specialises a size-1 dimension and then refuses a dynamic one).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings

import torch
from onnx_ir.passes.common import NameFixPass

from graphopt.errors import ModelError, PreconditionError
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program

__all__ = ["OnnxExportPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Args: opset: ONNX opset (21 is the lowest with int4 and blocked quantization).
    dynamic: name dims 0/1 of every input ``batch``/``sequence`` and leave them free.
    optimize: run the exporter's onnxscript optimizer (constant folding, dead code)."""

    opset: int = 21
    dynamic: bool = True
    optimize: bool = True

    def __post_init__(self) -> None:
        if not 18 <= self.opset <= 23:
            raise ValueError(f"opset must be between 18 and 23, got {self.opset}")


class OnnxExportPass(Pass):
    """Exports the module with ``torch.onnx.export(dynamo=True)`` into an ``onnx_ir.Model``."""

    name = "export"
    kind_in = "module"
    kind_out = "onnx"
    exact = True
    tolerance = 1e-4
    Options = ExportOptions

    def requires(self, program: Program) -> None:
        for key, value in program.example_inputs.items():
            if self.options.dynamic and any(d < 2 for d in value.shape[:2]):
                raise PreconditionError(f"export: example input {key!r} has shape {tuple(value.shape)}; "
                                        "dynamic axes need batch and sequence of at least 2")

    def call(self, program: Program) -> PassResult:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = {key: ({0: batch, 1: sequence} if value.dim() >= 2 else {0: batch})
                   for key, value in program.example_inputs.items()} if self.options.dynamic else None
        module = program.ir.eval()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = torch.onnx.export(
                    module, (), kwargs=dict(program.example_inputs), dynamo=True,
                    opset_version=self.options.opset, dynamic_shapes=dynamic,
                    output_names=list(program.output_names), optimize=self.options.optimize,
                    verbose=False, report=False)
        except Exception as error:
            root = error
            while root.__cause__ is not None:  # the exporter wraps the torch.export error that says why
                root = root.__cause__
            first_line = re.sub(r"\x1b\[[0-9;]*m", "", (str(root).strip().splitlines() or [""])[0])
            raise ModelError(
                f"model {program.info.get('model', '?')!r} cannot be exported with torch.export "
                f"({type(root).__name__}: {first_line}). Symbolic trace: "
                f"{program.info.get('trace', {}).get('reason', 'n/a')}. Remove data-dependent Python "
                "control flow from forward(), or export the model to ONNX yourself and pass the file") from error
        model = exported.model
        # The exporter can name an internal value after an output (aten.embedding's result is
        # "embedding"), which breaks SSA; NameFixPass renames the internal one.
        NameFixPass()(model)
        model.producer_name, model.producer_version = "graphopt", _version()
        program = dataclasses.replace(program, kind="onnx", ir=model)
        return PassResult(program, modified=True)


def _version() -> str:
    from graphopt import __version__

    return __version__
