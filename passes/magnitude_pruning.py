"""Prune Linear weights: nn.Linear(W) -> nn.Linear(W' ⊙ M), M a fixed 0/1 mask per layer.

Invariant: lossy. Each selected ``nn.Linear`` (fnmatch globs over module names; embeddings
are ``nn.Embedding`` and never match) ends with exactly ``round(s·n)`` of its weights (of its
blocks, for a block pattern) at zero, ``s`` the final sparsity, chosen by magnitude
(``graphopt.sparsity``): unstructured, R×C blocks, or N:M (reported, not sped up: CPUs have no
N:M hardware), per layer or against one global threshold. Module types and names, output
names and dtypes are unchanged. The mask, pattern and sparsity of each layer go to
``program.annotations[layer]["sparsity"]``, which the ``onnxruntime`` writer (sparse
initializers) and the ``cpp`` backend (sparse kernels) read; the notes give each layer's
sparsity and pattern, the schedule, training and held-out agreement with the dense model.

``criterion = "magnitude"`` scores weights by ``|w|``; ``"activation"`` by ``|w|·√E[x²]`` of
their input on calibration sentences, layer after layer through the model pruned so far, and
(``refit``) re-solves each layer's kept weights by least squares so that its outputs on those
inputs stay closest to the dense layer's (``graphopt.sparsity.prune_layerwise``); W' is then the
refit weight, otherwise W. Either criterion follows the schedule below; activation pruning costs
one forward pass over the calibration sentences per layer at each pruning step, so its
schedules prune rarely: ``initial_sparsity = sparsity`` prunes once, before training; for
distillation alone, three steps (60% -> 86% -> 90%) measured best on MiniLM at 90%, ahead of
pruning once and of gradual magnitude pruning (see ``prune_layerwise``). The sparse-90 recipes
prune once and reconstruct (below), which beats both.

``reconstruct_steps > 0`` reconstructs the model block-wise right after the masks are first
chosen (``graphopt.blockwise``): each Transformer layer alone, first to last, learns to give the
dense layer's output on the inputs the pruned layers before it give, masks fixed. A step costs
a fraction of an end-to-end one: 250 steps a layer took MiniLM at 90% from 0.506 to 0.742
held-out mean cosine in 3.5 minutes. End-to-end distillation (``steps``) then continues from
there; a short one undoes part of it (150 steps: 0.719), 2200 steps reached 0.799.

``reconstruct_rounds = R > 1`` prunes gradually inside the reconstruction instead of at once: the
model is first pruned to the first point of Zhu & Gupta's cubic from 0 to ``sparsity`` in R
rounds (0.63 for 90% in 3), and each block, while it trains, is pruned further by the same
criterion (with refit) at evenly spaced steps up to ``prune_until`` of its steps, reaching the
final sparsity at the last; so each block's masks are chosen on weights that have already
learnt to do without the weights removed before. A phase (the steps between two prunings)
that ends worse than it began is put back before the next pruning. On MiniLM at 90%, 250 steps
a layer: 0.797 at once, 0.826 in 3 rounds (0.820 in 5; the last round at 0.3 of the steps 0.814,
at 0.6 or 0.8 0.826); 500 steps a block of two (the sparse-90 recipes): 0.826 -> 0.852; 2000
steps a block of two on 8192 sentences (25 minutes): 0.887. With ``steps > 0`` (and
``initial_sparsity = sparsity``: the trainer has nothing left to prune) the trainer then
fine-tunes the whole model end to end at the final masks; on the output's cosine alone
(``soft_label = hidden = 0``, ``output = 1``) that corrects the error the blocks leave one
another: 1000 steps a block of two on 8192 sentences and then 900 end-to-end steps at lr 4e-4
gave 0.900 in 27 minutes, at lr 1e-3 0.903 in 25 (1800 and 300: 0.896 in 30).

``steps = 0`` prunes once. ``steps > 0`` prunes gradually on Zhu & Gupta's cubic schedule, from
``initial_sparsity`` to ``sparsity`` every ``prune_every`` steps until ``prune_until`` of the
steps (a point that would not raise the sparsity is skipped), distilling from the dense model
(kept as ``program.teacher``) through the shared trainer, whose after-step hook re-applies the
masks so pruned weights stay zero. A later training pass that does not re-apply them would
fill the zeros back in: prune last.

Preconditions: kind ``module``; a selected layer; a tokenizer when ``steps > 0`` or the criterion
is ``"activation"``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from torch import nn

from graphopt.blockwise import LayerReconstruction, reconstruct_layers
from graphopt.data import load_sentences
from graphopt.data.corpus import OWN_DATA, corpus_digest, load_training_data
from graphopt.distill import (
    AttentionLoss,
    DistillationLoss,
    HiddenStateLoss,
    OutputLoss,
    SoftLabelLoss,
    find_layers,
    keep_teacher,
)
from graphopt.errors import PassError, PreconditionError
from graphopt.evaluate import embed, heldout_agreement, module_embedder
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program
from graphopt.sparsity import (
    SPARSITY_KEY,
    Pattern,
    PruningHook,
    apply_masks,
    mask_sparsity,
    prune_layerwise,
    pruning_schedule,
)
from graphopt.train import TrainingOptions, TrainProgress, train

__all__ = ["MagnitudePruningPass"]

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class PruneOptions(TrainingOptions):
    """Args: sparsity: final fraction removed (an N:M pattern needs exactly 1 − N/M). pattern:
    "unstructured", a block "RxC" ("1x8", "4x4", "16x1") or "N:M" ("2:4"). scope: "layer" or
    "global" (one threshold over all selected layers). criterion: "magnitude" (|w|) or
    "activation" (|w|·√E[x²] on calibration sentences, layer by layer at each pruning step;
    scope "layer" only). refit: with "activation", re-solve the kept weights by least
    squares on the calibration inputs. calibration_sentences: how many training sentences
    (drawn with the seed from ``data``) calibrate "activation". layers, exclude: fnmatch globs over
    nn.Linear names. density: glob → relative kept fraction (scope "layer"): a layer keeps in
    proportion to the product of the factors of the globs it matches (1 for none), and the
    layers together reach ``sparsity`` (``graphopt.sparsity.allocate_sparsity``). steps:
    trainer steps (0: prune once, no training). initial_sparsity,
    prune_every, prune_until: the cubic schedule (final sparsity at prune_until × steps, masks
    fixed after). batch_size, lr, warmup_steps, weight_decay, grad_clip, seed, max_length,
    dropout: the trainer's. soft_label, hidden, attention, output: distillation loss weights
    (0 leaves a term out; the defaults measured best on MiniLM at 90%, output cosine weighted most);
    temperature: Hinton's T. data: as the distill pass's, graphopt's own plain-English sentences
    (69k for MiniLM; "sentences" + "pydoc", the trainer's default, are ~1.2k, which reconstruction
    overfits: 0.771 held-out mean cosine against 0.851 at the sparse-90 recipe's settings, on a
    GPU). reconstruct_steps: Adam steps per block (a Transformer layer by default) of block-wise
    reconstruction after the first pruning (to initial_sparsity; the final sparsity when steps = 0),
    0 for none;
    reconstruct_lr: its peak Adam learning rate (cosine-decayed to 0 within each block); on MiniLM at
    90%, 250 steps a layer, held-out mean cosine 0.695 at 3e-4, 0.742 at 1e-3, 0.774 at 3e-3, 0.784 at
    6e-3 and 1e-2, 0.69 at 2e-2 and 0.22 at 4e-2 (diverged): the default, 6e-3, keeps off that edge;
    reconstruct_sentences: how many training sentences (drawn with the seed) it uses, in batches of
    batch_size. reconstruct_block: Transformer layers trained together as one block (1: each alone).
    reconstruct_rounds: prunings on the cubic schedule, the first before reconstruction and the
    others during each block's, the last at prune_until of its steps (1: all at once); with R > 1,
    steps > 0 fine-tunes end to end afterwards at the final masks (initial_sparsity = sparsity).
    evaluate: held-out agreement with the dense model (evaluation only, never trained on)."""

    sparsity: float = 0.9
    pattern: str = "unstructured"
    scope: Literal["layer", "global"] = "layer"
    criterion: Literal["magnitude", "activation"] = "magnitude"
    refit: bool = True
    calibration_sentences: int = 256
    layers: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    density: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: int = 0
    initial_sparsity: float = 0.0
    prune_every: int = 10
    prune_until: float = 0.75
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_length: int = 32
    soft_label: float = 1.0
    hidden: float = 0.2
    attention: float = 0.0
    output: float = 5.0
    temperature: float = 1.0
    data: tuple[str, ...] = OWN_DATA
    reconstruct_steps: int = 0
    reconstruct_lr: float = 6e-3
    reconstruct_sentences: int = 2048
    reconstruct_block: int = 1
    reconstruct_rounds: int = 1
    evaluate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        pattern = Pattern.parse(self.pattern)  # raises ValueError naming the accepted forms
        checks = [
            (0.0 <= self.sparsity < 1.0, f"sparsity must be in [0, 1), got {self.sparsity}"),
            (0.0 <= self.initial_sparsity <= self.sparsity,
             f"initial_sparsity must be in [0, sparsity={self.sparsity}], got {self.initial_sparsity}"),
            (pattern.fixed_sparsity is None or abs(pattern.fixed_sparsity - self.sparsity) < 1e-9,
             f"pattern {pattern} fixes the sparsity at {pattern.fixed_sparsity}: set sparsity = "
             f"{pattern.fixed_sparsity}"),
            (pattern.kind != "n:m" or self.scope == "layer", f"pattern {pattern} has no global form: scope = \"layer\""),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.prune_every >= 1, f"prune_every must be >= 1, got {self.prune_every}"),
            (0.0 <= self.prune_until <= 1.0, f"prune_until must be in [0, 1], got {self.prune_until}"),
            (bool(self.layers), "layers needs at least one glob (\"*\" for every nn.Linear)"),
            (self.criterion in ("magnitude", "activation"),
             f"criterion must be \"magnitude\" or \"activation\", got {self.criterion!r}"),
            (self.criterion != "activation" or self.scope == "layer",
             "criterion \"activation\" prunes layer by layer: scope = \"layer\""),
            (self.calibration_sentences >= 1, f"calibration_sentences must be >= 1, got {self.calibration_sentences}"),
            (not self.density or self.scope == "layer", "density sets each layer's share: scope = \"layer\""),
            (not self.density or pattern.kind != "n:m", f"pattern {pattern} fixes every layer's sparsity: no density"),
            (all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in self.density.values()),
             f"density factors must be numbers > 0, got {self.density}"),
            (self.reconstruct_steps >= 0, f"reconstruct_steps must be >= 0, got {self.reconstruct_steps}"),
            (self.reconstruct_lr > 0, f"reconstruct_lr must be > 0, got {self.reconstruct_lr}"),
            (self.reconstruct_sentences >= 1, f"reconstruct_sentences must be >= 1, got {self.reconstruct_sentences}"),
            (self.reconstruct_block >= 1, f"reconstruct_block must be >= 1, got {self.reconstruct_block}"),
            (self.reconstruct_rounds >= 1, f"reconstruct_rounds must be >= 1, got {self.reconstruct_rounds}"),
            (self.reconstruct_rounds == 1 or self.scope == "layer",
             "reconstruct_rounds > 1 prunes block by block: scope = \"layer\""),
            (self.reconstruct_rounds == 1 or self.reconstruct_steps,
             "reconstruct_rounds > 1 prunes during block-wise reconstruction: it needs reconstruct_steps > 0"),
            (self.reconstruct_rounds == 1 or not self.steps or self.initial_sparsity == self.sparsity,
             ("reconstruct_rounds > 1 reaches the final sparsity inside the reconstruction; steps > 0 then "
              f"fine-tunes end to end at those masks: set initial_sparsity = sparsity = {self.sparsity}")),
            (self.reconstruct_rounds == 1 or _inside_and_distinct(
                _round_steps(self.reconstruct_steps, self.reconstruct_rounds, self.prune_until),
                self.reconstruct_steps),
             (f"reconstruct_rounds = {self.reconstruct_rounds} needs {self.reconstruct_rounds - 1} distinct steps "
              f"within 1 … reconstruct_steps - 1 up to prune_until = {self.prune_until} of them: raise "
              "reconstruct_steps, or set prune_until below 1")),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.steps:
            self.train_config()  # TrainConfig validates lr, batch size, warm-up, ...
            self.loss()

    def loss(self) -> DistillationLoss:
        return DistillationLoss([SoftLabelLoss(self.soft_label, self.temperature), HiddenStateLoss(self.hidden),
                                 AttentionLoss(self.attention), OutputLoss(self.output)])


class MagnitudePruningPass(Pass):
    """Zeroes the smallest weights of selected Linears, at once or gradually with distillation.

    Attributes:
        train_progress: optional callback for each training step (the CLI's display sets it).
        progress_message: optional callback for what the pass is doing between training steps
            (block-wise reconstruction, layer by layer; the CLI's display sets it).
    """

    name = "prune"
    kind_in = "module"
    kind_out = "module"
    exact = False
    tolerance = None
    Options = PruneOptions
    train_progress: Callable[[TrainProgress], None] | None = None
    progress_message: Callable[[str], None] | None = None

    def _density(self, names: list[str]) -> dict[str, float]:
        """Each selected layer's density factor: the product of its matching globs' factors."""
        factors = {}
        for name in names:
            factor = 1.0
            for glob, f in self.options.density.items():
                if fnmatch.fnmatchcase(name, glob):
                    factor *= f
            factors[name] = factor
        return factors

    def _select(self, module: nn.Module) -> list[str]:
        o = self.options
        return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)
                and any(fnmatch.fnmatchcase(name, g) for g in o.layers)
                and not any(fnmatch.fnmatchcase(name, g) for g in o.exclude)]

    def requires(self, program: Program) -> None:
        selected = self._select(program.ir)
        if not selected:
            raise PreconditionError(f"prune: no nn.Linear matches layers={list(self.options.layers)} "
                                    f"exclude={list(self.options.exclude)}")
        unmatched = [g for g in self.options.density if not any(fnmatch.fnmatchcase(n, g) for n in selected)]
        if unmatched:
            raise PreconditionError(f"prune: density globs {unmatched} match no pruned layer (layers are named "
                                    f"like {selected[0]!r})")
        if self.options.steps and program.tokenizer is None:
            raise PreconditionError(f"prune: steps = {self.options.steps} distils on sentences and needs a text "
                                    f"model with a tokenizer (model {program.info.get('model')!r} has none); "
                                    "use steps = 0 to prune once")
        if self.options.reconstruct_steps and program.tokenizer is None:
            raise PreconditionError(f"prune: reconstruct_steps = {self.options.reconstruct_steps} reconstructs on "
                                    "sentences and needs a text model with a tokenizer (model "
                                    f"{program.info.get('model')!r} has none); use reconstruct_steps = 0")
        if self.options.reconstruct_steps:
            try:
                find_layers(program.ir)
            except ValueError as error:
                raise PreconditionError(f"prune: reconstruct_steps needs a model with Transformer layers: {error}") \
                    from error
        if self.options.criterion == "activation" and program.tokenizer is None:
            raise PreconditionError("prune: criterion = \"activation\" calibrates on sentences and needs a text "
                                    f"model with a tokenizer (model {program.info.get('model')!r} has none); "
                                    "use criterion = \"magnitude\"")

    def call(self, program: Program) -> PassResult:
        o, names = self.options, self._select(program.ir)
        evaluate = o.evaluate and program.tokenizer is not None
        dense = _embeddings(program.ir, program.tokenizer) if evaluate else None
        notes: dict[str, Any] = {"pattern": str(Pattern.parse(o.pattern)), "scope": o.scope,
                                 "target_sparsity": o.sparsity, "criterion": o.criterion}
        teacher = keep_teacher(program) if o.steps or o.reconstruct_steps else None
        needs_text = o.steps or o.criterion == "activation" or o.reconstruct_steps
        sentences = load_training_data(o.data, program.tokenizer) if needs_text else None
        calibration = (random.Random(o.seed).sample(list(sentences), min(o.calibration_sentences, len(sentences)))
                       if o.criterion == "activation" else None)
        choose = self._activation_masks(program, names, calibration) if calibration is not None else None
        schedule = pruning_schedule(o.steps, o.sparsity, initial=o.initial_sparsity, every=o.prune_every,
                                    until=o.prune_until)
        hook = PruningHook(names, pattern=o.pattern, scope=o.scope, schedule=schedule, choose_masks=choose,
                           density=self._density(names) if o.density else None)
        if choose is not None and len(schedule) > 5:
            logger.warning("prune: criterion \"activation\" calibrates every layer at each of the schedule's %d "
                           "pruning points (%d forward passes over %d sentences); raise prune_every or "
                           "initial_sparsity to prune fewer times", len(schedule), len(schedule) * len(names),
                           len(calibration))
        if hook.density:
            notes["density"] = hook.density
        if choose is not None:
            notes["calibration"] = {"sentences": len(calibration), "refit": o.refit}
        elif dense is not None and o.steps:  # what pruning at once would have cost, for comparison
            clone = program.clone()
            PruningHook(names, pattern=o.pattern, scope=o.scope, density=hook.density).prune(clone.ir, o.sparsity)
            notes["heldout_vs_dense_one_shot"] = _agreement(clone.ir, program.tokenizer, dense)
        if o.reconstruct_steps:
            assert teacher is not None and sentences is not None
            notes["reconstruct"] = self._reconstruct(program, teacher, hook, sentences, schedule)
        if o.steps:
            result = train(program.ir, teacher, sentences, o.loss(), o.train_config(),
                           tokenizer=program.tokenizer, hooks=[hook], progress=self.train_progress)
            notes["train"] = result.as_dict()
            notes["data"] = {"sources": list(o.data), "sentences": len(sentences), "digest": corpus_digest(sentences)}
            notes["schedule"] = [[step, round(s, 4)] for step, s in hook.history]
        if not hook.history or hook.history[-1][1] != o.sparsity:
            hook.prune(program.ir, o.sparsity)
        program.ir.eval()
        if dense is not None:
            notes["heldout_vs_dense"] = _agreement(program.ir, program.tokenizer, dense)
        notes["layers"] = self._annotate(program, hook)
        counts = np.array([[row["shape"][0] * row["shape"][1], row["zeros"]] for row in notes["layers"].values()])
        notes["overall_sparsity"] = round(float(counts[:, 1].sum() / counts[:, 0].sum()), 5)
        logger.info("prune: %d layers at %s sparsity %.3f (%s)", len(names), notes["pattern"],
                    notes["overall_sparsity"], o.scope)
        return PassResult(program, o.sparsity > 0, notes)

    def _reconstruct(self, program: Program, teacher: nn.Module, hook: PruningHook, sentences: Sequence[str],
                     schedule: Mapping[int, float]) -> dict[str, Any]:
        """Prunes to the schedule's step-0 sparsity now (training will not redo it), then reconstructs block-wise."""
        o = self.options
        first = schedule[0]  # initial_sparsity, or the final one when steps = 0
        rounds = _round_sparsities(o.sparsity, o.reconstruct_rounds) if o.reconstruct_rounds > 1 else [first]
        hook.prune(program.ir, rounds[0], 0)
        hook.schedule.pop(0)
        chosen = random.Random(o.seed).sample(list(sentences), min(o.reconstruct_sentences, len(sentences)))
        batches = [program.tokenizer(chosen[i:i + o.batch_size], max_length=o.max_length)
                   for i in range(0, len(chosen), o.batch_size)]

        unit = "layer" if o.reconstruct_block == 1 else "block"

        def progress(done: int, total: int, layer: LayerReconstruction) -> None:
            text = (f"{unit} {done}/{total} ({layer.layer}) reconstructed, mse {layer.loss_before:.4g} -> "
                    f"{layer.loss_after:.4g}"
                    + (f" ({layer.reverted} phase(s) no better: weights put back)" if layer.reverted else ""))
            logger.info("prune: %s", text)
            if self.progress_message is not None:
                self.progress_message(text)

        if self.progress_message is not None:
            self.progress_message(f"reconstructing {unit} by {unit}, {o.reconstruct_steps} steps each")
        start = time.perf_counter()
        def reapply(layer: str) -> None:  # only the layers being trained change
            apply_masks(program.ir, {n: hook.masks[n] for n in _inside(hook.masks, [layer])})

        prune_at = _round_steps(o.reconstruct_steps, len(rounds), o.prune_until)

        def prune_further(block: Sequence[str], point: int) -> None:
            hook.prune_layers(program.ir, rounds[point + 1], _inside(hook.names, block))

        layers = reconstruct_layers(program.ir, teacher, batches, steps=o.reconstruct_steps, lr=o.reconstruct_lr,
                                    seed=o.seed, layers_per_block=o.reconstruct_block, after_step=reapply,
                                    prune_at=prune_at, prune=prune_further, progress=progress)
        if len(rounds) > 1:
            hook.history.append((0, rounds[-1]))
        return {"sparsity": rounds if len(rounds) > 1 else first, "sentences": len(chosen),
                "steps_per_block": o.reconstruct_steps, "layers_per_block": o.reconstruct_block,
                "wall_s": round(time.perf_counter() - start, 2), "layers": [r.as_dict() for r in layers]}

    def _activation_masks(self, program: Program, names: list[str], calibration: list[str]) -> Callable[..., Any]:
        """The hook's mask choice for criterion "activation": ``prune_layerwise`` on calibration batches."""
        o = self.options
        batches = [program.tokenizer(calibration[i:i + 32], max_length=o.max_length)
                   for i in range(0, len(calibration), 32)]

        def progress(done: int, total: int, name: str) -> None:
            logger.info("prune: layer %d/%d (%s) pruned on activations", done, total, name)

        def choose(module: nn.Module, sparsity: Mapping[str, float]) -> dict[str, Any]:
            return prune_layerwise(module, [n for n in names if n in sparsity], sparsity, batches,
                                   pattern=o.pattern, refit=o.refit, progress=progress)

        return choose

    def _annotate(self, program: Program, hook: PruningHook) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        pattern = str(hook.pattern)
        for name, mask in hook.masks.items():
            weight = program.ir.get_submodule(name).weight.detach()
            if bool(weight[~mask].any()):
                raise PassError(f"prune: layer {name!r} has nonzero weights outside its mask")
            sparsity = round(mask_sparsity(mask), 5)
            program.annotations.setdefault(name, {})[SPARSITY_KEY] = {
                "mask": mask.clone(), "pattern": pattern, "sparsity": sparsity, "shape": list(mask.shape)}
            rows[name] = {"shape": list(mask.shape), "pattern": pattern, "sparsity": sparsity,
                          "zeros": int((weight == 0).sum())}
        return rows


def _inside(names: Iterable[str], layers: Sequence[str]) -> list[str]:
    """The ``names`` (Linears) that are submodules of one of ``layers`` (Transformer layers)."""
    return [n for n in names if any(n.startswith(layer + ".") for layer in layers)]


def _round_steps(steps: int, rounds: int, until: float) -> list[int]:
    """The steps of a block's reconstruction before which rounds 2 … ``rounds`` prune (round 1 is before it):
    evenly spaced up to ``until`` of the ``steps``."""
    return [round(until * steps * r / (rounds - 1)) for r in range(1, rounds)]


def _inside_and_distinct(points: list[int], steps: int) -> bool:
    """Whether ``points`` are distinct steps after the first and before the end of ``steps``."""
    return len(set(points)) == len(points) and all(1 <= p < steps for p in points)


def _round_sparsities(final: float, rounds: int) -> list[float]:
    """The overall sparsity after each of ``rounds`` prunings on Zhu & Gupta's cubic from 0 to ``final``."""
    return [final * (1.0 - (1.0 - r / rounds) ** 3) for r in range(1, rounds + 1)]


def _embeddings(module: nn.Module, tokenizer: Any) -> np.ndarray:
    was_training = module.training
    module.eval()
    try:
        return embed(module_embedder(module), tokenizer, load_sentences("heldout"))
    finally:
        module.train(was_training)


def _agreement(module: nn.Module, tokenizer: Any, dense: np.ndarray) -> dict[str, float | int]:
    """Held-out agreement of ``module`` with the dense model's embeddings (evaluation only)."""
    return heldout_agreement(module, dense, tokenizer)
