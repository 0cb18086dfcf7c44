"""The Program: the one thing that flows through a pipeline.

A Program is an IR of one of two kinds plus everything a pass needs beside it:

* kind ``"module"``: an ``nn.Module`` (a ``torch.fx.GraphModule`` when the model traced
  symbolically, else the eager module);
* kind ``"onnx"``: an ``onnx_ir.Model``.

Beside the IR it carries named example inputs, the reference output of the original model
on them, per-layer *annotations* keyed by module name (quantization spec, sparsity mask,
rank), free-form ``info`` (where the model came from, which trace path was taken and why)
and the ``history`` of what each pass did.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

__all__ = ["Kind", "Program", "PassRecord", "Drift", "flatten_outputs"]

logger = logging.getLogger(__name__)

Kind = Literal["module", "onnx"]


@dataclass(frozen=True)
class Drift:
    """How far one set of outputs is from another.

    ``max_abs`` is the largest absolute difference over every output element;
    ``min_cosine`` and ``mean_cosine`` are over the rows of each output (the last axis is
    the vector), so for a sentence encoder they are per-embedding cosines.
    """

    max_abs: float
    min_cosine: float
    mean_cosine: float
    worst_output: str

    @staticmethod
    def between(
        candidate: tuple[np.ndarray, ...], reference: tuple[np.ndarray, ...], names: tuple[str, ...]
    ) -> Drift:
        if len(candidate) != len(reference):
            raise ValueError(f"{len(candidate)} outputs against {len(reference)} reference outputs")
        worst_abs, worst_name, cosines = 0.0, names[0] if names else "output", []
        for name, got, want in zip(names, candidate, reference):
            got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
            if got64.shape != want64.shape:
                raise ValueError(f"output {name!r}: shape {got64.shape} != reference {want64.shape}")
            diff = float(np.max(np.abs(got64 - want64))) if got64.size else 0.0
            if not np.isfinite(diff) or diff > worst_abs or np.isnan(diff):
                worst_abs, worst_name = (diff if np.isfinite(diff) else float("inf")), name
            rows_got = got64.reshape(-1, got64.shape[-1]) if got64.ndim else got64.reshape(1, 1)
            rows_want = want64.reshape(rows_got.shape)
            dot = np.sum(rows_got * rows_want, axis=-1)
            norms = np.linalg.norm(rows_got, axis=-1) * np.linalg.norm(rows_want, axis=-1)
            # Two zero rows agree perfectly; one zero row against a non-zero one does not.
            cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(
                np.all(rows_got == rows_want, axis=-1), 1.0, 0.0))
            cosines.append(np.nan_to_num(cos, nan=-1.0))
        all_cos = np.concatenate(cosines) if cosines else np.ones(1)
        return Drift(worst_abs, float(all_cos.min()), float(all_cos.mean()), worst_name)

    def as_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "min_cosine": self.min_cosine,
                "mean_cosine": self.mean_cosine, "worst_output": self.worst_output}


@dataclass
class PassRecord:
    """What one pass did: the row of the report table."""

    name: str
    options: dict[str, Any]
    kind_in: Kind
    kind_out: Kind
    exact: bool
    tolerance: float | None
    modified: bool
    wall_s: float
    param_bytes: tuple[int, int]
    nodes: tuple[int, int]
    step_drift: Drift | None
    total_drift: Drift | None
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "options": self.options, "kind_in": self.kind_in,
            "kind_out": self.kind_out, "exact": self.exact, "tolerance": self.tolerance,
            "modified": self.modified, "wall_s": self.wall_s,
            "param_bytes_before": self.param_bytes[0], "param_bytes_after": self.param_bytes[1],
            "nodes_before": self.nodes[0], "nodes_after": self.nodes[1],
            "step_drift": self.step_drift.as_dict() if self.step_drift else None,
            "total_drift": self.total_drift.as_dict() if self.total_drift else None,
            "notes": self.notes,
        }


def flatten_outputs(outputs: Any) -> tuple[torch.Tensor, ...]:
    """Flattens a model's output (tensor, tuple, dict, HF ModelOutput) into its tensors."""
    leaves, _ = torch.utils._pytree.tree_flatten(
        dict(outputs) if isinstance(outputs, Mapping) else outputs)
    return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


