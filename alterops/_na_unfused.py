"""Unfused neighbourhood attention: the separate ``qk`` and ``av`` operations of NATTEN's removed
API (``alterops.compat.natten``), as three gather primitives over precomputed neighbour tables.

Tensors are heads-first with the spatial axes flattened: ``(B, heads, N, D)`` with N queries in
row-major order, ``(B, heads, N, K)`` for the K = prod(kernel_size) neighbour slots of each query
(row-major over the kernel axes). The neighbourhood of every query is described once per
(map, kernel, dilation, causal) by :class:`Tables`:

* ``nb`` ``(K, N)`` int32: the flat position of slot c of query p (always inside the map);
* ``ok`` ``(K, N)`` bool or None: whether the slot holds a key (None: all do);
* ``cell`` ``(K, N)`` int32: the flat index of the slot's relative-position-bias cell in the
  table ``(2k0-1, 2k1-1, ...)``;
* ``rowptr`` ``(N+1,)`` / ``entries`` ``(N*K,)`` int32 (int64 when ``N * K`` reaches 2**31): the
  inverse, ``entries[rowptr[j]:rowptr[j+1]]`` the ``p * K + c`` of every (query, slot) that holds
  key j, in increasing order (the slots without a key follow ``rowptr[N]``).

The primitives (ops ``alterops::na_unfused_{dot,sum,scatter}`` on the CPU, ``..._triton`` on
Triton devices; float32 and float64; inputs of any strides, outputs contiguous):

* ``dot(x, y, nb, ok, table, cell, fill)``: ``out[b,h,p,c] = x[b,h,p] . y[b,h,nb[c,p]]
  + table[h, cell[c,p]]``, ``fill`` where ``ok[c,p]`` is false (``qk`` forward, ``av``'s
  attention-weight gradient);
* ``sum(w, y, nb, ok)``: ``out[b,h,p] = sum over the slots c that hold a key of
  w[b,h,p,c] * y[b,h,nb[c,p]]`` (the others contribute nothing, whatever their weight)
  (``av`` forward, ``qk``'s query gradient);
* ``scatter(w, x, rowptr, entries, K)``: ``out[b,h,j] = sum over the entries e of row
  j, in order, of w[b,h,p_e,c_e] * x[b,h,p_e]`` (``qk``'s key gradient, ``av``'s value gradient;
  deterministic: every output row is summed by one thread in a fixed order).

Backends (table ``natten_qk_av`` in ``alterops info``): ``reference`` (the plain-PyTorch
primitives below, one kernel slot at a time), ``cpu`` (``csrc/neighborhood_attention/
neighborhood_unfused_cpu.cpp``) and ``triton`` (``alterops/kernels/na_unfused.py``). The autograd functions
:class:`NeighbourQK` and :class:`NeighbourAV` express each backward pass through the same three
primitives; the bias-table gradient is a per-axis one-hot contraction (matmuls, deterministic on
every device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ext
from ._dispatch import Backend, OpBackends, register


@dataclass(frozen=True)
class Tables:
    spatial: tuple
    ks: tuple
    ds: tuple
    cs: tuple
    nb: Tensor
    ok: Optional[Tensor]
    cell: Tensor
    rowptr: Tensor
    entries: Tensor

    @property
    def K(self) -> int:
        return self.nb.shape[0]


_CACHE: dict = {}
_CACHE_SIZE = 32


def tables(spatial, ks, ds, cs, device) -> Tables:
    """The neighbour tables of a map ``spatial`` (clamp border, stride 1; NATTEN's rule), cached."""
    key = (tuple(spatial), tuple(ks), tuple(ds), tuple(bool(c) for c in cs), torch.device(device))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    from .neighborhood_attention_nd import axis_window

    n = len(spatial)
    for a in range(n):
        if not (ks[a] >= 1 and ds[a] >= 1 and ks[a] * ds[a] <= spatial[a]):
            raise ValueError(f"the neighbour tables need 1 <= kernel_size * dilation <= size on every axis, got "
                             f"kernel_size {tuple(ks)}, dilation {tuple(ds)} for a map {tuple(spatial)}")
    nb = cell = ok = None
    for a in range(n):
        pos, valid, bias_index = axis_window(spatial[a], ks[a], ds[a], 1, cs[a], "clamp", "cpu")
        pos = torch.where(valid, pos, torch.zeros_like(pos))  # in the map even where no key
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = ks[a], spatial[a]
        pos, valid, bias_index = (t.t().reshape(shape) for t in (pos, valid, bias_index))
        nb = pos if nb is None else nb * spatial[a] + pos
        cell = bias_index if cell is None else cell * (2 * ks[a] - 1) + bias_index
        if cs[a]:
            ok = valid if ok is None else ok & valid
    K, N = math.prod(ks), math.prod(spatial)
    full = tuple(ks) + tuple(spatial)
    nb = nb.expand(full).reshape(K, N)
    cell = cell.expand(full).reshape(K, N)
    if ok is not None:
        ok = ok.expand(full).reshape(K, N).contiguous()
    # The inverse: entries p*K + c grouped by key nb[c, p], increasing within a key (a stable
    # sort of the keys in entry order); slots without a key sort last, past rowptr[N]. Static
    # shapes throughout, so this also traces under torch.compile.
    index_dtype = torch.int32 if N * K < 2**31 else torch.int64
    keys = nb.t().reshape(-1)  # entry p*K + c
    if ok is not None:
        keys = torch.where(ok.t().reshape(-1), keys, torch.full_like(keys, N))
    _, entries = torch.sort(keys, stable=True)
    counts = torch.zeros(N + 1, dtype=torch.int64).scatter_add_(0, keys, torch.ones_like(keys))[:N]
    rowptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    out = Tables(
        spatial=key[0], ks=key[1], ds=key[2], cs=key[3],
        nb=nb.to(torch.int32).contiguous().to(device),
        ok=None if ok is None else ok.to(device),
        cell=cell.to(torch.int32).contiguous().to(device),
        rowptr=rowptr.to(index_dtype).to(device),
        entries=entries.to(index_dtype).contiguous().to(device),
    )
    if torch.compiler.is_compiling():  # traced tensors are not kept across calls
        return out
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = out
    return out


# ---------------------------------------------------------------------------------------
# Fake impls (shapes only), shared by the CPU and Triton ops
# ---------------------------------------------------------------------------------------
def fake_dot(x, y, nb, ok, table, cell, fill):
    B, heads, N, _ = x.shape
    return x.new_empty((B, heads, N, nb.shape[0]))


def fake_sum(w, y, nb, ok):
    return y.new_empty(y.shape)


def fake_scatter(w, x, rowptr, entries, K):
    return x.new_empty(x.shape)


if _ext.has_op("na_unfused_dot"):
    torch.library.register_fake("alterops::na_unfused_dot")(fake_dot)
    torch.library.register_fake("alterops::na_unfused_sum")(fake_sum)
    torch.library.register_fake("alterops::na_unfused_scatter")(fake_scatter)

from . import _na_unfused_triton  # noqa: E402,F401  (registers the Triton ops; Triton is imported when they run)


# ---------------------------------------------------------------------------------------
# Reference primitives (plain PyTorch, any device; memory O(N * D) besides the outputs)
# ---------------------------------------------------------------------------------------
def reference_dot(x: Tensor, y: Tensor, t: Tables, table: Optional[Tensor], fill: float) -> Tensor:
    out = x.new_empty(*x.shape[:3], t.K)
    for c in range(t.K):
        out[..., c] = (x * y.index_select(2, t.nb[c])).sum(-1)
    if table is not None:
        out += table[:, t.cell.t()].unsqueeze(0)
    if t.ok is not None:
        out.masked_fill_(~t.ok.t(), fill)
    return out


def reference_sum(w: Tensor, y: Tensor, t: Tables) -> Tensor:
    if t.ok is not None:  # a select: the weight of a slot without a key may be anything
        w = w.masked_fill(~t.ok.t(), 0)
    out = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
    for c in range(t.K):
        out += w[..., c, None] * y.index_select(2, t.nb[c])
    return out


def reference_scatter(w: Tensor, x: Tensor, t: Tables) -> Tensor:
    if t.ok is not None:
        w = w.masked_fill(~t.ok.t(), 0)
    out = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    for c in range(t.K):
        out.index_add_(2, t.nb[c], w[..., c, None] * x)
    return out


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------
TABLE = register(OpBackends(
    op="natten_qk_av",
    backends={
        "reference": Backend(),
        "cpu": Backend(dtypes=(torch.float32, torch.float64),
                       ops=("na_unfused_dot", "na_unfused_sum", "na_unfused_scatter")),
        "triton": Backend(dtypes=(torch.float32, torch.float64)),
    },
    auto_cuda=("triton", "reference"),
    auto_cpu=("cpu", "reference"),
))


def _dot(backend: str, x, y, t: Tables, table, fill):
    if backend == "reference":
        return reference_dot(x, y, t, table, fill)
    op = torch.ops.alterops.na_unfused_dot if backend == "cpu" else torch.ops.alterops.na_unfused_dot_triton
    return op(x, y, t.nb, t.ok, table, None if table is None else t.cell, fill)


def _sum(backend: str, w, y, t: Tables):
    if backend == "reference":
        return reference_sum(w, y, t)
    op = torch.ops.alterops.na_unfused_sum if backend == "cpu" else torch.ops.alterops.na_unfused_sum_triton
    return op(w, y, t.nb, t.ok)


def _scatter(backend: str, w, x, t: Tables):
    if backend == "reference":
        return reference_scatter(w, x, t)
    op = torch.ops.alterops.na_unfused_scatter if backend == "cpu" else torch.ops.alterops.na_unfused_scatter_triton
    return op(w, x, t.rowptr, t.entries, t.K)


def bias_grad(grad: Tensor, t: Tables) -> Tensor:
    """``dtable[h, cell]`` ``(heads, cells)``: the sum over batch, queries and slots of ``grad``
    ``(B, heads, N, K)`` by bias cell, slots without a key excluded (the fused kernels' per-axis
    one-hot contraction)."""
    from ._na_nd_triton import bias_grad_from_slots

    B, heads = grad.shape[:2]
    n = len(t.spatial)
    g = bias_grad_from_slots(grad.reshape(B, heads, *t.spatial, *t.ks), t.ks, t.ds, (1,) * n, t.cs, "clamp", heads)
    return g.reshape(heads, -1)


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------
class NeighbourQK(torch.autograd.Function):
    """``attn[b, h, p, c] = q[b, h, p] . k[b, h, nb[c, p]] + table[h, cell[c, p]]`` (``-inf`` where
    slot c of query p holds no key). q, k ``(B, heads, N, D)``, table ``(heads, cells)`` or None."""

    @staticmethod
    def forward(ctx, q, k, table, t, backend):
        attn = _dot(backend, q, k, t, table, float("-inf"))
        ctx.save_for_backward(q, k)
        ctx.tables, ctx.backend = t, backend
        return attn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        t, backend = ctx.tables, ctx.backend
        dq = _sum(backend, grad, k, t) if ctx.needs_input_grad[0] else None
        dk = _scatter(backend, grad, q, t) if ctx.needs_input_grad[1] else None
        dtable = bias_grad(grad, t) if ctx.needs_input_grad[2] else None
        return dq, dk, dtable, None, None


class NeighbourAV(torch.autograd.Function):
    """``out[b, h, p] = sum_c attn[b, h, p, c] * v[b, h, nb[c, p]]`` over the slots that hold a key."""

    @staticmethod
    def forward(ctx, attn, v, t, backend):
        out = _sum(backend, attn, v, t)
        ctx.save_for_backward(attn, v)
        ctx.tables, ctx.backend = t, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        attn, v = ctx.saved_tensors
        t, backend = ctx.tables, ctx.backend
        dattn = _dot(backend, grad, v, t, None, 0.0) if ctx.needs_input_grad[0] else None
        dv = _scatter(backend, attn, grad, t) if ctx.needs_input_grad[1] else None
        return dattn, dv, None, None
