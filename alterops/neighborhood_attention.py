"""Neighborhood (k×k sliding-window) multi-head self-attention on 2D maps.

``neighborhood_attention2d(q, k, v, kernel_size, dilation=1, *, border="clamp",
rel_pos_bias=None, scale=None, backend=None)``

Shapes: ``q, k, v`` are ``(B, H, W, heads, head_dim)`` (heads-last, NATTEN's layout) with any
strides; the output is ``(B, H, W, heads, head_dim)`` contiguous, in the input dtype.

Semantics (``docs/semantics.md``): query ``p = (y, x)`` attends to the keys
``p + dilation * (i - r)``, ``i = 0..k-1`` per axis, ``r = (k-1)//2``, with the border rule

* ``"clamp"``: NATTEN's rule. Within the query's dilation sub-grid (positions congruent to it
  modulo the dilation) the window slides inward at a border, so every query sees exactly
  ``kh*kw`` in-image keys. Needs ``kernel_size * dilation <= map size`` per axis.
* ``"mask"``: the window stays centred; out-of-image keys are left out of the softmax.
* ``"zero"``: the paper's ``ConvAttention2d`` (unfold with zero padding): out-of-image keys are
  zero vectors; their logit is ``0 + bias`` and their value 0, and they keep softmax mass.

``rel_pos_bias``: a table ``(heads | 1, 2*kh-1, 2*kw-1)``; the logit of query ``p`` and key
``p'`` gets ``table[h, dy + kh-1, dx + kw-1]`` with ``(dy, dx) = (p' - p) / dilation`` (key minus
query). For ``"zero"`` the out-of-image keys get their bias too.

Decisions where the contract is open:

* the bias table may have any floating dtype (e.g. a float32 parameter with bfloat16
  activations); it is read in float32 (float64 for float64 inputs) and its gradient has the
  table's dtype. It must be on the device of ``q``.
* ``kernel_size`` larger than the map is allowed for ``"mask"`` and ``"zero"`` (the extra keys
  are outside the image) up to ``max(31, 2 * map size + 1)`` per axis; ``"clamp"`` raises.
* the fused backends save the output and the per-query logsumexp (float32; float64 for float64
  inputs) for the backward, as flash attention does; memory is linear in the number of queries.
* the bias gradient is deterministic on every backend (no atomic adds into the table).

Backends: ``reference`` (plain PyTorch, differentiable by autograd; every dtype), ``cpu``
(C++, ``csrc/neighborhood_attention/``: float32, float64, bfloat16) and
``triton`` (flash-style fused kernels, ``kernels/neighborhood_attention.py``: float32,
float16, bfloat16, head_dim <= 256). Automatic order: CUDA ``triton, reference``; CPU
``cpu, reference``.
"""
from __future__ import annotations

import math

import torch

from . import _checks, _ext
from ._autograd import first_order_only
from ._dispatch import Backend, OpBackends, register

__all__ = ["neighborhood_attention2d", "neighborhood_attention2d_reference", "neighborhood_window"]

BORDERS = ("clamp", "mask", "zero")
_BORDER_CODE = {"clamp": 0, "mask": 1, "zero": 2}
_MAX_TRITON_HEAD_DIM = 256
_MAX_FREE_KERNEL = 31  # "mask"/"zero": kernels up to this size are accepted on any map