@dataclass
class Program:
    """An IR of kind ``module`` or ``onnx`` and what travels with it through passes.

    Attributes:
        kind: ``"module"`` (``ir`` is an ``nn.Module``) or ``"onnx"`` (an ``onnx_ir.Model``).
        ir: The graph or module itself.
        example_inputs: Named inputs with batch and sequence of at least 2 (a dimension of
            size 1 is specialised by ``torch.export``), used for export and drift checks.
        reference_output: The original model's outputs on ``example_inputs``.
        output_names: One name per flattened output.
        annotations: Per-layer facts keyed by module name (``{"encoder.layers.0.ffn":
            {"quant": ..., "mask": ...}}``); module passes write them, onnx passes read them.
        info: Provenance: model name, trace path taken and why, source file.
        history: One ``PassRecord`` per pass run so far.
        tokenizer: For text models, turns sentences into ``example_inputs``-like dicts.
        teacher: The model lossy module passes learn back from, in eval mode and never
            trained: set by a pass that changes the architecture (``depth-shrink`` keeps the
            module from before it) and read by ``distill``. ``None`` until such a pass ran.
            ``clone`` shares it.
    """

    kind: Kind
    ir: Any
    example_inputs: dict[str, torch.Tensor]
    reference_output: tuple[np.ndarray, ...]
    output_names: tuple[str, ...]
    annotations: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    history: list[PassRecord] = field(default_factory=list)
    tokenizer: Any = None
    teacher: nn.Module | None = None

    def __post_init__(self) -> None:
        expected = nn.Module if self.kind == "module" else ir.Model
        if not isinstance(self.ir, expected):
            raise TypeError(f"Program of kind {self.kind!r} needs an {expected.__name__}, "
                            f"got {type(self.ir).__name__}")

    def clone(self) -> Program:
        """An independent copy: modules deep-copied; ONNX graphs cloned, initializer tensors shared.

        Passes replace initializer tensors rather than writing into them, so sharing is safe.
        """
        copied_ir = self.ir.clone() if self.kind == "onnx" else copy.deepcopy(self.ir)
        return dataclasses.replace(self, ir=copied_ir, annotations=copy.deepcopy(self.annotations),
                                   info=dict(self.info), history=list(self.history))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.example_inputs)

    def run(self, inputs: Mapping[str, torch.Tensor] | None = None) -> tuple[np.ndarray, ...]:
        """Runs the program on named inputs (default: its example inputs) and returns numpy.

        Modules run eagerly under ``torch.inference_mode``; ONNX models run in ONNX Runtime
        with graph optimizations off, so what is measured is the graph itself.
        """
        inputs = self.example_inputs if inputs is None else inputs
        if self.kind == "module":
            with torch.inference_mode():
                outputs = flatten_outputs(self.ir(**inputs))
            return tuple(t.detach().float().numpy() for t in outputs)
        from graphopt.onnx_runtime import run_onnx_model

        return run_onnx_model(self.ir, inputs)

    def parameter_bytes(self) -> int:
        """Bytes of weights: parameters and buffers, or ONNX initializers."""
        if self.kind == "module":
            tensors = {id(t): t for t in (*self.ir.parameters(), *self.ir.buffers())}
            return sum(t.numel() * t.element_size() for t in tensors.values())
        return sum(v.const_value.nbytes for v in self.ir.graph.initializers.values()
                   if v.const_value is not None)

    def node_count(self) -> int:
        """Graph nodes (fx call nodes, or ONNX nodes of the main graph); leaf modules if eager."""
        if self.kind == "onnx":
            return len(self.ir.graph)
        graph = getattr(self.ir, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            return sum(1 for n in graph.nodes if n.op.startswith("call_"))
        return sum(1 for m in self.ir.modules() if not list(m.children()))
