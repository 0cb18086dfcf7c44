"""Host-side packing of dense Linear weights into the layouts graphopt's sparse ops take.

Written here rather than with ``Tensor.to_sparse_csr``/``to_sparse_bsr`` because the ops
need plain tensors in narrower dtypes than torch's sparse tensors carry (int32 row
pointers, int16 column indices, int8 values with per-row scales), and ``torch.export``
rejects sparse tensors as inputs or buffers.

Layouts (W is ``[out_features, in_features]``; ``y = x @ W.T + b``):

* CSR: ``row_ptr`` int32 ``[out + 1]``; ``col_idx`` ``[nnz]``; ``values`` ``[nnz]``. Row
  pointers are int32 (a layer with 2**31 nonzeros is 8 GiB of fp32 values; packing refuses
  it) because they are read once per row and int64 would only add bytes. Each row is padded
  with explicit zeros (value 0, the row's last column index) to a multiple of
  ``row_multiple`` entries, 8 by default: the kernels take eight nonzeros at a time, and a
  row's variable tail then never runs. On the sparse-90-int8 model's 36 matrices that stores
  ~8% more entries and takes 5% less time at 15 rows, 7% at 8 and 20% at one row (a
  standalone harness of the kernel, one core; neutral at 120 rows).
* BSR with blocks ``(R, C)``: the weight is zero-padded to ``[ceil(out/R)*R,
  ceil(in/C)*C]``; ``row_ptr`` int32 ``[ceil(out/R) + 1]`` over block rows; ``col_idx``
  ``[n_blocks]`` in block units; ``values`` ``[n_blocks, R, C]``. All-zero blocks are not
  stored.
* SELL-8 (sliced ELLPACK, slices of 8 rows): rows sorted by nonzero count, longest first
  (stable), cut into ``ceil(out/8)`` slices; slice ``s`` stores its 8 rows side by side,
  zero-padded to its longest row: ``col_idx`` ``[entries, 8]``, ``values`` ``[entries, 8]``
  (entry ``k`` of a slice = one index and one value per row; padding: index 0, value 0);
  ``slice_ptr`` int32 ``[ceil(out/8) + 1]`` in entries; ``row_order`` int32
  ``[8 * ceil(out/8)]``, the output row of each lane (-1 for the lanes past ``out``). Sorting
  keeps the padding small (a few % at 90% unstructured, against ~20% unsorted).
* SELL-P (SELL with permutes, for batch 1): rows sorted as for SELL, in slices of 16
  (``row_order`` ``[16 * ceil(out/16)]``), whose nonzeros go two ways. The columns are cut into
  blocks of 32, and a slice stores K *layers* (K per slice, 0..32) in each block where it has a
  nonzero: layer k holds the k-th nonzero each of its 16 rows has in the block. One (slice,
  block) pair is a *group*: ``layer_block`` ``[groups]`` (the block of each), and
  ``layer_lanes`` uint8 ``[layers, 16]``, each lane's column within the block (0 for padding).
  The nonzeros beyond a slice's K in a block are SELL entries, 16 lanes wide: ``col_idx``
  ``[entries, 16]``. ``values`` ``[layers + entries, 16]`` holds the layers' values, then the
  entries' (0 for padding); ``slice_ptr`` int32 ``[3, ceil(out/16) + 1]`` the slices' offsets
  in groups, layers and entries (one tensor, not three: every tensor argument costs ~0.1-0.3 us
  of an op call from Python). A layer is one two-register permute of 32 columns of x instead of
  16 scalar loads; it holds the lanes whose rows have a k-th nonzero in the block (~15.5 of 16
  for the first layer at 90% sparsity, ~13.5 for the second); K is chosen per slice by a cost
  model (``pack_sellp``).
* Column indices are int16 when the index range fits (``in_features <= 32767`` for CSR,
  SELL and SELL-P, whose blocks take the dtype of its columns; ``ceil(in/C) <= 32767`` for
  BSR), else int32: at fp32 they are a third of the bytes read.
* Packed tensors are never inference tensors, even when packed under ``torch.inference_mode``:
  the ops check a weight's column indices once per tensor version (``ops.cpp``), and
  inference tensors have no version counter, so theirs would be read on every call.
* int8 values are symmetric per output row: ``scale[o] = max|W[o, :]| / 127``,
  ``q = clamp(round(W / scale), -127, 127)``; ``scales`` float32 ``[out]`` (1.0 for an
  all-zero row). The stored pattern is the nonzero pattern of the fp32 weight, even where a
  small value rounds to 0, so fp32 and int8 packings of one weight share their indices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "INT16_INDEX_LIMIT",
    "BsrWeight",
    "CsrWeight",
    "SellWeight",
    "SellpWeight",
    "linear_op",
    "pack_bsr",
    "pack_csr",
    "pack_sell",
    "pack_sellp",
    "pack_weight",
]

logger = logging.getLogger(__name__)

#: Largest index range stored with int16 column indices.
INT16_INDEX_LIMIT = 32767
_INT32_MAX = 2**31 - 1


def linear_op(layout: str, *, int8: bool) -> Callable[..., Tensor]:
    """The op for weights packed in ``layout``: ``graphopt::<layout>_linear[_int8]``."""
    return getattr(torch.ops.graphopt, f"{layout}_linear{'_int8' if int8 else ''}").default


def _owners(ptr: Tensor) -> Tensor:
    """For a row pointer ``ptr`` (of rows, block rows or slices), the group each stored item is in."""
    counts = (ptr[1:] - ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def _rank_in_runs(keys: Tensor) -> Tensor:
    """The position of each element of ``keys`` within its run of equal consecutive keys."""
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    starts = torch.nonzero(first).flatten()
    return torch.arange(len(keys)) - starts[torch.cumsum(first.long(), 0) - 1]


class _Packed:
    """What every packed weight has: ``values`` and ``shape``, tensor fields to count, and the
    op that multiplies by it."""

    #: The layout's name, and its op's: ``graphopt::<LAYOUT>_linear`` (``_int8`` for int8 values).
    LAYOUT: ClassVar[str]

    values: Tensor
    scales: Tensor | None
    shape: tuple[int, int]

    @property
    def op_fields(self) -> tuple[str, ...]:
        """The packed tensors the layout's op takes after ``x``: the fields before ``scales``,
        which are declared in schema order."""
        return tuple(f.name for f in dataclasses.fields(self) if f.name not in ("scales", "shape"))  # type: ignore[arg-type]

    @functools.cached_property
    def linear_call(self) -> tuple[Callable[..., Tensor], tuple[Tensor, ...], int]:
        """``(op, tensors, out_features)``: ``op(x, *tensors, bias, out_features)`` is
        ``x @ W.T + bias``. Computed once per weight: looking the op and its tensors up on
        every call cost ~0.9 us of a ~5 us batch-1 call from Python (an 8x8 weight)."""
        tensors = tuple(getattr(self, f) for f in self.op_fields)
        if self.scales is not None:
            tensors += (self.scales,)
        return linear_op(self.LAYOUT, int8=self.scales is not None), tensors, self.shape[0]

    @property
    def nnz(self) -> int:
        """Number of stored values (zeros inside BSR blocks, CSR row padding and SELL padding included)."""
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors."""
        tensors = (getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


@dataclasses.dataclass(frozen=True, eq=False)
class CsrWeight(_Packed):
    """A weight in CSR form, as the ``graphopt::csr_linear*`` ops take it.

    Attributes:
        row_ptr: int32 ``[out + 1]``.
        col_idx: int16 or int32 ``[nnz]``, ascending within a row (a padding entry repeats
            the row's last index).
        values: float32 or int8 ``[nnz]``, explicit zeros for the padding.
        scales: float32 ``[out]`` per-row dequantisation scales when ``values`` is int8,
            else None.
        shape: ``(out_features, in_features)``.
    """

    LAYOUT: ClassVar[str] = "csr"

    row_ptr: Tensor
    col_idx: Tensor
    values: Tensor
    scales: Tensor | None
    shape: tuple[int, int]

    def to_dense(self) -> Tensor:
        """The float32 weight this packing represents (dequantised when int8)."""
        out, inp = self.shape
        rows = _owners(self.row_ptr)
        vals = self.values.float()
        if self.scales is not None:
            vals = vals * self.scales[rows]
        dense = torch.zeros(out, inp)
        # Padding entries (value 0) repeat a stored index: add, not assign.
        dense.index_put_((rows, self.col_idx.long()), vals, accumulate=True)
        return dense


@dataclasses.dataclass(frozen=True, eq=False)
class BsrWeight(_Packed):
    """A weight in block-sparse form, as the ``graphopt::bsr_linear*`` ops take it.

    Attributes:
        row_ptr: int32 ``[ceil(out / R) + 1]`` over block rows.
        col_idx: int16 or int32 ``[n_blocks]``, block-column index of each stored block.
        values: float32 or int8 ``[n_blocks, R, C]``.
        scales: float32 ``[out]`` when ``values`` is int8, else None.
        shape: ``(out_features, in_features)``.
    """

    LAYOUT: ClassVar[str] = "bsr"

    row_ptr: Tensor
    col_idx: Tensor
    values: Tensor
    scales: Tensor | None
    shape: tuple[int, int]

    @property
    def block(self) -> tuple[int, int]:
        """Block shape ``(R, C)``."""
        return int(self.values.shape[1]), int(self.values.shape[2])

    def to_dense(self) -> Tensor:
        """The float32 weight this packing represents (dequantised when int8)."""
        out, inp = self.shape
        r, c = self.block
        n_br, n_bc = len(self.row_ptr) - 1, -(-inp // c)
        brow = _owners(self.row_ptr)
        blocks = torch.zeros(n_br, n_bc, r, c)
        blocks[brow, self.col_idx.long()] = self.values.float()
        dense = blocks.permute(0, 2, 1, 3).reshape(n_br * r, n_bc * c)[:out, :inp].clone()
        if self.scales is not None:
            dense *= self.scales[:, None]
        return dense


@dataclasses.dataclass(frozen=True, eq=False)
class SellWeight(_Packed):
    """A weight in SELL-8 form, as the ``graphopt::sell_linear*`` ops take it.

    Attributes:
        slice_ptr: int32 ``[ceil(out / 8) + 1]``, entry offsets of the slices.
        row_order: int32 ``[8 * ceil(out / 8)]``, output row of each slice lane, -1 = padding.
        col_idx: int16 or int32 ``[entries, 8]``.
        values: float32 or int8 ``[entries, 8]``.
        scales: float32 ``[out]`` when ``values`` is int8, else None.
        shape: ``(out_features, in_features)``.
    """

    LAYOUT: ClassVar[str] = "sell"

    slice_ptr: Tensor
    row_order: Tensor
    col_idx: Tensor
    values: Tensor
    scales: Tensor | None
    shape: tuple[int, int]

    def to_dense(self) -> Tensor:
        """The float32 weight this packing represents (dequantised when int8)."""
        out, inp = self.shape
        slice_of_entry = _owners(self.slice_ptr)
        rows = self.row_order.long().view(-1, 8)[slice_of_entry]  # [entries, 8]
        live = rows >= 0
        dense = torch.zeros(out, inp)
        # Padding entries (value 0) of different lanes may share index 0: add, not assign.
        dense.index_put_((rows[live], self.col_idx.long()[live]), self.values.float()[live], accumulate=True)
        if self.scales is not None:
            dense *= self.scales[:, None]
        return dense


@dataclasses.dataclass(frozen=True, eq=False)
class SellpWeight(_Packed):
    """A weight in SELL-P form, as the ``graphopt::sellp_linear*`` ops take it.

    Attributes:
        slice_ptr: int32 ``[3, ceil(out / 16) + 1]``: the slices' offsets in groups (row 0),
            layers (row 1) and entries (row 2). A slice's layers are K per group, K =
            its layers / its groups.
        layer_block: int16 or int32 ``[groups]``, the 32-column block of ``x`` each group reads.
        layer_lanes: uint8 ``[layers, 16]``, the column within that block of each lane's value
            (0 for padding lanes).
        row_order: int32 ``[16 * ceil(out / 16)]``, output row of each slice lane, -1 = padding.
        col_idx: ``[entries, 16]``, of ``layer_block``'s dtype.
        values: float32 or int8 ``[layers + entries, 16]``: the layers' values, then the
            entries'; 0 for padding lanes.
        scales: float32 ``[out]`` when the values are int8, else None.
        shape: ``(out_features, in_features)``.
    """

    LAYOUT: ClassVar[str] = "sellp"

    slice_ptr: Tensor
    layer_block: Tensor
    layer_lanes: Tensor
    row_order: Tensor
    col_idx: Tensor
    values: Tensor
    scales: Tensor | None
    shape: tuple[int, int]

    @property
    def layers_per_group(self) -> Tensor:
        """K of each slice: the layers it stores per block (0 for a slice of entries only)."""
        groups = (self.slice_ptr[0, 1:] - self.slice_ptr[0, :-1]).long()
        layers = (self.slice_ptr[1, 1:] - self.slice_ptr[1, :-1]).long()
        return layers // groups.clamp(min=1)

    def to_dense(self) -> Tensor:
        """The float32 weight this packing represents (dequantised when int8)."""
        out, inp = self.shape
        lanes = self.row_order.long().view(-1, _SELLP_ROWS)
        group_ptr, layer_ptr, _ = self.slice_ptr.long()
        slice_of_layer = _owners(self.slice_ptr[1])
        k = self.layers_per_group[slice_of_layer]
        group = group_ptr[slice_of_layer] + (torch.arange(len(slice_of_layer)) - layer_ptr[slice_of_layer]) // k
        rows = torch.cat([lanes[slice_of_layer], lanes[_owners(self.slice_ptr[2])]])  # [layers + entries, 16]
        cols = torch.cat([self.layer_block.long()[group, None] * _SELLP_BLOCK + self.layer_lanes.long(),
                          self.col_idx.long()])
        live = rows >= 0
        dense = torch.zeros(out, inp)
        # Padding lanes (value 0) may repeat a stored position: add, not assign.
        dense.index_put_((rows[live], cols[live]), self.values.float()[live], accumulate=True)
        if self.scales is not None:
            dense *= self.scales[:, None]
        return dense


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


@torch.inference_mode(False)
def pack_csr(weight: Tensor, dtype: torch.dtype = torch.float32, *, row_multiple: int = 8) -> CsrWeight:
    """Packs a dense weight ``[out, in]`` into CSR, keeping its nonzero entries.

    Args:
        weight: the dense weight; zeros are the pruned entries.
        dtype: ``torch.float32``, or ``torch.int8`` for symmetric per-row int8 values.
        row_multiple: each row's stored entries are padded with zeros to a multiple of
            this (see the module doc); 1 stores exactly the nonzeros.

    Returns:
        The packed weight.

    Example::

        w = pack_csr(linear.weight * mask)
        y = sparse_linear(x, w, linear.bias)
    """
    w = _check_weight(weight, dtype)
    if row_multiple < 1:
        raise ValueError(f"row_multiple must be >= 1, got {row_multiple}")
    out, inp = w.shape
    mask = w != 0
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's columns ascending
    counts = torch.bincount(rows, minlength=out)
    stored = (counts + row_multiple - 1) // row_multiple * row_multiple
    row_ptr = _row_pointer(stored)
    starts = _row_pointer(counts).long()  # where each row's nonzeros start in `rows, cols`
    # Every entry of a row first holds the row's last column; the nonzeros then overwrite theirs.
    last_col = cols[(starts[1:] - 1).clamp(min=0)] if len(cols) else torch.zeros(out, dtype=torch.int64)
    col_idx = torch.repeat_interleave(last_col, stored)
    position = row_ptr.long()[rows] + torch.arange(len(rows)) - starts[rows]
    col_idx[position] = cols
    scales = None
    source = w
    if dtype == torch.int8:
        scales = _row_scales(w)
        source = _quantize_rows(w, scales)
    values = torch.zeros(len(col_idx), dtype=dtype)
    values[position] = source[rows, cols]
    logger.debug("packed %dx%d weight as CSR: %d nonzeros in %d entries, %s", out, inp, len(cols), len(col_idx), dtype)
    return CsrWeight(row_ptr, col_idx.to(_index_dtype(inp)), values, scales, (out, inp))


@torch.inference_mode(False)
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


def _sorted_lanes(mask: Tensor, lanes: int = 8) -> tuple[Tensor, Tensor]:
    """SELL's lanes: rows sorted by nonzero count (longest first, stable), ``lanes`` to a slice.

    Returns ``(row_order, lane_of_row)``: the output row of each lane (-1 past ``out``,
    int32), and the lane of each row (int64).
    """
    out = mask.shape[0]
    order = torch.sort(mask.sum(dim=1), descending=True, stable=True).indices
    row_order = torch.full((-(-out // lanes) * lanes,), -1, dtype=torch.int32)
    row_order[:out] = order.to(torch.int32)
    lane_of_row = torch.empty(out, dtype=torch.int64)
    lane_of_row[order] = torch.arange(out)
    return row_order, lane_of_row


def _sell_entries(rows: Tensor, cols: Tensor, values: Tensor, lane_of_row: Tensor,
                  n_slices: int, lanes: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """SELL entries of the nonzeros ``(rows, cols, values)``, given row-major (each row's
    nonzeros together, columns ascending): each slice's rows side by side, zero-padded to
    its longest row.

    Returns ``(slice_ptr, col_idx, values)``: int32 ``[n_slices + 1]`` entry offsets, and
    int64 and float32 ``[entries, lanes]``.
    """
    lane = lane_of_row[rows]
    widths = torch.bincount(lane, minlength=n_slices * lanes).view(n_slices, lanes).amax(dim=1)
    slice_ptr = _row_pointer(widths)
    entry = slice_ptr.long()[lane // lanes] + _rank_in_runs(rows)  # the nonzero's place in its row
    col_idx = torch.zeros(int(slice_ptr[-1]), lanes, dtype=torch.int64)
    stored = torch.zeros(int(slice_ptr[-1]), lanes)
    col_idx[entry, lane % lanes] = cols
    stored[entry, lane % lanes] = values
    return slice_ptr, col_idx, stored


@torch.inference_mode(False)
def pack_sell(weight: Tensor, dtype: torch.dtype = torch.float32) -> SellWeight:
    """Packs a dense weight ``[out, in]`` into SELL-8, keeping its nonzero entries.

    The batch-1 layout: each slice entry is one 8-lane gather of the activations, with no
    per-row tail or reduction (see ``sparse_sell.cpp``).

    Args:
        weight: the dense weight; zeros are the pruned entries.
        dtype: ``torch.float32``, or ``torch.int8`` for symmetric per-row int8 values.

    Returns:
        The packed weight.
    """
    w = _check_weight(weight, dtype)
    out, inp = w.shape
    mask = w != 0
    row_order, lane_of_row = _sorted_lanes(mask)
    scales = _row_scales(w) if dtype == torch.int8 else None
    source = w if scales is None else _quantize_rows(w, scales).float()
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's columns ascending
    slice_ptr, col_idx, values = _sell_entries(rows, cols, source[rows, cols], lane_of_row, len(row_order) // 8)
    logger.debug("packed %dx%d weight as SELL-8: %d nonzeros in %d entries, %s", out, inp, len(rows), len(values),
                 dtype)
    return SellWeight(
        slice_ptr,
        row_order,
        col_idx.to(_index_dtype(inp)),
        values.to(dtype).contiguous(),
        scales,
        (out, inp),
    )


#: SELL-P's rows per slice and columns per block: 16 fp32 lanes are one AVX-512 register, and a
#: two-register permute (vpermt2ps) reads 32 columns.
_SELLP_ROWS = 16
_SELLP_BLOCK = 32
#: What a 16-lane entry costs in layers, for choosing K: a layer ~0.6-0.75 ns, an entry ~2.7 ns
#: (one core, batch 1, random MiniLM shapes at 70-95%, standalone harness of the kernel; the
#: kernel's time was flat for ratios 3.4 to 6.8).
_ENTRY_COST_IN_LAYERS = 4.0
#: Most layers a slice stores per block: 32 hold a dense block.
_MAX_LAYERS = _SELLP_BLOCK


def _layers_per_block(lane_block_counts: Tensor) -> Tensor:
    """Each slice's layers per block, K: the one of 0 .. 32 with the least modelled cost.

    ``lane_block_counts`` ``[slices, 16, blocks]`` holds each lane's nonzeros per block. With K
    layers a slice stores K layers in each block where it has a nonzero, and as many entries as
    its lane with the most nonzeros beyond K per block.
    """
    stored_blocks = (lane_block_counts.amax(dim=1) > 0).sum(dim=1)
    costs = []
    for k in range(_MAX_LAYERS + 1):
        entries = (lane_block_counts - k).clamp(min=0).sum(dim=2, dtype=torch.int64).amax(dim=1)
        costs.append(k * stored_blocks + _ENTRY_COST_IN_LAYERS * entries)
    return torch.stack(costs, dim=1).argmin(dim=1)


@torch.inference_mode(False)
def pack_sellp(weight: Tensor, dtype: torch.dtype = torch.float32, *, layers: int | None = None) -> SellpWeight:
    """Packs a dense weight ``[out, in]`` into SELL-P, keeping its nonzero entries.

    A batch-1 layout with fewer gathers than SELL: in each block of 32 columns, a slice of 16
    rows stores its first nonzeros as K layers, each read with one permute of 32 columns of
    ``x`` held in registers; the rest are SELL entries (see ``sparse_sellp.cpp``).

    Args:
        weight: the dense weight; zeros are the pruned entries.
        dtype: ``torch.float32``, or ``torch.int8`` for symmetric per-row int8 values.
        layers: K for every slice, 0 (all entries: SELL with 16 lanes) to 32 (all layers).
            None chooses per slice by a cost model: 4-6 at 90% sparsity, 11-13 at 70%.

    Returns:
        The packed weight.
    """
    if layers is not None and not 0 <= layers <= _MAX_LAYERS:
        raise ValueError(f"layers must be in [0, {_MAX_LAYERS}] or None, got {layers}")
    w = _check_weight(weight, dtype)
    out, inp = w.shape
    n_slices, n_blocks = -(-out // _SELLP_ROWS), -(-inp // _SELLP_BLOCK)
    mask = w != 0
    row_order, lane_of_row = _sorted_lanes(mask, _SELLP_ROWS)
    scales = _row_scales(w) if dtype == torch.int8 else None
    source = w if scales is None else _quantize_rows(w, scales).float()
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's columns ascending
    lane, block = lane_of_row[rows], cols // _SELLP_BLOCK
    slice_of = lane // _SELLP_ROWS
    # Rank of each nonzero among its row's nonzeros in the same block: its layer there.
    rank = _rank_in_runs(rows * n_blocks + block)
    counts = torch.zeros(n_slices * _SELLP_ROWS * n_blocks, dtype=torch.int16)  # at most 32 a block
    counts.index_add_(0, lane * n_blocks + block, torch.ones(len(lane), dtype=torch.int16))
    counts = counts.view(n_slices, _SELLP_ROWS, n_blocks)
    k = _layers_per_block(counts) if layers is None else torch.full((n_slices,), layers, dtype=torch.int64)
    # The groups: each (slice, block) where the slice has a nonzero and K > 0, slice by slice.
    stored = (counts.amax(dim=1) > 0) & (k[:, None] > 0)
    group_counts = stored.sum(dim=1)
    group_ptr, layer_ptr = _row_pointer(group_counts), _row_pointer(group_counts * k)
    group_of = torch.cumsum(stored.flatten(), 0) - 1
    layer_block = stored.nonzero()[:, 1]
    in_layer = rank < k[slice_of]
    s, r = slice_of[in_layer], rank[in_layer]
    group = group_of[s * n_blocks + block[in_layer]]
    layer = layer_ptr.long()[s] + (group - group_ptr.long()[s]) * k[s] + r
    layer_lanes = torch.zeros(int(layer_ptr[-1]), _SELLP_ROWS, dtype=torch.uint8)
    layer_values = torch.zeros(int(layer_ptr[-1]), _SELLP_ROWS)
    layer_lanes[layer, lane[in_layer] % _SELLP_ROWS] = (cols[in_layer] % _SELLP_BLOCK).to(torch.uint8)
    layer_values[layer, lane[in_layer] % _SELLP_ROWS] = source[rows[in_layer], cols[in_layer]]
    rest = ~in_layer
    entry_ptr, col_idx, values = _sell_entries(rows[rest], cols[rest], source[rows[rest], cols[rest]], lane_of_row,
                                               n_slices, _SELLP_ROWS)
    logger.debug("packed %dx%d weight as SELL-P: %d nonzeros in %d layers and %d entries, %s", out, inp, len(rows),
                 len(layer_values), len(values), dtype)
    index_dtype = _index_dtype(inp)
    return SellpWeight(
        torch.stack([group_ptr, layer_ptr, entry_ptr]),
        layer_block.to(index_dtype),
        layer_lanes,
        row_order,
        col_idx.to(index_dtype),
        torch.cat([layer_values, values]).to(dtype),
        scales,
        (out, inp),
    )


def pack_weight(
    weight: Tensor,
    layout: str,
    block: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> CsrWeight | BsrWeight | SellWeight | SellpWeight:
    """Packs ``weight`` in the named layout: ``"csr"``, ``"sell"``, ``"sellp"`` or ``"bsr"`` (with ``block``)."""
    if layout == "csr":
        return pack_csr(weight, dtype)
    if layout == "sell":
        return pack_sell(weight, dtype)
    if layout == "sellp":
        return pack_sellp(weight, dtype)
    if layout == "bsr":
        if block is None:
            raise ValueError("the bsr layout needs a block shape")
        return pack_bsr(weight, block, dtype)
    raise ValueError(f"unknown sparse layout {layout!r}; expected 'csr', 'bsr', 'sell' or 'sellp'")