# ---------------------------------------------------------------------------------------
# Reference: the spec in code
# ---------------------------------------------------------------------------------------
def neighborhood_window(length: int, kernel: int, dilation: int, border: str, device=None):
    """Per-axis neighbourhood of every position.

    Returns ``(pos, valid, bias_index)``, each ``(length, kernel)``: ``pos[y, i]`` is the key
    position of neighbour ``i`` of query ``y`` (possibly outside ``[0, length)`` for ``"mask"``
    and ``"zero"``), ``valid`` says whether it lies in the image, and ``bias_index`` is its row
    (column) in the bias table, ``(pos - y) / dilation + kernel - 1``.
    """
    y = torch.arange(length, device=device).unsqueeze(1)
    i = torch.arange(kernel, device=device).unsqueeze(0)
    r = (kernel - 1) // 2
    if border == "clamp":
        residue = y % dilation
        n_grid = (length - residue + dilation - 1) // dilation  # size of y's dilation sub-grid
        start = residue + dilation * torch.minimum(
            torch.clamp(y // dilation - r, min=0), n_grid - kernel
        )
        pos = start + dilation * i
    else:
        pos = y + dilation * (i - r)
    valid = (pos >= 0) & (pos < length)
    bias_index = torch.div(pos - y, dilation, rounding_mode="floor") + kernel - 1
    return pos, valid, bias_index


def neighborhood_attention2d_reference(q, k, v, kernel_size, dilation=(1, 1), border="clamp",
                                       rel_pos_bias=None, scale=None):
    """Plain PyTorch (differentiable by autograd). Gathers neighbour indices, one neighbour
    offset at a time: the forward never holds more than ``O(N·k²)`` logits (no N×N matrix).
    Computes in float32 for half inputs, float64 for float64."""
    kh, kw = kernel_size
    dh, dw = dilation
    B, H, W, heads, head_dim = q.shape
    if scale is None:
        scale = head_dim ** -0.5
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    pos_y, valid_y, bias_y = neighborhood_window(H, kh, dh, border, q.device)
    pos_x, valid_x, bias_x = neighborhood_window(W, kw, dw, border, q.device)
    table = None if rel_pos_bias is None else rel_pos_bias.to(compute)

    def neighbour(t, i, j):  # t[b, pos_y[y, i], pos_x[x, j]] for every query (y, x)
        rows = t.index_select(1, pos_y[:, i].clamp(0, H - 1))
        out = rows.index_select(2, pos_x[:, j].clamp(0, W - 1))
        if border != "clamp":  # out-of-image keys and values are zero vectors ("zero") or unused
            # ("mask"); a select, not a product: the clamped in-image row may hold NaN or inf
            inside = valid_y[:, i, None] & valid_x[None, :, j]
            out = torch.where(inside[None, :, :, None, None], out, out.new_zeros(()))
        return out

    logits = []
    for i in range(kh):
        for j in range(kw):
            s = (qc * neighbour(kc, i, j)).sum(-1) * scale  # (B, H, W, heads)
            if table is not None:
                b = table[:, bias_y[:, i]][:, :, bias_x[:, j]]  # (heads|1, H, W)
                s = s + b.permute(1, 2, 0).unsqueeze(0)
            if border == "mask":
                inside = valid_y[:, i, None] & valid_x[None, :, j]
                s = s.masked_fill(~inside[None, :, :, None], float("-inf"))
            logits.append(s)
    attn = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, H, W, heads, kh*kw)
    out = torch.zeros_like(qc, memory_format=torch.contiguous_format)  # documented: contiguous
    for i in range(kh):
        for j in range(kw):
            out = out + attn[..., i * kw + j, None] * neighbour(vc, i, j)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------
# Launchers (Triton) and the deterministic bias-gradient reduction shared by them
# ---------------------------------------------------------------------------------------
def _bias_grad_from_offsets(ds_offsets, H, W, kh, kw, dh, dw, border, table_heads):
    """Bias-table gradient from per-(query, neighbour offset) logit gradients.

    ``ds_offsets``: ``(B, heads, H, W, kh, kw)`` float32. Each entry goes to table cell
    ``(bias_index_y[y, i], bias_index_x[x, j])``; the sum is two one-hot contractions (matmuls),
    deterministic unlike a scatter-add with atomics.
    """
    dev = ds_offsets.device
    _, _, by = neighborhood_window(H, kh, dh, border, dev)
    _, _, bx = neighborhood_window(W, kw, dw, border, dev)
    ey = torch.nn.functional.one_hot(by, 2 * kh - 1).to(ds_offsets.dtype)  # (H, kh, 2kh-1)
    ex = torch.nn.functional.one_hot(bx, 2 * kw - 1).to(ds_offsets.dtype)  # (W, kw, 2kw-1)
    per_head = ds_offsets.sum(0)  # (heads, H, W, kh, kw)
    t = torch.einsum("hyxij,xjb->hyib", per_head, ex)
    grad = torch.einsum("hyib,yia->hab", t, ey)
    if table_heads == 1:
        grad = grad.sum(0, keepdim=True)
    return grad


