"""The quantization spec: how each layer is quantized, written on the module side, read on the ONNX side.

A ``TensorQuant`` says how one tensor is quantized (bits, signedness, scheme, granularity,
axis, block size, and once calibrated its scale and zero point). A ``QuantSpec`` says how a
layer runs: its ``mode`` (static, dynamic, weight-only or float), its weight's and input's
``TensorQuant``, and notes for the report (sensitivity, why this mode). Calibration writes
one into ``program.annotations[module_name]["quant"]``; the materialisation pass reads it
after export; quantization-aware training refines the same object.

Integer arithmetic follows ONNX ``QuantizeLinear``: ``q = clamp(round_half_even(x / s) + zp)``,
``x ≈ (q - zp) * s``. Symmetric signed ranges are restricted (``[-127, 127]``, ``[-7, 7]``)
so that zero is exact and the range is symmetric.

Example::

    tq = TensorQuant(bits=8, signed=True, scheme="symmetric", granularity="per-channel", axis=0)
    tq = tq.with_params(*qparams(w.amin(1), w.amax(1), tq))
    w_q = fake_quantize(w, tq)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal, get_args

import numpy as np
import torch

__all__ = ["Mode", "Scheme", "Granularity", "LayerKind", "TensorQuant", "QuantSpec", "qparams",
           "quantize", "dequantize", "fake_quantize", "broadcast_params", "QUANT_KEY", "SUPPORTED_BITS"]

logger = logging.getLogger(__name__)

Mode = Literal["static", "dynamic", "weight-only", "float"]
Scheme = Literal["symmetric", "asymmetric"]
Granularity = Literal["per-tensor", "per-channel", "per-block"]
LayerKind = Literal["linear", "embedding"]

#: The key of a layer's spec inside ``program.annotations[module_name]``.
QUANT_KEY = "quant"
SUPPORTED_BITS = (4, 8)


@dataclasses.dataclass(frozen=True, eq=False)
class TensorQuant:
    """How one tensor is quantized.

    Attributes:
        bits: 4 or 8.
        signed: int (True) or uint (False) storage.
        scheme: ``symmetric`` (zero point at the middle of the range) or ``asymmetric``.
        granularity: one scale for the tensor, one per channel along ``axis``, or one per
            block of ``block_size`` consecutive elements along ``axis`` (per row otherwise).
        axis: per-channel: the channel axis; per-block: the blocked axis (torch layout).
        block_size: elements per block (per-block only).
        scale: float32, ``()`` per tensor, ``[C]`` per channel, ``[rows, blocks]`` per block.
        zero_point: int32 values within ``[qmin, qmax]``, the shape of ``scale``.
        observer: the observer that computed the parameters, for the report.
        reduce_range: use one bit less of the range (s8 weights in ``[-63, 63]``, u8 in
            ``[0, 127]``), stored in 8 bits: on x86 CPUs without VNNI, ONNX Runtime's u8×s8
            kernels add pairs of products in saturating int16 (``vpmaddubsw``), and full-range
            codes overflow it (measured: error 18× the quantization error on a layer with an
            outlier input).
    """

    bits: int
    signed: bool
    scheme: Scheme
    granularity: Granularity
    axis: int | None = None
    block_size: int | None = None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    observer: str | None = None
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{self.bits}-bit quantization is not supported; use one of {SUPPORTED_BITS}")
        if self.scheme not in get_args(Scheme):
            raise ValueError(f"unknown scheme {self.scheme!r}; use one of {get_args(Scheme)}")
        if self.granularity not in get_args(Granularity):
            raise ValueError(f"unknown granularity {self.granularity!r}; use one of {get_args(Granularity)}")
        if self.granularity != "per-tensor" and self.axis is None:
            raise ValueError(f"{self.granularity} quantization needs an axis")
        if self.granularity == "per-block" and (not self.block_size or self.block_size < 2):
            raise ValueError(f"per-block quantization needs block_size >= 2, got {self.block_size}")
        if (self.scale is None) != (self.zero_point is None):
            raise ValueError("scale and zero_point are given together or not at all")

    @property
    def _range_bits(self) -> int:
        return self.bits - 1 if self.reduce_range else self.bits

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        half = 2 ** (self._range_bits - 1)
        return -(half - 1) if self.scheme == "symmetric" else -half

    @property
    def qmax(self) -> int:
        return 2 ** (self._range_bits - 1) - 1 if self.signed else 2 ** self._range_bits - 1

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def with_params(self, scale: Any, zero_point: Any, observer: str | None = None) -> TensorQuant:
        """A copy holding ``scale`` (float32) and ``zero_point`` (int32)."""
        scale = np.asarray(torch.as_tensor(scale).detach().cpu().numpy(), np.float32)
        zero_point = np.asarray(torch.as_tensor(zero_point).detach().cpu().numpy()).astype(np.int32)
        return dataclasses.replace(self, scale=scale, zero_point=zero_point,
                                   observer=observer if observer is not None else self.observer)

    def describe(self) -> str:
        """``s8 symmetric per-channel``, ``u4 asymmetric per-block(32)``."""
        gran = f"per-block({self.block_size})" if self.granularity == "per-block" else self.granularity
        reduced = " (7-bit range)" if self.reduce_range else ""
        return f"{'s' if self.signed else 'u'}{self.bits}{reduced} {self.scheme} {gran}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no per-channel arrays, only their size and range)."""
        out: dict[str, Any] = {"format": self.describe(), "observer": self.observer}
        if self.scale is not None:
            out["scales"] = int(self.scale.size)
            out["scale_range"] = [float(self.scale.min()), float(self.scale.max())]
            if self.scale.size == 1:
                out["scale"], out["zero_point"] = float(self.scale), int(self.zero_point)
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class QuantSpec:
    """How one layer (an ``nn.Linear`` or ``nn.Embedding``) is quantized.

    Attributes:
        mode: ``static`` (input quantized with a calibrated scale), ``dynamic`` (input
            quantized per call from its own range), ``weight-only`` (activations stay float;
            weights 8- or 4-bit), or ``float`` (left alone).
        kind: ``linear`` or ``embedding`` (a table gathered by row).
        weight_shape: the weight's torch shape: ``[out, in]`` or ``[rows, dim]``.
        weight: how the weight is quantized (None for float).
        input: how the input activation is quantized (static: with scale; dynamic: the
            format only); None for weight-only and float.
        smoothing: per input channel ``s`` [in] (SmoothQuant, Xiao et al. 2022): the layer
            quantizes ``x / s`` and ``W · diag(s)``, which multiply back to ``x Wᵀ``, moving
            activation outliers into the weights' per-channel scales. Static and dynamic only.
        notes: for the report: sensitivity, the reason for the mode.
    """

    mode: Mode
    kind: LayerKind
    weight_shape: tuple[int, ...]
    weight: TensorQuant | None = None
    input: TensorQuant | None = None
    smoothing: np.ndarray | None = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise ValueError(f"unknown quantization mode {self.mode!r}; use one of {get_args(Mode)}")
        if self.mode != "float" and self.weight is None:
            raise ValueError(f"mode {self.mode!r} needs a weight quantization")
        if self.mode == "static" and (self.input is None or not self.input.calibrated):
            raise ValueError("mode 'static' needs a calibrated input quantization (scale and zero point)")
        if self.mode == "dynamic" and self.input is None:
            raise ValueError("mode 'dynamic' needs the input's quantization format")
        if self.kind == "embedding" and self.mode not in ("weight-only", "float"):
            raise ValueError(f"an embedding table is quantized weight-only, not {self.mode!r}")
        if self.smoothing is not None:
            if self.kind != "linear" or self.smoothing.shape != (self.weight_shape[-1],):
                raise ValueError(f"smoothing needs one factor per input channel of a linear layer "
                                 f"({self.weight_shape[-1]}), got shape {self.smoothing.shape}")
            if not np.all(self.smoothing > 0):
                raise ValueError("smoothing factors must be positive")

    @property
    def smoothed(self) -> bool:
        """Whether this layer runs on ``x / s`` (static and dynamic layers with smoothing)."""
        return self.smoothing is not None and self.mode in ("static", "dynamic")

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "kind": self.kind, "weight_shape": list(self.weight_shape),
                "weight": self.weight.as_dict() if self.weight else None,
                "input": self.input.as_dict() if self.input else None,
                "smoothing": ({"range": [float(self.smoothing.min()), float(self.smoothing.max())]}
                              if self.smoothed else None), **self.notes}


