"""Fourier and variance statistics of feature maps ("How Do Vision Transformers Work?", §4).

Ops (feature maps ``x`` of shape ``(B, C, H, W)``; float16, bfloat16, float32 or float64 input;
half inputs are accumulated in float32; results are float32, or float64 for float64 input)::

    delta_log_amplitude(x, eps=1e-6)          -> (H - H//2,)  Δ log amplitude on the diagonal
    log_amplitude_spectrum(x, eps=1e-6)       -> (H, W)       mean log amplitude, fftshifted
    radial_log_amplitude(x, bins=None, eps)   -> (bins,)      per ring of radial frequency, minus DC
    feature_variance(x)                       -> ()           mean over (b, c) of the unbiased var over (H, W)
    frequency_noise(shape, freq, width, eps)  -> noise        band-limited ±eps sign noise
    feature_statistics(maps, stats=...)       -> per-map dicts, one launch per op where possible

``delta_log_amplitude`` is the paper's procedure (``fourier_analysis.ipynb``): ``A[u, v] = mean
over b, c of log(|fft2(x)[u, v]| + eps)`` (log before averaging), shifted so the zero frequency
sits at ``(H//2, W//2)``; the main diagonal from the centre to the bottom-right corner minus its
first element. After the shift that half-diagonal is exactly the unshifted bins ``(k, k)`` for
``k = 0 .. H - 1 - H//2``, so entry ``k`` is ``A[k, k] - A[0, 0]``. The fused backends compute
only those bins: bin ``(k, k)`` of a square ``N x N`` map is the 1-D DFT of the anti-diagonal
sums ``a_s = sum_{(y + x) mod N = s} x[y, x]``, so each map is read once, without any FFT;
per-plane partial sums of the logs are reduced in a fixed order (deterministic). The paper
plots entry ``k`` at ``k / (len - 1) * π`` (the last entry is labelled 1.0π; its true per-axis
frequency is ``2πk/N``).

Backends (``backend=None`` picks automatically):

======================  =========  ====================  ===================  ============
op                      reference  cpu (C++)             cuda (C++)           triton
======================  =========  ====================  ===================  ============
delta_log_amplitude     all        f16 bf16 f32 f64      f16 bf16 f32 f64     f16 bf16 f32
feature_variance        all        f16 bf16 f32 f64      f16 bf16 f32 f64     f16 bf16 f32
log_amplitude_spectrum  all        -                     -                    -
radial_log_amplitude    all        -                     -                    -
======================  =========  ====================  ===================  ============

The fused ops take a list of maps (``feature_statistics`` runs every layer of a model in one
C++ call / one CUDA launch per op). Gradients: the reference is differentiated by autograd;
the fused backends' backward is the closed form in plain PyTorch (recomputing the diagonal
bins from the saved input). Decisions where the contract is silent: an empty batch
(``B * C == 0``) gives NaN (a mean over nothing) and empty gradients; ``feature_variance``
needs ``H * W >= 2``; the Triton kernel of ``delta_log_amplitude`` handles ``H <= 64`` and the
CUDA kernel ``H <= 512`` (256 for float64); larger maps take the same closed form (anti-diagonal
sums and a small DFT matrix) in torch ops on those backends.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from . import _checks, _ext
from ._autograd import eager_or_op, needs_grad
from ._dispatch import Backend, OpBackends, register

__all__ = [
    "delta_log_amplitude",
    "log_amplitude_spectrum",
    "radial_log_amplitude",
    "feature_variance",
    "frequency_noise",
    "feature_statistics",
    "delta_log_amplitude_reference",
    "feature_variance_reference",
]

_FLOAT_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_TRITON = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_SIZE = 64  # delta_log_amplitude on Triton: H = W <= 64 in the kernel


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# =========================================================================================
# Reference: the paper's procedures in plain PyTorch (differentiable).
# =========================================================================================
def _mean_log_amplitude(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(H, W)``: mean over b, c of log(|fft2(x)| + eps), unshifted."""
    if x.numel() == 0:  # a mean over no planes (kept in the graph for empty gradients)
        return torch.full(x.shape[2:], float("nan"), dtype=_acc_dtype(x.dtype), device=x.device) + 0 * x.sum()
    f = torch.fft.fft2(x.to(_acc_dtype(x.dtype)))
    return torch.log(f.abs() + eps).mean(dim=(0, 1))


