"""Observers: running statistics of a tensor that become its scale and zero point.

Four, chosen by name in recipes (``OBSERVERS``):

- ``minmax``: the running minimum and maximum (per tensor or per channel).
- ``moving-average``: an exponential moving average of each batch's min and max, so one
  outlier batch moves the range only a little.
- ``percentile``: clips to the ``percentile``-th percentile of ``|x|``-tails (per tensor from
  a histogram; per channel from the stored values, meant for weights, observed once).
- ``mse``: searches clipping ranges ``α·[min, max]`` for the one with the least expected
  squared quantization error (rounding plus clipping), over the same histogram / values.

Written here rather than taken from ``torch.ao.quantization`` (which warns of its own
removal) or ONNX Runtime's calibrators (which observe ONNX graphs, while calibration here
observes the module, before export). Per-tensor histograms grow their range as batches
arrive and re-bin the counts they hold, as ONNX Runtime's ``HistogramCollector`` does.

Example::

    observer = make_observer("mse", TensorQuant(8, False, "asymmetric", "per-tensor"))
    for batch in batches:
        observer.update(activation(batch))
    tq = observer.compute()          # a TensorQuant holding scale and zero point
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import logging
from typing import Any, ClassVar

import torch

from graphopt.quantization.spec import TensorQuant, fake_quantize, qparams

__all__ = ["Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver",
           "MseObserver", "OBSERVERS", "make_observer"]

logger = logging.getLogger(__name__)


class Observer(abc.ABC):
    """Collects statistics of one tensor; ``compute`` turns them into a calibrated ``TensorQuant``.

    Args:
        tq: the format (bits, signedness, scheme, granularity, axis, block size) to calibrate.
    """

    name: ClassVar[str]

    def __init__(self, tq: TensorQuant) -> None:
        if tq.granularity == "per-block":
            raise ValueError(f"observer {self.name!r} calibrates per-tensor or per-channel formats; "
                             "per-block weight scales come from graphopt.quantization.weights")
        self.tq = tq
        self.batches = 0

    def _reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.tq.granularity == "per-tensor":
            return tuple(range(x.dim()))
        axis = self.tq.axis % x.dim()
        return tuple(d for d in range(x.dim()) if d != axis)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[channels, values]`` (one row for per-tensor)."""
        if self.tq.granularity == "per-tensor":
            return x.reshape(1, -1)
        return x.movedim(self.tq.axis % x.dim(), 0).reshape(x.shape[self.tq.axis % x.dim()], -1)

    def update(self, x: torch.Tensor) -> None:
        """Observes one batch of the tensor (any float dtype; copied to float32 on the CPU)."""
        x = x.detach().float().cpu()
        if x.numel() == 0:
            return
        self._update(x)
        self.batches += 1

    @abc.abstractmethod
    def _update(self, x: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(lo, hi)`` range to quantize, per channel or scalar."""

    def compute(self) -> TensorQuant:
        """The calibrated ``TensorQuant``. Raises ``ValueError`` if nothing was observed."""
        if self.batches == 0:
            raise ValueError(f"observer {self.name!r} saw no data; nothing to calibrate")
        lo, hi = self.range()
        scale, zero = qparams(lo, hi, self.tq)
        if self.tq.granularity == "per-tensor":
            scale, zero = scale.reshape(()), zero.reshape(())
        return self.tq.with_params(scale, zero, observer=self.name)


class MinMaxObserver(Observer):
    """The running minimum and maximum."""

    name = "minmax"

    def __init__(self, tq: TensorQuant) -> None:
        super().__init__(tq)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        rows = self._channels(x)
        lo, hi = rows.amin(1), rows.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lo is not None and self.hi is not None
        return self.lo, self.hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """An exponential moving average of each batch's min and max (``averaging_constant`` per batch)."""

    name = "moving-average"

    def __init__(self, tq: TensorQuant, averaging_constant: float = 0.01) -> None:
        super().__init__(tq)
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant

    def _update(self, x: torch.Tensor) -> None:
        rows = self._channels(x)
        lo, hi = rows.amin(1), rows.amax(1)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)


