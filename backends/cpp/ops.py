"""Declarations of graphopt's C++ ops: schemas, typed wrappers and fake implementations.

Every op of the ``graphopt`` namespace is declared here and only here, with
``torch.library``; the C++ side (``ops.cpp``) only implements them with
``TORCH_LIBRARY_IMPL``, because a second ``TORCH_LIBRARY`` for one namespace terminates the
process (measured, torch 2.13). The fake implementations let ``torch.export``, fx and
``torch.compile`` trace models that call the ops without the extension being built;
``c_shim_declarations`` gives AOTInductor the ops' C entry points (``ops.cpp``).

The kernels are hand-written (see ``sparse_common.h``): no maintained library does sparse
weight x dense activation fast on CPU at Transformer shapes. The ``*_linear`` ops compute
``y = x @ W.T + b`` for a sparse ``W [out_features, in_features]``, with ``x [..., in]``
of any leading dims, float32, on the CPU. Weight layouts are described in ``packing.py``;
pack with :func:`pack_csr` / :func:`pack_bsr` / :func:`pack_sell` / :func:`pack_sellp`.

Schemas::

    graphopt::csr_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values,
                         Tensor? bias, int out_features) -> Tensor
    graphopt::csr_linear_int8(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values,
                              Tensor scales, Tensor? bias, int out_features) -> Tensor
    graphopt::bsr_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values,
                         Tensor? bias, int out_features) -> Tensor
    graphopt::bsr_linear_int8(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values,
                              Tensor scales, Tensor? bias, int out_features) -> Tensor
    graphopt::sell_linear(Tensor x, Tensor slice_ptr, Tensor row_order, Tensor col_idx,
                          Tensor values, Tensor? bias, int out_features) -> Tensor
    graphopt::sell_linear_int8(Tensor x, Tensor slice_ptr, Tensor row_order, Tensor col_idx,
                               Tensor values, Tensor scales, Tensor? bias, int out_features) -> Tensor
    graphopt::sellp_linear(Tensor x, Tensor slice_ptr, Tensor layer_block, Tensor layer_lanes,
                           Tensor row_order, Tensor col_idx, Tensor values, Tensor? bias,
                           int out_features) -> Tensor
    graphopt::sellp_linear_int8(Tensor x, Tensor slice_ptr, Tensor layer_block, Tensor layer_lanes,
                                Tensor row_order, Tensor col_idx, Tensor values, Tensor scales,
                                Tensor? bias, int out_features) -> Tensor
    graphopt::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale) -> Tensor
    graphopt::gelu(Tensor x) -> Tensor

``attention`` is ``F.scaled_dot_product_attention`` (additive float mask, no dropout, not
causal) for short sequences, where torch's CPU kernels spend most of their time outside the
arithmetic (``attention.cpp``); ``gelu`` is the exact (erf) GELU with a cheaper erf
(``gelu.cpp``). The cpp backend swaps both in (``lower_attention``, ``lower_gelu``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from .packing import (
    BsrWeight,
    CsrWeight,
    SellpWeight,
    SellWeight,
    pack_bsr,
    pack_csr,
    pack_sell,
    pack_sellp,
    pack_weight,
)

__all__ = [
    "OP_SCHEMAS",
    "BsrWeight",
    "CsrWeight",
    "SellWeight",
    "SellpWeight",
    "attention",
    "bsr_linear",
    "bsr_linear_int8",
    "c_shim_declarations",
    "csr_linear",
    "csr_linear_int8",
    "gelu",
    "pack_bsr",
    "pack_csr",
    "pack_sell",
    "pack_sellp",
    "pack_weight",
    "sell_linear",
    "sell_linear_int8",
    "sellp_linear",
    "sellp_linear_int8",
    "sparse_linear",
]

logger = logging.getLogger(__name__)

#: Op name -> schema, in the namespace ``graphopt``.
OP_SCHEMAS: dict[str, str] = {
    "csr_linear": (
        "csr_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, "
        "Tensor? bias, int out_features) -> Tensor"
    ),
    "csr_linear_int8": (
        "csr_linear_int8(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, "
        "Tensor scales, Tensor? bias, int out_features) -> Tensor"
    ),
    "bsr_linear": (
        "bsr_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, "
        "Tensor? bias, int out_features) -> Tensor"
    ),
    "bsr_linear_int8": (
        "bsr_linear_int8(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, "
        "Tensor scales, Tensor? bias, int out_features) -> Tensor"
    ),
    "sell_linear": (
        "sell_linear(Tensor x, Tensor slice_ptr, Tensor row_order, Tensor col_idx, Tensor values, "
        "Tensor? bias, int out_features) -> Tensor"
    ),
    "sell_linear_int8": (
        "sell_linear_int8(Tensor x, Tensor slice_ptr, Tensor row_order, Tensor col_idx, Tensor values, "
        "Tensor scales, Tensor? bias, int out_features) -> Tensor"
    ),
    "sellp_linear": (
        "sellp_linear(Tensor x, Tensor slice_ptr, Tensor layer_block, Tensor layer_lanes, Tensor row_order, "
        "Tensor col_idx, Tensor values, Tensor? bias, int out_features) -> Tensor"
    ),
    "sellp_linear_int8": (
        "sellp_linear_int8(Tensor x, Tensor slice_ptr, Tensor layer_block, Tensor layer_lanes, Tensor row_order, "
        "Tensor col_idx, Tensor values, Tensor scales, Tensor? bias, int out_features) -> Tensor"
    ),
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale) -> Tensor",
    "gelu": "gelu(Tensor x) -> Tensor",
}

# "DEF" owns the namespace: a second declaration anywhere fails loudly at import. The
# Library object must stay alive, or its registrations are removed.
_LIB = torch.library.Library("graphopt", "DEF")
for _schema in OP_SCHEMAS.values():
    _LIB.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))


#: Dimensions of ``values`` in each layout: CSR [nnz], SELL [entries, 8], SELL-P [layers + entries, 16],
#: BSR [n_blocks, R, C].
_VALUES_DIM = {"csr": 1, "sell": 2, "sellp": 2, "bsr": 3}


def _make_fake(name: str) -> Callable[..., Tensor]:
    """The fake (meta) implementation of op ``name``: checks what shapes depend on, returns
    ``x``'s leading dims with ``out_features`` last. Every schema starts with ``x`` and ends
    with ``out_features``; arguments are bound by the schema's names."""
    names = [a.name for a in getattr(torch.ops.graphopt, name).default._schema.arguments]
    values_dim = _VALUES_DIM[name.split("_", 1)[0]]

    def fake(*args: object, **kwargs: object) -> Tensor:
        bound = {**dict(zip(names, args)), **kwargs}
        x, values, out_features = bound["x"], bound["values"], bound["out_features"]
        assert isinstance(x, Tensor) and isinstance(values, Tensor) and isinstance(out_features, int)
        torch._check(x.dtype == torch.float32, lambda: f"x must be float32, got {x.dtype}")
        torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
        torch._check(out_features >= 0, lambda: f"out_features must be >= 0, got {out_features}")
        torch._check(values.dim() == values_dim, lambda: f"{name}: values must have {values_dim} dimension(s)")
        return x.new_empty((*x.shape[:-1], out_features))

    return fake


