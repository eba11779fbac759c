"""Spatial smoothing: ``box_blur2d`` and ``tanh_blur2d`` ("Blurs Behave Like Ensembles").

Module order: reference, launchers, op registration, ``autograd.Function``, public functions.

Semantics (``docs/semantics.md``). For ``x`` of shape ``(B, C, H, W)``, a kernel ``(kh, kw)``,
strides ``(sh, sw)`` and padding ``(top, bottom, left, right)``::

    y[b, c, i, j] = 1/(kh*kw) * sum_{a<kh, e<kw} P[b, c, i*sh + a, j*sw + e]

where ``P`` is ``f(x)`` padded per ``pad_mode`` (``"zeros"``: zeros, so the divisor stays
``kh*kw`` like ``count_include_pad=True``; ``"replicate"``/``"reflect"``: as ``F.pad``), and
``f`` is the identity (``box_blur2d``) or ``relu(tau * tanh(x / tau))`` (``tanh_blur2d``; without
the ReLU for ``relu=False``). The output is ``(B, C, Ho, Wo)`` with
``Ho = (H + top + bottom - kh) // sh + 1`` (likewise ``Wo``).

Decisions where the contract is open:

* ``padding`` int ``p``: ``p`` on every side; pair ``(ph, pw)``: per axis, both sides;
  ``"same"``: ``(k-1)//2`` before and ``k//2`` after on each axis (output ``H x W`` at stride
  1, ``ceil(H/s)`` at stride ``s``). Any padding from 0 to ``max(input size, 32)`` per axis
  (also what ``"same"`` gives) is accepted (no ``<= k/2`` limit as in ``F.avg_pool2d``); ``"reflect"`` needs padding
  ``<`` the input size on that axis, as ``F.pad``. ``tau`` must be finite and ``> 0``.
* ``kernel_size``/``stride`` are ints or pairs, ``>= 1``; the kernel must fit in the padded
  map (``H + top + bottom >= kh``). ``H, W >= 1``.
* The compiled backends read a channels-last or otherwise strided ``x`` through one contiguous
  copy (``x`` is never written) and return a contiguous NCHW output; ``reference`` follows
  PyTorch's layout propagation.
* Half inputs are accumulated in float32, float64 in float64; the output has the input dtype.
  ``tanh`` in the kernels: on ``cpu`` (float32/bfloat16/float16) and ``cuda`` a rational minimax
  approximation with absolute error ``<= 4e-7`` (float64 on ``cpu`` uses ``std::tanh``); on
  ``triton`` ``1 - 2 / (exp(2y) + 1)`` in float32.
* The fused backends save ``x`` for ``tanh_blur2d``'s backward (``tanh`` is recomputed) and
  nothing but the shape for ``box_blur2d``'s. ``box_blur2d`` is linear and its fused backward
  is differentiable again (double backward works); differentiating ``tanh_blur2d``'s fused
  backward raises a ``RuntimeError`` (use ``backend="reference"``).
* The ReLU's derivative at 0 is 0 (as ``torch.relu``).

Backends: ``reference`` (``F.pad`` + ``F.avg_pool2d``, any float dtype, autograd), ``cpu`` (C++,
float32/float64/bfloat16/float16), ``cuda`` (CUDA C++, float32/float16/bfloat16), ``triton``
(float32/float16/bfloat16).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks, _ext
from ._autograd import eager_or_op, first_order_only
from ._dispatch import Backend, OpBackends, register

__all__ = ["box_blur2d", "tanh_blur2d"]

PAD_MODES = ("zeros", "replicate", "reflect")
_PAD_CODE = {m: i for i, m in enumerate(PAD_MODES)}
_F_PAD = {"zeros": "constant", "replicate": "replicate", "reflect": "reflect"}
ACT_NONE, ACT_TANH, ACT_TANH_RELU = 0, 1, 2
_MAX_FREE_PAD = 32  # padding up to this is accepted on any input size


# ---------------------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------------------
def _pads(padding, kernel: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from an int, a pair, or "same"."""
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair of ints or 'same', got {padding!r}")
        kh, kw = kernel
        return ((kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2)
    ph, pw = _checks.pair("padding", padding, minimum=0)
    return (ph, ph, pw, pw)


def _geometry(x, kernel_size, stride, padding, pad_mode):
    """Validate everything; return (kernel, stride, pads, mode)."""
    _checks.tensor("x", x, ndim=4, layout="(B, C, H, W)")
    kernel = _checks.pair("kernel_size", kernel_size, minimum=1)
    strides = _checks.pair("stride", stride, minimum=1)
    _checks.choice("pad_mode", pad_mode, PAD_MODES)
    pads = _pads(padding, kernel)
    H, W = x.shape[-2:]
    if H < 1 or W < 1:
        raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
    if pad_mode == "reflect" and (max(pads[:2]) >= H or max(pads[2:]) >= W):
        raise ValueError(
            f"reflect padding must be < the input size on each axis: padding (top, bottom, left, "
            f"right) = {pads} for an input of size {H}x{W}"
        )
    if max(pads[:2]) > max(H, _MAX_FREE_PAD) or max(pads[2:]) > max(W, _MAX_FREE_PAD):
        raise ValueError(
            f"padding must be <= max(input size, {_MAX_FREE_PAD}) on each axis, got padding (top, bottom, "
            f"left, right) = {pads} (kernel_size {kernel}) for an input of size {H}x{W}"
        )
    if H + pads[0] + pads[1] < kernel[0] or W + pads[2] + pads[3] < kernel[1]:
        raise ValueError(
            f"kernel_size {kernel} is larger than the padded input "
            f"({H + pads[0] + pads[1]}x{W + pads[2] + pads[3]})"
        )
    # A stride past the last window start gives one output row/column either way.
    strides = (min(strides[0], H + pads[0] + pads[1] - kernel[0] + 1),
               min(strides[1], W + pads[2] + pads[3] - kernel[1] + 1))
    return kernel, strides, pads, pad_mode


def _out_hw(H, W, kernel, stride, pads):
    return ((H + pads[0] + pads[1] - kernel[0]) // stride[0] + 1,
            (W + pads[2] + pads[3] - kernel[1]) // stride[1] + 1)


# ---------------------------------------------------------------------------------------
# Reference (plain, differentiable PyTorch: the spec in code)
# ---------------------------------------------------------------------------------------
def _pointwise_reference(x, act: int, tau: float):
    if act == ACT_NONE:
        return x
    y = tau * torch.tanh(x / tau)
    return torch.relu(y) if act == ACT_TANH_RELU else y


def blur2d_reference(x, kernel, stride, pads, pad_mode, act=ACT_NONE, tau=10.0):
    """``f(x)`` padded per ``pad_mode`` then averaged over every window (divisor kh*kw)."""
    y = _pointwise_reference(x, act, tau)
    top, bottom, left, right = pads
    if any(pads):
        if pad_mode == "zeros":
            y = F.pad(y, (left, right, top, bottom))
        else:
            y = F.pad(y, (left, right, top, bottom), mode=_F_PAD[pad_mode])
    return F.avg_pool2d(y, kernel, stride, 0)


# ---------------------------------------------------------------------------------------
# Launchers: Triton (custom ops wrapping the kernels in alterops.kernels.blur)
# ---------------------------------------------------------------------------------------
def _blur2d_forward_triton_launch(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                                  pad_mode: int, act: int, tau: float) -> torch.Tensor:
    from .kernels import blur as kernels

    x = x.contiguous()
    B, C, H, W = x.shape
    Ho, Wo = _out_hw(H, W, kernel_size, stride, padding)
    out = _checks.empty((B, C, Ho, Wo), like=x)
    kernels.launch_forward(x, out, kernel_size, stride, padding, pad_mode, act, tau)
    return out


_blur2d_forward_triton = torch.library.custom_op("alterops::blur2d_forward_triton", mutates_args=())(
    _blur2d_forward_triton_launch)


@_blur2d_forward_triton.register_fake
def _(x, kernel_size, stride, padding, pad_mode, act, tau):
    B, C, H, W = x.shape
    Ho, Wo = _out_hw(H, W, kernel_size, stride, padding)
    return x.new_empty((B, C, Ho, Wo))


def _blur2d_backward_triton_launch(grad_out: torch.Tensor, x: Optional[torch.Tensor], input_hw: list[int],
                                   kernel_size: list[int], stride: list[int], padding: list[int], pad_mode: int,
                                   act: int, tau: float) -> torch.Tensor:
    from .kernels import blur as kernels

    grad_out = grad_out.contiguous()
    if x is not None:
        x = x.contiguous()
    B, C = grad_out.shape[:2]
    grad_x = _checks.empty((B, C, input_hw[0], input_hw[1]), like=grad_out)
    kernels.launch_backward(grad_out, x, grad_x, kernel_size, stride, padding, pad_mode, act, tau)
    return grad_x


_blur2d_backward_triton = torch.library.custom_op("alterops::blur2d_backward_triton", mutates_args=())(
    _blur2d_backward_triton_launch)


@_blur2d_backward_triton.register_fake
def _(grad_out, x, input_hw, kernel_size, stride, padding, pad_mode, act, tau):
    B, C = grad_out.shape[:2]
    return grad_out.new_empty((B, C, input_hw[0], input_hw[1]))


# ---------------------------------------------------------------------------------------
# Op registration: fake impls of the compiled ops (schemas live in csrc/blur/blur_binding.cpp)
# ---------------------------------------------------------------------------------------
if _ext.has_op("blur2d_forward"):

    @torch.library.register_fake("alterops::blur2d_forward")
    def _(x, kernel_size, stride, padding, pad_mode, act, tau):
        B, C, H, W = x.shape
        Ho, Wo = _out_hw(H, W, kernel_size, stride, padding)
        return x.new_empty((B, C, Ho, Wo))


if _ext.has_op("blur2d_backward"):

    @torch.library.register_fake("alterops::blur2d_backward")
    def _(grad_out, x, input_hw, kernel_size, stride, padding, pad_mode, act, tau):
        B, C = grad_out.shape[:2]
        return grad_out.new_empty((B, C, input_hw[0], input_hw[1]))


# eager calls run the Triton launchers themselves (alterops._autograd.direct_call_ok)
_TRITON_FORWARD = eager_or_op(_blur2d_forward_triton_launch, "blur2d_forward_triton")
_TRITON_BACKWARD = eager_or_op(_blur2d_backward_triton_launch, "blur2d_backward_triton")


def _forward_op(backend: str):
    if backend == "triton":
        return _TRITON_FORWARD
    return torch.ops.alterops.blur2d_forward  # cpu and cuda share the op (per-device kernels)


def _backward_op(backend: str):
    if backend == "triton":
        return _TRITON_BACKWARD
    return torch.ops.alterops.blur2d_backward


# ---------------------------------------------------------------------------------------
# autograd.Function (fused backends)
# ---------------------------------------------------------------------------------------
class _Blur2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend, kernel, stride, pads, mode, act, tau):
        out = _forward_op(backend)(x, kernel, stride, pads, mode, act, tau)
        ctx.params = (backend, kernel, stride, pads, mode, act, tau, (x.shape[-2], x.shape[-1]))
        ctx.backend_name = backend
        if act != ACT_NONE:
            ctx.save_for_backward(x)  # the pointwise derivative needs x; the box blur needs nothing
        return out

    @staticmethod
    def backward(ctx, grad_out):
        backend, kernel, stride, pads, mode, act, tau, hw = ctx.params
        if act == ACT_NONE:  # linear: its backward is a differentiable op too (double backward works)
            grad_x = _BoxBlur2dAdjoint.apply(grad_out, backend, kernel, stride, pads, mode, list(hw))
            return grad_x, None, None, None, None, None, None, None
        return _tanh_blur_backward(ctx, grad_out)


@first_order_only("tanh_blur2d")
def _tanh_blur_backward(ctx, grad_out):
    backend, kernel, stride, pads, mode, act, tau, hw = ctx.params
    x = ctx.saved_tensors[0]
    grad_x = _backward_op(backend)(grad_out, x, list(hw), kernel, stride, pads, mode, act, tau)
    return grad_x, None, None, None, None, None, None, None


class _BoxBlur2dAdjoint(torch.autograd.Function):
    """The box blur's backward (the transposed window sum) as an op whose own backward is the
    box blur again."""

    @staticmethod
    def forward(ctx, grad_out, backend, kernel, stride, pads, mode, hw):
        ctx.params = (backend, kernel, stride, pads, mode)
        return _backward_op(backend)(grad_out, None, hw, kernel, stride, pads, mode, ACT_NONE, 10.0)

    @staticmethod
    def backward(ctx, gg):
        backend, kernel, stride, pads, mode = ctx.params
        return (_Blur2dFunction.apply(gg, backend, kernel, stride, pads, mode, ACT_NONE, 10.0),
                None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def _table(name: str) -> OpBackends:
    return register(OpBackends(
        op=name,
        backends={
            "reference": Backend(),
            "cpu": Backend(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                           ops=("blur2d_forward", "blur2d_backward")),
            "triton": Backend(dtypes=(torch.float32, torch.float16, torch.bfloat16)),
            "cuda": Backend(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                            ops=("blur2d_forward", "blur2d_backward")),
        },
        auto_cuda=("cuda", "triton", "reference"),
        auto_cpu=("cpu", "reference"),
    ))


_BOX_TABLE = _table("box_blur2d")
_TANH_TABLE = _table("tanh_blur2d")


def _run(table, x, kernel_size, stride, padding, pad_mode, act, tau, backend):
    kernel, strides, pads, mode = _geometry(x, kernel_size, stride, padding, pad_mode)
    chosen = table.select(backend, x.device, x.dtype)
    if chosen == "reference":
        return blur2d_reference(x, kernel, strides, pads, mode, act, tau)
    return _Blur2dFunction.apply(x, chosen, list(kernel), list(strides), list(pads), _PAD_CODE[mode], act, tau)


def box_blur2d(x: torch.Tensor, kernel_size=2, stride=1, padding=1, *, pad_mode: str = "zeros",
               backend: Optional[str] = None) -> torch.Tensor:
    """Depthwise box filter: the mean over each ``kh x kw`` window of the padded map.

    Args:
        x: ``(B, C, H, W)`` floating-point feature map (any strides; never written).
        kernel_size: int or ``(kh, kw)``, ``>= 1``. Default 2 (the paper's blur).
        stride: int or ``(sh, sw)``, ``>= 1``.
        padding: int, ``(ph, pw)`` (both sides of each axis) or ``"same"`` (``(k-1)//2`` before,
            ``k//2`` after). Default 1: with the defaults this is ``AvgPool2d(2, 1, 1)`` and the
            output is ``(H+1) x (W+1)``.
        pad_mode: ``"zeros"`` (divisor stays ``kh*kw``, i.e. ``count_include_pad=True``),
            ``"replicate"`` or ``"reflect"`` (padding must be < the size on that axis).
        backend: ``None`` (auto), ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(B, C, Ho, Wo)`` in ``x.dtype``, ``Ho = (H + top + bottom - kh) // sh + 1``.
        Differentiable in ``x``.
    """
    return _run(_BOX_TABLE, x, kernel_size, stride, padding, pad_mode, ACT_NONE, 10.0, backend)


def tanh_blur2d(x: torch.Tensor, tau: float = 10.0, kernel_size=2, stride=1, padding=1, *, relu: bool = True,
                pad_mode: str = "zeros", backend: Optional[str] = None) -> torch.Tensor:
    """The paper's ``TanhBlurBlock`` in one pass: ``box_blur2d(relu(tau * tanh(x / tau)))``.

    Order as in the paper: scaled tanh, then ReLU (skipped for ``relu=False``), then padding
    (of the activated map) and the box mean. ``tau > 0`` (default 10). The other arguments
    and the output are those of :func:`box_blur2d`. Differentiable in ``x`` (the fused
    backends save ``x`` and recompute ``tanh`` in the backward).
    """
    tau = _checks.number("tau", tau, positive=True)
    if math.isinf(tau):
        raise ValueError(f"tau must be finite, got {tau!r}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {relu!r}")
    act = ACT_TANH_RELU if relu else ACT_TANH
    return _run(_TANH_TABLE, x, kernel_size, stride, padding, pad_mode, act, tau, backend)