def _na_triton_fwd(q, k, v, kh, kw, dh, dw, border, bias, scale):
    from .kernels import neighborhood_attention as kern
    from .kernels._attention_common import nonfinite_passes

    B, H, W, heads, head_dim = q.shape
    out = _checks.empty((B, H, W, heads, head_dim), like=q)
    lse = _checks.empty((B, heads, H, W), like=q, dtype=torch.float32)
    cfg = kern.pick_config(head_dim, q.dtype)
    tiles = triton_cdiv(H, cfg["TM_H"]) * triton_cdiv(W, cfg["TM_W"])
    has_bias = bias is not None
    bias_arg = bias if has_bias else q.new_zeros(1, dtype=torch.float32)
    bias_head_stride = 0 if (not has_bias or bias.shape[0] == 1) else bias.stride(0)
    wide = kern.needs_wide(q, k, v, out)
    # A NaN or inf in v: the plain kernel's dots would spread it to queries whose window does not
    # hold it (their weight 0 times inf); a second launch recomputes with IEEE handling when the
    # device-side flag says so (on a GPU it returns at once otherwise: no host sync).
    flag, variants = nonfinite_passes(v)
    for nonfinite in variants:
        for bh0, grid, split in kern.launches(B, heads, tiles):
            kern.na2d_fwd_kernel[grid](
                q, k, v, out, lse, bias_arg, flag,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                H, W, heads, head_dim, kh, kw, dh, dw, bias_head_stride, bh0,
                scale * kern.LOG2E,
                BORDER=_BORDER_CODE[border], HAS_BIAS=has_bias,
                TM_H=cfg["TM_H"], TM_W=cfg["TM_W"], TN_H=cfg["TN_H"], TN_W=cfg["TN_W"],
                BLOCK_D=cfg["BLOCK_D"], FP32_DOT=q.dtype == torch.float32, UPCAST_DOT=q.device.type == "cpu",
                WIDE=wide, SPLIT=split, NONFINITE=nonfinite, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
    return out, lse


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _na_triton_bwd(dout, q, k, v, out, lse, kh, kw, dh, dw, border, bias, scale, bias_grad):
    from .kernels import neighborhood_attention as kern

    B, H, W, heads, head_dim = q.shape
    delta = (dout.float() * out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()  # (B, heads, H, W)
    dq = _checks.empty(q.shape, like=q)
    dk = _checks.empty(k.shape, like=k)
    dv = _checks.empty(v.shape, like=v)
    cfg = kern.pick_config(head_dim, q.dtype)
    has_bias = bias is not None
    bias_arg = bias if has_bias else q.new_zeros(1, dtype=torch.float32)
    bias_head_stride = 0 if (not has_bias or bias.shape[0] == 1) else bias.stride(0)
    want_db = has_bias and bias_grad
    # Per-(query, offset) logit gradients for the bias table; entries of masked offsets stay 0.
    ds_off = torch.zeros((B, heads, H, W, kh, kw) if want_db else (1,), device=q.device, dtype=torch.float32)
    common = dict(
        BORDER=_BORDER_CODE[border], HAS_BIAS=has_bias,
        TM_H=cfg["TM_H"], TM_W=cfg["TM_W"], TN_H=cfg["TN_H"], TN_W=cfg["TN_W"],
        BLOCK_D=cfg["BLOCK_D"], FP32_DOT=q.dtype == torch.float32, UPCAST_DOT=q.device.type == "cpu",
        WIDE=kern.needs_wide(q, k, v, dout, dq, dk, dv),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    tiles_q = triton_cdiv(H, cfg["TM_H"]) * triton_cdiv(W, cfg["TM_W"])
    for bh0, grid, split in kern.launches(B, heads, tiles_q):
        kern.na2d_bwd_dq_kernel[grid](
            q, k, v, dout, lse, delta, dq, bias_arg, ds_off,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
            H, W, heads, head_dim, kh, kw, dh, dw, bias_head_stride, bh0,
            scale * kern.LOG2E, scale, STORE_DS=want_db, SPLIT=split, **common,
        )
    tiles_k = triton_cdiv(H, cfg["TN_H"]) * triton_cdiv(W, cfg["TN_W"])
    for bh0, grid, split in kern.launches(B, heads, tiles_k):
        kern.na2d_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, dk, dv, bias_arg,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            H, W, heads, head_dim, kh, kw, dh, dw, bias_head_stride, bh0,
            scale * kern.LOG2E, scale, SPLIT=split, **common,
        )
    if want_db:
        dbias = _bias_grad_from_offsets(ds_off, H, W, kh, kw, dh, dw, border, bias.shape[0])
    else:
        dbias = q.new_zeros((0,), dtype=torch.float32)
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------
# Op registration: opaque ops with fake impls (C++ ops are defined in C++)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("alterops::neighborhood_attention2d_triton_fwd", mutates_args=())
def _na2d_triton_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, dh: int,
                        dw: int, border: str, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _na_triton_fwd(q, k, v, kh, kw, dh, dw, border, bias, scale)


@_na2d_triton_fwd_op.register_fake
def _(q, k, v, kh, kw, dh, dw, border, bias, scale):
    B, H, W, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, heads, H, W), dtype=torch.float32)


