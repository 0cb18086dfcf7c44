"""Train under fake quantization: nn.Linear(W) with spec scales s -> nn.Linear(W') with trained scales s' (QAT).

Before: a module program whose layers carry a ``QuantSpec`` (from ``calibrate``, optionally
``mixed-precision`` and ``round-weights``). After: the same module (plain ``nn.Linear``s,
names and outputs unchanged) with weights trained under the spec's fake quantization, and
each spec rewritten with the trained scales and zero points. Export and ``quantize`` then
run unchanged: QAT leaves nothing in the graph that the exporter has to understand.

During training each quantized ``nn.Linear`` (static, dynamic or weight-only; float layers
stay as they are) is a ``QatLinear`` (`graphopt.quantization.qat`): straight-through
rounding, optionally learned (LSQ) weight and static-input scales, and static inputs that
keep observing for ``observe_steps`` steps before they are frozen. Quantized embedding
tables run fake-quantized and are not trained (their calibrated row scales stay valid).
The student learns from the float model before QAT (``program.teacher`` if a pass kept
one, else a copy taken here) with the shared trainer and the distillation losses.

Invariant: lossy (the weights move); every spec keeps its mode, format and shapes, only its
scales and zero points change. Notes: held-out agreement with the float model of the PTQ
model (before) and the QAT model (after), the trainer's losses and wall time, how far the
scales moved.

Preconditions: kind ``module``; quantized linear specs (run ``calibrate`` first); a tokenizer.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from graphopt.data.corpus import corpus_digest, load_training_data
from graphopt.distill import (
    DistillationLoss,
    HiddenStateLoss,
    OutputLoss,
    SoftLabelLoss,
    keep_teacher,
)
from graphopt.errors import PreconditionError
from graphopt.evaluate import heldout_agreement
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program
from graphopt.quantization import QuantSpec, get_specs, set_spec, swap_fake_quant
from graphopt.quantization.qat import QatObserverHook, swap_qat, unswap_qat
from graphopt.train import TrainingOptions, TrainProgress, train

__all__ = ["QuantAwareTrainingPass"]

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class QatOptions(TrainingOptions):
    """Args: steps, batch_size, lr, warmup_steps, weight_decay, grad_clip, seed, max_length,
    dropout: the trainer's. learn_scales: LSQ scales for weights and static inputs;
    scale_lr: their learning rate as a multiple of lr. observe_steps: static inputs follow a
    moving average of each batch's range for this many steps, then are frozen (or learned).
    soft_label, hidden, output: distillation loss weights against the float model (0 leaves a
    term out); temperature: Hinton's T. data: "sentences" and corpus sources. evaluate:
    held-out agreement with the float model before and after (evaluation only)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-5
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_length: int = 64
    learn_scales: bool = True
    scale_lr: float = 10.0
    observe_steps: int = 0
    soft_label: float = 1.0
    hidden: float = 1.0
    output: float = 1.0
    temperature: float = 1.0
    evaluate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_lr <= 0:
            raise ValueError(f"scale_lr must be positive, got {self.scale_lr}")
        if not 0 <= self.observe_steps <= self.steps:
            raise ValueError(f"observe_steps must be in [0, steps={self.steps}], got {self.observe_steps}")
        self.train_config()  # TrainConfig validates the rest
        self.loss()

    def loss(self) -> DistillationLoss:
        return DistillationLoss([SoftLabelLoss(self.soft_label, self.temperature), HiddenStateLoss(self.hidden),
                                 OutputLoss(self.output)])


class QuantAwareTrainingPass(Pass):
    """Trains the module under its quantization spec and writes the trained scales back into it.

    Attributes:
        train_progress: optional callback for each training step (the CLI's display sets it).
    """

    name = "qat"
    kind_in = "module"
    kind_out = "module"
    exact = False
    tolerance = None
    Options = QatOptions
    train_progress: Callable[[TrainProgress], None] | None = None

    @staticmethod
    def _trained(program: Program) -> dict[str, QuantSpec]:
        return {n: s for n, s in get_specs(program).items()
                if s.kind == "linear" and s.mode != "float" and s.weight is not None}

    def requires(self, program: Program) -> None:
        if not self._trained(program):
            raise PreconditionError("qat: no quantized nn.Linear in the program's spec: put 'calibrate' "
                                    "(static, dynamic or weight-only) before 'qat'")
        if program.tokenizer is None:
            raise PreconditionError(f"qat distils on sentences and needs a text model with a tokenizer "
                                    f"(model {program.info.get('model')!r} has none)")

    def call(self, program: Program) -> PassResult:
        o, module = self.options, program.ir
        specs = self._trained(program)
        tables = {n: s for n, s in get_specs(program).items() if s.kind == "embedding" and s.mode != "float"}
        teacher = keep_teacher(program)
        notes: dict[str, Any] = {"layers": len(specs), "modes": dict(collections.Counter(s.mode for s in specs.values())),
                                 "learn_scales": o.learn_scales, "observe_steps": o.observe_steps}
        if o.evaluate:
            with swap_fake_quant(module, {**specs, **tables}):
                notes["heldout_vs_float_ptq"] = heldout_agreement(module, teacher, program.tokenizer)
        frozen = [p for n in tables for p in module.get_submodule(n).parameters() if p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(False)
        sentences = load_training_data(o.data, program.tokenizer)
        layers = swap_qat(module, specs, learn_scales=o.learn_scales)
        try:
            with swap_fake_quant(module, tables):
                result = train(module, teacher, sentences, o.loss(), o.train_config(), tokenizer=program.tokenizer,
                               hooks=[QatObserverHook(layers, o.observe_steps)], progress=self.train_progress,
                               lr_multipliers={"*.log_scale": o.scale_lr})
        finally:
            trained = unswap_qat(module, layers)
            for parameter in frozen:
                parameter.requires_grad_(True)
        for name, spec in trained.items():
            set_spec(program, name, spec)
        program.ir = module.eval()
        notes["train"] = result.as_dict()
        notes["data"] = {"sources": list(o.data), "sentences": len(sentences), "digest": corpus_digest(sentences)}
        notes["scale_change"] = _scale_change(specs, trained)
        if o.evaluate:
            with swap_fake_quant(module, {**trained, **tables}):
                notes["heldout_vs_float_qat"] = heldout_agreement(module, teacher, program.tokenizer)
            logger.info("qat: held-out mean cosine to the float model %.4f (PTQ) -> %.4f (QAT)",
                        notes["heldout_vs_float_ptq"]["mean_cosine"], notes["heldout_vs_float_qat"]["mean_cosine"])
        return PassResult(program, True, notes)


def _scale_change(before: dict[str, QuantSpec], after: dict[str, QuantSpec]) -> dict[str, float]:
    """Median and largest relative change of the weight scales over all layers (the report's summary)."""
    ratios = np.concatenate([np.abs(after[n].weight.scale / before[n].weight.scale - 1).reshape(-1) for n in before])
    return {"median": round(float(np.median(ratios)), 5), "max": round(float(ratios.max()), 5)}
