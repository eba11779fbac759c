"""Triton launchers of the N-d neighbourhood attention family (``alterops/kernels/neighborhood_attention_nd.py``)
and their registration as opaque ops:

* ``alterops::neighborhood_attention_nd_triton_fwd(q, k, v, kernel_size, dilation, stride, causal,
  border, bias, scale) -> (out, lse)``
* ``alterops::neighborhood_attention_nd_triton_bwd(dout, q, k, v, out, lse, dlse, kernel_size,
  dilation, stride, causal, border, bias, scale, bias_grad) -> (dq, dk, dv, dbias)``

Tensors have three spatial axes: q ``(B, T, H, W, heads, D)``, k and v ``(B, T, H, W, heads_kv, D)``
(any strides, ``heads % heads_kv == 0``), out contiguous like q, lse ``(B, heads, T, H, W)``
float32 (natural log). ``kernel_size``, ``dilation``, ``stride``, ``causal``: one int per axis.
``bias``: None or a contiguous float32 table ``(heads | 1, 2kt-1, 2kh-1, 2kw-1)``. The callers
check the arguments (window sizes against the map, border with stride/causal); these functions
compute. Dtypes: float32, float16, bfloat16; head_dim <= 256.
"""
from __future__ import annotations

import functools

import torch

from . import _checks
from ._autograd import eager_or_op