@torch.library.custom_op("alterops::neighborhood_attention2d_triton_bwd", mutates_args=())
def _na2d_triton_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, kh: int, kw: int, dh: int, dw: int, border: str,
                        bias: torch.Tensor | None, scale: float, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _na_triton_bwd(dout, q, k, v, out, lse, kh, kw, dh, dw, border, bias, scale, bias_grad)


@_na2d_triton_bwd_op.register_fake
def _(dout, q, k, v, out, lse, kh, kw, dh, dw, border, bias, scale, bias_grad):
    db_shape = bias.shape if (bias is not None and bias_grad) else (0,)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty(db_shape, dtype=torch.float32))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


if _ext.has_op("neighborhood_attention2d_fwd"):

    @torch.library.register_fake("alterops::neighborhood_attention2d_fwd")
    def _(q, k, v, kh, kw, dh, dw, border, bias, scale):
        B, H, W, heads, _ = q.shape
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty((B, heads, H, W), dtype=_acc_dtype(q.dtype)))

    @torch.library.register_fake("alterops::neighborhood_attention2d_bwd")
    def _(dout, q, k, v, out, lse, kh, kw, dh, dw, border, bias, scale, bias_grad):
        db_shape = bias.shape if (bias is not None and bias_grad) else (0,)
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
                torch.empty_like(v, memory_format=torch.contiguous_format),
                q.new_empty(db_shape, dtype=_acc_dtype(q.dtype)))


_TABLE = register(OpBackends(
    op="neighborhood_attention2d",
    backends={
        "reference": Backend(),
        "cpu": Backend(dtypes=(torch.float32, torch.float64, torch.bfloat16),
                       ops=("neighborhood_attention2d_fwd", "neighborhood_attention2d_bwd")),
        "triton": Backend(dtypes=(torch.float32, torch.float16, torch.bfloat16)),
    },
    auto_cuda=("triton", "reference"),
    auto_cpu=("cpu", "reference"),
))


