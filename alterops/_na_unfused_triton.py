"""Triton launchers of the unfused neighbourhood-attention primitives (``alterops/kernels/na_unfused.py``;
the math and the neighbour tables are in ``alterops/_na_unfused.py``) and their registration as
opaque ops:

* ``alterops::na_unfused_dot_triton(x, y, nb, ok, table, cell, fill) -> out (B, heads, N, K)``
* ``alterops::na_unfused_sum_triton(w, y, nb, ok) -> out (B, heads, N, D)``
* ``alterops::na_unfused_scatter_triton(w, x, rowptr, entries, K) -> out (B, heads, N, D)``

x, y ``(B, heads, N, D)`` and w ``(B, heads, N, K)`` of any strides, float32 or float64 (one dtype
for all the data, the table included); ``table`` ``(heads | 1, cells)`` or None. The index tables
are those of :func:`alterops._na_unfused.tables` (nb, cell int32 ``(K, N)``, ok bool ``(K, N)`` or
None, rowptr ``(N + 1,)`` and entries int32 or int64); ``cell`` may be None when ``table`` is.
Outputs are new contiguous tensors. The checks are cheap (dtypes, devices, shapes; never the
tables' values).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from ._na_unfused import fake_dot, fake_scatter, fake_sum

DTYPES = (torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_LIMIT = 2**31 - 1


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------
def _data(name: str, t, like: Optional[Tensor] = None, ndim: int = 4) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if like is None:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        return
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the other inputs' {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {like.device}")


def _index(name: str, t, like: Tensor, dtypes, shape: Optional[tuple] = None, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the data is on {like.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t.contiguous()


def _neighbours(nb, ok, like: Tensor, N: int) -> tuple[Tensor, Optional[Tensor]]:
    """nb (K, N) int32 and ok (K, N) bool or None, contiguous; ok as uint8 for the kernels."""
    nb = _index("nb", nb, like, (torch.int32,), ndim=2)
    if nb.shape[1] != N:
        raise ValueError(f"nb must have shape (K, {N}) for {N} positions, got {tuple(nb.shape)}")
    if ok is not None:
        ok = _index("ok", ok, like, (torch.bool,), shape=nb.shape).view(torch.uint8)
    return nb, ok


def _wide(*tensors: Tensor, extra: int = 0) -> bool:
    """True when an offset within one (batch, head) of any tensor (dims 2 and 3), or ``extra``,
    can reach 2**31 - 1: the kernels then compute those offsets in int64."""
    for t in tensors:
        if sum((n - 1) * s for n, s in zip(t.shape[2:], t.stride()[2:]) if n > 0) >= _INT32_LIMIT:
            return True
    return extra >= _INT32_LIMIT


def _launches(pairs: int, tiles: int):
    from .kernels import neighborhood_attention_nd as nd

    return nd.launches(pairs, tiles)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def dot(x: Tensor, y: Tensor, nb: Tensor, ok: Optional[Tensor], table: Optional[Tensor], cell: Optional[Tensor],
        fill: float) -> Tensor:
    """out[b, h, p, c] = x[b, h, p] . y[b, h, nb[c, p]] (+ table[h, cell[c, p]]); ``fill`` where
    ok[c, p] is False."""
    _data("x", x)
    _data("y", y, like=x)
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    B, heads, N, D = x.shape
    nb, ok = _neighbours(nb, ok, x, N)
    K = nb.shape[0]
    if table is not None:
        _data("table", table, like=x, ndim=2)
        if table.shape[0] not in (heads, 1):
            raise ValueError(f"table must have {heads} (or 1) rows for {heads} heads, got shape {tuple(table.shape)}")
        cell = _index("cell", cell, x, (torch.int32,), shape=nb.shape)
    out = _checks.empty((B, heads, N, K), like=x)
    if out.numel() == 0:
        return out
    from .kernels import na_unfused as kern

    has_table = table is not None
    tab = table if has_table else x.new_zeros(1)
    stab_h = 0 if (not has_table or table.shape[0] == 1) else table.stride(0)
    stab_c = table.stride(1) if has_table else 0
    fill_t = torch.full((1,), float(fill), dtype=x.dtype, device=x.device)
    cfg = kern.config(D, x.element_size())
    wide = _wide(x, y, extra=N * max(K, D))
    for bh0, grid, split in _launches(B * heads, _cdiv(N, cfg["BLOCK_P"])):
        kern.na_unfused_dot_kernel[grid](
            x, y, nb, nb if ok is None else ok, tab, cell if has_table else nb, fill_t, out,
            *x.stride(), *y.stride(), stab_h, stab_c,
            heads, N, K, D, bh0,
            HAS_OK=ok is not None, HAS_TABLE=has_table, CHUNKED=D > cfg["BLOCK_D"], **cfg,
            WIDE=wide, SPLIT=split, num_warps=kern.NUM_WARPS, num_stages=1,
        )
    return out


def weighted_sum(w: Tensor, y: Tensor, nb: Tensor, ok: Optional[Tensor]) -> Tensor:
    """out[b, h, p] = sum over the slots c with ok[c, p] of w[b, h, p, c] * y[b, h, nb[c, p]]."""
    _data("y", y)
    _data("w", w, like=y)
    B, heads, N, D = y.shape
    nb, ok = _neighbours(nb, ok, y, N)
    K = nb.shape[0]
    if tuple(w.shape) != (B, heads, N, K):
        raise ValueError(f"w must have shape {(B, heads, N, K)} (y's batch, heads and positions, nb's {K} slots), "
                         f"got {tuple(w.shape)}")
    out = _checks.empty((B, heads, N, D), like=y)
    if out.numel() == 0:
        return out
    from .kernels import na_unfused as kern

    cfg = kern.config(D, y.element_size())
    wide = _wide(w, y, extra=N * max(K, D))
    for bh0, grid, split in _launches(B * heads, _cdiv(N, cfg["BLOCK_P"])):
        kern.na_unfused_sum_kernel[grid](
            w, y, nb, nb if ok is None else ok, out,
            *w.stride(), *y.stride(),
            heads, N, K, D, bh0,
            HAS_OK=ok is not None, **cfg, WIDE=wide, SPLIT=split, num_warps=kern.NUM_WARPS, num_stages=1,
        )
    return out


def scatter(w: Tensor, x: Tensor, rowptr: Tensor, entries: Tensor, K: int) -> Tensor:
    """out[b, h, j] = sum over e in [rowptr[j], rowptr[j + 1]), in order, of w[b, h, p_e, c_e] * x[b, h, p_e]
    with entries[e] = p_e * K + c_e."""
    _data("x", x)
    _data("w", w, like=x)
    B, heads, N, D = x.shape
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if tuple(w.shape) != (B, heads, N, K):
        raise ValueError(f"w must have shape {(B, heads, N, K)} (x's batch, heads and positions, K = {K}), "
                         f"got {tuple(w.shape)}")
    rowptr = _index("rowptr", rowptr, x, INDEX_DTYPES, shape=(N + 1,))
    entries = _index("entries", entries, x, INDEX_DTYPES, ndim=1)
    out = _checks.empty((B, heads, N, D), like=x)
    if out.numel() == 0:
        return out
    from .kernels import na_unfused as kern

    cfg = kern.config(D, x.element_size())
    wide = _wide(w, x, extra=N * max(K, D))
    for bh0, grid, split in _launches(B * heads, _cdiv(N, cfg["BLOCK_P"])):
        kern.na_unfused_scatter_kernel[grid](
            w, x, rowptr, entries, out,
            *w.stride(), *x.stride(),
            heads, N, K, D, bh0,
            **cfg, WIDE=wide, SPLIT=split, num_warps=kern.NUM_WARPS, num_stages=1,
        )
    return out


# ---------------------------------------------------------------------------------------
# Op registration (the fake impls are the CPU ops', from alterops/_na_unfused.py)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("alterops::na_unfused_dot_triton", mutates_args=())
def _dot_op(x: Tensor, y: Tensor, nb: Tensor, ok: Optional[Tensor], table: Optional[Tensor],
            cell: Optional[Tensor], fill: float) -> Tensor:
    return dot(x, y, nb, ok, table, cell, fill)


@torch.library.custom_op("alterops::na_unfused_sum_triton", mutates_args=())
def _sum_op(w: Tensor, y: Tensor, nb: Tensor, ok: Optional[Tensor]) -> Tensor:
    return weighted_sum(w, y, nb, ok)


@torch.library.custom_op("alterops::na_unfused_scatter_triton", mutates_args=())
def _scatter_op(w: Tensor, x: Tensor, rowptr: Tensor, entries: Tensor, K: int) -> Tensor:
    return scatter(w, x, rowptr, entries, K)


torch.library.register_fake("alterops::na_unfused_dot_triton")(fake_dot)
torch.library.register_fake("alterops::na_unfused_sum_triton")(fake_sum)
torch.library.register_fake("alterops::na_unfused_scatter_triton")(fake_scatter)
