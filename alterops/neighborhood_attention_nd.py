"""Neighbourhood attention in 1, 2 and 3 dimensions, with NATTEN's stride, causal masks and even
kernels, grouped-query heads, relative position biases and the per-query logsumexp.

``neighborhood_attention{1,2,3}d(q, k, v, kernel_size, dilation=1, *, stride=1, is_causal=False,
border="clamp", rel_pos_bias=None, scale=None, return_lse=False, backend=None)``

Shapes: ``q`` is ``(B, *spatial, heads, head_dim)`` (heads-last, NATTEN's layout; ``spatial`` has
1, 2 or 3 axes) and ``k``, ``v`` are ``(B, *spatial, heads_kv, head_dim)`` with ``heads_kv``
dividing ``heads`` (grouped-query / multi-query attention: query head ``h`` reads key/value head
``h // (heads // heads_kv)``; k and v are never expanded). Any strides. The output is
``(B, *spatial, heads, head_dim)`` contiguous, in the input dtype; with ``return_lse=True`` the
call returns ``(out, lse)``, ``lse`` the natural-log logsumexp of each query's scaled, biased
logits, ``(B, *spatial, heads)``, float32 (float64 for float64 inputs, so that float64 merges and
gradient checks stay exact). ``lse`` is differentiable, so results merged with
:func:`merge_attentions` train.

``kernel_size``, ``dilation``, ``stride`` and ``is_causal`` are an int (bool) or one per axis.
The window of a query is the product of per-axis windows (:func:`axis_window`). Per axis, in
the query's dilation sub-grid (the positions congruent to it modulo the dilation, of length
``Lg``; ``i`` the query's index there), with ``left = k // 2`` and ``right = k // 2 + k % 2 - 1``
(even kernels allowed):

* ``border="clamp"`` (default; NATTEN's rule, from NATTEN's reference kernels and
  ``docs/`` of NATTEN 0.21, checked against ``natten.na1d/na2d/na3d`` 0.21.7 in the tests):
  not causal: the stride-group leader ``l = min((i // s) * s + s // 2, Lg - 1)``, the window
  starts at ``max(l - left, 0)``, moved inward by ``Lg - right - l - 1`` when
  ``l + right >= Lg``, and holds ``k`` keys; causal: ``l = min((i // s) * s + s - 1, Lg - 1)``,
  the window is ``[max(l - left - right, 0), min(i + 1, Lg))`` (fewer than ``k`` keys near the
  start, never empty). Needs ``kernel_size * dilation <= size`` per axis and
  ``1 <= stride <= kernel_size``; ``stride == kernel_size`` is blocked attention.
* ``"mask"`` / ``"zero"``: the 2-D op's rules in every dimension: the window stays centred (keys
  ``i + d * (j - left)``, ``j = 0..k-1``); out-of-map keys are left out of the softmax
  (``"mask"``) or are zero vectors whose logit ``0 + bias`` keeps softmax mass (``"zero"``, the
  paper's ConvAttention2d). These rules have no stride groups and no causal form: combining
  them with ``stride > 1`` or ``is_causal`` raises a ``ValueError``.

``rel_pos_bias``: a table ``(heads | 1, 2*k0-1[, 2*k1-1[, 2*k2-1]])``; the logit of query ``p``
and key ``p'`` gets ``table[h, *((p' - p) / dilation + kernel_size - 1)]`` (key minus query, per
axis). It receives a deterministic gradient on every backend.

Backends: ``reference`` (plain PyTorch, differentiable by autograd, every dtype; memory
``O(N * prod(kernel_size))``, never ``N x N``), ``cpu`` (fused C++ kernels, float32 / float64 /
bfloat16 / float16; 16-bit inputs in float32 arithmetic, the results rounded to their dtype), ``triton`` (flash-style, float32 / float16 / bfloat16, head_dim <= 256) and ``cuda``
(flash-style CUDA C++ kernels, float32 / float16 / bfloat16, head_dim <= 256, float32
accumulation; float16 / bfloat16 on the tensor cores, float32 in exact SIMT arithmetic).
Automatic order: CUDA ``triton, cuda, reference`` (Triton first until GPU timings show the CUDA
kernels faster); CPU ``cpu, reference``. One kernel family serves the three
ops: the fused kernels take three spatial axes, and 1-D and 2-D inputs reach them as views with
leading axes of size 1 (kernel 1).

Decisions where the contract is open:

* the bias table may have any floating dtype (e.g. a float32 parameter with bfloat16
  activations); it is read in float32 (float64 for float64 inputs) and its gradient has the
  table's dtype. It must be on the device of ``q``.
* the fused backends save the output and the per-query logsumexp for the backward, as flash
  attention does; memory is linear in the number of queries.
* the bias gradient is deterministic on every backend (no atomic adds into the table), and the
  CPU backward gives the same bits whatever the thread count.
"""
from __future__ import annotations

