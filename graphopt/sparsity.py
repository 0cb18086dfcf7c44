"""Sparsity masks, the gradual pruning schedule, and the table that picks a sparse kernel format.

Shared by the ``prune`` pass, the ``cpp`` backend (which lowers each pruned Linear to the
kernel format that measured fastest for it) and anyone else who needs the mask math without
importing a pass. A mask is a bool tensor the shape of the weight, ``True`` where a weight is
kept; the ``prune`` pass stores it in ``program.annotations[layer]["sparsity"]`` (see
``SPARSITY_KEY``) with the pattern and the sparsity reached.

Patterns (``Pattern.parse``):

* ``"unstructured"``: the ``round(s·numel)`` weights of least ``|w|`` are removed.
* ``"RxC"`` blocks (``"1x8"``, ``"4x4"``, ``"16x1"``): R output rows by C input columns;
  a block's score is the mean ``|w|`` of its entries (edge blocks of a shape that is not a
  multiple count only their real entries), and the ``round(s·blocks)`` blocks of least score
  are removed whole. These are the shapes the cpp kernels run (see ``backends/cpp/packing.py``).
* ``"N:M"`` (``"2:4"``): in every group of M consecutive weights along the input dimension the
  N of largest ``|w|`` are kept, so the sparsity is ``1 − N/M``. CPUs have no N:M hardware:
  the pattern is for export to targets that do; here it is reported, not sped up.

``scope="global"`` ranks all layers' scores together against one threshold (unstructured and
blocks), so layers with larger weights keep more of them. Ties are broken by position (a
stable sort), so a mask is a deterministic function of the weights.

Gradual pruning (Zhu & Gupta, 2017, "To prune, or not to prune"): the sparsity at step t is
``s_f + (s_i − s_f)·(1 − (t − t0)/(t1 − t0))³`` between ``t0`` and ``t1``, pruning fast while
many weights are redundant and slowly near the end. ``PruningHook`` is the shared trainer's
hook that prunes on that schedule before a step and re-applies the masks after every step, so
masked weights stay exactly zero through training.

Kernel choice: ``KernelTable`` reads measured times of the cpp kernels (``graphopt/data/
sparse_kernel_times.json``, written by ``benchmarks/prune.py table --write``) and
``KernelTable.choose`` returns, for one mask, the format (CSR, a BSR block shape, or dense)
whose interpolated time is least, or dense where no sparse format beats the dense time by the
margin: a deterministic choice that needs no timing at compile time.

Example::

    mask = magnitude_mask(linear.weight, 0.9, "4x4")
    apply_masks(model, {"layers.0.ffn.intermediate": mask})
    hook = PruningHook(masks, pattern="unstructured", schedule=pruning_schedule(1000, 0.9))
    train(student, teacher, sentences, loss, config, hooks=[hook])
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from graphopt.calibration import collect_second_moments

__all__ = ["SPARSITY_KEY", "Pattern", "magnitude_mask", "global_magnitude_masks", "activation_mask",
           "refit_kept_weights", "prune_layerwise", "allocate_sparsity", "mask_sparsity", "stored_density",
           "apply_masks", "cubic_sparsity", "pruning_schedule", "PruningHook", "KernelChoice", "KernelTable"]

logger = logging.getLogger(__name__)

#: The annotation key of a pruned layer: ``{"mask", "pattern", "sparsity", "shape"}``.
SPARSITY_KEY = "sparsity"

#: The shipped kernel timing table, in ``graphopt/data``.
TABLE_NAME = "sparse_kernel_times.json"

Scope = Literal["layer", "global"]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``unstructured``, ``block`` (R×C) or ``n:m``."""

    kind: Literal["unstructured", "block", "n:m"]
    block: tuple[int, int] = (1, 1)
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """``"unstructured"``, ``"RxC"`` (a block) or ``"N:M"``.

        Raises:
            ValueError: naming the text and the three accepted forms.
        """
        if isinstance(text, Pattern):
            return text
        spec = str(text).strip().lower()
        if spec == "unstructured":
            return cls("unstructured")
        if match := re.fullmatch(r"(\d+)x(\d+)", spec):
            r, c = int(match[1]), int(match[2])
            if not (1 <= r <= 64 and 1 <= c <= 64):
                raise ValueError(f"block pattern {text!r}: each side must be 1..64")
            return cls("unstructured") if (r, c) == (1, 1) else cls("block", (r, c))
        if match := re.fullmatch(r"(\d+):(\d+)", spec):
            n, m = int(match[1]), int(match[2])
            if not 1 <= n < m:
                raise ValueError(f"N:M pattern {text!r} needs 1 <= N < M")
            return cls("n:m", n=n, m=m)
        raise ValueError(f"unknown sparsity pattern {text!r}: use \"unstructured\", a block \"RxC\" "
                         "(\"1x8\", \"4x4\", \"16x1\") or \"N:M\" (\"2:4\")")

    def __str__(self) -> str:
        if self.kind == "block":
            return f"{self.block[0]}x{self.block[1]}"
        return f"{self.n}:{self.m}" if self.kind == "n:m" else "unstructured"

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (``1 − N/M``); ``None`` for the others."""
        return 1 - self.n / self.m if self.kind == "n:m" else None


def _check(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"masks are for 2-D weights [out, in], got shape {tuple(weight.shape)}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return weight.detach().abs().float()


def _block_scores(magnitude: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Mean |w| of each R×C block, ``[ceil(out/R), ceil(in/C)]`` (edge blocks: real entries only)."""
    (r, c), (out, inp) = block, magnitude.shape
    rows, cols = -(-out // r), -(-inp // c)
    padded = magnitude.new_zeros(rows * r, cols * c)
    padded[:out, :inp] = magnitude
    count = magnitude.new_zeros(rows * r, cols * c)
    count[:out, :inp] = 1
    fold = lambda t: t.reshape(rows, r, cols, c).sum(dim=(1, 3))  # noqa: E731
    return fold(padded) / fold(count)


def _expand_blocks(keep: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    r, c = block
    return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[: shape[0], : shape[1]].contiguous()


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask of ``scores``' shape removing the ``round(sparsity·numel)`` smallest (stable ties)."""
    flat = scores.reshape(-1)
    pruned = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.argsort(flat, stable=True)[:pruned]] = False
    return keep.reshape(scores.shape)


def _nm_mask(magnitude: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out, inp = magnitude.shape
    if inp % m:
        raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {inp}")
    groups = magnitude.reshape(out, inp // m, m)
    order = torch.argsort(-groups, dim=-1, stable=True)  # largest first, ties by position
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(out, inp)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str | Pattern = "unstructured") -> torch.Tensor:
    """The magnitude-pruning mask of one weight ``[out, in]``: ``True`` where kept.

    Args:
        weight: the dense weight.
        sparsity: fraction of weights (of blocks, for a block pattern) to remove. An N:M
            pattern removes ``1 − N/M`` whatever is asked; pass that value.
        pattern: see ``Pattern.parse``.

    Raises:
        ValueError: a weight that is not 2-D, a sparsity outside [0, 1], an N:M pattern on a
            width not divisible by M or a sparsity other than ``1 − N/M``.
    """
    magnitude, spec = _check(weight, sparsity), Pattern.parse(pattern)
    if spec.kind == "n:m":
        if not math.isclose(sparsity, spec.fixed_sparsity or 0.0, abs_tol=1e-9):
            raise ValueError(f"pattern {spec} fixes the sparsity at {spec.fixed_sparsity:g}, got {sparsity}")
        return _nm_mask(magnitude, spec.n, spec.m)
    if spec.kind == "block":
        return _expand_blocks(_keep_largest(_block_scores(magnitude, spec.block), sparsity), spec.block,
                              magnitude.shape)
    return _keep_largest(magnitude, sparsity)


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float,
                           pattern: str | Pattern = "unstructured") -> dict[str, torch.Tensor]:
    """Masks of several weights against one threshold: ``round(s·total)`` of all scores removed.

    The scores are ``|w|`` (unstructured) or block means (blocks); all layers must then use
    the same block shape. N:M is per group by definition and has no global form.

    Raises:
        ValueError: an N:M pattern, no weights, or a bad weight or sparsity.
    """
    spec = Pattern.parse(pattern)
    if spec.kind == "n:m":
        raise ValueError(f"pattern {spec} is per group of {spec.m}: it has no global form; use scope = \"layer\"")
    if not weights:
        raise ValueError("global_magnitude_masks needs at least one weight")
    scores = {name: _check(w, sparsity) for name, w in weights.items()}
    if spec.kind == "block":
        scores = {name: _block_scores(s, spec.block) for name, s in scores.items()}
    keep = _keep_largest(torch.cat([s.reshape(-1) for s in scores.values()]), sparsity)
    masks, start = {}, 0
    for name, s in scores.items():
        part = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
        masks[name] = _expand_blocks(part, spec.block, weights[name].shape) if spec.kind == "block" else part
    return masks


def activation_mask(weight: torch.Tensor, second_moment: torch.Tensor, sparsity: float,
                    pattern: str | Pattern = "unstructured") -> torch.Tensor:
    """The mask of ``magnitude_mask`` on the scores ``|w_ij|·√E[x_j²]`` instead of ``|w_ij|``.

    Sun et al. (2023, "Wanda"): a weight matters by what it multiplies, so one on an input
    that is large on real data is kept before a larger one on an input that is nearly zero.
    ``second_moment`` is ``E[x xᵀ]`` of the layer's input (``[in, in]``, only its diagonal is
    read; ``graphopt.calibration.collect_second_moments`` gives it). Same patterns, counts and
    errors as ``magnitude_mask``.
    """
    if second_moment.dim() != 2 or second_moment.shape[0] != weight.shape[-1]:
        raise ValueError(f"second_moment must be [in, in] = [{weight.shape[-1]}, {weight.shape[-1]}], "
                         f"got {tuple(second_moment.shape)}")
    scale = second_moment.diagonal().clamp_min(0).sqrt().to(torch.float32)
    return magnitude_mask(weight.detach().abs().float() * scale, sparsity, pattern)


def refit_kept_weights(weight: torch.Tensor, second_moment: torch.Tensor, mask: torch.Tensor,
                       damping: float = 0.01) -> torch.Tensor:
    """The weight with its kept entries re-solved and the rest zero: least squares per output row.

    Row ``w`` of the dense weight becomes ``w'`` (zero off ``mask``) minimising
    ``E[(w'·x − w·x)²] = (w' − w)ᵀ Σ (w' − w)`` with ``Σ = E[x xᵀ]`` the layer's input second
    moment, i.e. the kept weights take over what the removed ones did on real inputs (the
    exact per-row solution of the layer-wise problem SparseGPT approximates; rows are short
    enough here to solve each one). ``damping·mean(diag Σ)`` is added to Σ's diagonal so that
    rarely active inputs do not give huge weights. Returns float32, the weight's shape.
    """
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    sigma = second_moment.to(torch.float64)
    sigma = sigma + damping * float(sigma.diagonal().mean().clamp_min(1e-12)) * torch.eye(
        sigma.shape[0], dtype=torch.float64, device=sigma.device)
    dense = weight.detach().to(torch.float64)
    target = dense @ sigma  # row o: Σ w_o, the right-hand side of each row's normal equations
    fitted = torch.zeros_like(dense)
    for row in range(dense.shape[0]):
        kept = mask[row].nonzero().squeeze(1)
        if kept.numel():
            fitted[row, kept] = torch.linalg.solve(sigma[kept][:, kept], target[row, kept])
    return fitted.to(torch.float32)


def allocate_sparsity(sizes: Mapping[str, int], sparsity: float,
                      density: Mapping[str, float]) -> dict[str, float]:
    """Each layer's sparsity such that ``sparsity`` of all ``sizes`` weights are removed, with
    every layer's kept fraction proportional to ``density[name]`` (1 when absent).

    A layer the proportion would make denser than dense is kept dense and the rest share what
    remains (water-filling). Uniform factors give every layer ``sparsity``.

    Raises:
        ValueError: a factor that is not positive, or a sparsity outside [0, 1).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    bad = {name: f for name, f in density.items() if not f > 0}
    if bad:
        raise ValueError(f"density factors must be > 0, got {bad}")
    keep = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [name for name in sizes if name not in dense]
        weighted = sum(density.get(name, 1.0) * sizes[name] for name in free)
        if not free or weighted == 0:
            return {name: 0.0 for name in sizes}
        scale = (keep - sum(sizes[name] for name in dense)) / weighted
        over = {name for name in free if density.get(name, 1.0) * scale >= 1.0}
        if not over:
            return {name: 0.0 if name in dense else 1.0 - density.get(name, 1.0) * scale for name in sizes}
        dense |= over


def prune_layerwise(module: nn.Module, names: Sequence[str], sparsity: float | Mapping[str, float],
                    batches: Iterable[Mapping[str, torch.Tensor]], *, pattern: str | Pattern = "unstructured",
                    refit: bool = True, damping: float = 0.01,
                    progress: Callable[[int, int, str], None] | None = None) -> dict[str, torch.Tensor]:
    """Prunes each named Linear in turn by ``activation_mask``, refitting the kept weights on real inputs.

    Layers are taken in the order given (module order: earlier layers first); each one's
    input second moment is measured on ``batches`` through the model *as pruned so far*, so a
    layer is fitted to the inputs it will see, not the dense model's (as in SparseGPT). With
    ``refit`` the kept weights are re-solved (``refit_kept_weights``); otherwise they keep
    their values. ``sparsity`` is one for all layers or one per layer (``allocate_sparsity``).
    One forward pass over ``batches`` per layer, ended at that layer. Returns the masks, applied.

    Measured on all-MiniLM-L6-v2 at 90% unstructured (256 calibration sentences), held-out mean
    cosine of the pruned model with the dense one before any training: magnitude 0.23,
    activation scores 0.35 (compared per output row), with refit 0.46 (per layer, as here; 0.47
    per row); SparseGPT's approximate solve 0.43. Distilled with the masks fixed afterwards:
    0.62 after 500 steps (per-row variant) against 0.56 for gradual magnitude pruning over the
    same steps; 0.689 after 1500 steps (25 minutes on one thread) against 0.664. Pruning in
    three steps (60%, 86%, 90% at steps 0, 300, 600 of 1500; lr 1e-3) reached 0.713.
    """
    batches = list(batches)
    masks: dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        layer = module.get_submodule(name)
        moments = collect_second_moments(module, [name], batches, stop_early=True)
        if name not in moments:
            raise ValueError(f"prune_layerwise: layer {name!r} did not run on the calibration batches")
        sigma = moments[name]
        target = sparsity if isinstance(sparsity, (int, float)) else sparsity[name]
        mask = activation_mask(layer.weight, sigma, target, pattern)
        with torch.no_grad():
            if refit:
                layer.weight.copy_(refit_kept_weights(layer.weight, sigma, mask, damping).to(layer.weight.dtype))
            layer.weight.masked_fill_(~mask, 0.0)
        masks[name] = mask
        if progress is not None:
            progress(index + 1, len(names), name)
    return masks


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of ``False`` (removed) entries."""
    return 1.0 - float(mask.float().mean()) if mask.numel() else 0.0


def stored_density(mask: torch.Tensor, block: tuple[int, int] = (1, 1)) -> float:
    """Fraction of R×C blocks (of entries, for 1×1) that hold a kept weight: what BSR/CSR store."""
    if block == (1, 1):
        return 1.0 - mask_sparsity(mask)
    return float((_block_scores(mask.float(), block) > 0).float().mean())


def apply_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zeroes the weight of each named submodule where its mask is ``False`` (in place, no grad)."""
    with torch.no_grad():
        for name, mask in masks.items():
            weight = module.get_submodule(name).weight
            weight.masked_fill_(~mask.to(weight.device), 0.0)


def cubic_sparsity(step: int, final: float, *, initial: float = 0.0, start: int = 0, end: int) -> float:
    """Zhu & Gupta's schedule: ``initial`` until ``start``, ``final`` from ``end``, cubic between."""
    if end <= start or step >= end:
        return final if step >= start else initial
    if step <= start:
        return initial
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def pruning_schedule(steps: int, final: float, *, initial: float = 0.0, every: int = 10,
                     until: float = 0.75) -> dict[int, float]:
    """Trainer step → sparsity to prune to before it, every ``every`` steps, reaching ``final``.

    The last pruning step is ``end = min(steps − 1, round(until·steps))``; it prunes to
    ``final``, and the remaining steps train with the masks fixed. ``steps == 0`` gives
    ``{0: final}`` (one-shot). A point that would prune to the sparsity already reached is left
    out (``initial == final`` prunes once, at step 0): re-choosing masks at the same sparsity
    changes nothing for magnitude and costs a calibration pass for activation scores.
    """
    if steps <= 0:
        return {0: final}
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    end = max(0, min(steps - 1, round(until * steps)))
    points = sorted({*range(0, end + 1, every), end})
    schedule: dict[int, float] = {}
    reached = None
    for t in points:
        sparsity = cubic_sparsity(t, final, initial=initial, start=0, end=end)
        if sparsity != reached:
            schedule[t] = reached = sparsity
    return schedule


class PruningHook:
    """A ``graphopt.train.TrainHook``: prunes on a schedule before steps, re-applies masks after each.

    Args:
        names: the submodules (``nn.Linear``-like, with ``weight``) to prune.
        pattern: see ``Pattern``.
        scope: ``"layer"`` (each layer to the sparsity) or ``"global"`` (one threshold).
        schedule: step → sparsity (``pruning_schedule``); an empty one only re-applies ``masks``.
        masks: initial masks (default: none removed).
        choose_masks: ``(module, sparsities) → masks`` in place of magnitude, ``sparsities`` one
            per layer (it may also change the kept weights, as ``prune_layerwise`` does); the hook
            applies what it returns.
        density: relative kept fraction of layers (``allocate_sparsity``; absent: 1): at each
            point of the schedule the layers together reach its sparsity, each layer at its
            share. Scope ``"layer"`` only.

    Attributes:
        masks: the current mask of each layer.
        history: ``(step, sparsity asked)`` of every pruning done.
    """

    def __init__(self, names: Sequence[str], *, pattern: str | Pattern = "unstructured", scope: Scope = "layer",
                 schedule: Mapping[int, float] | None = None,
                 masks: Mapping[str, torch.Tensor] | None = None,
                 choose_masks: Callable[[nn.Module, Mapping[str, float]], Mapping[str, torch.Tensor]] | None = None,
                 density: Mapping[str, float] | None = None) -> None:
        self.names, self.pattern, self.scope = list(names), Pattern.parse(pattern), scope
        if density and scope != "layer":
            raise ValueError("per-layer density needs scope = \"layer\" (a global threshold sets its own)")
        self.choose_masks = choose_masks
        self.density = dict(density or {})
        self.schedule = dict(schedule or {})
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self.history: list[tuple[int, float]] = []

    @property
    def _global_threshold(self) -> bool:
        """One magnitude threshold over all layers (scope "global" without a custom mask choice)."""
        return self.scope == "global" and self.choose_masks is None

    def prune(self, module: nn.Module, sparsity: float, step: int = -1) -> None:
        """Recomputes every mask at ``sparsity`` (overall) from the current weights and applies it."""
        if self._global_threshold:
            weights = {name: module.get_submodule(name).weight for name in self.names}
            self.masks = global_magnitude_masks(weights, sparsity, self.pattern)
            apply_masks(module, self.masks)
        else:
            self.masks = {}
            self.prune_layers(module, sparsity, self.names)
        self.history.append((step, sparsity))

    def prune_layers(self, module: nn.Module, sparsity: float, names: Sequence[str]) -> None:
        """Recomputes and applies the masks of ``names`` only, each at its share of an overall ``sparsity``.

        For pruning part of the model further (block by block); scope ``"layer"`` or ``choose_masks``.
        """
        if self._global_threshold:
            raise ValueError("prune_layers: a global threshold prunes all layers together; use prune")
        sizes = {name: module.get_submodule(name).weight.numel() for name in self.names}
        chosen = set(names)
        targets = {name: t for name, t in self.layer_sparsity(sparsity, sizes).items() if name in chosen}
        if self.choose_masks is not None:
            masks = dict(self.choose_masks(module, targets))
        else:
            masks = {name: magnitude_mask(module.get_submodule(name).weight, t, self.pattern)
                     for name, t in targets.items()}
        self.masks.update(masks)
        apply_masks(module, masks)

    def layer_sparsity(self, sparsity: float, sizes: Mapping[str, int]) -> dict[str, float]:
        """Each layer's share of an overall ``sparsity`` (``density``; all equal without it)."""
        if not self.density:
            return {name: sparsity for name in sizes}
        return allocate_sparsity(sizes, sparsity, self.density)

    def before_step(self, step: int, student: nn.Module) -> None:
        if step in self.schedule:
            self.prune(student, self.schedule[step], step)

    def after_step(self, step: int, student: nn.Module) -> None:
        apply_masks(student, self.masks)


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """How one Linear is lowered: ``format`` ``"dense"``, ``"csr"``, ``"sell"``, ``"sellp"`` or ``"bsr"``
    (with ``block``)."""

    format: Literal["dense", "csr", "sell", "sellp", "bsr"]
    block: tuple[int, int] | None
    int8: bool
    reason: str
    ms: float | None = None
    dense_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class KernelTable:
    """Measured ms of the cpp sparse kernels and of dense ``F.linear``, by shape, rows and density.

    ``entries``: ``{out, in, rows, format, block, dtype, density, ms}`` rows; ``format`` is
    ``"dense"`` (``dtype`` fp32, ``density`` 1), ``"csr"``, ``"sell"``, ``"sellp"`` or ``"bsr"``, ``dtype`` ``"fp32"``
    or ``"int8"``, ``density`` the fraction of entries (CSR) or blocks (BSR) stored. A query
    reads the measured ``rows`` nearest in log scale and interpolates ms linearly in density;
    a density below the least measured reads that one's time (an over-estimate), above the
    most measured the format is not considered.
    """

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self.source, self.entries = source, list(data.get("entries", []))
        self.settings = dict(data.get("settings", {}))

    @classmethod
    def load(cls, path: Path) -> KernelTable:
        try:
            return cls(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the kernel timing table {path}: {error}") from error

    @classmethod
    def shipped(cls) -> KernelTable:
        resource = importlib.resources.files("graphopt.data").joinpath(TABLE_NAME)
        return cls(json.loads(resource.read_text()), f"graphopt/data/{TABLE_NAME}")

    def _near_rows(self, mine: list[dict[str, Any]], rows: int) -> int:
        return min({e["rows"] for e in mine}, key=lambda x: (abs(math.log(x) - math.log(max(rows, 1))), x))

    def _time(self, points: list[tuple[float, float]], density: float) -> float | None:
        points = sorted(points)
        if not points or density > points[-1][0] + 1e-9:
            return None
        if density <= points[0][0]:
            return points[0][1]
        for (d0, t0), (d1, t1) in zip(points, points[1:]):
            if density <= d1:
                return t0 + (t1 - t0) * (density - d0) / (d1 - d0)
        return points[-1][1]

    def choose(self, mask: torch.Tensor, rows: int, *, int8: bool = False, margin: float = 0.9,
               unmeasured: Literal["dense", "csr"] = "dense") -> KernelChoice:
        """The fastest format for a weight with this ``mask`` at ``rows`` = batch × sequence.

        A sparse format is chosen only if its time is below ``margin`` × the dense time.
        """
        out, inp = mask.shape
        mine = [e for e in self.entries if e["out"] == out and e["in"] == inp]
        if not mine:
            why = f"no timing for {out}×{inp} in {self.source}"
            return KernelChoice(unmeasured, None, int8 and unmeasured != "dense", f"{why}; unmeasured = {unmeasured!r}")
        near = self._near_rows(mine, rows)
        at = [e for e in mine if e["rows"] == near]
        dense = [e["ms"] for e in at if e["format"] == "dense"]
        dense_ms = min(dense) if dense else None
        dtype = "int8" if int8 else "fp32"
        candidates: dict[tuple[str, tuple[int, int] | None], list[tuple[float, float]]] = {}
        for e in at:
            if e["format"] != "dense" and e["dtype"] == dtype:
                key = (e["format"], tuple(e["block"]) if e.get("block") else None)
                candidates.setdefault(key, []).append((e["density"], e["ms"]))
        best: tuple[float, str, tuple[int, int] | None, float] | None = None
        for (fmt, block), points in sorted(candidates.items(), key=lambda kv: (kv[0][0], kv[0][1] or (0, 0))):
            density = stored_density(mask, block or (1, 1))
            ms = self._time(points, density)
            if ms is not None and (best is None or ms < best[0]):
                best = (ms, fmt, block, density)
        if best is None or dense_ms is None or best[0] >= margin * dense_ms:
            why = ("no sparse timing at this density" if best is None else
                   f"{best[1]}{'' if best[2] is None else ' %dx%d' % best[2]} {best[0]:.4f} ms at density "
                   f"{best[3]:.3f} is not below {margin} × dense {dense_ms} ms")
            return KernelChoice("dense", None, False, f"dense: {why} ({near} rows)",
                                None if best is None else best[0], dense_ms)
        ms, fmt, block, density = best
        label = fmt if block is None else f"{fmt} {block[0]}x{block[1]}"
        return KernelChoice(fmt, block, int8, f"{label} {dtype}: {ms:.4f} ms against dense {dense_ms:.4f} ms at "
                            f"density {density:.3f}, {near} rows", ms, dense_ms)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "settings": self.settings,
                "shapes": sorted({f"{e['out']}x{e['in']}" for e in self.entries})}