def log_amplitude_spectrum_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return torch.fft.fftshift(_mean_log_amplitude(x, eps), dim=(0, 1))


def delta_log_amplitude_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fft2 → log(|.| + eps) → mean over (b, c) → fftshift → half diagonal → minus its first."""
    H = x.shape[2]
    a = log_amplitude_spectrum_reference(x, eps)
    d = torch.diagonal(a)[H // 2:]
    return d - d[0]


def radial_log_amplitude_reference(x: torch.Tensor, bins: int, eps: float = 1e-6) -> torch.Tensor:
    H, W = x.shape[2], x.shape[3]
    a = _mean_log_amplitude(x, eps)
    ring = _ring_index(H, W, bins, a.device)
    ring = torch.where(ring >= 0, ring, bins)  # frequencies beyond the last ring go to a dropped slot
    sums = torch.zeros(bins + 1, dtype=a.dtype, device=a.device).index_add(0, ring, a.reshape(-1))[:bins]
    counts = torch.zeros(bins + 1, dtype=a.dtype, device=a.device).index_add(
        0, ring, torch.ones(H * W, dtype=a.dtype, device=a.device))[:bins]
    return sums / counts - a[0, 0]


def _ring_index(H: int, W: int, bins: int, device) -> torch.Tensor:
    """Flat (H*W,) ring of every unshifted frequency: ``round(r * (bins - 1))`` with
    ``r = sqrt((ωy/π)² + (ωx/π)²)``; ``-1`` where ``r`` lies beyond the last ring (> 1 + half a ring)."""
    fy = torch.fft.fftfreq(H, device=device, dtype=torch.float64).abs() * 2.0
    fx = torch.fft.fftfreq(W, device=device, dtype=torch.float64).abs() * 2.0
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).reshape(-1)
    if bins == 1:
        return torch.where(r <= 0.5, 0, -1).long()
    ring = torch.round(r * (bins - 1)).long()
    return torch.where(ring <= bins - 1, ring, -1)


def feature_variance_reference(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] * x.shape[1] == 0:
        return torch.full((), float("nan"), dtype=_acc_dtype(x.dtype), device=x.device) + 0 * x.sum()
    return x.to(_acc_dtype(x.dtype)).var(dim=(2, 3), unbiased=True).mean()


# =========================================================================================
# Closed forms shared by the fused backends' backward (and Triton's large-map path).
# =========================================================================================
_TRIG_CACHE: dict = {}


def _diag_trig(n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos, sin of 2πks/n as ``(K, n)`` and the ``(n*n,)`` anti-diagonal index (y + x) mod n."""
    key = (n, dtype, str(device))
    compiling = torch.compiler.is_compiling()  # no global mutation while tracing
    hit = None if compiling else _TRIG_CACHE.get(key)
    if hit is None:
        k = torch.arange(n - n // 2, dtype=torch.int64)
        s = torch.arange(n, dtype=torch.int64)
        ang = (2.0 * math.pi / n) * ((k[:, None] * s[None, :]) % n).double()
        idx = ((s[:, None] + s[None, :]) % n).reshape(-1)
        hit = (ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device), idx.to(device))
        if not compiling:
            if len(_TRIG_CACHE) > 64:
                _TRIG_CACHE.clear()
            _TRIG_CACHE[key] = hit
    return hit


def _diag_bins(x: torch.Tensor, fixed_order: bool = False):
    """Per plane: anti-diagonal sums ``a`` (P, n) and the bins' real/imag parts (P, K); with
    ``fixed_order`` the bins are summed by ``_rowdot`` (the same bits for any thread count)."""
    B, C, n, _ = x.shape
    acc = _acc_dtype(x.dtype)
    cos, sin, idx = _diag_trig(n, acc, x.device)
    planes = x.reshape(B * C, n * n).to(acc)
    a = torch.zeros(B * C, n, dtype=acc, device=x.device).index_add_(1, idx, planes)
    if fixed_order:
        return a, _rowdot(a, cos), -_rowdot(a, sin)
    return a, a @ cos.T, -(a @ sin.T)


