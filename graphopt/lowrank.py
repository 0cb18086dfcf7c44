"""Low-rank factors of a linear layer: the ``LowRankLinear`` module and the SVD algebra behind it.

``LowRankLinear`` is a Linear ``y = W x + b`` (W of shape m×n) stored as two thin ones,
``y = B (A x) + b`` with ``A`` (r×n, no bias) and ``B`` (m×r, the bias). It lives in the
core, not in a pass, because later stages recognise it (the cpp backend, QAT, pruning may
treat ``down``/``up`` as ordinary ``nn.Linear`` layers, which they are), and it stays
trainable and exportable: ``torch.export`` turns it into two ``MatMul``s and an ``Add``.

The factors come from the truncated SVD (Eckart–Young: the best rank-r approximation in
Frobenius norm), with √S folded into both sides so that neither factor dominates the
other's scale:

* plain: ``W = U S Vᵀ``, ``B = U_r √S_r``, ``A = √S_r V_rᵀ``; the weight error
  ``‖W − BA‖_F² = Σ_{i>r} s_i²``.
* activation-aware (ASVD / SVD-LLM): with ``Σ = E[x xᵀ]`` the second moment of the layer's
  input, the output error is ``E‖(W − Ŵ) x‖² = ‖(W − Ŵ) Σ^{1/2}‖_F²``. Truncating the SVD
  of ``W Σ^{1/2}`` and mapping back with ``Σ^{-1/2}`` minimises it. ``Σ`` is damped
  (``Σ + λ·mean(diag Σ)·I``); its Cholesky factor stands in for ``Σ^{1/2}`` (same
  truncation, far cheaper), and where Σ is too ill-conditioned for it, ``eigh`` with clamped
  eigenvalues does, so a rank-deficient Σ (a dead input feature, fewer calibration tokens
  than features) gives finite factors.

All algebra runs in float64 and is cast back to the layer's dtype at the end.

Example::

    factors = Factorization.of(linear.weight, second_moment=sigma, damping=0.01)
    small = LowRankLinear.from_factors(*factors.factors(64), bias=linear.bias)
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Factorization", "LayerSpectrum", "LowRankLinear", "SpeedTable", "allocate_budget",
           "round_rank", "second_moment_sqrt", "whitening"]

logger = logging.getLogger(__name__)

#: The shipped timing table, in ``graphopt/data``, written by ``benchmarks/low_rank.py layers --write-table``.
TABLE_NAME = "low_rank_times.json"


class LowRankLinear(nn.Module):
    """``up(down(x))``: ``down`` is ``nn.Linear(n, r, bias=False)``, ``up`` is ``nn.Linear(r, m)``.

    Args:
        in_features, out_features: n and m, as for ``nn.Linear``.
        rank: r, the width between the two factors.
        bias: whether ``up`` carries a bias.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"LowRankLinear: rank {rank} must be in [1, min({in_features}, {out_features})]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """From ``up`` (m×r) and ``down`` (r×n); ``bias`` (m) is copied onto ``up``."""
        (m, r), (r2, n) = up.shape, down.shape
        if r != r2:
            raise ValueError(f"LowRankLinear.from_factors: up is {m}×{r} but down is {r2}×{n}")
        module = cls(n, m, r, bias=bias is not None, device=down.device, dtype=down.dtype)
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def weight_product(self) -> torch.Tensor:
        """The m×n weight the two factors compute (for checks, not for inference)."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def round_rank(rank: int, multiple: int, limit: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, at least ``multiple``, at most ``limit``."""
    rounded = max(multiple, -(-rank // multiple) * multiple)
    return min(rounded, limit)


def _damped(sigma: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    sigma = sigma.to(torch.float64)
    sigma = (sigma + sigma.T) / 2
    scale = float(torch.diagonal(sigma).mean().clamp(min=0.0))
    if scale == 0.0:
        scale = 1.0  # an all-zero input: any whitening is as good as none
    return sigma + damping * scale * torch.eye(sigma.shape[0], dtype=torch.float64), scale


def second_moment_sqrt(sigma: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_d^{1/2}, Σ_d^{-1/2})`` of ``Σ_d = Σ + damping·mean(diag Σ)·I``, symmetric, by ``eigh``.

    Eigenvalues are clamped to ``1e-10 ·`` the largest, so a singular Σ (damping 0 on a
    rank-deficient Σ) still gives a finite inverse square root.
    """
    damped, scale = _damped(sigma, damping)
    values, vectors = torch.linalg.eigh(damped)
    values = values.clamp(min=float(values.max().clamp(min=scale)) * 1e-10)
    root = values.sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def whitening(sigma: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L⁻¹)`` with ``L Lᵀ = Σ_d``: any such L gives the same truncated ``Ŵ`` (``W L = W Σ_d^{1/2} Q``).

    The Cholesky factor when ``Σ_d`` is well conditioned (pivots above ``1e-10`` of the
    largest): about 30× cheaper than ``eigh`` on a 1536² matrix (measured 37 s for eigh on this
    shared machine). Otherwise ``second_moment_sqrt`` (``eigh`` with clamped eigenvalues).
    """
    damped, _ = _damped(sigma, damping)
    factor, info = torch.linalg.cholesky_ex(damped)
    pivots = torch.diagonal(factor) ** 2
    if int(info) == 0 and bool(torch.isfinite(factor).all()) and float(pivots.min()) > 1e-10 * float(pivots.max()):
        eye = torch.eye(damped.shape[0], dtype=torch.float64)
        return factor, torch.linalg.solve_triangular(factor, eye, upper=False)
    return second_moment_sqrt(sigma, damping)


@dataclasses.dataclass(frozen=True)
class Factorization:
    """The SVD of a weight, plain (``W``) or whitened (``W Σ^{1/2}``), ready to truncate.

    Attributes:
        u, s, vh: ``W L = U diag(s) Vh``, where ``L Lᵀ = Σ_d`` (`whitening`) or ``L = I``.
        unwhiten: ``L⁻¹``, or ``None`` for the plain SVD.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    unwhiten: torch.Tensor | None

    @classmethod
    def of(cls, weight: torch.Tensor, second_moment: torch.Tensor | None = None,
           damping: float = 0.01) -> Factorization:
        """Factorizes ``weight`` (m×n); with ``second_moment`` (n×n), the activation-aware way."""
        w = weight.detach().to(torch.float64)
        unwhiten = None
        if second_moment is not None:
            if second_moment.shape != (w.shape[1], w.shape[1]):
                raise ValueError(f"second moment {tuple(second_moment.shape)} does not match the "
                                 f"weight's {w.shape[1]} inputs")
            root, unwhiten = whitening(second_moment, damping)
            w = w @ root
        if w.shape[0] > w.shape[1]:  # LAPACK was 2.4× faster on the wide orientation (measured, 1536×384)
            v, s, uh = torch.linalg.svd(w.T, full_matrices=False)
            return cls(uh.T, s, v.T, unwhiten)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return cls(u, s, vh, unwhiten)

    def energy(self) -> torch.Tensor:
        """Normalised spectrum ``s_i² / Σ s_j²``: the share of the (output) error each rank removes."""
        power = self.s ** 2
        total = power.sum()
        return power / total if total > 0 else torch.full_like(power, 1.0 / len(power))

    def rank_for_energy(self, fraction: float) -> int:
        """Smallest r whose leading singular values keep ``fraction`` of the energy."""
        kept = torch.cumsum(self.energy(), 0)
        return int(torch.searchsorted(kept, torch.tensor(fraction, dtype=kept.dtype) - 1e-12)) + 1

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)``, m×r and r×n, with √s folded into both."""
        if not 1 <= rank <= len(self.s):
            raise ValueError(f"rank {rank} must be in [1, {len(self.s)}]")
        root = self.s[:rank].sqrt()
        up = self.u[:, :rank] * root
        down = root[:, None] * self.vh[:rank]
        if self.unwhiten is not None:
            down = down @ self.unwhiten
        return up.to(dtype), down.to(dtype)


@dataclasses.dataclass(frozen=True)
class LayerSpectrum:
    """What the budget greedy needs of one layer.

    Attributes:
        m, n: the weight's shape (out × in); whole, the layer costs ``m·n`` weights.
        energy: the normalised spectrum (`Factorization.energy`): removing rank i costs energy[i].
        max_rank: the largest rank at which a split is allowed (saves parameters and time),
            every multiple of the step below it allowed too; 0 if the layer must stay whole.
    """

    m: int
    n: int
    energy: torch.Tensor
    max_rank: int


def allocate_budget(layers: Sequence[LayerSpectrum], budget: float, multiple: int) -> list[int]:
    """Ranks (0 = whole) keeping about ``budget`` of the layers' ``Σ m·n`` weights, by one greedy.

    Every splittable layer starts at rank ``multiple``, the others whole. Each step then buys,
    among the steps that still fit, the one that removes the most normalised error per weight:
    ``multiple`` more ranks of one layer (its next singular values' energy for
    ``multiple·(m+n)`` weights) or, once its ``max_rank`` is reached, the whole layer back
    (the rest of its energy for ``m·n − r·(m+n)``). Steps that remove no error are not bought.
    """
    limit = budget * sum(layer.m * layer.n for layer in layers)
    ranks = [multiple if layer.max_rank >= multiple else 0 for layer in layers]
    used = sum(r * (layer.m + layer.n) if r else layer.m * layer.n for layer, r in zip(layers, ranks))
    while True:
        best, best_ratio, best_cost = -1, 0.0, 0
        for i, (layer, r) in enumerate(zip(layers, ranks)):
            if not r:
                continue
            if r + multiple <= layer.max_rank:
                gain, cost = float(layer.energy[r:r + multiple].sum()), multiple * (layer.m + layer.n)
            else:
                gain, cost = float(layer.energy[r:].sum()), layer.m * layer.n - r * (layer.m + layer.n)
            if gain > 1e-12 and used + cost <= limit and gain / cost > best_ratio:
                best, best_ratio, best_cost = i, gain / cost, cost
        if best < 0:
            return ranks
        layer, r = layers[best], ranks[best]
        ranks[best] = r + multiple if r + multiple <= layer.max_rank else 0
        used += best_cost


class SpeedTable:
    """Measured ONNX Runtime times of one dense Linear against its two-MatMul split.

    ``entries``: ``{m, n, rows, rank, dense_ms, split_ms, ratio}`` rows, ``ratio`` the median
    per-round ``split/dense``. A query reads the measured ``rows`` nearest in log scale and
    interpolates the ratio linearly in the rank (held flat below the smallest rank measured,
    extrapolated from the last two above the largest, never below the last).
    """

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.source, self.entries = source, list(data.get("entries", []))
        self.settings = data.get("settings", {})

    @classmethod
    def load(cls, path: Path) -> SpeedTable:
        try:
            return cls(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the timing table {path}: {error}") from error

    @classmethod
    def shipped(cls) -> SpeedTable:
        resource = importlib.resources.files("graphopt.data").joinpath(TABLE_NAME)
        return cls(json.loads(resource.read_text()), f"graphopt/data/{TABLE_NAME}")

    def _points(self, m: int, n: int, rows: int) -> tuple[int, list[tuple[int, float]]]:
        mine = [e for e in self.entries if e["m"] == m and e["n"] == n]
        if not mine:
            return 0, []
        near = min({e["rows"] for e in mine}, key=lambda x: abs(math.log(x) - math.log(rows)))
        return near, sorted((e["rank"], e["ratio"]) for e in mine if e["rows"] == near)

    def ratio(self, m: int, n: int, rows: int, rank: int) -> tuple[float, int] | None:
        """Predicted split/dense time at ``rank``, and the measured rows it was read at."""
        near, points = self._points(m, n, rows)
        if not points:
            return None
        if rank <= points[0][0] or len(points) == 1:
            return (points[0][1] if rank <= points[0][0] else points[-1][1]), near
        for (r0, q0), (r1, q1) in itertools.pairwise(points):
            if rank <= r1:
                return q0 + (q1 - q0) * (rank - r0) / (r1 - r0), near
        (r0, q0), (r1, q1) = points[-2:]
        return max(q1, q1 + (q1 - q0) * (rank - r1) / (r1 - r0)), near

    def verdict(self, m: int, n: int, rows: int, rank: int, max_ratio: float,
                unmeasured: str) -> tuple[bool, str]:
        found = self.ratio(m, n, rows, rank)
        if found is None:
            why = f"no ORT timing for {m}×{n} in {self.source}"
            return (True, why + "; split as unmeasured = 'split'") if unmeasured == "split" else (
                False, why + "; kept whole (run benchmarks/low_rank.py layers --write-table, or unmeasured = 'split')")
        ratio, near = found
        where = f"ORT split/dense time {ratio:.2f} at {near} rows ({m}×{n}, rank {rank})"
        return (True, where) if ratio < max_ratio else (False, f"slower: {where}, not below {max_ratio}")

    def describe(self, rows: int) -> dict[str, Any]:
        return {"source": self.source, "rows_asked": rows, "settings": self.settings,
                "shapes": sorted({f"{e['m']}x{e['n']}" for e in self.entries})}
