"""Swin-style (shifted) window multi-head self-attention as one fused op.

``window_attention2d(q, k, v, window_size, *, shift=0, rel_pos_bias=None, scale=None, backend=None)``

Layout: ``q, k, v`` are ``(B, H, W, heads, head_dim)`` with any strides (a view into a fused
``qkv`` tensor of shape ``(B, H, W, 3, heads, head_dim)`` is read in place by the fused
backends). The output is a new contiguous ``(B, H, W, heads, head_dim)`` tensor of the input
dtype.

Semantics (``docs/semantics.md``), exactly Swin's shifted-window MSA:

1. The map is padded at the bottom/right to ``Hp x Wp``, multiples of the window
   ``(wh, ww)``, with *absent* tokens: they are never attended to and produce no output.
2. The padded map is rolled by ``-shift`` (``torch.roll`` over H and W) and split into
   non-overlapping ``wh x ww`` windows from the top-left corner.
3. Inside a window, token ``p`` attends to token ``p'`` when ``p'`` is present and both lie in
   the same shift region; each axis of the rolled padded map of length ``L`` has three
   regions ``[0, L-w)``, ``[L-w, L-s)``, ``[L-s, L)`` (computed on the padded size, as Swin).
4. logit = ``scale * q.k + table[h, dy + wh - 1, dx + ww - 1]`` with ``(dy, dx)`` the
   in-window offset **key minus query** (Hugging Face / timm Swin index query minus key: flip
   both table axes to port weights).
5. Softmax over the allowed keys, weighted sum of values, windows merged back, rolled back
   by ``+shift``, cropped to ``H x W``.

``scale`` defaults to ``head_dim ** -0.5``. Softmax and accumulation run in float32 for half
inputs (float64 for float64). Decisions where the contract is silent: Swin's mask adds -100
to cross-region logits, here they are excluded exactly (weight 0); the bias table may have
any floating dtype (it is read in the compute precision, float32 or float64, and its
gradient is returned in its own dtype); a map smaller than the window is padded up to one
window (Swin instead shrinks the window; its module wrappers do that before calling), for
windows up to ``max(map size, 32)`` per axis; ``scale`` must be finite.

Backends: ``reference`` (plain PyTorch, autograd), ``cpu`` (C++,
``csrc/window_attention/``: float32, float64, bfloat16, float16; 16-bit inputs on float32
copies), ``triton`` (CUDA, or the
interpreter: float32, float16, bfloat16; windows up to 256 tokens, head_dim up to 256; larger
windows fall back to ``reference`` under automatic selection), ``cuda`` (CUDA C++,
``csrc/window_attention/window_attention_cuda.cu``: float32, float16, bfloat16; tensor cores
for float16/bfloat16 with head_dim up to 128 on sm_80+, SIMT otherwise; windows up to 256
tokens, head_dim up to 256, larger ones fall back to ``reference`` under automatic selection).
Automatic order: ``cpu`` then ``reference`` on CPU, ``triton``, ``cuda``, then ``reference`` on
CUDA (Triton first until GPU timings show the CUDA kernels faster). The fused backends save only
q, k, v, the output and the float32 (float64) logsumexp per query for the backward, which
returns dq, dk, dv and a deterministic gradient of the bias table (no float atomics).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks, _ext
from ._autograd import eager_or_op, first_order_only
from ._dispatch import (ATTENTION_GPU_ORDER, Backend, BackendUnavailableError, OpBackends, get_backend,
                        register)

__all__ = ["window_attention2d", "window_attention2d_reference"]

_TRITON_MAX_TOKENS = 256
_TRITON_MAX_HEAD_DIM = 256
_CUDA_MAX_TOKENS = 256  # window_cuda::kMaxTokens (csrc/window_attention/window_attention_cuda.h)
_CUDA_MAX_HEAD_DIM = 256  # window_cuda::kMaxHeadDim
_LIMITS = {"triton": (_TRITON_MAX_TOKENS, _TRITON_MAX_HEAD_DIM), "cuda": (_CUDA_MAX_TOKENS, _CUDA_MAX_HEAD_DIM)}
_MAX_FREE_WINDOW = 32  # windows larger than the map (padded with absent tokens) up to this size


# =========================================================================================
# Reference: the semantics in plain PyTorch (pad with absent tokens, roll, partition,
# region mask, bias, softmax, merge, roll back).
# =========================================================================================
def relative_position_index(window_size, device=None) -> torch.Tensor:
    """``(N, N)`` flat index into a ``(2wh-1) * (2ww-1)`` table for query row, key column:
    ``(ky - qy + wh - 1) * (2ww - 1) + (kx - qx + ww - 1)`` (key minus query)."""
    wh, ww = window_size
    ys = torch.arange(wh, device=device).repeat_interleave(ww)
    xs = torch.arange(ww, device=device).repeat(wh)
    dy = ys[None, :] - ys[:, None]
    dx = xs[None, :] - xs[:, None]
    return (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)


def _shift_regions(length: int, window: int, shift: int, device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    return (i >= length - window).long() + (i >= length - shift).long() if shift > 0 else torch.zeros_like(i)


def window_attention2d_reference(q, k, v, window_size, shift=(0, 0), rel_pos_bias=None, scale=None):
    """Plain differentiable PyTorch; arguments already validated (pairs for window and shift)."""
    B, H, W, nh, d = q.shape
    wh, ww = window_size
    sh, sw = shift
    if scale is None:
        scale = d ** -0.5
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    nWy, nWx, N = Hp // wh, Wp // ww, wh * ww
    dev = q.device

    def pad_roll_partition(t):
        t = F.pad(t.to(ct), (0, 0, 0, 0, 0, Wp - W, 0, Hp - H))
        t = torch.roll(t, shifts=(-sh, -sw), dims=(1, 2))
        t = t.view(B, nWy, wh, nWx, ww, nh, d).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(B, nWy, nWx, nh, N, d)

    qw, kw, vw = pad_roll_partition(q), pad_roll_partition(k), pad_roll_partition(v)

    present = torch.zeros(Hp, Wp, dtype=torch.bool, device=dev)
    present[:H, :W] = True
    present = torch.roll(present, shifts=(-sh, -sw), dims=(0, 1))
    region = _shift_regions(Hp, wh, sh, dev)[:, None] * 3 + _shift_regions(Wp, ww, sw, dev)[None, :]

    def windows2d(t):
        return t.view(nWy, wh, nWx, ww).permute(0, 2, 1, 3).reshape(nWy, nWx, N)

    present_w, region_w = windows2d(present), windows2d(region)
    allowed = (region_w[..., :, None] == region_w[..., None, :]) & present_w[..., None, :]
    # An absent query keeps itself so its (discarded) softmax row is finite.
    allowed = allowed | torch.eye(N, dtype=torch.bool, device=dev)

    logits = torch.matmul(qw, kw.transpose(-1, -2)) * scale  # (B, nWy, nWx, nh, N, N)
    if rel_pos_bias is not None:
        table = rel_pos_bias.to(ct).reshape(rel_pos_bias.shape[0], -1)
        logits = logits + table[:, relative_position_index((wh, ww), dev)]
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    # An excluded key (weight 0) takes no part, where a matmul would give 0 * inf = NaN for a
    # NaN or inf value: the matmul runs on the finite values, and indicator products add the
    # non-finite ones back for allowed keys (IEEE: NaN for NaN, or inf at weight 0; +-inf for
    # +-inf at weight > 0). No data-dependent branch (torch.compile fullgraph).
    finite = torch.isfinite(vw)
    out = torch.matmul(attn, torch.where(finite, vw, vw.new_zeros(())))  # (B, nWy, nWx, nh, N, d)
    with torch.no_grad():
        ok = allowed[None, :, :, None].to(ct)
        pos = ok * (attn > 0).to(ct)
        nan_count = torch.matmul(ok, vw.isnan().to(ct)) + torch.matmul(ok - pos, vw.isinf().to(ct))
        pinf = torch.matmul(pos, vw.isposinf().to(ct))
        ninf = torch.matmul(pos, vw.isneginf().to(ct))
        fix = (torch.where(nan_count > 0, float("nan"), 0.0) + torch.where(pinf > 0, float("inf"), 0.0)
               + torch.where(ninf > 0, float("-inf"), 0.0)).to(ct)
    out = out + fix

    out = out.view(B, nWy, nWx, nh, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, nh, d)
    out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :H, :W].to(q.dtype).contiguous()


# =========================================================================================
# Launchers
# =========================================================================================
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_fwd_launch(q, k, v, bias, window_size, shift, scale):
    from .kernels import window_attention as kern

    return kern.forward(q, k, v, bias, tuple(window_size), tuple(shift), scale)


def _triton_bwd_launch(grad_out, q, k, v, out, lse, bias, window_size, shift, scale, bias_grad):
    from .kernels import window_attention as kern

    return kern.backward(grad_out, q, k, v, out, lse, bias, tuple(window_size), tuple(shift), scale, bias_grad)


# =========================================================================================
# Op registration (opaque ops with fake impls, so torch.compile sees shapes)
# =========================================================================================
def _fake_fwd(q, k, v, rel_pos_bias, window_size, shift, scale):
    B, H, W, nh, d = q.shape
    out = q.new_empty((B, H, W, nh, d))
    lse = q.new_empty((B, H, W, nh), dtype=_compute_dtype(q.dtype))
    return out, lse


def _fake_bwd(grad_out, q, k, v, out, lse, rel_pos_bias, window_size, shift, scale, bias_grad):
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    if rel_pos_bias is not None and bias_grad:
        db = rel_pos_bias.new_empty(rel_pos_bias.shape)
    else:
        db = q.new_empty((0,), dtype=_compute_dtype(q.dtype))
    return dq, dk, dv, db


if _ext.has_op("window_attention2d_fwd"):
    torch.library.register_fake("alterops::window_attention2d_fwd")(_fake_fwd)
if _ext.has_op("window_attention2d_bwd"):
    torch.library.register_fake("alterops::window_attention2d_bwd")(_fake_bwd)


@torch.library.custom_op("alterops::window_attention2d_fwd_triton", mutates_args=())
def _window_attention2d_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_bias: Optional[torch.Tensor],
    window_size: list[int], shift: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_fwd_launch(q, k, v, rel_pos_bias, window_size, shift, scale)


_window_attention2d_fwd_triton.register_fake(_fake_fwd)


@torch.library.custom_op("alterops::window_attention2d_bwd_triton", mutates_args=())
def _window_attention2d_bwd_triton(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, rel_pos_bias: Optional[torch.Tensor], window_size: list[int], shift: list[int],
    scale: float, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_bwd_launch(grad_out, q, k, v, out, lse, rel_pos_bias, window_size, shift, scale, bias_grad)


_window_attention2d_bwd_triton.register_fake(_fake_bwd)


# eager calls run the Triton launchers themselves (alterops._autograd.direct_call_ok)
_TRITON_FWD = eager_or_op(_triton_fwd_launch, "window_attention2d_fwd_triton")
_TRITON_BWD = eager_or_op(_triton_bwd_launch, "window_attention2d_bwd_triton")

_OPS = {
    # cpu and cuda share the ops: the dispatcher picks the kernel by device
    "cpu": (lambda: torch.ops.alterops.window_attention2d_fwd, lambda: torch.ops.alterops.window_attention2d_bwd),
    "cuda": (lambda: torch.ops.alterops.window_attention2d_fwd, lambda: torch.ops.alterops.window_attention2d_bwd),
    "triton": (lambda: _TRITON_FWD, lambda: _TRITON_BWD),
}


# =========================================================================================
# autograd.Function
# =========================================================================================
class _WindowAttention2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_pos_bias, window_size, shift, scale, backend):
        fwd = _OPS[backend][0]()
        table = None
        if rel_pos_bias is not None:
            table = rel_pos_bias.detach().to(_compute_dtype(q.dtype)).contiguous()
        out, lse = fwd(q, k, v, table, list(window_size), list(shift), float(scale))
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.window_size, ctx.shift, ctx.scale, ctx.backend = list(window_size), list(shift), float(scale), backend
        ctx.backend_name = backend
        ctx.bias_dtype = rel_pos_bias.dtype if rel_pos_bias is not None else None
        return out

    @staticmethod
    @first_order_only("window_attention2d")
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        bwd = _OPS[ctx.backend][1]()
        bias_grad = table is not None and ctx.needs_input_grad[3]
        dq, dk, dv, db = bwd(grad_out, q, k, v, out, lse, table, ctx.window_size, ctx.shift, ctx.scale, bias_grad)
        dbias = db.to(ctx.bias_dtype) if bias_grad else None
        return dq, dk, dv, dbias, None, None, None, None


# =========================================================================================
# Public op
# =========================================================================================
_TABLE = register(OpBackends(
    op="window_attention2d",
    backends={
        "reference": Backend(),
        "cpu": Backend(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                       ops=("window_attention2d_fwd", "window_attention2d_bwd")),
        "triton": Backend(dtypes=(torch.float32, torch.float16, torch.bfloat16)),
        "cuda": Backend(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                        ops=("window_attention2d_fwd", "window_attention2d_bwd")),
    },
    auto_cuda=("triton", "cuda", "reference"),
    auto_why=ATTENTION_GPU_ORDER,
    auto_cpu=("cpu", "reference"),
))


def _validate(q, k, v, window_size, shift, rel_pos_bias, scale):
    layout = "(B, H, W, heads, head_dim)"
    _checks.tensor("q", q, ndim=5, layout=layout)
    _checks.tensor("k", k, ndim=5, layout=layout)
    _checks.tensor("v", v, ndim=5, layout=layout)
    _checks.same(("q", "k", "v"), (q, k, v))
    wh, ww = _checks.pair("window_size", window_size, minimum=1)
    sh, sw = _checks.pair("shift", shift, minimum=0)
    H, W = q.shape[1:3]
    if wh > max(H, _MAX_FREE_WINDOW) or ww > max(W, _MAX_FREE_WINDOW):
        raise ValueError(f"window_size must be <= max(map size, {_MAX_FREE_WINDOW}) per axis, got "
                         f"window_size={window_size!r} for a {H}x{W} map")
    if sh >= wh or sw >= ww:
        raise ValueError(f"shift must be in [0, window_size) per axis, got shift={shift!r} for "
                         f"window_size={window_size!r}")
    nh = q.shape[3]
    if rel_pos_bias is not None:
        expected = f"({nh} or 1, {2 * wh - 1}, {2 * ww - 1})"
        _checks.tensor("rel_pos_bias", rel_pos_bias, ndim=3, layout=expected)
        if rel_pos_bias.device != q.device:
            raise ValueError(f"rel_pos_bias is on {rel_pos_bias.device} but q is on {q.device}")
        if rel_pos_bias.shape[0] not in (1, nh) or tuple(rel_pos_bias.shape[1:]) != (2 * wh - 1, 2 * ww - 1):
            raise ValueError(f"rel_pos_bias must have shape {expected}, got {tuple(rel_pos_bias.shape)}")
    if scale is None:
        scale = q.shape[4] ** -0.5
    else:
        scale = _checks.number("scale", scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")
    return (wh, ww), (sh, sw), scale


def window_attention2d(q, k, v, window_size, *, shift=0, rel_pos_bias=None, scale=None, backend=None):
    """Swin (shifted-)window multi-head self-attention, fused.

    Args:
        q, k, v: ``(B, H, W, heads, head_dim)``, same shape, dtype and device; any strides.
        window_size: int or ``(wh, ww)``, >= 1. H and W need not be multiples: the map is padded
            at the bottom/right with absent tokens (never attended to, no output).
        shift: int or ``(sh, sw)`` in ``[0, window)``: Swin's cyclic shift (roll by ``-shift``,
            region mask computed on the padded size, roll back by ``+shift``).
        rel_pos_bias: optional table ``(heads or 1, 2wh-1, 2ww-1)``; the logit of query ``p``
            and key ``p'`` in one window gets ``table[h, dy + wh-1, dx + ww-1]``,
            ``(dy, dx) = p' - p`` in window coordinates (key minus query). Gets a gradient.
        scale: logit scale, default ``head_dim ** -0.5``.
        backend: ``None`` (auto: cpu then reference on CPU; triton, cuda, then reference on
            CUDA), ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(B, H, W, heads, head_dim)`` contiguous, dtype of ``q``.
    """
    window_size, shift, scale = _validate(q, k, v, window_size, shift, rel_pos_bias, scale)
    name = _TABLE.select(backend, q.device, q.dtype)
    if name in _LIMITS:
        wh, ww = window_size
        max_tokens, max_head_dim = _LIMITS[name]
        if wh * ww > max_tokens or q.shape[4] > max_head_dim:
            if backend is not None or get_backend() is not None:
                raise BackendUnavailableError(
                    f"window_attention2d: the {name!r} backend handles windows of up to "
                    f"{max_tokens} tokens and head_dim up to {max_head_dim}, got "
                    f"window {window_size} and head_dim {q.shape[4]}")
            name = "reference"
    if name == "reference":
        return window_attention2d_reference(q, k, v, window_size, shift, rel_pos_bias, scale)
    return _WindowAttention2dFn.apply(q, k, v, rel_pos_bias, window_size, shift, scale, name)
