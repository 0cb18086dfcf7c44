"""Weight quantization: formats, scales by round-to-nearest (min-max or MSE clipping), and GPTQ.

Weights are ``[out, in]`` (``nn.Linear``) or ``[rows, dim]`` (``nn.Embedding``). Per-channel
formats have one scale per output row (axis 0); per-block formats have one per block of
``block_size`` consecutive inputs of a row (axis 1), which is the layout of ONNX blocked
``DequantizeLinear`` on the transposed ``[in, out]`` weight and of ``MatMulNBits``.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") quantizes one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian
``H = 2·XᵀX`` of the layer's calibration inputs, so the layer's *output* error is what
is minimised rather than the weight error. Written here (about 50 lines) because the
well-kept implementations (auto-gptq, gptqmodel, llm-compressor) pull in CUDA kernels or
transformers; ours runs on the CPU in seconds for a MiniLM-sized layer.

Example::

    tq = weight_format(bits=4, scheme="asymmetric", granularity="per-block", block_size=32)
    w_hat, tq = gptq(linear.weight, hessian, tq)     # w_hat == dequantize(quantize(w_hat, tq))
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from graphopt.quantization.observers import make_observer
from graphopt.quantization.spec import Granularity, Scheme, TensorQuant, fake_quantize, qparams

__all__ = ["weight_format", "calibrate_weight", "block_params", "gptq"]

logger = logging.getLogger(__name__)


def weight_format(bits: int = 8, scheme: Scheme = "symmetric", granularity: Granularity = "per-channel",
                  block_size: int | None = None, signed: bool | None = None, reduce_range: bool = False) -> TensorQuant:
    """The format of a weight ``[out, in]``: per-channel on axis 0 or per-block along axis 1.

    ``signed`` defaults to True for symmetric (s8, s4) and False for asymmetric (u8, u4).
    """
    signed = scheme == "symmetric" if signed is None else signed
    if granularity == "per-tensor":
        return TensorQuant(bits, signed, scheme, "per-tensor", reduce_range=reduce_range)
    if granularity == "per-channel":
        return TensorQuant(bits, signed, scheme, "per-channel", axis=0, reduce_range=reduce_range)
    return TensorQuant(bits, signed, scheme, "per-block", axis=1, block_size=block_size, reduce_range=reduce_range)


def block_params(w: torch.Tensor, tq: TensorQuant, search: str = "minmax", steps: int = 50,
                 min_alpha: float = 0.5) -> TensorQuant:
    """Per-block scales of ``w`` ``[rows, cols]`` (blocks along axis 1), by min-max or MSE clipping search."""
    rows, cols = w.shape
    block = tq.block_size
    assert block is not None and tq.axis == 1
    padded = torch.nn.functional.pad(w.detach().float(), (0, -cols % block))
    blocks = padded.reshape(rows, -1, block)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    if search == "minmax":
        return tq.with_params(*qparams(lo, hi, tq), observer="minmax")
    if search != "mse":
        raise ValueError(f"unknown block search {search!r}; use 'minmax' or 'mse'")
    flat = blocks.reshape(-1, block)
    channel_tq = dataclasses.replace(tq, granularity="per-channel", axis=0, block_size=None)
    best_err = torch.full((flat.shape[0],), float("inf"))
    best_lo, best_hi = lo.reshape(-1).clone(), hi.reshape(-1).clone()
    for alpha in torch.linspace(min_alpha, 1.0, steps):
        cand_lo, cand_hi = lo.reshape(-1) * alpha, hi.reshape(-1) * alpha
        err = ((fake_quantize(flat, channel_tq.with_params(*qparams(cand_lo, cand_hi, tq))) - flat) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, cand_lo, best_lo), torch.where(better, cand_hi, best_hi)
    scale, zero = qparams(best_lo.reshape(lo.shape), best_hi.reshape(hi.shape), tq)
    return tq.with_params(scale, zero, observer="mse")


def calibrate_weight(w: torch.Tensor, tq: TensorQuant, observer: str = "minmax") -> TensorQuant:
    """Scales of a weight under ``tq``, from the named observer (per-block: ``minmax`` or ``mse``)."""
    if tq.granularity == "per-block":
        return block_params(w, tq, search=observer if observer in ("minmax", "mse") else _refuse_block(observer))
    obs = make_observer(observer, tq)
    obs.update(w)
    return obs.compute()


def _refuse_block(observer: str) -> str:
    raise ValueError(f"per-block weights are calibrated with 'minmax' or 'mse', not {observer!r}")


def gptq(w: torch.Tensor, hessian: torch.Tensor, tq: TensorQuant, *, damp: float = 0.01, block: int = 128,
         search: str = "minmax", act_order: bool = False) -> tuple[torch.Tensor, TensorQuant]:
    """GPTQ-quantizes ``w`` ``[out, in]`` given ``hessian`` ``[in, in]`` of its inputs.

    Per-channel formats take their scales from the whole original rows. Per-block formats
    compute each block's scale when GPTQ reaches it, from the error-updated weights; with
    ``act_order`` (columns in order of decreasing Hessian diagonal, the paper's "act-order")
    block scales are fixed up front from the original weights ("static groups"), since the
    columns of a block are then not quantized together.

    Returns:
        The dequantized weight (exactly representable under the returned format, so
        quantizing it again gives the same codes) and the format holding its scales.
    """
    rows, cols = w.shape
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(cols, dtype=H.dtype) * damp * torch.mean(torch.diag(H))
    group = tq.block_size if tq.granularity == "per-block" else None
    if group is None:
        fixed = calibrate_weight(W.float(), tq, search if search in ("minmax", "mse") else "minmax")
    elif act_order:
        fixed = block_params(W.float(), tq, search=search)
    else:
        fixed = None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    if group is not None:
        block = max(group, block // group * group)
    scales = torch.zeros(rows, -(-cols // group) if group else 1)
    zeros = torch.zeros_like(scales, dtype=torch.int32)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, original = i1 + i, int(perm[i1 + i])
            if fixed is None and col % group == 0:  # a new block: its scale from the updated weights
                found = block_params(W1[:, i:i + group].float(), tq, search=search)
                scales[:, col // group] = torch.from_numpy(found.scale[:, 0])
                zeros[:, col // group] = torch.from_numpy(found.zero_point[:, 0])
            scale, zero = _column_params(fixed, original, group) if fixed is not None else (
                scales[:, col // group].double(), zeros[:, col // group].double())
            q = (torch.clamp(torch.round(W1[:, i] / scale) + zero, tq.qmin, tq.qmax) - zero) * scale
            Q[:, col] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    result = fixed if fixed is not None else tq.with_params(scales, zeros)
    result = dataclasses.replace(result, observer=f"gptq+{search}{'+act-order' if act_order else ''}")
    return fake_quantize(Q.float(), result), result


def _column_params(tq: TensorQuant, column: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (per row) that apply to input ``column`` of a weight."""
    if group is None:
        return torch.from_numpy(tq.scale).double(), torch.from_numpy(tq.zero_point).double()
    return (torch.from_numpy(tq.scale[:, column // group]).double(),
            torch.from_numpy(tq.zero_point[:, column // group]).double())
