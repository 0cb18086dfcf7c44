"""Distil the module from a teacher: student (damaged or smaller) -> student trained to match the teacher.

Before: a module program whose outputs drifted from the model it came from (fewer layers
after ``depth-shrink``). After: the same architecture, its weights trained with the shared
trainer (`graphopt.train.train`) on a weighted sum of the distillation losses of
`graphopt.distill` (soft labels, hidden states, attention maps, output cosine), on English
sentences that are never held-out ones.

The teacher: ``teacher = "kept"`` (default) is ``program.teacher``, the module kept by the
first architecture-changing pass before this one (``depth-shrink`` keeps the full model);
any other value names a registered model (``"minilm"``), loaded and run eagerly.

Invariant: lossy by nature (the student is meant to move towards the teacher, not to stay
where it was); the architecture, module names, output names and dtypes are unchanged, and
the program stays in eval mode. For text models the notes carry the held-out agreement of
the student with the teacher before and after training (`graphopt.evaluate`), the training
losses and wall time, and the data used (sources, sentence count, digest).

Preconditions: kind ``module``; a tokenizer on the program (text models); a teacher.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from graphopt import registry
from graphopt.data.corpus import OWN_DATA, corpus_digest, load_training_data
from graphopt.distill import (
    AttentionLoss,
    DistillationLoss,
    HiddenStateLoss,
    OutputLoss,
    SoftLabelLoss,
)
from graphopt.errors import PreconditionError
from graphopt.evaluate import heldout_agreement
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program
from graphopt.train import TrainConfig, TrainingOptions, TrainProgress, train

__all__ = ["DistillationPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillOptions(TrainingOptions):
    """Args: teacher: "kept" (program.teacher) or a registered model name. steps, batch_size, lr,
    warmup_steps (at most steps), weight_decay, grad_clip, seed, max_length, eval_every, early_stopping_patience
    (0: off): the trainer's (`TrainConfig`). soft_label, hidden, attention, output: loss weights
    (0 leaves a term out). temperature: Hinton's T. similarity_temperature: τ of the in-batch
    cosine logits. logits: "similarity" (sentence encoders) or "output" (a head's logits).
    hidden_metric, output_metric: "mse" or "cosine". layer_map: teacher layer per student layer
    (empty: uniform). data: "sentences" (graphopt's train and calibration splits), "written"
    (training-only sentences written for graphopt), "recombined" (new sentences spliced from
    those), "substituted" (those with words swapped for the tokenizer's) and corpus sources.
    dropout: train the student with its dropout on. evaluate:
    score the student on held-out sentences before and after (evaluation only: never trained on). The defaults are
    the weights and schedule measured best for MiniLM 6 -> 3 (see recipes/distill-3layer.toml)."""

    teacher: str = "kept"
    steps: int = 500
    lr: float = 1e-3
    warmup_steps: int = 50
    data: tuple[str, ...] = OWN_DATA
    eval_every: int = 0
    early_stopping_patience: int = 0
    soft_label: float = 0.0
    temperature: float = 1.0
    similarity_temperature: float = 0.05
    logits: Literal["similarity", "output"] = "similarity"
    hidden: float = 1.0
    hidden_metric: Literal["mse", "cosine"] = "mse"
    attention: float = 0.1
    output: float = 0.0
    output_metric: Literal["mse", "cosine"] = "cosine"
    layer_map: tuple[int, ...] = ()
    evaluate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0 or self.similarity_temperature <= 0:
            raise ValueError("temperature and similarity_temperature must be positive")
        if not any(w > 0 for w in (self.soft_label, self.hidden, self.attention, self.output)):
            raise ValueError("at least one of soft_label, hidden, attention, output must be > 0")
        self.train_config()  # TrainConfig validates the rest

    def train_config(self, **more: object) -> TrainConfig:
        return super().train_config(eval_every=self.eval_every,
                                    early_stopping_patience=self.early_stopping_patience or None, **more)

    def loss(self) -> DistillationLoss:
        return DistillationLoss([
            SoftLabelLoss(self.soft_label, self.temperature, self.logits, self.similarity_temperature),
            HiddenStateLoss(self.hidden, self.hidden_metric), AttentionLoss(self.attention),
            OutputLoss(self.output, self.output_metric)], layer_map=self.layer_map or None)


class DistillationPass(Pass):
    """Trains the program's module against a teacher with the shared trainer.

    Attributes:
        train_progress: optional callback for each training step (the CLI's display sets it).
    """

    name = "distill"
    kind_in = "module"
    kind_out = "module"
    exact = False
    tolerance = None
    Options = DistillOptions
    train_progress: Callable[[TrainProgress], None] | None = None

    def requires(self, program: Program) -> None:
        if program.tokenizer is None:
            raise PreconditionError("distill trains on sentences and needs a text model with a tokenizer "
                                    f"(model {program.info.get('model')!r} has none)")
        if self.options.teacher == "kept" and program.teacher is None:
            raise PreconditionError(
                "distill: no teacher kept: put 'depth-shrink' (or another pass that keeps the model before "
                "it) earlier in the pipeline, or set teacher = \"<registered model>\"")

    def _teacher(self, program: Program) -> nn.Module:
        if self.options.teacher == "kept":
            assert program.teacher is not None
            return program.teacher
        bundle = registry.models.get(self.options.teacher)()
        return bundle.module.eval()

    def call(self, program: Program) -> PassResult:
        teacher, student = self._teacher(program), program.ir
        sentences = load_training_data(self.options.data, program.tokenizer)
        before = heldout_agreement(student, teacher, program.tokenizer) if self.options.evaluate else None
        result = train(student, teacher, sentences, self.options.loss(), self.options.train_config(),
                       tokenizer=program.tokenizer, progress=self.train_progress)
        after = heldout_agreement(student, teacher, program.tokenizer) if self.options.evaluate else None
        notes: dict[str, Any] = {
            "teacher": self.options.teacher, "data": {"sources": list(self.options.data),
                                                      "sentences": len(sentences), "digest": corpus_digest(sentences)},
            "train": result.as_dict()}
        if before is not None:
            notes["heldout_vs_teacher"] = {"before": before, "after": after}
            logger.info("distill: held-out mean cosine to the teacher %.4f -> %.4f",
                        before["mean_cosine"], after["mean_cosine"] if after else float("nan"))
        program.ir = student.eval()
        return PassResult(program, True, notes)