# ---------------------------------------------------------------------------------------
# autograd.Function: calls only the opaque ops
# ---------------------------------------------------------------------------------------
class _NeighborhoodAttention2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, kh, kw, dh, dw, border, scale, backend):
        bias = None if table is None else table.to(_acc_dtype(q.dtype)).contiguous()
        if backend == "cpu":
            out, lse = torch.ops.alterops.neighborhood_attention2d_fwd(q, k, v, kh, kw, dh, dw, border, bias, scale)
        else:
            out, lse = torch.ops.alterops.neighborhood_attention2d_triton_fwd(q, k, v, kh, kw, dh, dw, border, bias, scale)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.args = (kh, kw, dh, dw, border, scale, backend)
        ctx.backend_name = backend
        ctx.table_dtype = None if table is None else table.dtype
        return out

    @staticmethod
    @first_order_only("neighborhood_attention2d")
    def backward(ctx, dout):
        q, k, v, out, lse, bias = ctx.saved_tensors
        kh, kw, dh, dw, border, scale, backend = ctx.args
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        if backend == "cpu":
            op = torch.ops.alterops.neighborhood_attention2d_bwd
        else:
            op = torch.ops.alterops.neighborhood_attention2d_triton_bwd
        dq, dk, dv, dbias = op(dout, q, k, v, out, lse, kh, kw, dh, dw, border, bias, scale, bias_grad)
        dtable = dbias.to(ctx.table_dtype) if bias_grad else None
        return dq, dk, dv, dtable, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def neighborhood_attention2d(q, k, v, kernel_size, dilation=1, *, border="clamp", rel_pos_bias=None,
                             scale=None, backend=None):
    """k×k neighbourhood multi-head self-attention (see the module docstring for the exact rules).

    Args:
        q, k, v: ``(B, H, W, heads, head_dim)``, same shape, dtype and device, any strides.
        kernel_size: odd int or pair ``(kh, kw)``.
        dilation: int or pair ``(dh, dw)``, >= 1.
        border: ``"clamp"`` (NATTEN), ``"mask"`` or ``"zero"`` (the paper's ConvAttention2d).
        rel_pos_bias: optional table ``(heads | 1, 2*kh-1, 2*kw-1)``, key-minus-query indexing.
        scale: logit scale, default ``head_dim ** -0.5``.
        backend: ``None`` (auto), ``"reference"``, ``"cpu"`` or ``"triton"``.

    Returns:
        ``(B, H, W, heads, head_dim)`` contiguous, dtype of ``q``.
    """
    layout = "(B, H, W, heads, head_dim)"
    q = _checks.tensor("q", q, ndim=5, layout=layout)
    k = _checks.tensor("k", k, ndim=5, layout=layout)
    v = _checks.tensor("v", v, ndim=5, layout=layout)
    _checks.same(("q", "k", "v"), (q, k, v))
    kh, kw = _checks.pair("kernel_size", kernel_size, minimum=1, odd=True)
    dh, dw = _checks.pair("dilation", dilation, minimum=1)
    border = _checks.choice("border", border, BORDERS)
    B, H, W, heads, head_dim = q.shape
    if border == "clamp" and (kh * dh > H or kw * dw > W):
        raise ValueError(
            f"border='clamp' needs kernel_size * dilation <= the map size per axis, got kernel_size="
            f"({kh}, {kw}), dilation=({dh}, {dw}) for a {H}x{W} map; use a smaller kernel or "
            "border='mask'/'zero'"
        )
    if border != "clamp":
        if kh > max(_MAX_FREE_KERNEL, 2 * H + 1) or kw > max(_MAX_FREE_KERNEL, 2 * W + 1):
            raise ValueError(
                f"kernel_size must be <= max({_MAX_FREE_KERNEL}, 2 * map size + 1) per axis for "
                f"border={border!r}, got ({kh}, {kw}) for a {H}x{W} map (a larger window only adds "
                "keys outside the image)"
            )
        # Every key but the centre one is outside the image once dilation >= the map size, with
        # the same bias index, so a larger dilation computes the same thing.
        dh, dw = min(dh, max(H, 1)), min(dw, max(W, 1))
    if rel_pos_bias is not None:
        rel_pos_bias = _checks.tensor("rel_pos_bias", rel_pos_bias, ndim=3,
                                      layout="(heads | 1, 2*kh-1, 2*kw-1)")
        want = (2 * kh - 1, 2 * kw - 1)
        if rel_pos_bias.shape[0] not in (1, heads) or tuple(rel_pos_bias.shape[1:]) != want:
            raise ValueError(
                f"rel_pos_bias must have shape ({heads} or 1, {want[0]}, {want[1]}) for {heads} heads "
                f"and kernel_size ({kh}, {kw}), got {tuple(rel_pos_bias.shape)}"
            )
        if rel_pos_bias.device != q.device:
            raise ValueError(f"rel_pos_bias is on {rel_pos_bias.device} but q is on {q.device}")
    if scale is None:
        scale = head_dim ** -0.5
    else:
        scale = _checks.number("scale", scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")
    name = _TABLE.select(backend, q.device, q.dtype)
    if name == "triton" and head_dim > _MAX_TRITON_HEAD_DIM:
        if backend == "triton":
            raise ValueError(f"the 'triton' backend supports head_dim <= {_MAX_TRITON_HEAD_DIM}, got {head_dim}")
        name = "reference"
    if name == "reference":
        return neighborhood_attention2d_reference(q, k, v, (kh, kw), (dh, dw), border, rel_pos_bias, scale)
    return _NeighborhoodAttention2d.apply(q, k, v, rel_pos_bias, kh, kw, dh, dw, border, float(scale), name)
