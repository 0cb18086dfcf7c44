"""Tests of graphopt's C++ sparse-linear kernels: numerics, packing, fakes, export, build cache.

Numerics: every op is compared with ``F.linear`` on the weight the packing represents
(``packed.to_dense()``: the fp32 weight itself, or the dequantised int8 one), with
``rtol = atol = 1e-5`` on outputs of unit scale (weights scaled by 1/sqrt(in)); the kernels
sum in a different order than MKL, so bit-equality is not expected. The extension is
built once per session (cached across sessions in the user's cache).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from graphopt.backends.cpp import build, ops
from graphopt.backends.cpp.ops import (
    BsrWeight,
    CsrWeight,
    SellpWeight,
    SellWeight,
    pack_bsr,
    pack_csr,
    pack_sell,
    pack_sellp,
    pack_weight,
    sparse_linear,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

RTOL = ATOL = 1e-5
BLOCKS = [(1, 4), (1, 8), (1, 16), (4, 4), (8, 1), (16, 1), (2, 2), (3, 5)]


@pytest.fixture(scope="session")
def kernels() -> None:
    """Builds (first session only) and loads the extension, once per test session."""
    build.load_extension()


def _weight(out: int, inp: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) / math.sqrt(max(inp * density, 1.0))
    return w * (torch.rand(out, inp, generator=g) < density)


def _check(x: torch.Tensor, packed: CsrWeight | BsrWeight | SellWeight | SellpWeight, bias: torch.Tensor | None) -> None:
    y = sparse_linear(x, packed, bias)
    ref = F.linear(x, packed.to_dense(), bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=RTOL, atol=ATOL)


batch_shapes = st.sampled_from(
    [(1,), (2,), (3,), (7,), (8,), (9,), (16,), (33,), (70,), (2, 5), (1, 1, 3), (0,)]
)


def _pack_csr_exact(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> CsrWeight:
    """CSR without row padding: rows of any length, so the kernels' row tails run."""
    return pack_csr(w, dtype, row_multiple=1)


