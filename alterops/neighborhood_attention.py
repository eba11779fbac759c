"""The 2-D kernels of neighborhood attention: k×k sliding-window multi-head self-attention on 2D
maps with odd kernels, stride 1, no causal mask and as many kv heads as heads. The public
``neighborhood_attention2d`` (``alterops/neighborhood_attention_nd.py``, which also holds the
reference implementation) runs these kernels for such calls and the N-d kernels for the others.

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

import torch

from . import _checks, _ext
from ._autograd import first_order_only
from ._dispatch import Backend, OpBackends, register
from .neighborhood_attention_nd import axis_window, neighborhood_attention_nd_reference


_BORDER_CODE = {"clamp": 0, "mask": 1, "zero": 2}
_MAX_TRITON_HEAD_DIM = 256


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
    _, _, by = axis_window(H, kh, dh, border=border, device=dev)
    _, _, bx = axis_window(W, kw, dw, border=border, device=dev)
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
# Entry from the public function (alterops.neighborhood_attention_nd.neighborhood_attention2d)
# ---------------------------------------------------------------------------------------
def _neighborhood_attention2d_checked(q, k, v, kernel_size, dilation, border, table, scale, backend):
    """The 2-D kernels, for checked arguments: odd kernels, stride 1, not causal, as many kv heads
    as heads; ``dilation`` already reduced for ``"mask"``/``"zero"``."""
    (kh, kw), (dh, dw) = kernel_size, dilation
    name = _TABLE.select(backend, q.device, q.dtype)
    if name == "triton" and q.shape[-1] > _MAX_TRITON_HEAD_DIM:
        if backend == "triton":
            raise ValueError(f"the 'triton' backend supports head_dim <= {_MAX_TRITON_HEAD_DIM}, got {q.shape[-1]}")
        name = "reference"
    if name == "reference":
        return neighborhood_attention_nd_reference(q, k, v, kernel_size, dilation, border=border,
                                                   rel_pos_bias=table, scale=scale)
    return _NeighborhoodAttention2d.apply(q, k, v, table, kh, kw, dh, dw, border, float(scale), name)