def _attention_fake(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k and v must be 4-D")
    torch._check(q.dtype == torch.float32, lambda: f"q must be float32, got {q.dtype}")
    torch._check(q.shape[3] % 8 == 0, lambda: f"head_dim must be a multiple of 8, got {q.shape[3]}")
    batch, heads, tokens, dim = q.shape
    # The kernel's layout: [batch, tokens, heads, dim] in memory (see attention.cpp).
    return q.new_empty((batch, tokens, heads, dim)).transpose(1, 2)


def _gelu_fake(x: Tensor) -> Tensor:
    torch._check(x.dtype == torch.float32, lambda: f"x must be float32, got {x.dtype}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_FAKES: dict[str, Callable[..., Tensor]] = {"attention": _attention_fake, "gelu": _gelu_fake}
for _name in OP_SCHEMAS:
    torch.library.register_fake(f"graphopt::{_name}", _FAKES.get(_name) or _make_fake(_name), lib=_LIB)


#: C types of schema arguments in AOTInductor's C shim convention.
_C_SHIM_TYPES = {"Tensor": "AtenTensorHandle", "Optional[Tensor]": "AtenTensorHandle*", "int": "int64_t",
                 "float": "double"}


def c_shim_declarations() -> dict[torch._ops.OpOverload, list[str]]:
    """Each op's C entry point (``aoti_torch_cpu_<name>`` in ``ops.cpp``), as
    AOTInductor's ``aot_inductor.custom_ops_to_c_shims`` takes them: compiled code then calls
    the kernels directly rather than through the boxed dispatcher. Built from the schemas,
    so the declarations cannot drift from the ops."""
    declarations = {}
    for name in OP_SCHEMAS:
        op = getattr(torch.ops.graphopt, name).default
        args = [f"{_C_SHIM_TYPES[str(a.type)]} {a.name}" for a in op._schema.arguments]
        declarations[op] = [f"AOTITorchError aoti_torch_cpu_{name}({', '.join([*args, 'AtenTensorHandle* ret0'])})"]
    return declarations


_kernels_ready = False


def _ensure_kernels(x: Tensor) -> None:
    """Builds/loads the C++ kernels on the first eager call.

    Only for plain tensors: under tracing (fake tensors, proxies, functionalization) the
    fake implementations answer, so tracing never needs a compiler.
    """
    global _kernels_ready
    if _kernels_ready or type(x) is not torch.Tensor:
        return
    from .build import load_extension

    load_extension()
    _kernels_ready = True


def csr_linear(
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` in CSR form and float32 values.

    Args:
        x: float32 ``[..., in_features]``.
        row_ptr: int32 ``[out_features + 1]``.
        col_idx: int16 or int32 ``[nnz]``.
        values: float32 ``[nnz]``.
        bias: float32 ``[out_features]`` or None.
        out_features: rows of ``W``.

    Returns:
        float32 ``[..., out_features]``.
    """
    _ensure_kernels(x)
    return torch.ops.graphopt.csr_linear.default(x, row_ptr, col_idx, values, bias, out_features)


def csr_linear_int8(
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    values: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """Like :func:`csr_linear` with int8 ``values`` and float32 per-row ``scales [out]``.

    Computes ``y[..., o] = scales[o] * sum_k values[k] * x[..., col_idx[k]] + bias[o]``.
    """
    _ensure_kernels(x)
    return torch.ops.graphopt.csr_linear_int8.default(
        x, row_ptr, col_idx, values, scales, bias, out_features
    )


def bsr_linear(
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` in block-sparse form and float32 values.

    Args:
        x: float32 ``[..., in_features]``.
        row_ptr: int32 ``[ceil(out_features / R) + 1]``.
        col_idx: int16 or int32 ``[n_blocks]``, in block units.
        values: float32 ``[n_blocks, R, C]``; the block shape is read from here.
        bias: float32 ``[out_features]`` or None.
        out_features: rows of ``W``.

    Returns:
        float32 ``[..., out_features]``.
    """
    _ensure_kernels(x)
    return torch.ops.graphopt.bsr_linear.default(x, row_ptr, col_idx, values, bias, out_features)


def bsr_linear_int8(
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    values: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """Like :func:`bsr_linear` with int8 ``values`` and float32 per-row ``scales [out]``."""
    _ensure_kernels(x)
    return torch.ops.graphopt.bsr_linear_int8.default(
        x, row_ptr, col_idx, values, scales, bias, out_features
    )


def sell_linear(
    x: Tensor,
    slice_ptr: Tensor,
    row_order: Tensor,
    col_idx: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` in SELL-8 form (see :func:`pack_sell`), float32 values.

    Args:
        x: float32 ``[..., in_features]``.
        slice_ptr: int32 ``[ceil(out_features / 8) + 1]``, in entries.
        row_order: int32 ``[8 * ceil(out_features / 8)]``, the output row of each slice lane
            (-1 for padding lanes).
        col_idx: int16 or int32 ``[entries, 8]``.
        values: float32 ``[entries, 8]``.
        bias: float32 ``[out_features]`` or None.
        out_features: rows of ``W``.

    Returns:
        float32 ``[..., out_features]``.
    """
    _ensure_kernels(x)
    return torch.ops.graphopt.sell_linear.default(
        x, slice_ptr, row_order, col_idx, values, bias, out_features
    )


def sell_linear_int8(
    x: Tensor,
    slice_ptr: Tensor,
    row_order: Tensor,
    col_idx: Tensor,
    values: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """Like :func:`sell_linear` with int8 ``values`` and float32 per-row ``scales [out]``."""
    _ensure_kernels(x)
    return torch.ops.graphopt.sell_linear_int8.default(
        x, slice_ptr, row_order, col_idx, values, scales, bias, out_features
    )


def sellp_linear(
    x: Tensor,
    slice_ptr: Tensor,
    layer_block: Tensor,
    layer_lanes: Tensor,
    row_order: Tensor,
    col_idx: Tensor,
    values: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` in SELL-P form (see :func:`pack_sellp`), float32 values.

    Args:
        x: float32 ``[..., in_features]``.
        slice_ptr: int32 ``[3, ceil(out_features / 16) + 1]``: the slices' offsets in groups,
            layers and entries (a slice's layers are a multiple of its groups: K per group).
        layer_block: int16 or int32 ``[groups]``, the 32-column block of ``x`` of each group.
        layer_lanes: uint8 ``[layers, 16]``, each lane's column within its group's block.
        row_order: int32 ``[16 * ceil(out_features / 16)]``, the output row of each slice lane
            (-1 for padding lanes).
        col_idx: ``[entries, 16]``, of ``layer_block``'s dtype.
        values: float32 ``[layers + entries, 16]``, the layers' then the entries'.
        bias: float32 ``[out_features]`` or None.
        out_features: rows of ``W``.

    Returns:
        float32 ``[..., out_features]``.
    """
    _ensure_kernels(x)
    return torch.ops.graphopt.sellp_linear.default(
        x, slice_ptr, layer_block, layer_lanes, row_order, col_idx, values, bias, out_features
    )


def sellp_linear_int8(
    x: Tensor,
    slice_ptr: Tensor,
    layer_block: Tensor,
    layer_lanes: Tensor,
    row_order: Tensor,
    col_idx: Tensor,
    values: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    out_features: int,
) -> Tensor:
    """Like :func:`sellp_linear` with int8 ``values`` and float32 per-row ``scales [out]``."""
    _ensure_kernels(x)
    return torch.ops.graphopt.sellp_linear_int8.default(
        x, slice_ptr, layer_block, layer_lanes, row_order, col_idx, values, scales, bias, out_features
    )


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              scale: float | None = None) -> Tensor:
    """``softmax(q @ k.T * scale + attn_mask) @ v``, as ``F.scaled_dot_product_attention``.

    Args:
        q: float32 ``[batch, heads, queries, head_dim]``, ``head_dim`` a multiple of 8; any
            strides (a last dimension that is not contiguous is copied).
        k: float32 ``[batch, heads, keys, head_dim]``.
        v: float32 ``[batch, heads, keys, head_dim]``.
        attn_mask: additive float32 mask broadcastable to ``[batch, heads, queries, keys]``, or
            None. A query whose mask is ``-inf`` for every key gets zeros (as in torch).
        scale: the scores' factor; None is ``1 / sqrt(head_dim)``.

    Returns:
        float32 ``[batch, heads, queries, head_dim]``, stored as ``[batch, queries, heads,
        head_dim]`` (so ``out.transpose(1, 2)`` is contiguous).
    """
    _ensure_kernels(q)
    return torch.ops.graphopt.attention.default(q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale)


def gelu(x: Tensor) -> Tensor:
    """``F.gelu(x)`` (exact, erf form) for float32 ``x``, within 1e-6 of it (a rational erf,
    see ``gelu.cpp``); returns a new contiguous tensor."""
    _ensure_kernels(x)
    return torch.ops.graphopt.gelu.default(x)


def sparse_linear(
    x: Tensor, weight: CsrWeight | BsrWeight | SellWeight | SellpWeight, bias: Tensor | None = None
) -> Tensor:
    """``y = x @ W.T + bias`` for a packed weight, choosing the op from its layout and dtype.

    Args:
        x: float32 ``[..., in_features]``.
        weight: the output of :func:`pack_csr`, :func:`pack_bsr`, :func:`pack_sell` or
            :func:`pack_sellp`.
        bias: float32 ``[out_features]`` or None.

    Returns:
        float32 ``[..., out_features]``.

    Example::

        packed = pack_csr(linear.weight.detach() * mask, dtype=torch.int8)
        y = sparse_linear(x, packed, linear.bias)
    """
    # The op directly, with the weight's tensors looked up once (linear_call), not through
    # csr_linear & co.: each Python step costs ~0.1-0.6 us of a ~4 us call, which shows at batch 1.
    if not _kernels_ready:
        _ensure_kernels(x)
    if not isinstance(weight, (CsrWeight, BsrWeight, SellWeight, SellpWeight)):
        raise TypeError(
            f"weight must be a CsrWeight, BsrWeight, SellWeight or SellpWeight, got {type(weight).__name__}"
        )
    op, tensors, out_features = weight.linear_call
    return op(x, *tensors, bias, out_features)