def _delta_closed_form(x: torch.Tensor, eps: float) -> torch.Tensor:
    _, re, im = _diag_bins(x)
    logs = torch.log(torch.sqrt(re * re + im * im) + eps).sum(0) / (x.shape[0] * x.shape[1])
    return logs - logs[0]


def _rowdot(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``a @ m.T`` for ``a`` (P, n) and ``m`` (K, n), each output summed over ``n`` in one fixed
    order by one thread. A BLAS matmul blocks its sums differently for different thread counts,
    so its last bits would depend on ``torch.get_num_threads()``; this does not. Rows go in chunks
    of at most 2**22 products."""
    P, n = a.shape
    K = m.shape[0]
    step = max(1, (1 << 22) // max(1, K * n))
    return torch.cat([(a[i:i + step, None, :] * m[None]).sum(-1) for i in range(0, P, step)]) if P else a.new_zeros(0, K)


def _delta_backward(x: torch.Tensor, grad: torch.Tensor, eps: float) -> torch.Tensor:
    B, C, n, _ = x.shape
    P = B * C
    if P == 0:
        return torch.zeros_like(x)
    acc = _acc_dtype(x.dtype)
    cos, sin, idx = _diag_trig(n, acc, x.device)
    fixed_order = x.device.type == "cpu"  # bitwise the same for any thread count (the CPU backend's promise)
    _, re, im = _diag_bins(x, fixed_order)
    amp = torch.sqrt(re * re + im * im)
    g = grad.to(acc)
    # Δ_0 ≡ 0, and every Δ_k subtracts L_0: the weight of L_0 is -sum_{k>=1} g_k.
    weight = torch.cat([-g[1:].sum().reshape(1), g[1:]])
    denom = amp * (amp + eps)
    coef = torch.where(amp > 0, weight / (P * denom.clamp_min(torch.finfo(acc).tiny)), torch.zeros_like(amp))
    # d|F|/da_s = (re c_ks - im s_ks) / |F|
    if fixed_order:
        grad_a = _rowdot(coef * re, cos.T.contiguous()) - _rowdot(coef * im, sin.T.contiguous())
    else:
        grad_a = (coef * re) @ cos - (coef * im) @ sin
    return grad_a[:, idx].reshape(B, C, n, n).to(x.dtype)


def _variance_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    if B * C == 0:
        return torch.zeros_like(x)
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    scale = grad.to(acc) * 2.0 / ((H * W - 1) * B * C)
    return (scale * (xa - xa.mean(dim=(2, 3), keepdim=True))).to(x.dtype)


# =========================================================================================
# Launchers: Triton (one launch per map, then a fixed-order sum of per-program partials).
# =========================================================================================
def _delta_triton_launch(x: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[2]
    P = x.shape[0] * x.shape[1]
    out_dtype = _acc_dtype(x.dtype)
    if P == 0:
        return torch.full((n - n // 2,), float("nan"), dtype=out_dtype, device=x.device)
    if n > TRITON_MAX_SIZE:
        return _delta_closed_form(x, eps).to(out_dtype)
    from .kernels import statistics as kern

    return kern.delta_log_amplitude(x.contiguous(), eps, _checks.empty)


def _variance_triton_launch(x: torch.Tensor) -> torch.Tensor:
    P = x.shape[0] * x.shape[1]
    out_dtype = _acc_dtype(x.dtype)
    if P == 0:
        return torch.full((), float("nan"), dtype=out_dtype, device=x.device)
    from .kernels import statistics as kern

    return kern.feature_variance(x.contiguous(), _checks.empty)


# =========================================================================================
# Op registration: fake impls of the C++ ops, custom ops for the Triton launchers.
# =========================================================================================
def _fake_delta_list(xs, eps):
    return [x.new_empty((x.shape[2] - x.shape[2] // 2,), dtype=_acc_dtype(x.dtype)) for x in xs]


def _fake_variance_list(xs):
    return [x.new_empty((), dtype=_acc_dtype(x.dtype)) for x in xs]


if _ext.has_op("delta_log_amplitude_fwd"):
    torch.library.register_fake("alterops::delta_log_amplitude_fwd")(_fake_delta_list)
if _ext.has_op("feature_variance_fwd"):
    torch.library.register_fake("alterops::feature_variance_fwd")(_fake_variance_list)


@torch.library.custom_op("alterops::delta_log_amplitude_triton", mutates_args=())
def _delta_log_amplitude_triton(x: torch.Tensor, eps: float) -> torch.Tensor:
    return _delta_triton_launch(x, eps)


@_delta_log_amplitude_triton.register_fake
def _(x, eps):
    return x.new_empty((x.shape[2] - x.shape[2] // 2,), dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("alterops::feature_variance_triton", mutates_args=())
def _feature_variance_triton(x: torch.Tensor) -> torch.Tensor:
    return _variance_triton_launch(x)


@_feature_variance_triton.register_fake
def _(x):
    return x.new_empty((), dtype=_acc_dtype(x.dtype))


# eager calls run the Triton launchers themselves (alterops._autograd.direct_call_ok)
_TRITON_DELTA = eager_or_op(_delta_triton_launch, "delta_log_amplitude_triton")
_TRITON_VARIANCE = eager_or_op(_variance_triton_launch, "feature_variance_triton")


CUDA_MAX_SIZE = {torch.float64: 256}  # delta on CUDA: per-warp shared buffers; 512 for other dtypes


def _fused_delta(backend: str, xs: Sequence[torch.Tensor], eps: float) -> list:
    if backend == "cpu":
        return list(torch.ops.alterops.delta_log_amplitude_fwd(list(xs), eps))
    if backend == "cuda":
        # Maps beyond the kernel's size limit take the same closed form in torch ops.
        small = [i for i, x in enumerate(xs) if x.shape[2] <= CUDA_MAX_SIZE.get(x.dtype, 512)]
        outs: list = [None] * len(xs)
        if small:
            for i, o in zip(small, torch.ops.alterops.delta_log_amplitude_fwd([xs[i] for i in small], eps)):
                outs[i] = o
        for i, x in enumerate(xs):
            if outs[i] is None:
                outs[i] = _delta_closed_form(x, eps).to(_acc_dtype(x.dtype))
        return outs
    return [_TRITON_DELTA(x, eps) for x in xs]


def _fused_variance(backend: str, xs: Sequence[torch.Tensor]) -> list:
    if backend in ("cpu", "cuda"):
        return list(torch.ops.alterops.feature_variance_fwd(list(xs)))
    return [_TRITON_VARIANCE(x) for x in xs]


# =========================================================================================
# autograd.Functions (fused backends): forward = the fused op over a list of maps.
# =========================================================================================
class _DeltaLogAmplitudeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: str, eps: float, *xs):
        ctx.eps = eps
        ctx.save_for_backward(*xs)
        return tuple(_fused_delta(backend, xs, eps))

    @staticmethod
    def backward(ctx, *grads):
        xs = ctx.saved_tensors
        out = [None, None]
        for x, g, need in zip(xs, grads, ctx.needs_input_grad[2:]):
            out.append(_delta_backward(x, g, ctx.eps) if need and g is not None else None)
        return tuple(out)


class _FeatureVarianceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: str, *xs):
        ctx.save_for_backward(*xs)
        return tuple(_fused_variance(backend, xs))

    @staticmethod
    def backward(ctx, *grads):
        xs = ctx.saved_tensors
        out = [None]
        for x, g, need in zip(xs, grads, ctx.needs_input_grad[1:]):
            out.append(_variance_backward(x, g) if need and g is not None else None)
        return tuple(out)


def _apply_delta(backend: str, eps: float, xs) -> list:
    # Without autograd the op is called directly (less per-call overhead; same kernels).
    if needs_grad(*xs):
        return list(_DeltaLogAmplitudeFn.apply(backend, eps, *xs))
    return _fused_delta(backend, xs, eps)


def _apply_variance(backend: str, xs) -> list:
    if needs_grad(*xs):
        return list(_FeatureVarianceFn.apply(backend, *xs))
    return _fused_variance(backend, xs)


# =========================================================================================
# Backend tables, validation and the public functions.
# =========================================================================================
_DELTA = register(OpBackends(
    op="delta_log_amplitude",
    backends={
        "reference": Backend(),
        "cpu": Backend(dtypes=_FLOAT_ALL, ops=("delta_log_amplitude_fwd",)),
        "cuda": Backend(dtypes=_FLOAT_ALL, ops=("delta_log_amplitude_fwd",)),
        "triton": Backend(dtypes=_FLOAT_TRITON),
    },
    auto_cuda=("cuda", "triton", "reference"),
    auto_cpu=("cpu", "reference"),
))
_VARIANCE = register(OpBackends(
    op="feature_variance",
    backends={
        "reference": Backend(),
        "cpu": Backend(dtypes=_FLOAT_ALL, ops=("feature_variance_fwd",)),
        "cuda": Backend(dtypes=_FLOAT_ALL, ops=("feature_variance_fwd",)),
        "triton": Backend(dtypes=_FLOAT_TRITON),
    },
    auto_cuda=("cuda", "triton", "reference"),
    auto_cpu=("cpu", "reference"),
))
_SPECTRUM = register(OpBackends(op="log_amplitude_spectrum", backends={"reference": Backend()},
                                auto_cuda=("reference",), auto_cpu=("reference",)))
_RADIAL = register(OpBackends(op="radial_log_amplitude", backends={"reference": Backend()},
                              auto_cuda=("reference",), auto_cpu=("reference",)))


_TABLES = {t.op: t for t in (_DELTA, _VARIANCE, _SPECTRUM, _RADIAL)}


def _check_map(name: str, x) -> torch.Tensor:
    return _checks.tensor(name, x, ndim=4, layout="(B, C, H, W)")


def _check_square(name: str, x: torch.Tensor) -> None:
    if x.shape[2] != x.shape[3]:
        raise ValueError(
            f"{name} must be a square map (H == W) for delta_log_amplitude, got shape {tuple(x.shape)}; "
            "use radial_log_amplitude or log_amplitude_spectrum for non-square maps"
        )
    if x.shape[2] < 1:
        raise ValueError(f"{name} must have H = W >= 1, got shape {tuple(x.shape)}")


def _check_variance_size(name: str, x: torch.Tensor) -> None:
    if x.shape[2] * x.shape[3] < 2:
        raise ValueError(
            f"{name} must have H * W >= 2 for an unbiased variance, got shape {tuple(x.shape)}"
        )


def _check_eps(eps) -> float:
    value = _checks.number("eps", eps)
    if not value >= 0.0 or math.isinf(value):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def delta_log_amplitude(x: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """The paper's Δ log amplitude of a square feature map, shape ``(H - H//2,)``.

    ``x``: ``(B, C, H, H)`` float16/bfloat16/float32/float64, any strides. Entry ``k`` is
    ``A[k, k] - A[0, 0]`` with ``A[u, v] = mean over b, c of log(|DFT2(x)[u, v]| + eps)`` (log
    before averaging; unnormalised DFT). Entry 0 is 0; the last entry is the paper's
    "high-frequency" value (plotted at 1.0π). Result float32 (float64 for float64 input).
    Non-square maps raise ``ValueError``. Differentiable in ``x``.
    """
    x = _check_map("x", x)
    _check_square("x", x)
    eps = _check_eps(eps)
    chosen = _DELTA.select(backend, x.device, x.dtype)
    if chosen == "reference":
        return delta_log_amplitude_reference(x, eps)
    return _apply_delta(chosen, eps, [x])[0]


def feature_variance(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mean over (b, c) of the unbiased variance over (H, W) (divides by ``H*W - 1``), a 0-dim tensor.

    ``x``: ``(B, C, H, W)`` with ``H * W >= 2``, any float dtype and strides. The fused backends
    read each map once (two-pass per block of a plane while it is in cache, blocks merged with
    Chan's formula; float32 accumulation for half inputs). Result float32 (float64 for float64
    input). Differentiable in ``x``.
    """
    x = _check_map("x", x)
    _check_variance_size("x", x)
    chosen = _VARIANCE.select(backend, x.device, x.dtype)
    if chosen == "reference":
        return feature_variance_reference(x)
    return _apply_variance(chosen, [x])[0]


def log_amplitude_spectrum(x: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """``(H, W)``: mean over (b, c) of ``log(|fft2(x)| + eps)``, shifted so that the zero
    frequency sits at ``(H//2, W//2)`` (``torch.fft.fftshift``). Any H, W; reference backend
    only (``torch.fft``). Result float32 (float64 for float64 input)."""
    x = _check_map("x", x)
    eps = _check_eps(eps)
    _SPECTRUM.select(backend, x.device, x.dtype)
    return log_amplitude_spectrum_reference(x, eps)


def radial_log_amplitude(x: torch.Tensor, bins: int | None = None, eps: float = 1e-6, *,
                         backend: str | None = None) -> torch.Tensor:
    """Mean log amplitude per ring of normalised radial frequency, minus its value at frequency 0.

    ``x``: ``(B, C, H, W)``, any H, W. With ``A`` the (unshifted) mean over (b, c) of
    ``log(|fft2(x)| + eps)``, every frequency ``(ωy, ωx)`` (angular, in ``[-π, π]``) has the
    normalised radius ``r = sqrt((ωy/π)² + (ωx/π)²)``; ring ``i`` (``i = 0 .. bins-1``, centre
    ``i / (bins - 1)``, so the last ring is the per-axis edge of the spectrum) collects the
    frequencies with ``round(r * (bins - 1)) == i``; corners beyond the last ring are left out.
    Entry ``i`` is the mean of ``A`` over ring ``i`` minus ``A[0, 0]`` (the DC bin). ``bins``
    defaults to ``min(H, W) // 2 + 1`` (then ring 0 holds only the DC bin of a square map). An
    empty ring (possible with many bins on a small map) gives NaN. Reference backend only.
    """
    x = _check_map("x", x)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
    eps = _check_eps(eps)
    if bins is None:
        bins = min(x.shape[2], x.shape[3]) // 2 + 1
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be an int in [1, {MAX_BINS}], got {bins!r}")
    _RADIAL.select(backend, x.device, x.dtype)
    return radial_log_amplitude_reference(x, bins, eps)


def frequency_noise(shape, freq: float, width: float, eps: float = 1.0, *, generator: torch.Generator | None = None,
                    dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Random ``±eps`` sign noise restricted to a square annulus of frequencies.

    ``shape``: ``(..., H, W)`` (at least 2 dims; the band is applied over the last two).
    ``δ = eps * sign(randn(shape))``; ``F = fft2(δ)``; the coefficient at angular frequency
    ``(ωy, ωx)`` (``ω = 2π * torch.fft.fftfreq(n)``, so ``|ω|`` runs over ``[0, π]``; the Nyquist
    bin of an even size has ``|ω| = π``) is kept, with its amplitude and phase, iff

        ``freq - width <= max(|ωy|, |ωx|) < freq + width``

    and zeroed otherwise; the result is the real part of ``ifft2``. ``freq`` and ``width`` are in
    radians (π = the edge of the spectrum along an axis); ``width`` is the half-width, the
    paper's ``s`` (``FreqAttack`` default 0.2). The band is symmetric in ``±ω``, so the inverse
    transform is real up to rounding. The paper's code builds the same band from centred integer
    squares of side ``2⌊(f ± s)·H/(2π)⌋``, which includes ``-ω`` but not ``+ω`` on the outer
    edge; this function uses the symmetric rule of the contract. Computed in float32 (float64
    for ``dtype=torch.float64``) and returned in ``dtype`` (default: torch's default dtype).
    """
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(f"shape must be a tuple of >= 2 non-negative ints (..., H, W), got {shape!r}")
    if shape[-1] < 1 or shape[-2] < 1:
        raise ValueError(f"shape must have H, W >= 1, got {tuple(shape)}")
    freq = _checks.number("freq", freq)
    width = _checks.number("width", width, positive=True)
    eps = _checks.number("eps", eps)
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if math.prod(shape) > 2**62:
        raise ValueError(f"shape must have fewer than 2**62 elements, got {tuple(shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if device is not None:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from exc
    if device is None and generator is not None:
        device = generator.device
    if generator is not None and device.type != generator.device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}")
    compute = _acc_dtype(dtype)
    try:
        noise = torch.randn(tuple(shape), generator=generator, dtype=compute, device=device)
    except (RuntimeError, AssertionError) as exc:  # no such device here, or out of memory
        raise RuntimeError(f"frequency_noise: cannot allocate noise of shape {tuple(shape)} on device "
                           f"{device}: {exc}") from exc
    noise = noise.sign() * eps
    H, W = shape[-2], shape[-1]
    wy = (2.0 * math.pi) * torch.fft.fftfreq(H, dtype=compute, device=noise.device).abs()
    wx = (2.0 * math.pi) * torch.fft.fftfreq(W, dtype=compute, device=noise.device).abs()
    r = torch.maximum(wy[:, None], wx[None, :])
    mask = ((r >= freq - width) & (r < freq + width)).to(compute)
    out = torch.fft.ifft2(torch.fft.fft2(noise) * mask).real
    return out.to(dtype)


MAX_BINS = 2**20
STATS = ("delta_log_amplitude", "feature_variance", "log_amplitude_spectrum", "radial_log_amplitude")


def feature_statistics(maps: Iterable[torch.Tensor], stats: Sequence[str] = ("delta_log_amplitude", "feature_variance"),
                       eps: float = 1e-6, *, bins: int | None = None, backend: str | None = None) -> list[dict]:
    """Every statistic in ``stats`` for every map in ``maps`` (maps may differ in shape).

    Returns one dict per map, ``{stat name: tensor}``, in order. Maps that share a device and
    dtype go through the fused op together: on the ``cpu`` and ``cuda`` backends that is one
    C++ call (one parallel region / one kernel launch) per op for all of them; ``triton``
    launches once per map. ``delta_log_amplitude`` needs square maps (``ValueError``
    otherwise); the other statistics take any map. Differentiable like the single ops.
    """
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Iterable):
        raise TypeError(f"maps must be an iterable of (B, C, H, W) tensors, got {type(maps).__name__}")
    maps = list(maps)
    if isinstance(stats, str):
        stats = (stats,)
    if not isinstance(stats, Iterable):
        raise TypeError(f"stats must be a name or a sequence of names, got {stats!r}")
    stats = tuple(stats)
    for s in stats:
        _checks.choice("stats entry", s, STATS)
    for i, x in enumerate(maps):
        _check_map(f"maps[{i}]", x)
        if "delta_log_amplitude" in stats:
            _check_square(f"maps[{i}]", x)
        if "feature_variance" in stats:
            _check_variance_size(f"maps[{i}]", x)
    eps = _check_eps(eps)
    results = [dict() for _ in maps]
    groups: dict = {}
    for i, x in enumerate(maps):
        groups.setdefault((x.device, x.dtype), []).append(i)
    for (device, dtype), idx in groups.items():
        xs = [maps[i] for i in idx]
        if "delta_log_amplitude" in stats:
            chosen = _DELTA.select(backend, device, dtype)
            nonempty = [i for i, x in zip(idx, xs) if x.shape[0] * x.shape[1] > 0]
            if chosen == "reference" or not nonempty:
                outs = [delta_log_amplitude(maps[i], eps, backend="reference") for i in idx]
            else:
                outs = _apply_delta(chosen, eps, xs)
            for i, o in zip(idx, outs):
                results[i]["delta_log_amplitude"] = o
        if "feature_variance" in stats:
            chosen = _VARIANCE.select(backend, device, dtype)
            outs = ([feature_variance_reference(x) for x in xs] if chosen == "reference"
                    else _apply_variance(chosen, xs))
            for i, o in zip(idx, outs):
                results[i]["feature_variance"] = o
        for i in idx:
            if "log_amplitude_spectrum" in stats:  # reference-only ops
                results[i]["log_amplitude_spectrum"] = log_amplitude_spectrum(maps[i], eps, backend="reference")
            if "radial_log_amplitude" in stats:
                results[i]["radial_log_amplitude"] = radial_log_amplitude(maps[i], bins, eps, backend="reference")
    return results