BORDER_CODE = {"clamp": 0, "mask": 1, "zero": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _check(q: torch.Tensor, k: torch.Tensor, border: str) -> None:
    if q.shape[4] % k.shape[4] != 0:
        raise ValueError(f"q's {q.shape[4]} heads are not a multiple of k/v's {k.shape[4]} heads")
    if q.dtype not in DTYPES:
        raise TypeError(f"the Triton N-d neighbourhood attention takes {DTYPES}, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the Triton N-d neighbourhood attention takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if border not in BORDER_CODE:
        raise ValueError(f"border must be one of {tuple(BORDER_CODE)}, got {border!r}")


def _window_args(kernel_size, dilation, stride, causal) -> list[int]:
    """The kernels' KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW."""
    return [int(x) for x in (*kernel_size, *dilation, *stride)] + [int(bool(c)) for c in causal]


def _bias_args(bias, unused):
    """``(pointer, head stride)`` of the bias table for the kernels; without a table they read
    no bias, and ``unused`` (any float32 tensor of the call) stands in for the pointer."""
    if bias is None:
        return unused, 0
    return bias, 0 if bias.shape[0] == 1 else bias.stride(0)


def _kernels():
    """The kernels' module, imported (with Triton) on the first launch, not with alterops."""
    global _KERNELS
    if _KERNELS is None:
        from .kernels import neighborhood_attention_nd

        _KERNELS = neighborhood_attention_nd
    return _KERNELS


_KERNELS = None


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@functools.lru_cache(maxsize=256)
def _plan(kernel: str, head_dim: int, dtype: torch.dtype, T: int, H: int, W: int, pairs: int):
    """``(meta, launches)`` of ``kernel`` ("fwd", "dq" or "dkdv") on a (T, H, W) map: the tile
    constexprs with num_warps / num_stages, and the (BH0, grid, SPLIT) of each launch over
    ``pairs`` (batch, head) pairs. Cached: the host side of a call is part of its time."""
    kern = _kernels()

    cfg = kern.pick_config(kernel, head_dim, dtype, kern.map_rank(T, H, W))
    meta = dict({n: cfg[n] for n in kern.TILE_KEYS}, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    pre = "TN_" if kernel == "dkdv" else "TM_"
    tiles = _cdiv(T, cfg[pre + "T"]) * _cdiv(H, cfg[pre + "H"]) * _cdiv(W, cfg[pre + "W"])
    return meta, tuple(kern.launches(pairs, tiles))


def na_nd_triton_fwd(q, k, v, kernel_size, dilation, stride, causal, border, bias, scale):
    kern = _kernels()

    _check(q, k, border)
    B, T, H, W, heads, head_dim = q.shape
    heads_kv = k.shape[4]
    out = _checks.empty((B, T, H, W, heads, head_dim), like=q)
    lse = _checks.empty((B, heads, T, H, W), like=q, dtype=torch.float32)
    meta, launches = _plan("fwd", head_dim, q.dtype, T, H, W, B * heads)
    bias_arg, bias_head_stride = _bias_args(bias, lse)
    wide = kern.needs_wide(q, k, v, out)
    window = _window_args(kernel_size, dilation, stride, causal)
    # A NaN or inf in v: the plain kernel's dots would spread it to queries whose window does not
    # hold it (their weight 0 times inf); a second launch recomputes with IEEE handling when the
    # device-side flag says so.
    flag, variants = kern.nonfinite_passes(v)
    for nonfinite in variants:
        for bh0, grid, split in launches:
            kern.nand_fwd_kernel[grid](
                q, k, v, out, lse, bias_arg, flag,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                T, H, W, heads, heads // heads_kv, head_dim, *window,
                bias_head_stride, bh0, scale * kern.LOG2E,
                BORDER=BORDER_CODE[border], HAS_BIAS=bias is not None,
                FP32_DOT=q.dtype == torch.float32, UPCAST_DOT=q.device.type == "cpu",
                WIDE=wide, SPLIT=split, NONFINITE=nonfinite, **meta,
            )
    return out, lse


def bias_grad_from_slots(ds_slots, kernel_size, dilation, stride, causal, border, table_heads):
    """Bias-table gradient from per-(query, neighbour slot) logit gradients, in any number of
    spatial axes n = ``len(kernel_size)``.

    ``ds_slots``: ``(B, heads, *spatial, *kernel_size)``. Entry (i_0.., j_0..) goes to table cell
    ``(cell_0[i_0, j_0], ...)`` of ``(table_heads, 2k_0-1, ...)`` (summed over the heads when
    ``table_heads`` is 1); slots without a key (past the end of a short causal window) are left
    out. The sum is one one-hot contraction per axis (matmuls), deterministic unlike a
    scatter-add with atomics.
    """
    from .neighborhood_attention_nd import axis_window

    n = len(kernel_size)
    heads, spatial, ks = ds_slots.shape[1], tuple(ds_slots.shape[2:2 + n]), tuple(kernel_size)
    g = ds_slots.sum(0)  # (heads, L_0.., k_0..)
    for a in range(n):
        # slot j of query i: bias row `cell`; a slot holds a key unless it lies past the end of a
        # short causal window ("mask"/"zero" slots outside the map keep their stored dS: 0, or the
        # zero key's gradient)
        _, valid, cell = axis_window(spatial[a], ks[a], dilation[a], stride[a], bool(causal[a]), border, g.device)
        used = valid if border == "clamp" else torch.ones_like(valid)
        onehot = torch.nn.functional.one_hot(cell, 2 * ks[a] - 1).to(g.dtype) * used[..., None]  # (L, k, 2k-1)
        # g: (heads, L_a.., k_a.., r_0..r_{a-1}); contract (L_a, k_a) into r_a, appended last
        g = g.movedim(1 + n - a, 2).reshape(heads, spatial[a] * ks[a], -1)
        g = torch.einsum("hmz,mr->hzr", g, onehot.reshape(-1, 2 * ks[a] - 1))
        g = g.reshape(heads, *spatial[a + 1:], *ks[a + 1:], *(2 * k - 1 for k in ks[:a]), 2 * ks[a] - 1)
    if table_heads == 1:
        g = g.sum(0, keepdim=True)
    return g.contiguous()


def na_nd_triton_bwd(dout, q, k, v, out, lse, dlse, kernel_size, dilation, stride, causal, border, bias,
                     scale, bias_grad):
    kern = _kernels()

    _check(q, k, border)
    B, T, H, W, heads, head_dim = q.shape
    heads_kv = k.shape[4]
    # DELTA = rowsum(dO * O) - dlse per query, (B, heads, T, H, W): for 16-bit inputs the dq
    # kernel computes it (and stores it for the dk/dv kernel), float32 has it computed here
    fused_delta = q.dtype != torch.float32
    has_dlse = fused_delta and dlse is not None
    dlse_arg = dlse.to(torch.float32).contiguous() if has_dlse else lse  # lse: a pointer never read
    if fused_delta:
        delta = _checks.empty((B, heads, T, H, W), like=q, dtype=torch.float32)
    else:
        delta = (dout * out).sum(-1).permute(0, 4, 1, 2, 3).contiguous()
        if dlse is not None:
            delta = delta - dlse
    dq = _checks.empty(q.shape, like=q)
    dk = _checks.empty(k.shape, like=k)
    dv = _checks.empty(v.shape, like=v)
    has_bias = bias is not None
    bias_arg, bias_head_stride = _bias_args(bias, lse)
    want_db = has_bias and bias_grad
    kt, kh, kw = (int(x) for x in kernel_size)
    # per-(query, slot) logit gradients for the bias table; slots that are no neighbour stay 0
    # (without the table's gradient the kernels write no DS: lse stands in for the pointer)
    ds_slots = torch.zeros((B, heads, T, H, W, kt, kh, kw), device=q.device, dtype=torch.float32) if want_db else lse
    window = _window_args(kernel_size, dilation, stride, causal)
    common = dict(
        BORDER=BORDER_CODE[border], HAS_BIAS=has_bias,
        FP32_DOT=q.dtype == torch.float32, UPCAST_DOT=q.device.type == "cpu",
        WIDE=kern.needs_wide(q, k, v, out, dout, dq, dk, dv),
    )
    group = heads // heads_kv
    meta, launches = _plan("dq", head_dim, q.dtype, T, H, W, B * heads)
    for bh0, grid, split in launches:
        kern.nand_bwd_dq_kernel[grid](
            q, k, v, out, dout, lse, dlse_arg, delta, dq, bias_arg, ds_slots,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(),
            T, H, W, heads, group, head_dim, *window,
            bias_head_stride, bh0, scale * kern.LOG2E, scale, FUSED_DELTA=fused_delta, HAS_DLSE=has_dlse,
            STORE_DS=want_db, SPLIT=split, **common, **meta,
        )
    meta, launches = _plan("dkdv", head_dim, q.dtype, T, H, W, B * heads_kv)
    for bh0, grid, split in launches:
        kern.nand_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, dk, dv, bias_arg,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            T, H, W, heads, group, head_dim, *window,
            bias_head_stride, bh0, scale * kern.LOG2E, scale, SPLIT=split, **common, **meta,
        )
    if want_db:
        dbias = bias_grad_from_slots(ds_slots, (kt, kh, kw), dilation, stride, causal, border, bias.shape[0])
    else:
        dbias = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------
# Op registration: opaque ops (their fake impls, shared with the CPU ops, are registered in
# alterops/neighborhood_attention_nd.py)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("alterops::neighborhood_attention_nd_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: list[int], dilation: list[int],
            stride: list[int], causal: list[int], border: str, bias: torch.Tensor | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return na_nd_triton_fwd(q, k, v, kernel_size, dilation, stride, causal, border, bias, scale)


@torch.library.custom_op("alterops::neighborhood_attention_nd_triton_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, dlse: torch.Tensor | None, kernel_size: list[int], dilation: list[int],
            stride: list[int], causal: list[int], border: str, bias: torch.Tensor | None, scale: float,
            bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return na_nd_triton_bwd(dout, q, k, v, out, lse, dlse, kernel_size, dilation, stride, causal, border, bias,
                            scale, bias_grad)


# eager calls run the launchers themselves (alterops._autograd.direct_call_ok)
fwd = eager_or_op(na_nd_triton_fwd, "neighborhood_attention_nd_triton_fwd")
bwd = eager_or_op(na_nd_triton_bwd, "neighborhood_attention_nd_triton_bwd")