class _DistributionObserver(Observer):
    """Keeps the distribution: a growing histogram per tensor, the values themselves per channel."""

    bins: ClassVar[int] = 2048

    def __init__(self, tq: TensorQuant) -> None:
        super().__init__(tq)
        self.hist: torch.Tensor | None = None
        self.edges: tuple[float, float] = (0.0, 0.0)
        self.values: list[torch.Tensor] = []

    def _update(self, x: torch.Tensor) -> None:
        if self.tq.granularity == "per-channel":
            self.values.append(self._channels(x))
            return
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if self.hist is None:
            self.edges = (lo, hi if hi > lo else lo + 1e-8)
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        elif lo < self.edges[0] or hi > self.edges[1]:
            self._rebin(min(lo, self.edges[0]), max(hi, self.edges[1]))
        self.hist += torch.histc(x.reshape(-1).double(), self.bins, *self.edges)

    def _rebin(self, lo: float, hi: float) -> None:
        """Moves the counts onto a wider range: each old bin's count goes to its centre's new bin."""
        assert self.hist is not None
        centres = self._centres()
        width = (hi - lo) / self.bins
        index = torch.clamp(((centres - lo) / width).long(), 0, self.bins - 1)
        hist = torch.zeros(self.bins, dtype=torch.float64)
        hist.index_add_(0, index, self.hist)
        self.hist, self.edges = hist, (lo, hi)

    def _centres(self) -> torch.Tensor:
        lo, hi = self.edges
        width = (hi - lo) / self.bins
        return lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def _stored(self) -> torch.Tensor:
        return torch.cat(self.values, dim=1)


class PercentileObserver(_DistributionObserver):
    """Clips each tail at ``percentile`` (99.99 keeps all but the extreme 0.01% on each side)."""

    name = "percentile"

    def __init__(self, tq: TensorQuant, percentile: float = 99.99) -> None:
        super().__init__(tq)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100
        if self.tq.granularity == "per-channel":
            values = self._stored()
            return torch.quantile(values, 1 - q, dim=1), torch.quantile(values, q, dim=1)
        assert self.hist is not None
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        lo_edge, hi_edge = self.edges
        width = (hi_edge - lo_edge) / self.bins
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(1 - q, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
        return torch.tensor(lo_edge + width * lo_bin), torch.tensor(lo_edge + width * (hi_bin + 1))


class MseObserver(_DistributionObserver):
    """Picks the clipping range ``α·[min, max]``, α in ``alphas``, with the least quantization MSE."""

    name = "mse"

    def __init__(self, tq: TensorQuant, steps: int = 100, min_alpha: float = 0.2) -> None:
        super().__init__(tq)
        if not 0 < min_alpha < 1 or steps < 2:
            raise ValueError(f"mse search needs 0 < min_alpha < 1 and steps >= 2, got {min_alpha}, {steps}")
        self.alphas = torch.linspace(min_alpha, 1.0, steps)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tq.granularity == "per-channel":
            return self._channel_range(self._stored())
        assert self.hist is not None
        centres, counts = self._centres().float(), self.hist.float()
        lo, hi = self.edges
        best, best_err = (torch.tensor(lo), torch.tensor(hi)), float("inf")
        for alpha in self.alphas:
            candidate = (torch.tensor(lo * float(alpha)), torch.tensor(hi * float(alpha)))
            scale, zero = qparams(*candidate, self.tq)
            tq = self.tq.with_params(scale.reshape(()), zero.reshape(()))
            err = float((counts * (fake_quantize(centres, tq) - centres) ** 2).sum())
            if err < best_err:
                best, best_err = candidate, err
        return best

    def _channel_range(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = values.amin(1), values.amax(1)
        best_lo, best_hi = lo.clone(), hi.clone()
        best_err = torch.full_like(lo, float("inf"))
        for alpha in self.alphas:
            scale, zero = qparams(lo * alpha, hi * alpha, self.tq)
            tq = dataclasses.replace(self.tq, axis=0).with_params(scale, zero)
            err = ((fake_quantize(values, tq) - values) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo * alpha, best_lo), torch.where(better, hi * alpha, best_hi)
        return best_lo, best_hi


#: Observer name → class, the names recipes use.
OBSERVERS: dict[str, type[Observer]] = {cls.name: cls for cls in
                                        (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MseObserver)}


def make_observer(name: str, tq: TensorQuant, **options: Any) -> Observer:
    """An observer by name. Raises ``ValueError`` naming the valid observers."""
    if name not in OBSERVERS:
        near = difflib.get_close_matches(name, list(OBSERVERS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(f"unknown observer {name!r}: {hint}choose one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name](tq, **options)