def qparams(lo: torch.Tensor | float, hi: torch.Tensor | float, tq: TensorQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` (element-wise for channels) onto ``tq``'s range.

    The range is widened to include 0 so that zero (padding, ReLU zeros) is exact. A zero
    range gets scale 1 (any scale represents an all-zero tensor exactly).
    """
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float64), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float64), min=0.0)
    if tq.scheme == "symmetric":
        amax = torch.maximum(-lo, hi)
        half = (tq.qmax - tq.qmin) / 2
        scale = amax / half
        zero = torch.full_like(scale, 0 if tq.signed else (tq.qmax + 1) // 2)
    else:
        scale = (hi - lo) / (tq.qmax - tq.qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(tq.qmin - lo / safe), tq.qmin, tq.qmax)
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
    return scale.to(torch.float32), zero.to(torch.int32)


def broadcast_params(scale: torch.Tensor, zero: torch.Tensor, tq: TensorQuant,
                     shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` and ``zero`` (in ``tq``'s layout) expanded to ``shape``; per block: repeated along the
    blocked axis. Differentiable in ``scale``, so learned scales (QAT) use it too."""
    if tq.granularity == "per-tensor":
        return scale.reshape(()), zero.reshape(())
    axis = tq.axis % len(shape)
    if tq.granularity == "per-channel":
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return scale.reshape(view), zero.reshape(view)
    # per-block on a 2-D tensor: scale [rows, blocks], blocks along `axis`.
    if len(shape) != 2:
        raise ValueError(f"per-block quantization takes a 2-D tensor, got shape {tuple(shape)}")
    block = tq.block_size
    if axis == 0:
        scale, zero = scale.T, zero.T
    scale = scale.repeat_interleave(block, dim=1)[:, : shape[axis]]
    zero = zero.repeat_interleave(block, dim=1)[:, : shape[axis]]
    return (scale.T, zero.T) if axis == 0 else (scale, zero)


def _broadcast(tq: TensorQuant, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    assert tq.scale is not None and tq.zero_point is not None
    return broadcast_params(torch.from_numpy(tq.scale), torch.from_numpy(tq.zero_point), tq, shape)


def quantize(x: torch.Tensor, tq: TensorQuant) -> torch.Tensor:
    """Integer codes (int32) of ``x`` under ``tq``: ``clamp(round(x / s) + zp)``, ties to even."""
    scale, zero = _broadcast(tq, x.shape)
    return torch.clamp(torch.round(x.float() / scale) + zero, tq.qmin, tq.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, tq: TensorQuant) -> torch.Tensor:
    """``(q - zp) * s`` as float32."""
    scale, zero = _broadcast(tq, q.shape)
    return (q.to(torch.int32) - zero).to(torch.float32) * scale


def fake_quantize(x: torch.Tensor, tq: TensorQuant) -> torch.Tensor:
    """``dequantize(quantize(x))`` through torch's fake-quant ops (straight-through gradient).

    Per-tensor and per-channel use ``torch.fake_quantize_per_tensor_affine`` /
    ``_per_channel_affine``; per-block views the tensor as one channel per block.
    """
    if tq.scale is None or tq.zero_point is None:
        raise ValueError("fake_quantize needs a calibrated TensorQuant (scale and zero point)")
    scale = torch.from_numpy(tq.scale).to(x.device)
    zero = torch.from_numpy(tq.zero_point).to(x.device)
    if tq.granularity == "per-tensor":
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero.reshape(()), tq.qmin, tq.qmax)
    if tq.granularity == "per-channel":
        return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero.reshape(-1),
                                                      tq.axis % x.dim(), tq.qmin, tq.qmax)
    if x.dim() != 2:
        raise ValueError(f"per-block quantization takes a 2-D tensor, got shape {tuple(x.shape)}")
    axis, block = tq.axis % 2, tq.block_size
    rows = x if axis == 1 else x.T
    length = rows.shape[1]
    padded = torch.nn.functional.pad(rows, (0, -length % block))
    blocks = padded.reshape(-1, block)
    out = torch.fake_quantize_per_channel_affine(blocks, scale.reshape(-1), zero.reshape(-1), 0, tq.qmin, tq.qmax)
    out = out.reshape(rows.shape[0], -1)[:, :length]
    return out if axis == 1 else out.T