import math
from itertools import product

import torch

from . import _checks, _ext
from ._autograd import first_order_only, needs_grad
from ._dispatch import ATTENTION_GPU_ORDER, Backend, OpBackends, register

__all__ = [
    "neighborhood_attention1d", "neighborhood_attention2d", "neighborhood_attention3d",
    "merge_attentions", "axis_window", "neighborhood_attention_nd_reference",
]

BORDERS = ("clamp", "mask", "zero")
MAX_TRITON_HEAD_DIM = 256
MAX_CUDA_HEAD_DIM = 256
MAX_FREE_KERNEL = 31  # "mask"/"zero": kernels up to this size are accepted on any map


# ---------------------------------------------------------------------------------------
# Reference: the spec in code
# ---------------------------------------------------------------------------------------
def axis_window(length: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False,
                border: str = "clamp", device=None):
    """Per-axis neighbourhood of every position (the rules of the module docstring).

    Returns ``(pos, valid, bias_index)``, each ``(length, kernel)``: ``pos[i, j]`` is the
    position of neighbour slot ``j`` of query ``i``; ``valid`` says whether that slot holds a key
    (in the map for ``"mask"``/``"zero"``, inside the shorter causal window for ``"clamp"``);
    ``bias_index`` is its index on this axis of the bias table, ``(pos - i) / dilation + k - 1``
    (within ``[0, 2k-2]`` for every slot, valid or not).
    """
    i = torch.arange(length, device=device).unsqueeze(1)
    j = torch.arange(kernel, device=device).unsqueeze(0)
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    if border == "clamp":
        res, ig = i % dilation, i // dilation
        n_grid = (length - res + dilation - 1) // dilation  # length of i's dilation sub-grid
        if causal:
            leader = torch.clamp((ig // stride) * stride + stride - 1, max=n_grid - 1)
            start = torch.clamp(leader - left - right, min=0)
            valid = start + j < torch.clamp(ig + 1, max=n_grid)
        else:
            leader = torch.minimum((ig // stride) * stride + stride // 2, n_grid - 1)
            start = torch.clamp(leader - left, min=0)
            start = torch.where(leader + right >= n_grid, start + n_grid - right - leader - 1, start)
            valid = torch.ones(length, kernel, dtype=torch.bool, device=device)
        pos = res + dilation * (start + j)
    else:
        pos = i + dilation * (j - left)
        valid = (pos >= 0) & (pos < length)
    bias_index = torch.div(pos - i, dilation, rounding_mode="floor") + kernel - 1
    return pos, valid, bias_index


def neighborhood_attention_nd_reference(q, k, v, kernel_size, dilation, stride=None, is_causal=None,
                                        border="clamp", rel_pos_bias=None, scale=None, return_lse=False):
    """Plain PyTorch (differentiable by autograd), any number of spatial axes. Gathers one
    neighbour slot at a time, so it never holds more than ``O(N * prod(kernel_size))`` logits;
    grouped heads broadcast k and v instead of copying them. Computes in float32 for half
    inputs, float64 for float64. Arguments are per-axis tuples (unchecked: the public functions
    check them)."""
    n = q.dim() - 3
    B, spatial = q.shape[0], tuple(q.shape[1:1 + n])
    heads, head_dim = q.shape[-2:]
    heads_kv = k.shape[-2]
    group = heads // heads_kv
    stride = stride or (1,) * n
    is_causal = is_causal or (False,) * n
    if scale is None:
        scale = head_dim ** -0.5
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc = q.to(compute).reshape(B, *spatial, heads_kv, group, head_dim)
    kc = k.to(compute).unsqueeze(-2)  # (B, *spatial, heads_kv, 1, head_dim): broadcast over the group
    vc = v.to(compute).unsqueeze(-2)
    wins = [axis_window(spatial[a], kernel_size[a], dilation[a], stride[a], is_causal[a], border, q.device)
            for a in range(n)]
    table = None if rel_pos_bias is None else rel_pos_bias.to(compute)

    def axis_view(t, a):  # a (length,) tensor of axis a, broadcast against (*spatial)
        return t.reshape([-1 if b == a else 1 for b in range(n)])

    def inside(slots):  # (*spatial): slot combination `slots` holds a key for each query
        ok = None
        for a, j in enumerate(slots):
            va = axis_view(wins[a][1][:, j], a)
            ok = va if ok is None else ok & va
        return ok

    def neighbour(t, slots):  # t at the neighbour `slots` of every query; absent keys are zero vectors
        out = t
        for a, j in enumerate(slots):
            out = out.index_select(1 + a, wins[a][0][:, j].clamp(0, spatial[a] - 1))
        # a select, not a product: the clamped stand-in may hold NaN or inf
        return torch.where(inside(slots)[None, ..., None, None, None], out, out.new_zeros(()))

    combos = list(product(*[range(kk) for kk in kernel_size]))
    logits = []
    for slots in combos:
        s = (qc * neighbour(kc, slots)).sum(-1) * scale  # (B, *spatial, heads_kv, group)
        if table is not None:
            b = table
            for a, j in enumerate(slots):
                b = b.index_select(1 + a, wins[a][2][:, j])
            b = b.movedim(0, -1)  # (*spatial, heads | 1)
            s = s + b.reshape(*spatial, heads_kv, group) if b.shape[-1] == heads else s + b.unsqueeze(-1)
        if border != "zero":  # "mask" and the short causal windows: absent keys leave the softmax
            s = s.masked_fill(~inside(slots)[None, ..., None, None], float("-inf"))
        logits.append(s)
    logits = torch.stack(logits, dim=-1)  # (B, *spatial, heads_kv, group, prod(k))
    attn = torch.softmax(logits, dim=-1)
    out = torch.zeros_like(qc, memory_format=torch.contiguous_format)
    for c, slots in enumerate(combos):
        out = out + attn[..., c, None] * neighbour(vc, slots)
    out = out.reshape(B, *spatial, heads, head_dim).to(q.dtype)
    if not return_lse:
        return out
    return out, torch.logsumexp(logits, dim=-1).reshape(B, *spatial, heads)


def merge_attentions(outputs, lses):
    """Combine attention results over disjoint key sets into the result over their union,
    exactly, through their logsumexps (as ``natten.merge_attentions``): with ``w_i =
    exp(lse_i - lse)``, ``lse = log(sum_i exp(lse_i))``, the output is ``sum_i w_i * out_i``.

    Args:
        outputs: a sequence of ``(B, *spatial, heads, head_dim)`` tensors (same shape and dtype).
        lses: their logsumexps ``(B, *spatial, heads)`` (from ``return_lse=True``).

    Returns ``(out, lse)``: ``out`` in the outputs' dtype, ``lse`` in the lses' dtype. Both are
    differentiable (plain PyTorch). A partial result with ``lse = -inf`` (no keys) gets weight 0.
    """
    outputs, lses = list(outputs), list(lses)
    if len(outputs) < 2 or len(outputs) != len(lses):
        raise ValueError(f"merge_attentions needs two or more outputs and as many lses, got "
                         f"{len(outputs)} outputs and {len(lses)} lses")
    for i, (o, l) in enumerate(zip(outputs, lses)):
        _checks.tensor(f"outputs[{i}]", o)
        _checks.tensor(f"lses[{i}]", l)
        if o.shape != outputs[0].shape or o.dtype != outputs[0].dtype or o.device != outputs[0].device:
            raise ValueError(f"outputs[{i}] has shape {tuple(o.shape)}, dtype {o.dtype} on {o.device}, but "
                             f"outputs[0] has {tuple(outputs[0].shape)}, {outputs[0].dtype} on {outputs[0].device}")
        if tuple(l.shape) != tuple(o.shape[:-1]) or l.device != o.device:
            raise ValueError(f"lses[{i}] must have shape {tuple(o.shape[:-1])} (the output's without "
                             f"head_dim) on {o.device}, got {tuple(l.shape)} on {l.device}")
    stacked = torch.stack([l.to(torch.float64 if l.dtype == torch.float64 else torch.float32) for l in lses])
    lse = torch.logsumexp(stacked, dim=0)
    # all partials empty: lse = -inf; use 0 weights instead of exp(-inf - -inf) = NaN
    weights = torch.exp(stacked - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    acc = stacked.dtype
    out = sum(w.unsqueeze(-1) * o.to(acc) for w, o in zip(weights.unbind(0), outputs))
    return out.to(outputs[0].dtype), lse.to(lses[0].dtype)


# ---------------------------------------------------------------------------------------
# Fused backends: argument lists shared by the C++ (CPU and CUDA) and Triton ops (three spatial axes)
# ---------------------------------------------------------------------------------------
def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(q, k, v, kernel_size, dilation, stride, causal, border, bias, scale):
    B, T, H, W, heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B, heads, T, H, W), dtype=_acc_dtype(q.dtype)))


def _fake_bwd(dout, q, k, v, out, lse, dlse, kernel_size, dilation, stride, causal, border, bias, scale,
              bias_grad):
    db_shape = bias.shape if (bias is not None and bias_grad) else (0,)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty(db_shape, dtype=_acc_dtype(q.dtype)))


if _ext.has_op("neighborhood_attention_nd_fwd"):
    torch.library.register_fake("alterops::neighborhood_attention_nd_fwd")(_fake_fwd)
    torch.library.register_fake("alterops::neighborhood_attention_nd_bwd")(_fake_bwd)

# The Triton launchers register their ops at import (Triton itself is imported when they run);
# both fused backends' ops have the same argument lists, hence the same fake impls.
from . import _na_nd_triton  # noqa: E402
torch.library.register_fake("alterops::neighborhood_attention_nd_triton_fwd")(_fake_fwd)
torch.library.register_fake("alterops::neighborhood_attention_nd_triton_bwd")(_fake_bwd)

# One backend table per public op (the three are the same: one kernel family serves them all).
_TABLES = {n: register(OpBackends(
    op=f"neighborhood_attention{n}d",
    backends={
        "reference": Backend(),
        "cpu": Backend(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                       ops=("neighborhood_attention_nd_fwd", "neighborhood_attention_nd_bwd")),
        "triton": Backend(dtypes=(torch.float32, torch.float16, torch.bfloat16)),
        # the same ops as "cpu": they dispatch on the device (csrc/neighborhood_attention/*_cuda*)
        "cuda": Backend(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                        ops=("neighborhood_attention_nd_fwd", "neighborhood_attention_nd_bwd")),
    },
    auto_cuda=("triton", "cuda", "reference"),
    auto_why=ATTENTION_GPU_ORDER,
    auto_cpu=("cpu", "reference"),
)) for n in (1, 2, 3)}


def _fused_forward(q, k, v, table, kernel_size, dilation, stride, causal, border, scale, backend):
    """``(out, lse, bias)``: the fused forward on three spatial axes (``bias``: the table as the
    kernels take it, or ``None``)."""
    bias = None
    if table is not None:
        cells = [2 * kk - 1 for kk in kernel_size]
        bias = table.to(_acc_dtype(q.dtype)).reshape(table.shape[0], *cells).contiguous()
    op = torch.ops.alterops.neighborhood_attention_nd_fwd if backend in ("cpu", "cuda") else _na_nd_triton.fwd
    out, lse = op(q, k, v, kernel_size, dilation, stride, causal, border, bias, scale)
    return out, lse, bias


class _NeighborhoodAttentionNd(torch.autograd.Function):
    """Fused forward/backward on three spatial axes; returns ``(out, lse)``, both differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, table, kernel_size, dilation, stride, causal, border, scale, backend, op_name):
        out, lse, bias = _fused_forward(q, k, v, table, kernel_size, dilation, stride, causal, border, scale,
                                        backend)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.params = (kernel_size, dilation, stride, causal, border, scale)
        ctx.backend_name = backend
        ctx.op_name = op_name
        ctx.table_shape = None if table is None else (table.shape, table.dtype)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @first_order_only("neighborhood_attention_nd")
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias = ctx.saved_tensors
        kernel_size, dilation, stride, causal, border, scale = ctx.params
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.to(lse.dtype).contiguous()
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        fused_cpp = ctx.backend_name in ("cpu", "cuda")
        op = torch.ops.alterops.neighborhood_attention_nd_bwd if fused_cpp else _na_nd_triton.bwd
        dq, dk, dv, dbias = op(dout, q, k, v, out, lse, dlse, kernel_size, dilation, stride, causal, border,
                               bias, scale, bias_grad)
        dtable = None
        if bias_grad:
            shape, dtype = ctx.table_shape
            dtable = dbias.reshape(shape).to(dtype)
        return dq, dk, dv, dtable, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# Argument checks and the public functions
# ---------------------------------------------------------------------------------------
_AXES = {1: "(B, L, heads, head_dim)", 2: "(B, H, W, heads, head_dim)", 3: "(B, T, H, W, heads, head_dim)"}


def _per_axis(name: str, value, n: int, *, minimum: int | None = None, kind=int) -> tuple:
    """An int (bool for ``kind=bool``) or a sequence of ``n`` of them, returned as an n-tuple."""
    if type(value) is kind and (kind is bool or ((minimum is None or value >= minimum) and value <= _checks.MAX_INT)):
        return (value,) * n  # the common case, without the checks below
    what = "a bool or a sequence of bools" if kind is bool else "an int or a sequence of ints"

    def ok(x):
        return isinstance(x, bool) if kind is bool else (isinstance(x, int) and not isinstance(x, bool))

    if ok(value):
        out = (value,) * n
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == n and all(ok(x) for x in value):
        out = tuple(value)
    else:
        raise TypeError(f"{name} must be {what} with one entry per spatial axis ({n}), got {value!r}")
    if kind is int:
        out = tuple(int(x) for x in out)
        if minimum is not None and min(out) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        if max(out) > _checks.MAX_INT:
            raise ValueError(f"{name} must be <= {_checks.MAX_INT}, got {value!r}")
    return out


def _check_args(n, q, k, v, kernel_size, dilation, stride, is_causal, border, rel_pos_bias, scale):
    layout = _AXES[n]
    q = _checks.tensor("q", q, ndim=n + 3, layout=layout)
    k = _checks.tensor("k", k, ndim=n + 3, layout=layout.replace("heads", "heads_kv"))
    v = _checks.tensor("v", v, ndim=n + 3, layout=layout.replace("heads", "heads_kv"))
    _checks.same(("q", "k", "v"), (q, k, v), shape=False)
    _checks.same(("k", "v"), (k, v))
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1] or q.shape[-2] % max(k.shape[-2], 1):
        raise ValueError(
            f"k has shape {tuple(k.shape)} but q has shape {tuple(q.shape)}: k and v must match q except "
            "in the heads axis, where they may have fewer heads that divide q's (grouped-query attention)"
        )
    if k.shape[-2] == 0 and q.shape[-2] != 0:
        raise ValueError(f"k has 0 heads but q has {q.shape[-2]}")
    ks = _per_axis("kernel_size", kernel_size, n, minimum=1)
    ds = _per_axis("dilation", dilation, n, minimum=1)
    ss = _per_axis("stride", stride, n, minimum=1)
    cs = _per_axis("is_causal", is_causal, n, kind=bool)
    border = _checks.choice("border", border, BORDERS)
    spatial = tuple(q.shape[1:1 + n])
    if any(s > kk for s, kk in zip(ss, ks)):
        raise ValueError(f"stride must be <= kernel_size per axis, got stride={ss}, kernel_size={ks}")
    if border == "clamp":
        if any(kk * d > size for kk, d, size in zip(ks, ds, spatial)):
            raise ValueError(
                f"border='clamp' needs kernel_size * dilation <= the map size per axis, got kernel_size="
                f"{ks}, dilation={ds} for a map of size {spatial}; use a smaller kernel or border='mask'/'zero'"
            )
    else:
        if max(ss) > 1 or any(cs):
            raise ValueError(
                f"border={border!r} (a centred window) has no stride groups and no causal form; use "
                f"border='clamp' with stride={ss} and is_causal={cs}"
            )
        if any(kk > max(MAX_FREE_KERNEL, 2 * size + 1) for kk, size in zip(ks, spatial)):
            raise ValueError(
                f"kernel_size must be <= max({MAX_FREE_KERNEL}, 2 * map size + 1) per axis for border={border!r}, "
                f"got {ks} for a map of size {spatial} (a larger window only adds keys outside the map)"
            )
        # Once dilation >= the map size every key but the centre one is outside the map, with the
        # same bias index as for any larger dilation: the smaller one computes the same thing.
        ds = tuple(min(d, max(size, 1)) for d, size in zip(ds, spatial))
    heads = q.shape[-2]
    if rel_pos_bias is not None:
        want = tuple(2 * kk - 1 for kk in ks)
        rel_pos_bias = _checks.tensor("rel_pos_bias", rel_pos_bias, ndim=n + 1,
                                      layout=f"(heads | 1, {', '.join(f'2*k{a}-1' for a in range(n))})")
        if rel_pos_bias.shape[0] not in (1, heads) or tuple(rel_pos_bias.shape[1:]) != want:
            raise ValueError(
                f"rel_pos_bias must have shape ({heads} or 1, {', '.join(map(str, want))}) for {heads} heads "
                f"and kernel_size {ks if n > 1 else ks[0]}, got {tuple(rel_pos_bias.shape)}"
            )
        if rel_pos_bias.device != q.device:
            raise ValueError(f"rel_pos_bias is on {rel_pos_bias.device} but q is on {q.device}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    else:
        scale = _checks.number("scale", scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")
    return q, k, v, ks, ds, ss, cs, border, rel_pos_bias, float(scale)


def _neighborhood_attention(n, q, k, v, kernel_size, dilation, stride, is_causal, border, rel_pos_bias, scale,
                            return_lse, backend):
    q, k, v, ks, ds, ss, cs, border, table, scale = _check_args(
        n, q, k, v, kernel_size, dilation, stride, is_causal, border, rel_pos_bias, scale)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    heads, head_dim = q.shape[-2], q.shape[-1]
    name = _TABLES[n].select(backend, q.device, q.dtype)
    limit = {"triton": MAX_TRITON_HEAD_DIM, "cuda": MAX_CUDA_HEAD_DIM}.get(name)
    if limit is not None and head_dim > limit:
        if backend == name:
            raise ValueError(f"the {name!r} backend supports head_dim <= {limit}, got {head_dim}")
        name = "reference"
    if name == "reference":
        return neighborhood_attention_nd_reference(q, k, v, ks, ds, ss, cs, border, table, scale, return_lse)
    # The fused kernels take three spatial axes: pad with leading axes of size 1 (kernel 1).
    pad = 3 - n
    q3, k3, v3 = q, k, v
    for _ in range(pad):
        q3, k3, v3 = q3.unsqueeze(1), k3.unsqueeze(1), v3.unsqueeze(1)
    one = (1,) * pad
    args = (q3, k3, v3, table, [*one, *ks], [*one, *ds], [*one, *ss], [0] * pad + [int(c) for c in cs], border,
            scale, name)
    if needs_grad(q, k, v, table) or torch._C._are_functorch_transforms_active():
        out, lse = _NeighborhoodAttentionNd.apply(*args, f"neighborhood_attention{n}d")
    else:  # nothing to differentiate: the op without the autograd.Function's 20-30 us per call
        out, lse, _ = _fused_forward(*args)
    B, spatial = q.shape[0], tuple(q.shape[1:1 + n])
    out = out.reshape(B, *spatial, heads, head_dim)
    if not return_lse:
        return out
    return out, lse.reshape(B, heads, *spatial).movedim(1, -1)


_DOC_ARGS = """
    Args:
        q: {layout}; k, v: the same with ``heads_kv`` heads (a divisor of ``heads``). Same dtype
            and device, any strides.
        kernel_size: int or one per axis, >= 1 (even allowed with ``border="clamp"``).
        dilation: int or one per axis, >= 1.
        stride: int or one per axis, ``1 <= stride <= kernel_size`` (``border="clamp"`` only).
        is_causal: bool or one per axis (``border="clamp"`` only).
        border: ``"clamp"`` (NATTEN), ``"mask"`` or ``"zero"`` (the paper's ConvAttention2d).
        rel_pos_bias: optional table ``(heads | 1, *(2 * kernel_size - 1))``, key-minus-query.
        scale: logit scale, default ``head_dim ** -0.5``.
        return_lse: also return the logsumexp ``(B, *spatial, heads)`` (float32; float64 for
            float64 inputs).
        backend: ``None`` (auto), ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(B, *spatial, heads, head_dim)`` contiguous in the dtype of ``q``, or ``(out, lse)``.
    """


def neighborhood_attention1d(q, k, v, kernel_size, dilation=1, *, stride=1, is_causal=False, border="clamp",
                             rel_pos_bias=None, scale=None, return_lse=False, backend=None):
    return _neighborhood_attention(1, q, k, v, kernel_size, dilation, stride, is_causal, border, rel_pos_bias,
                                   scale, return_lse, backend)


def neighborhood_attention2d(q, k, v, kernel_size, dilation=1, *, stride=1, is_causal=False, border="clamp",
                             rel_pos_bias=None, scale=None, return_lse=False, backend=None):
    return _neighborhood_attention(2, q, k, v, kernel_size, dilation, stride, is_causal, border, rel_pos_bias,
                                   scale, return_lse, backend)


def neighborhood_attention3d(q, k, v, kernel_size, dilation=1, *, stride=1, is_causal=False, border="clamp",
                             rel_pos_bias=None, scale=None, return_lse=False, backend=None):
    return _neighborhood_attention(3, q, k, v, kernel_size, dilation, stride, is_causal, border, rel_pos_bias,
                                   scale, return_lse, backend)


for _n, _fn in ((1, neighborhood_attention1d), (2, neighborhood_attention2d), (3, neighborhood_attention3d)):
    _fn.__doc__ = (f"{_n}-D neighbourhood multi-head attention (the rules are in the module docstring of "
                   f"``alterops.neighborhood_attention_nd``).\n" + _DOC_ARGS.format(layout=f"``{_AXES[_n]}``"))
