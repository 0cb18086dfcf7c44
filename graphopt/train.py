"""The one training loop in graphopt: a student learns from a teacher through a `DistillationLoss`.

Every lossy pass that wins accuracy back (depth-shrink + distill, QAT, pruning, low-rank
recovery) calls `train` rather than writing its own loop, and adds what it needs through
`TrainHook`s (pruning re-applies its masks after each step, QAT freezes its observers).

What the loop does, in order: AdamW (weight decay on matrices only, not on biases and
norms), a linear warm-up then a cosine decay of the learning rate, gradient-norm clipping,
and optionally a validation loss every ``eval_every`` steps with early stopping, on a
*validation slice of the training data* (a seeded ``validation_fraction`` of it, never the
held-out split, which is refused on entry by `graphopt.data.assert_not_heldout`). The
teacher runs in eval mode under ``no_grad``; the student trains (dropout on unless
``train_mode=False``) and is returned in eval mode.

Determinism: batches are drawn with a generator seeded from ``config.seed``, and the global
RNG (dropout) is seeded inside ``torch.random.fork_rng``, so the same seed gives the same
weights after N steps and the caller's RNG state is left as it was.

Example::

    loss = DistillationLoss([SoftLabelLoss(temperature=2.0), HiddenStateLoss()])
    result = train(student, teacher, load_corpus(), loss, TrainConfig(steps=500),
                   tokenizer=program.tokenizer, progress=lambda p: print(p.step, p.loss))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from graphopt.data import assert_not_heldout
from graphopt.distill import DistillationLoss

__all__ = ["TrainConfig", "TrainHook", "TrainProgress", "TrainResult", "TrainingOptions", "lr_factor", "train"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        steps: optimizer steps.
        batch_size: sentences per step (ignored when the data are ready batches).
        lr: peak learning rate, reached after ``warmup_steps``, then cosine-decayed to
            ``lr · min_lr_ratio`` at the last step.
        warmup_steps: linear warm-up from 0.
        weight_decay: AdamW's, on weights of 2 or more dimensions only.
        grad_clip: clip the global gradient norm to this; ``None`` does not clip.
        seed: seeds batch order, the validation slice and dropout.
        eval_every: compute the validation loss every this many steps (0: never).
        early_stopping_patience: stop after this many validations without improvement and
            restore the best weights; ``None`` never stops early. Needs ``eval_every``.
        validation_fraction: share of the training data kept aside for validation when
            ``eval_every`` is set.
        max_length: tokens per sentence after truncation.
        train_mode: put the student in train mode (dropout) while training.
        min_lr_ratio: floor of the cosine decay, as a fraction of ``lr``.
        bucket_by_length: batch sentences of similar length together (seeded windows of 50
            batches sorted by length, batch order shuffled): less padding, faster steps.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    early_stopping_patience: int | None = None
    validation_fraction: float = 0.05
    max_length: int = 128
    train_mode: bool = True
    min_lr_ratio: float = 0.0
    bucket_by_length: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}"),
            (0 <= self.warmup_steps <= self.steps,
             f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip is None or self.grad_clip > 0,
             f"grad_clip must be positive or None, got {self.grad_clip}"),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.early_stopping_patience is None
             or (self.early_stopping_patience >= 1 and self.eval_every > 0),
             "early_stopping_patience needs a value >= 1 and eval_every > 0"),
            (0 < self.validation_fraction < 1,
             f"validation_fraction must be in (0, 1), got {self.validation_fraction}"),
            (self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """The trainer's options as a training pass exposes them in a recipe (``distill``, ``prune``,
    ``qat``); a pass's ``Options`` inherits them and may redeclare a field to change its default.

    Attributes: steps, batch_size, lr, warmup_steps (capped at steps), weight_decay, grad_clip,
    seed, max_length: as `TrainConfig`. dropout: train with the student's dropout on. data:
    "sentences" (graphopt's train and calibration splits) and `graphopt.data.corpus` sources.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    max_length: int = 128
    dropout: bool = False
    data: tuple[str, ...] = ("sentences", "pydoc")

    def __post_init__(self) -> None:
        from graphopt.data.corpus import OWN_DATA, SOURCES

        known = (*OWN_DATA, *SOURCES)
        if not self.data or any(d not in known for d in self.data):
            raise ValueError(f"data must name some of {list(known)}, got {list(self.data)}")

    def train_config(self, **more: object) -> TrainConfig:
        """The `TrainConfig` these options describe (``more``: its other fields, e.g. ``eval_every``)."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=min(self.warmup_steps, self.steps), weight_decay=self.weight_decay,
                           grad_clip=self.grad_clip, seed=self.seed, max_length=self.max_length,
                           train_mode=self.dropout, **more)  # type: ignore[arg-type]


class TrainHook(Protocol):
    """Called around every optimizer step; implement either method (a missing one is skipped).

    ``step`` counts from 0. ``after_step`` runs after ``optimizer.step()``, so a pruning
    hook can re-apply its masks to the updated weights.
    """

    def before_step(self, step: int, student: nn.Module) -> None: ...

    def after_step(self, step: int, student: nn.Module) -> None: ...


@dataclasses.dataclass(frozen=True)
class TrainProgress:
    """What the progress callback sees after each step: running (smoothed) losses."""

    step: int
    steps: int
    loss: float
    parts: Mapping[str, float]
    lr: float
    elapsed_s: float
    val_loss: float | None = None


@dataclasses.dataclass
class TrainResult:
    """What `train` did.

    Attributes:
        steps: steps taken (fewer than asked when stopped early).
        losses: the total loss of every step.
        first_parts, final_parts: running per-term losses at the first and last step.
        val_losses: ``(step, loss)`` of every validation.
        best_step: the step of the best validation loss (weights restored from it when
            early stopping is on); ``None`` without validation.
        stopped_early: whether early stopping ended training.
        wall_s: training wall time.
    """

    steps: int
    losses: list[float]
    first_parts: dict[str, float]
    final_parts: dict[str, float]
    val_losses: list[tuple[int, float]]
    best_step: int | None
    stopped_early: bool
    wall_s: float

    def as_dict(self) -> dict[str, object]:
        """For report notes: everything but the per-step losses."""
        return {"steps": self.steps, "first_loss": self.losses[0] if self.losses else None,
                "final_loss": self.losses[-1] if self.losses else None, "first_parts": self.first_parts,
                "final_parts": self.final_parts, "val_losses": self.val_losses, "best_step": self.best_step,
                "stopped_early": self.stopped_early, "wall_s": round(self.wall_s, 2)}


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Batches:
    """Seeded, reshuffled-every-epoch batches from sentences (tokenized) or ready input dicts."""

    def __init__(self, items: Sequence[str] | Sequence[Batch], tokenizer: Callable[..., Batch] | None,
                 config: TrainConfig, generator: torch.Generator) -> None:
        self.items, self.tokenizer, self.config, self.generator = items, tokenizer, config, generator
        self.text = bool(items) and isinstance(items[0], str)
        if self.text and tokenizer is None:
            raise ValueError("train: sentences need a tokenizer (tokenizer=program.tokenizer)")
        self.size = config.batch_size if self.text else 1

    def batch(self, chunk: Sequence[str | Batch]) -> Batch:
        if self.text:
            assert self.tokenizer is not None
            return self.tokenizer(list(chunk), max_length=self.config.max_length)
        return chunk[0]  # type: ignore[return-value]

    def _epoch(self) -> list[list[int]]:
        """One epoch of batches (item indices); the last partial batch is dropped."""
        order = torch.randperm(len(self.items), generator=self.generator).tolist()
        if not (self.text and self.config.bucket_by_length):
            return [order[i:i + self.size] for i in range(0, len(order) - self.size + 1, self.size)]
        # Sort windows of 50 batches by length, so that a batch's sentences pad to a similar
        # length, then shuffle the batches themselves (batch order stays random).
        window, batches = 50 * self.size, []
        for start in range(0, len(order), window):
            part = sorted(order[start:start + window], key=lambda i: len(self.items[i]))  # type: ignore[arg-type]
            batches += [part[i:i + self.size] for i in range(0, len(part) - self.size + 1, self.size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            epoch = self._epoch()
            if not epoch:
                raise ValueError(f"train: {len(self.items)} training items are fewer than one batch "
                                 f"of {self.size}")
            for indices in epoch:
                yield self.batch([self.items[i] for i in indices])

    def all(self) -> Iterator[Batch]:
        """Every item once, in order (validation)."""
        for start in range(0, len(self.items), self.size):
            yield self.batch(self.items[start:start + self.size])


def _split(data: Sequence[str] | Sequence[Batch], config: TrainConfig,
           generator: torch.Generator) -> tuple[list, list]:
    items = list(data)
    if not config.eval_every:
        return items, []
    order = torch.randperm(len(items), generator=generator).tolist()
    n_val = max(1, round(len(items) * config.validation_fraction))
    if len(items) - n_val < 1:
        raise ValueError(f"train: {len(items)} items are too few to keep {n_val} aside for validation")
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def _optimizer(student: nn.Module, config: TrainConfig,
               lr_multipliers: Mapping[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW; decay on weights of 2+ dims; parameters whose name matches a glob of ``lr_multipliers``
    get that multiple of the learning rate (and no decay: they are not weights)."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("train: the student has no trainable parameter")
    multipliers = dict(lr_multipliers or {})
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in named:
        factor = next((f for glob, f in multipliers.items() if fnmatch.fnmatchcase(name, glob)), None)
        decay = config.weight_decay if factor is None and param.dim() >= 2 else 0.0
        groups.setdefault((1.0 if factor is None else factor, decay), []).append(param)
    return torch.optim.AdamW([{"params": ps, "lr": config.lr * f, "weight_decay": d}
                              for (f, d), ps in sorted(groups.items(), key=lambda g: g[0][0] != 1.0)],
                             lr=config.lr)  # the base-rate groups first: progress reports group 0's lr


def train(student: nn.Module, teacher: nn.Module, data: Sequence[str] | Sequence[Batch],
          loss: DistillationLoss, config: TrainConfig = TrainConfig(), *,
          tokenizer: Callable[..., Batch] | None = None, hooks: Sequence[TrainHook] = (),
          progress: Callable[[TrainProgress], None] | None = None,
          lr_multipliers: Mapping[str, float] | None = None) -> TrainResult:
    """Trains ``student`` in place to match ``teacher`` on ``data`` under ``loss``.

    Args:
        student: the module being trained (an fx ``GraphModule`` or eager module).
        teacher: the reference; run in eval mode without gradients, never modified.
        data: training sentences (with ``tokenizer``), or ready input dicts, one per step.
            Must not contain held-out sentences.
        loss: the distillation loss; bound to this student and teacher here.
        config: optimiser, schedule, seed, validation.
        tokenizer: turns a list of sentences into the models' named inputs.
        hooks: `TrainHook`s called before and after every step.
        progress: called after every step with running losses (drive a progress bar with it).
        lr_multipliers: parameter-name globs -> multiple of ``config.lr`` (QAT's learned scales
            take a larger step than the weights); the first matching glob counts.

    Returns:
        what happened; the student is left in eval mode (at its best validation weights
        when early stopping is on).

    Raises:
        ValueError: held-out data, empty data, a bad config, or a loss that is not finite.
    """
    if not len(data):
        raise ValueError("train: no training data")
    if isinstance(data[0], str):
        assert_not_heldout(data, consumer="train")  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(config.seed)
    train_items, val_items = _split(data, config, generator)
    batches = _Batches(train_items, tokenizer, config, generator)
    loop = _Loop(student, teacher, loss.bind(student, teacher), config, hooks,
                 _Batches(val_items, tokenizer, config, generator) if val_items else None, lr_multipliers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        student.train(config.train_mode)
        try:
            for step, batch in zip(range(config.steps), batches):
                loop.step(step, batch)
                val_loss = loop.validate(step)
                if progress is not None:
                    progress(loop.progress(step, val_loss))
                if loop.result.stopped_early:
                    logger.info("early stop at step %d (best %s)", step + 1, loop.result.best_step)
                    break
        finally:
            student.eval()
    return loop.finish()


class _Loop:
    """The state of one `train` call: optimizer, schedule, running losses, best weights."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: DistillationLoss, config: TrainConfig,
                 hooks: Sequence[TrainHook], validation: _Batches | None,
                 lr_multipliers: Mapping[str, float] | None = None) -> None:
        self.student, self.teacher, self.loss, self.config = student, teacher.eval(), loss, config
        self.hooks, self.validation = hooks, validation
        self.optimizer = _optimizer(student, config, lr_multipliers)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.result = TrainResult(0, [], {}, {}, [], None, False, 0.0)
        self.running: dict[str, float] = {}
        self.best: dict[str, torch.Tensor] | None = None
        self.start = time.perf_counter()

    def _hooks(self, method: str, step: int) -> None:
        for hook in self.hooks:
            call = getattr(hook, method, None)
            if call is not None:
                call(step, self.student)

    def step(self, step: int, batch: Batch) -> None:
        self._hooks("before_step", step)
        with torch.no_grad():
            target = self.loss.run(self.teacher, batch, "teacher")
        value = self.loss(self.loss.run(self.student, batch, "student"), target, batch)
        parts = {"total": value.total.item(), **{k: v.item() for k, v in value.parts.items()}}
        if not all(math.isfinite(v) for v in parts.values()):
            raise ValueError(f"train: the loss is not finite at step {step} ({parts}); lower lr")
        self.optimizer.zero_grad(set_to_none=True)
        value.total.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self._hooks("after_step", step)
        for key, number in parts.items():  # exponentially smoothed, 0.9
            self.running[key] = number if key not in self.running else 0.9 * self.running[key] + 0.1 * number
        self.result.losses.append(parts["total"])
        self.result.steps = step + 1
        if step == 0:
            self.result.first_parts = {k: v for k, v in parts.items() if k != "total"}

    def validate(self, step: int) -> float | None:
        """Validation loss every ``eval_every`` steps; keeps the best weights; flags early stopping."""
        if self.validation is None or (step + 1) % self.config.eval_every:
            return None
        self.student.eval()
        with torch.no_grad():
            totals = [self.loss(self.loss.run(self.student, b, "student"), self.loss.run(self.teacher, b, "teacher"),
                                b).total.item() for b in self.validation.all()]
        self.student.train(self.config.train_mode)
        val_loss = sum(totals) / len(totals)
        result = self.result
        result.val_losses.append((step + 1, val_loss))
        if self.best is None or val_loss < min(v for _, v in result.val_losses[:-1]):
            self.best = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            result.best_step = step + 1
        patience = self.config.early_stopping_patience
        if patience is not None and result.best_step is not None:
            result.stopped_early = sum(1 for s, _ in result.val_losses if s > result.best_step) >= patience
        return val_loss

    def progress(self, step: int, val_loss: float | None) -> TrainProgress:
        return TrainProgress(step + 1, self.config.steps, self.running["total"],
                             {k: v for k, v in self.running.items() if k != "total"},
                             self.schedule.get_last_lr()[0], time.perf_counter() - self.start, val_loss)

    def finish(self) -> TrainResult:
        if self.best is not None and self.config.early_stopping_patience is not None:
            self.student.load_state_dict(self.best)
        self.result.final_parts = {k: v for k, v in self.running.items() if k != "total"}
        self.result.wall_s = time.perf_counter() - self.start
        if self.result.losses:
            logger.info("trained %d steps in %.1fs: loss %.4g -> %.4g", self.result.steps, self.result.wall_s,
                        self.result.losses[0], self.result.losses[-1])
        return self.result