def _pack_sellp_one_layer(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> SellpWeight:
    """SELL-P with one layer per block: most weights then have both layers and entries."""
    return pack_sellp(w, dtype, layers=1)


@pytest.mark.parametrize("pack", [pack_csr, _pack_csr_exact, pack_sell, pack_sellp, _pack_sellp_one_layer],
                         ids=["csr", "csr_exact", "sell", "sellp", "sellp_one_layer"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    out=st.integers(1, 70),
    inp=st.integers(1, 300),
    density=st.sampled_from([0.0, 0.03, 0.1, 0.3, 0.7, 1.0]),
    batch=batch_shapes,
    int8=st.booleans(),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unstructured_layouts_match_dense(kernels, pack, out, inp, density, batch, int8, with_bias, seed) -> None:
    w = _weight(out, inp, density, seed)
    # A third of the rows thinned further: rows of uneven length (SELL pads slices to the longest).
    w[: out // 3] *= torch.rand(out // 3, inp, generator=torch.Generator().manual_seed(seed)) < 0.5
    packed = pack(w, torch.int8 if int8 else torch.float32)
    x = torch.randn(*batch, inp, generator=torch.Generator().manual_seed(seed + 1))
    _check(x, packed, torch.randn(out) if with_bias else None)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    out=st.integers(1, 70),
    inp=st.integers(1, 200),
    block=st.sampled_from(BLOCKS),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    batch=batch_shapes,
    int8=st.booleans(),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bsr_matches_dense(kernels, out, inp, block, density, batch, int8, with_bias, seed) -> None:
    w = _weight(out, inp, density, seed)
    packed = pack_bsr(w, block, torch.int8 if int8 else torch.float32)
    x = torch.randn(*batch, inp, generator=torch.Generator().manual_seed(seed + 1))
    _check(x, packed, torch.randn(out) if with_bias else None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 5),
    queries=st.sampled_from([1, 2, 5, 8, 15, 17, 33]),
    keys=st.sampled_from([1, 3, 8, 15, 24, 129, 200]),
    head_dim=st.sampled_from([8, 16, 32, 40, 64]),
    mask=st.sampled_from(["none", "padding", "full", "2d", "3d", "masked_row", "per_query", "transposed"]),
    layout=st.sampled_from(["contiguous", "heads_inner"]),
    scale=st.sampled_from([None, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_torch(kernels, batch, heads, queries, keys, head_dim, mask, layout, scale, seed) -> None:
    """graphopt::attention against F.scaled_dot_product_attention (same inputs, atol 1e-5 on
    unit-scale values): masks broadcast from [b,1,1,k], full [b,h,q,k], 2-D [q,k] and 3-D
    [h,q,k], broadcast along the keys ([b,h,q,1]) and with strided keys (a transposed view); inputs as
    contiguous tensors and as the [b, tokens, heads, dim] views a model's head split gives;
    more than 128 keys take torch's kernel inside the op; a query masked everywhere gets zeros."""
    g = torch.Generator().manual_seed(seed)

    def tensor(tokens: int) -> torch.Tensor:
        if layout == "heads_inner":
            return torch.randn(batch, tokens, heads, head_dim, generator=g).transpose(1, 2)
        return torch.randn(batch, heads, tokens, head_dim, generator=g)

    q, k, v = tensor(queries), tensor(keys), tensor(keys)
    shapes = {"none": None, "padding": (batch, 1, 1, keys), "full": (batch, heads, queries, keys),
              "2d": (queries, keys), "3d": (heads, queries, keys), "masked_row": (batch, 1, queries, keys),
              "per_query": (batch, heads, queries, 1), "transposed": (batch, heads, keys, queries)}
    attn_mask = None if shapes[mask] is None else torch.randn(*shapes[mask], generator=g)
    if mask == "transposed":
        attn_mask = attn_mask.transpose(2, 3)
    if mask == "padding":
        attn_mask[..., -1] = torch.finfo(torch.float32).min
    if mask == "masked_row":
        attn_mask[:, :, 0, :] = float("-inf")
    got = ops.attention(q, k, v, attn_mask, scale)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    assert got.shape == want.shape and got.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    if mask == "masked_row":
        assert not got[:, :, 0].any()


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (15, 1536), (3, 5, 33)])
def test_gelu_matches_torch(kernels, shape) -> None:
    """graphopt::gelu against F.gelu (exact form) in float64 on normal values, within 1e-6 absolute
    (its erf is a rational approximation: up to 0.92e-6 off here; torch's own float kernel is off
    by up to 1.2e-6 on Zen 4 and gives NaN for inf), and on a sweep of the whole range, infinities
    and zeros included."""
    def exact(t: torch.Tensor) -> torch.Tensor:
        return F.gelu(t.double()).float()

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(ops.gelu(x), exact(x), rtol=0, atol=1e-6)
    sweep = torch.cat([torch.linspace(-30, 30, 100_003), torch.tensor([float("inf"), -0.0, 0.0, 1e-30, -1e-30])])
    torch.testing.assert_close(ops.gelu(sweep), exact(sweep), rtol=0, atol=1e-6)
    strided = torch.randn(16, 24)[:, ::2]  # not contiguous: copied, not misread
    torch.testing.assert_close(ops.gelu(strided), exact(strided), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        ops.gelu(x.double())


def test_attention_rejects_what_it_does_not_compute(kernels) -> None:
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.attention(torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12))
    with pytest.raises(RuntimeError, match="additive float32"):
        ops.attention(q, q, q, torch.ones(1, 1, 1, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="does not broadcast"):
        ops.attention(q, q, q, torch.zeros(1, 2, 2, 3))
    with pytest.raises(RuntimeError, match="must agree"):
        ops.attention(q, torch.randn(1, 3, 3, 16), torch.randn(1, 3, 3, 16))
    with pytest.raises(RuntimeError, match="4-D float32"):
        ops.attention(q.double(), q.double(), q.double())


@pytest.mark.parametrize("batch", [1, 3, 8, 24, 130])
@pytest.mark.parametrize(
    "layout", ["csr", "csr8", "csr_exact", "bsr1x8", "bsr4x4", "bsr16x1", "bsr16x1_8", "sell", "sell8", "sellp",
               "sellp8", "sellp_one_layer"]
)
def test_large_layers_use_threads_and_match(kernels, batch, layout) -> None:
    # Big enough for the multi-thread path (tests/conftest.py sets 2 threads); 301 rows
    # leave a partial 8-row group, and thread boundaries are rounded to multiples of 8.
    w = _weight(301, 515, 0.3, seed=batch)
    w[17:40] = 0  # a run of empty rows
    packed = {
        "csr": lambda: pack_csr(w),
        "csr8": lambda: pack_csr(w, torch.int8),
        "csr_exact": lambda: _pack_csr_exact(w),
        "bsr1x8": lambda: pack_bsr(w, (1, 8)),
        "bsr4x4": lambda: pack_bsr(w, (4, 4)),
        "bsr16x1": lambda: pack_bsr(w, (16, 1)),
        "bsr16x1_8": lambda: pack_bsr(w, (16, 1), torch.int8),
        "sell": lambda: pack_sell(w),
        "sell8": lambda: pack_sell(w, torch.int8),
        "sellp": lambda: pack_sellp(w),
        "sellp8": lambda: pack_sellp(w, torch.int8),
        "sellp_one_layer": lambda: _pack_sellp_one_layer(w),
    }[layout]()
    _check(torch.randn(batch, 515), packed, torch.randn(301))


@pytest.mark.parametrize(
    "pack,index_dtype",
    [
        (pack_csr, torch.int32),
        (lambda w: pack_bsr(w, (1, 1)), torch.int32),  # 40000 block columns: generic path
        (lambda w: pack_bsr(w, (4, 4)), torch.int16),  # 10000 block columns
        (pack_sell, torch.int32),
        (pack_sellp, torch.int32),
        (_pack_sellp_one_layer, torch.int32),
    ],
)
def test_wide_input_uses_int32_indices(kernels, pack, index_dtype) -> None:
    w = _weight(20, 40000, 0.01, seed=3)
    w[:, -1] = 1.0  # the last column, beyond the int16 range
    packed = pack(w)
    assert packed.col_idx.dtype == index_dtype
    for batch in (1, 5):
        _check(torch.randn(batch, 40000), packed, None)


def test_sellp_blocks_take_the_dtype_of_its_columns() -> None:
    w = _weight(9, 32768, 0.01, seed=4)
    packed = pack_sellp(w, layers=1)
    assert packed.layer_block.dtype == packed.col_idx.dtype == torch.int32
    narrow = pack_sellp(w[:, :32767], layers=1)
    assert narrow.layer_block.dtype == narrow.col_idx.dtype == torch.int16


def test_index_dtype_boundary() -> None:
    assert pack_csr(torch.ones(2, 32767)).col_idx.dtype == torch.int16
    assert pack_csr(torch.ones(2, 32768)).col_idx.dtype == torch.int32


@pytest.mark.parametrize("fill", ["zeros", "ones", "one_row"])
@pytest.mark.parametrize("layout", ["csr", "csr8", "bsr", "sell", "sell8", "sellp", "sellp8"])
def test_all_zero_and_dense_weights(kernels, fill, layout) -> None:
    w = {"zeros": torch.zeros(13, 29), "ones": torch.randn(13, 29), "one_row": torch.zeros(13, 29)}[
        fill
    ]
    if fill == "one_row":
        w[5, 3] = 2.0
    packed = {
        "csr": pack_csr,
        "csr8": lambda t: pack_csr(t, torch.int8),
        "bsr": lambda t: pack_bsr(t, (4, 4)),
        "sell": pack_sell,
        "sell8": lambda t: pack_sell(t, torch.int8),
        "sellp": pack_sellp,
        "sellp8": lambda t: pack_sellp(t, torch.int8),
    }[layout](w)
    bias = torch.randn(13)
    for shape in ((1, 29), (6, 29), (2, 3, 29)):
        _check(torch.randn(shape), packed, bias)


def test_packing_round_trips() -> None:
    w = _weight(37, 53, 0.2, seed=1)
    assert torch.equal(pack_csr(w).to_dense(), w)
    for block in BLOCKS:
        assert torch.equal(pack_bsr(w, block).to_dense(), w)
    q = pack_csr(w, torch.int8)
    assert q.values.dtype == torch.int8 and q.scales is not None
    # Symmetric rounding: at most half a step per entry.
    assert ((q.to_dense() - w).abs() <= q.scales[:, None] / 2 + 1e-7).all()
    assert torch.equal(q.row_ptr, pack_csr(w).row_ptr) and torch.equal(
        q.col_idx, pack_csr(w).col_idx
    )
    sell = pack_sell(w)
    assert torch.equal(sell.to_dense(), w)
    assert torch.equal(pack_sellp(w).to_dense(), w)
    assert torch.equal(pack_sellp(w, torch.int8).to_dense(), q.to_dense())
    assert torch.equal(pack_sell(w, torch.int8).to_dense(), q.to_dense())
    # Rows sorted by length: slice widths never increase, and padding is what sorting leaves.
    widths = sell.slice_ptr[1:] - sell.slice_ptr[:-1]
    assert (widths[1:] <= widths[:-1]).all()
    assert sorted(r for r in sell.row_order.tolist() if r >= 0) == list(range(37))
    assert (sell.row_order[37:] == -1).all()
    with pytest.raises(ValueError, match="2-D"):
        pack_csr(torch.ones(3))
    with pytest.raises(ValueError, match="row_multiple"):
        pack_csr(w, row_multiple=0)
    with pytest.raises(ValueError, match="block shape"):
        pack_bsr(w, (0, 4))


def test_packing_under_inference_mode_gives_tensors_with_versions() -> None:
    """The ops check column indices once per tensor version; inference tensors have none."""
    w = _weight(16, 40, 0.5, seed=3)
    with torch.inference_mode():
        packs = [pack_csr(w), pack_sell(w, torch.int8), pack_bsr(w, (1, 4)), pack_sellp(w), pack_weight(w * 2, "csr")]
    for packed in packs:
        tensors = [t for f in dataclasses.fields(packed) if isinstance(t := getattr(packed, f.name), torch.Tensor)]
        assert len(tensors) >= 3 and not any(t.is_inference() for t in tensors)


def test_sparse_linear_takes_the_layouts_op_and_rejects_other_weights(kernels) -> None:
    w = _weight(16, 40, 0.5, seed=5)
    for pack in (pack_csr, lambda t, d: pack_bsr(t, (4, 4), d), pack_sell, pack_sellp):
        for dtype, suffix in ((torch.float32, ""), (torch.int8, "_int8")):
            packed = pack(w, dtype)
            op, tensors, out = packed.linear_call
            assert op is getattr(torch.ops.graphopt, f"{packed.LAYOUT}_linear{suffix}").default and out == 16
            names = [a.name for a in op._schema.arguments]
            assert names[1:len(tensors) + 1] == [*packed.op_fields, *(["scales"] if dtype == torch.int8 else [])]
            assert all(t is getattr(packed, n) for t, n in zip(tensors, names[1:]))
    with pytest.raises(TypeError, match="got Tensor"):
        sparse_linear(torch.randn(2, 40), w)


def test_sellp_layers_hold_each_rows_first_nonzeros_in_a_block_and_entries_the_rest() -> None:
    w = torch.zeros(20, 70)
    w[0, [1, 4, 6]] = 1.0  # row 0: three nonzeros in block 0 (columns 0-31)
    w[3, [2, 40]] = 2.0  # row 3: one in block 0, one in block 1 (columns 32-63)
    w[9, 69] = 3.0  # row 9: one in block 2 (columns 64-69)
    three = pack_sellp(w, layers=3)
    # Rows sorted by count: slice 0 is rows 0, 3, 9, 1, 2, 4, ... (lanes 0-15), slice 1 rows 16-19.
    assert three.row_order.tolist()[:4] == [0, 3, 9, 1] and three.row_order.tolist()[16:] == [16, 17, 18, 19] + [-1] * 12
    # Slice 0: a group in each of blocks 0, 1, 2, of 3 layers each; no entries. Slice 1: nothing.
    assert three.slice_ptr.tolist() == [[0, 3, 3], [0, 9, 9], [0, 0, 0]]
    assert three.layer_block.tolist() == [0, 1, 2] and three.layers_per_group.tolist() == [3, 0]
    assert three.layer_lanes[:3, 0].tolist() == [1, 4, 6] and three.layer_lanes[0, 1] == 2
    assert three.values[:, 0].tolist() == [1.0] * 3 + [0.0] * 6
    assert three.layer_lanes[3, 1] == 40 - 32 and three.values[3, 1] == 2.0  # row 3 is lane 1
    assert three.layer_lanes[6, 2] == 69 - 64 and three.values[6, 2] == 3.0  # row 9 is lane 2
    one = pack_sellp(w, layers=1)
    # One layer per block; row 0's 2nd and 3rd nonzeros in block 0 become two entries of lane 0.
    assert one.slice_ptr.tolist() == [[0, 3, 3], [0, 3, 3], [0, 2, 2]]
    assert one.col_idx[:, 0].tolist() == [4, 6] and one.values[3:, 0].tolist() == [1.0, 1.0]
    none = pack_sellp(w, layers=0)
    assert len(none.layer_block) == 0 and none.slice_ptr.tolist() == [[0, 0, 0], [0, 0, 0], [0, 3, 3]]
    assert none.col_idx[:, 0].tolist() == [1, 4, 6] and none.col_idx[:2, 1].tolist() == [2, 40]
    for packed in (three, one, none, pack_sellp(w, layers=32)):
        assert torch.equal(packed.to_dense(), w)
    with pytest.raises(ValueError, match="layers"):
        pack_sellp(w, layers=33)


@pytest.mark.parametrize("layers", [*range(1, 18), 24, 32])
def test_sellp_matches_dense_for_every_layer_count(kernels, layers) -> None:
    """The kernel runs K layers a group through a loop compiled for each K of 1-16 and a generic
    one above: each against the dense product, with groups that hold fewer nonzeros than K too."""
    w = _weight(40, 96, 0.7, seed=layers)
    w[:8, 40:] = 0.0  # sparse rows beside dense ones in a slice: lanes with padding layers
    for dtype in (torch.float32, torch.int8):
        packed = pack_sellp(w, dtype, layers=layers)
        assert packed.layers_per_group.tolist() == [layers] * 3
        if dtype == torch.float32:  # the reference below is the packed weight: it must be w
            assert torch.equal(packed.to_dense(), w)
        for batch in (1, 3):
            x = torch.randn(batch, 96, generator=torch.Generator().manual_seed(layers))
            _check(x, packed, torch.randn(40))


def test_sellp_cost_model_takes_more_layers_where_blocks_are_denser() -> None:
    """The choices the cost model was calibrated for (sparse_sellp.cpp): at 90% sparsity a block's
    first layer holds ~15.5 of 16 lanes and its fourth ~6.4, at 70% the tenth still ~9."""
    for density, low, high in ((0.1, 3, 6), (0.3, 10, 14)):
        packed = pack_sellp(_weight(384, 1536, density, seed=9))
        assert low <= packed.layers_per_group.min() and packed.layers_per_group.max() <= high, density
        assert packed.layer_block.numel() == 24 * 48  # every (slice, block) pair has a nonzero


@pytest.mark.parametrize("row_multiple", [1, 4, 8])
def test_csr_rows_are_padded_with_zeros_to_the_row_multiple(row_multiple) -> None:
    w = _weight(37, 53, 0.2, seed=2)
    w[4] = 0  # an empty row stays empty
    w[9] = 0
    w[9, 52] = 1.5  # one nonzero, in the last column
    packed = pack_csr(w, row_multiple=row_multiple)
    counts = (w != 0).sum(dim=1)
    stored = (packed.row_ptr[1:] - packed.row_ptr[:-1]).long()
    assert torch.equal(stored, (counts + row_multiple - 1) // row_multiple * row_multiple)
    assert packed.nnz == int(stored.sum())
    assert torch.equal(packed.to_dense(), w)
    for r in range(37):
        s, e, n = int(packed.row_ptr[r]), int(packed.row_ptr[r + 1]), int(counts[r])
        cols, vals = packed.col_idx[s:e].long(), packed.values[s:e]
        assert torch.equal(cols[:n], w[r].nonzero().flatten())  # the nonzeros first, ascending
        assert torch.equal(vals[:n], w[r][cols[:n]])
        assert (vals[n:] == 0).all()  # padding: zeros at the row's last index
        assert e == s or (cols[n:] == cols[n - 1]).all()


def _op_args(x: torch.Tensor, packed: CsrWeight | BsrWeight | SellWeight | SellpWeight,
             bias: torch.Tensor | None) -> tuple:
    _, tensors, out = packed.linear_call
    return (x, *tensors, bias, out)


@pytest.mark.parametrize(
    "name,pack",
    [
        ("csr_linear", pack_csr),
        ("csr_linear_int8", lambda w: pack_csr(w, torch.int8)),
        ("bsr_linear", lambda w: pack_bsr(w, (1, 8))),
        ("bsr_linear_int8", lambda w: pack_bsr(w, (4, 4), torch.int8)),
        ("sell_linear", pack_sell),
        ("sell_linear_int8", lambda w: pack_sell(w, torch.int8)),
        ("sellp_linear", _pack_sellp_one_layer),
        ("sellp_linear_int8", lambda w: pack_sellp(w, torch.int8, layers=1)),
    ],
)
def test_fake_matches_real(kernels, name, pack) -> None:
    w = _weight(24, 40, 0.3, seed=2)
    packed = pack(w)
    op = getattr(torch.ops.graphopt, name).default
    for x in (torch.randn(3, 40), torch.randn(2, 5, 40)):
        args = _op_args(x, packed, torch.randn(24))
        # Checks the schema, fake-vs-real output metadata, and tracing through AOT dispatch.
        torch.library.opcheck(op, args)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        real = op(*args)
        assert fake.shape == real.shape and fake.dtype == real.dtype


def test_attention_and_gelu_fakes_match_real(kernels) -> None:
    q = torch.randn(2, 5, 3, 16).transpose(1, 2)
    k, v, attn_mask = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 1, 1, 7)
    op = torch.ops.graphopt.attention.default
    for args in ((q, k, v, attn_mask, 0.25), (q, k, v, None, 0.25)):
        torch.library.opcheck(op, args)  # includes the fake's shape and strides against the kernel's
    torch.library.opcheck(torch.ops.graphopt.gelu.default, (torch.randn(3, 5, 8).transpose(0, 1),))


class _SparseMlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = pack_csr(_weight(32, 16, 0.3, seed=4))
        self.b = pack_bsr(_weight(8, 32, 0.3, seed=5), (4, 4), torch.int8)
        for prefix, packed in (("a", self.a), ("b", self.b)):
            for field in ("row_ptr", "col_idx", "values", "scales"):
                if getattr(packed, field) is not None:
                    self.register_buffer(f"{prefix}_{field}", getattr(packed, field))
        self.register_buffer("bias", torch.randn(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.csr_linear(x, self.a_row_ptr, self.a_col_idx, self.a_values, self.bias, 32)
        return ops.bsr_linear_int8(
            torch.relu(h), self.b_row_ptr, self.b_col_idx, self.b_values, self.b_scales, None, 8
        )


def test_torch_export(kernels) -> None:
    model = _SparseMlp()
    x = torch.randn(2, 7, 16)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"graphopt.csr_linear.default", "graphopt.bsr_linear_int8.default"} <= targets
    x2 = torch.randn(5, 7, 16)
    torch.testing.assert_close(exported.module()(x2), model(x2), rtol=0, atol=0)


def test_export_without_kernels_uses_fakes() -> None:
    # Tracing needs only the schemas and fakes: a fresh interpreter that never builds.
    code = textwrap.dedent(
        """
        import torch
        from graphopt.backends.cpp import build, ops
        w = ops.pack_csr(torch.eye(4))
        class M(torch.nn.Module):
            def forward(self, x):
                return ops.csr_linear(x, w.row_ptr, w.col_idx, w.values, None, 4)
        ep = torch.export.export(M(), (torch.randn(2, 4),))
        assert build._loaded is None
        print("ok")
        """
    )
    env = {**os.environ, "GRAPHOPT_CACHE_DIR": "/nonexistent/graphopt-test"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_malformed_weights_raise(kernels) -> None:
    w = pack_csr(_weight(16, 40, 0.5, seed=6))
    x = torch.randn(3, 40)
    bad_col = w.col_idx.clone()
    bad_col[5] = 40
    neg_col = w.col_idx.clone()
    neg_col[-1] = -1
    bad_ptr = w.row_ptr.clone()
    bad_ptr[4] = bad_ptr[5] + 1
    for m in (1, 3):
        with pytest.raises(RuntimeError, match="col_idx"):
            ops.csr_linear(x[:m], w.row_ptr, bad_col, w.values, None, 16)
        with pytest.raises(RuntimeError, match="col_idx"):
            ops.csr_linear(x[:m], w.row_ptr, neg_col, w.values, None, 16)
        with pytest.raises(RuntimeError, match="row_ptr"):
            ops.csr_linear(x[:m], bad_ptr, w.col_idx, w.values, None, 16)
    with pytest.raises(RuntimeError, match="row_ptr has"):
        ops.csr_linear(x, w.row_ptr, w.col_idx, w.values, None, 15)
    with pytest.raises(RuntimeError, match="float32"):
        ops.csr_linear(x.double(), w.row_ptr, w.col_idx, w.values, None, 16)
    b = pack_bsr(_weight(16, 40, 0.5, seed=6), (4, 4))
    bad_bcol = b.col_idx.clone()
    bad_bcol[0] = 10  # 40 / 4 = 10 block columns
    with pytest.raises(RuntimeError, match="col_idx"):
        ops.bsr_linear(x, b.row_ptr, bad_bcol, b.values, None, 16)
    s = pack_sell(_weight(16, 40, 0.5, seed=6))
    for field, index, value, message in (
        ("col_idx", (3, 2), 40, "col_idx"),
        ("col_idx", (0, 0), -1, "col_idx"),
        ("row_order", (5,), 16, "row_order"),
        ("slice_ptr", (1,), int(s.slice_ptr[2]) + 1, "row_ptr"),
    ):
        tensors = {f: getattr(s, f).clone() for f in ("slice_ptr", "row_order", "col_idx")}
        tensors[field][index] = value
        for m in (1, 3):
            with pytest.raises(RuntimeError, match=message):
                ops.sell_linear(x[:m], tensors["slice_ptr"], tensors["row_order"], tensors["col_idx"],
                                s.values, None, 16)
    with pytest.raises(RuntimeError, match="row_order must"):
        ops.sell_linear(x, s.slice_ptr, s.row_order[:-1], s.col_idx, s.values, None, 16)
    p = _pack_sellp_one_layer(_weight(40, 100, 0.5, seed=6))  # 3 slices, 4 blocks
    xp = torch.randn(3, 100)
    assert len(p.layer_block) > 3 and len(p.col_idx) > 3
    for field, index, value, message in (
        ("layer_block", (3,), 4, "layer_block holds"),  # 100 / 32 = 4 blocks
        ("layer_block", (0,), -1, "layer_block holds"),
        ("col_idx", (3, 2), 100, "col_idx holds"),
        ("row_order", (5,), 40, "row_order"),
        ("slice_ptr", (0, 1), int(p.slice_ptr[0, 2]) + 1, "row_ptr"),
        ("slice_ptr", (1, 1), int(p.slice_ptr[1, 1]) + 1, "row_ptr"),  # layers not K per group
        ("slice_ptr", (2, 1), -1, "row_ptr"),
        ("slice_ptr", (2, 0), 1, "slice_ptr\\[2\\] must start at 0"),
        ("slice_ptr", (2, 3), 0, "values must be"),  # the slices' ends give the values' length
    ):
        tensors = {f: getattr(p, f).clone() for f in ("slice_ptr", "layer_block", "row_order", "col_idx")}
        tensors[field][index] = value
        for m in (1, 3):
            with pytest.raises(RuntimeError, match=message):
                ops.sellp_linear(xp[:m], tensors["slice_ptr"], tensors["layer_block"], p.layer_lanes,
                                 tensors["row_order"], tensors["col_idx"], p.values, None, 40)
    for lanes in (p.layer_lanes.to(torch.int16), p.layer_lanes[:-1]):
        with pytest.raises(RuntimeError, match="layer_lanes must"):
            ops.sellp_linear(xp, p.slice_ptr, p.layer_block, lanes, p.row_order, p.col_idx, p.values, None, 40)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.sellp_linear(xp, p.slice_ptr, p.layer_block.int(), p.layer_lanes, p.row_order, p.col_idx, p.values, None,
                         40)
    with pytest.raises(RuntimeError, match=r"values must be \[layers \+ entries, 16\]"):
        ops.sellp_linear(xp, p.slice_ptr, p.layer_block, p.layer_lanes, p.row_order, p.col_idx, p.values[1:], None,
                         40)
    with pytest.raises(RuntimeError, match="slice_ptr must"):
        ops.sellp_linear(xp, p.slice_ptr[:2], p.layer_block, p.layer_lanes, p.row_order, p.col_idx, p.values, None,
                         40)


def _call_with_columns(layout: str, packed: CsrWeight | SellWeight | SellpWeight, col_idx: torch.Tensor,
                       x: torch.Tensor) -> torch.Tensor:
    """The op of ``layout`` with ``col_idx`` as its column indices (``sellp_blocks``: SELL-P's
    layer blocks, ``sellp``: its entries' column indices)."""
    out = packed.shape[0]
    if layout == "csr":
        return ops.csr_linear(x, packed.row_ptr, col_idx, packed.values, None, out)
    if layout == "sellp_blocks":
        return ops.sellp_linear(x, packed.slice_ptr, col_idx, packed.layer_lanes, packed.row_order,
                                packed.col_idx.to(col_idx.dtype), packed.values, None, out)
    if layout == "sellp":
        return ops.sellp_linear(x, packed.slice_ptr, packed.layer_block.to(col_idx.dtype), packed.layer_lanes,
                                packed.row_order, col_idx, packed.values, None, out)
    return ops.sell_linear(x, packed.slice_ptr, packed.row_order, col_idx, packed.values, None, out)


_PACKS = {"csr": pack_csr, "sell": pack_sell, "sellp": _pack_sellp_one_layer, "sellp_blocks": _pack_sellp_one_layer}


def _columns(layout: str, packed: CsrWeight | SellWeight | SellpWeight) -> torch.Tensor:
    return packed.layer_block if layout == "sellp_blocks" else packed.col_idx


@pytest.mark.parametrize("layout", ["csr", "sell", "sellp", "sellp_blocks"])
@pytest.mark.parametrize("m", [1, 3, 20])
def test_indices_written_after_a_call_are_checked_again(kernels, layout, m) -> None:
    """CSR's, SELL's and SELL-P's column indices (and SELL-P's blocks) are checked once per index tensor and version,
    not on every call: an in-place write through torch (which bumps the version) is caught on the
    next call."""
    packed = _PACKS[layout](_weight(24, 40, 0.5, seed=7))
    x = torch.randn(m, 40)
    col_idx = _columns(layout, packed).clone()
    want = _call_with_columns(layout, packed, col_idx, x)
    entry = (0,) * col_idx.dim()
    saved = int(col_idx[entry])
    col_idx[entry] = 5 if layout == "sellp_blocks" else 40
    with pytest.raises(RuntimeError, match="layer_block" if layout == "sellp_blocks" else "col_idx"):
        _call_with_columns(layout, packed, col_idx, x)
    col_idx[entry] = saved
    torch.testing.assert_close(_call_with_columns(layout, packed, col_idx, x), want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["csr", "sell", "sellp", "sellp_blocks"])
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_indices_written_behind_torch_stay_inside_the_buffers(kernels, layout, m, index_dtype) -> None:
    """A write that torch does not see (through .data: no version bump) can make a result wrong
    but never makes a kernel read outside its buffers: int16 indices are masked into x's padded
    rows or tiles, and int32 ones are checked on every call. Rows without the bad index still
    match."""
    dense = _weight(24, 40, 0.5, seed=8)
    packed = _PACKS[layout](dense)
    x = torch.randn(m, 40)
    want = x @ dense.T
    col_idx = _columns(layout, packed).to(index_dtype)
    _call_with_columns(layout, packed, col_idx, x)  # checked now, and remembered
    if layout == "csr":  # entry 0 is in the first row that has entries
        bad_rows = [int(torch.searchsorted(packed.row_ptr, 0, right=True)) - 1]
    elif layout == "sellp_blocks":  # group 0 is read by every row of slice 0
        bad_rows = packed.row_order[:16].tolist()
    else:  # entry 0 is lane 0 of slice 0
        bad_rows = [int(packed.row_order[0])]
    col_idx.data[(0,) * col_idx.dim()] = -1 if index_dtype == torch.int16 else 1 << 30
    if index_dtype == torch.int32:
        with pytest.raises(RuntimeError, match="layer_block" if layout == "sellp_blocks" else "col_idx"):
            _call_with_columns(layout, packed, col_idx, x)
        return
    got = _call_with_columns(layout, packed, col_idx, x)
    others = [r for r in range(24) if r not in bad_rows]
    assert others
    torch.testing.assert_close(got[:, others], want[:, others], rtol=1e-5, atol=1e-5)


def test_extension_available(kernels) -> None:
    assert build.extension_available()
    build.load_extension()  # idempotent


# --- build cache: a tiny C++ source, built for real in a temporary cache ------------------

_PROBE = 'extern "C" int graphopt_probe() {{ return {value}; }}\n'


def _probe_spec(tmp_path: Path, value: int) -> build.BuildSpec:
    src = tmp_path / "probe.cpp"
    src.write_text(_PROBE.format(value=value))
    return build.BuildSpec(name="graphopt_probe", sources=(src,), cflags=("-O0",), ldflags=())


def _builds(caplog) -> int:
    return sum(r.message.startswith("building C++ kernels") for r in caplog.records)


def test_cache_rebuilds_after_source_change(tmp_path: Path, caplog) -> None:
    root = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="graphopt.backends.cpp.build")
    spec1 = _probe_spec(tmp_path, 1)
    key1 = spec1.key()
    lib1 = build.build_library(spec1, root)
    assert lib1.exists() and (root.stat().st_mode & 0o777) == 0o700
    assert build.build_library(spec1, root) == lib1  # cache hit
    assert _builds(caplog) == 1
    spec2 = _probe_spec(tmp_path, 2)  # the same file with new bytes
    assert spec2.key() != key1
    lib2 = build.build_library(spec2, root)
    assert lib2 != lib1 and lib2.exists()
    assert _builds(caplog) == 2
    # A library that no longer matches its recorded sha256 is rebuilt, not loaded.
    lib2.write_bytes(lib2.read_bytes() + b"tampered")
    assert build.build_library(spec2, root) == lib2
    assert _builds(caplog) == 3
    assert build._sha256(lib2) == (lib2.parent / "graphopt_probe.so.sha256").read_text().strip()


def test_stale_lock_does_not_hang(tmp_path: Path, caplog) -> None:
    root = tmp_path / "cache"
    spec = _probe_spec(tmp_path, 3)
    build_dir = root / spec.key()
    build_dir.mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # What a build killed mid-way leaves: cpp_extension's O_EXCL lock and our owner note.
    (build_dir / "lock").write_text("")
    (build_dir / "owner").write_text(str(dead.pid))
    caplog.set_level(logging.WARNING, logger="graphopt.backends.cpp.build")
    t0 = time.monotonic()
    lib = build.build_library(spec, root)
    assert lib.exists() and time.monotonic() - t0 < 120
    assert not (build_dir / "lock").exists()
    assert any(
        "stale build lock" in r.message and str(dead.pid) in r.message for r in caplog.records
    )


def test_eight_processes_on_an_empty_cache_build_once(tmp_path: Path) -> None:
    """8 processes load graphopt's real kernels at the same instant from an empty cache: one
    builds (under the flock), the 7 others wait, verify its sha256 and load it; all 8 get a
    working op (csr_linear against F.linear)."""
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    code = textwrap.dedent(
        """
        import logging, sys, time
        from pathlib import Path
        import torch
        import torch.nn.functional as F
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        from graphopt.backends.cpp import build, ops
        Path(sys.argv[1]).touch()  # ready: every process is past its imports
        while not Path(sys.argv[2]).exists():
            time.sleep(0.01)
        build.load_extension()
        w = torch.randn(8, 16) * (torch.rand(8, 16) < 0.3)
        x = torch.randn(3, 16)
        diff = (ops.sparse_linear(x, ops.pack_csr(w)) - F.linear(x, w)).abs().max().item()
        print(f"max diff {diff:.3g}")
        assert diff < 1e-4
        """
    )
    env = {**os.environ, "GRAPHOPT_CACHE_DIR": str(cache)}
    env.pop("GRAPHOPT_CPP_PORTABLE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / f"ready-{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(8)
    ]
    try:
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("ready-*"))) < 8 and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                for p in procs:
                    p.kill()
                pytest.fail(f"a process exited before the start: {[p.communicate() for p in procs]}")
            time.sleep(0.05)
        assert len(list(tmp_path.glob("ready-*"))) == 8, "not all 8 processes started within 300 s"
        assert not cache.exists(), "the cache must be empty when the 8 start"
        go.touch()
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), results
    assert all("max diff" in out for out, _ in results), results
    building = [err.count("building C++ kernels") for _, err in results]
    built = sum(line.startswith("built ") for _, err in results for line in err.splitlines())
    assert sum(n > 0 for n in building) == 1 and built == 1, results
    libraries = list(cache.glob("ext/*/graphopt_cpp.so"))
    assert len(libraries) == 1 and (libraries[0].parent / "graphopt_cpp.so.sha256").exists()
