"""Host-side packing of dense Linear weights into the layouts graphopt's sparse ops take.

Written here rather than with ``Tensor.to_sparse_csr``/``to_sparse_bsr`` because the ops
need plain tensors in narrower dtypes than torch's sparse tensors carry (int32 row
pointers, int16 column indices, int8 values with per-row scales), and ``torch.export``
rejects sparse tensors as inputs or buffers.

Layouts (W is ``[out_features, in_features]``; ``y = x @ W.T + b``):

* CSR: ``row_ptr`` int32 ``[out + 1]``; ``col_idx`` ``[nnz]``; ``values`` ``[nnz]``. Row
  pointers are int32 (a layer with 2**31 nonzeros is 8 GiB of fp32 values; packing refuses
  it) because they are read once per row and int64 would only add bytes.
* BSR with blocks ``(R, C)``: the weight is zero-padded to ``[ceil(out/R)*R,
  ceil(in/C)*C]``; ``row_ptr`` int32 ``[ceil(out/R) + 1]`` over block rows; ``col_idx``
  ``[n_blocks]`` in block units; ``values`` ``[n_blocks, R, C]``. All-zero blocks are not
  stored.
* Column indices are int16 when the index range fits (``in_features <= 32767`` for CSR,
  ``ceil(in/C) <= 32767`` for BSR), else int32: at fp32 they are a third of the bytes read.
* int8 values are symmetric per output row: ``scale[o] = max|W[o, :]| / 127``,
  ``q = clamp(round(W / scale), -127, 127)``; ``scales`` float32 ``[out]`` (1.0 for an
  all-zero row). The stored pattern is the nonzero pattern of the fp32 weight, even where a
  small value rounds to 0, so fp32 and int8 packings of one weight share their indices.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor

__all__ = ["INT16_INDEX_LIMIT", "BsrWeight", "CsrWeight", "pack_bsr", "pack_csr"]

logger = logging.getLogger(__name__)

#: Largest index range stored with int16 column indices.
INT16_INDEX_LIMIT = 32767
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True, eq=False)
class CsrWeight:
    """A weight in CSR form, as the ``graphopt::csr_linear*`` ops take it.

    Attributes:
        row_ptr: int32 ``[out + 1]``.
        col_idx: int16 or int32 ``[nnz]``.
        values: float32 or int8 ``[nnz]``.
        scales: float32 ``[out]`` per-row dequantisation scales when ``values`` is int8,
            else None.
        shape: ``(out_features, in_features)``.
    """

    row_ptr: Tensor
    col_idx: Tensor
    values: Tensor
    scales: Tensor | None
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors."""
        return _nbytes(self.row_ptr, self.col_idx, self.values, self.scales)

    def to_dense(self) -> Tensor:
        """The float32 weight this packing represents (dequantised when int8)."""
        out, inp = self.shape
        rows = torch.repeat_interleave(
            torch.arange(out), (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        )
        vals = self.values.float()
        if self.scales is not None:
            vals = vals * self.scales[rows]
        dense = torch.zeros(out, inp)
        dense[rows, self.col_idx.long()] = vals
        return dense


@dataclasses.dataclass(frozen=True, eq=False)
class BsrWeight:
    """A weight in block-sparse form, as the ``graphopt::bsr_linear*`` ops take it.

    Attributes:
        row_ptr: int32 ``[ceil(out / R) + 1]`` over block rows.
        col_idx: int16 or int32 ``[n_blocks]``, block-column index of each stored block.
        values: float32 or int8 ``[n_blocks, R, C]``.
        scales: float32 ``[out]`` when ``values`` is int8, else None.
        shape: ``(out_features, in_features)``.
    """

    row_ptr: Tensor
    col_idx: Tensor
    values: Tensor
    scales: Tensor | None
    shape: tuple[int, int]

    @property
    def block(self) -> tuple[int, int]:
        """Block shape ``(R, C)``."""
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def nnz(self) -> int:
        """Number of stored values (blocks times R * C), zeros inside blocks included."""
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors."""
        return _nbytes(self.row_ptr, self.col_idx, self.values, self.scales)

    def to_dense(self) -> Tensor:
        """The float32 weight this packing represents (dequantised when int8)."""
        out, inp = self.shape
        r, c = self.block
        n_br, n_bc = len(self.row_ptr) - 1, -(-inp // c)
        brow = torch.repeat_interleave(
            torch.arange(n_br), (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        )
        blocks = torch.zeros(n_br, n_bc, r, c)
        blocks[brow, self.col_idx.long()] = self.values.float()
        dense = blocks.permute(0, 2, 1, 3).reshape(n_br * r, n_bc * c)[:out, :inp].clone()
        if self.scales is not None:
            dense *= self.scales[:, None]
        return dense


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if dtype not in (torch.float32, torch.int8):
        raise ValueError(f"dtype must be torch.float32 or torch.int8, got {dtype}")
    w = weight.detach().to("cpu", torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds inf or NaN; sparse packing needs finite values")
    return w


def _index_dtype(n_columns: int) -> torch.dtype:
    return torch.int16 if n_columns <= INT16_INDEX_LIMIT else torch.int32


def _row_pointer(counts: Tensor) -> Tensor:
    total = int(counts.sum())
    if total > _INT32_MAX:
        raise ValueError(
            f"{total} stored values exceed the int32 row-pointer range; split the layer"
        )
    row_ptr = torch.zeros(len(counts) + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return row_ptr.to(torch.int32)


def _row_scales(w: Tensor) -> Tensor:
    scales = w.abs().amax(dim=1) / 127.0
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def _quantize_rows(w: Tensor, scales: Tensor) -> Tensor:
    return torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)


def pack_csr(weight: Tensor, dtype: torch.dtype = torch.float32) -> CsrWeight:
    """Packs a dense weight ``[out, in]`` into CSR, keeping its nonzero entries.

    Args:
        weight: the dense weight; zeros are the pruned entries.
        dtype: ``torch.float32``, or ``torch.int8`` for symmetric per-row int8 values.

    Returns:
        The packed weight.

    Example::

        w = pack_csr(linear.weight * mask)
        y = sparse_linear(x, w, linear.bias)
    """
    w = _check_weight(weight, dtype)
    out, inp = w.shape
    mask = w != 0
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = _row_pointer(torch.bincount(rows, minlength=out))
    scales = None
    if dtype == torch.int8:
        scales = _row_scales(w)
        values = _quantize_rows(w, scales)[rows, cols]
    else:
        values = w[rows, cols]
    col_idx = cols.to(_index_dtype(inp))
    logger.debug("packed %dx%d weight as CSR: %d nonzeros, %s", out, inp, len(cols), dtype)
    return CsrWeight(row_ptr, col_idx, values.contiguous(), scales, (out, inp))


def pack_bsr(
    weight: Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> BsrWeight:
    """Packs a dense weight ``[out, in]`` into block-sparse form, keeping nonzero blocks.

    Args:
        weight: the dense weight; a block is stored when any of its entries is nonzero.
        block: block shape ``(R, C)``: R output rows by C input columns, each 1..64.
            (1, 4), (1, 8), (1, 16), (4, 4), (8, 1) and (16, 1) have compiled kernels;
            other shapes run a generic, slower loop.
        dtype: ``torch.float32``, or ``torch.int8`` for symmetric per-row int8 values.

    Returns:
        The packed weight.
    """
    w = _check_weight(weight, dtype)
    r, c = (int(v) for v in block)
    if not (1 <= r <= 64 and 1 <= c <= 64):
        raise ValueError(f"block shape must be within 1..64 on each side, got {block}")
    out, inp = w.shape
    n_br, n_bc = -(-out // r), -(-inp // c)
    scales = None
    if dtype == torch.int8:
        scales = _row_scales(w)
    padded = torch.zeros(n_br * r, n_bc * c)
    padded[:out, :inp] = w
    blocks = padded.reshape(n_br, r, n_bc, c).permute(0, 2, 1, 3)
    keep = (blocks != 0).any(dim=3).any(dim=2)
    brow, bcol = keep.nonzero(as_tuple=True)
    if scales is not None:
        qpad = torch.zeros(n_br * r, n_bc * c, dtype=torch.int8)
        qpad[:out, :inp] = _quantize_rows(w, scales)
        blocks = qpad.reshape(n_br, r, n_bc, c).permute(0, 2, 1, 3)
    values = blocks[brow, bcol].contiguous()
    row_ptr = _row_pointer(torch.bincount(brow, minlength=n_br))
    logger.debug(
        "packed %dx%d weight as BSR %dx%d: %d blocks, %s", out, inp, r, c, len(bcol), dtype
    )
    return BsrWeight(row_ptr, bcol.to(_index_dtype(n_bc)), values, scales, (out, inp))
