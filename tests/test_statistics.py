"""Fourier and variance statistics: every backend against independent float64 math.

The ground truths here are written from scratch: the paper's notebook procedure with
``torch.fft`` (log before averaging, fftshift, half diagonal, minus DC) and a brute-force
diagonal DFT with explicit complex exponentials; ``torch.var`` for the variance.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import alterops as ao
from alterops import BackendUnavailableError
from helpers import assert_close, assert_fused, interpreted, skip_unless

BACKENDS = ("reference", "cpu", "triton", "cuda")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Independent float64 ground truths
# ---------------------------------------------------------------------------------------
def paper_delta(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fourier_analysis.ipynb, step by step, in float64."""
    x = x.double()
    f = torch.fft.fft2(x)
    a = torch.log(torch.abs(f) + eps)
    h, w = x.shape[-2:]
    a = torch.roll(a, shifts=(h // 2, w // 2), dims=(-2, -1))
    a = a.mean(dim=(0, 1))
    diag = a.diag()[h // 2:]
    return diag - diag[0]


def brute_force_delta(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Diagonal bins with explicit exponentials exp(-2πi k (y + x) / N)."""
    x = x.double()
    n = x.shape[-1]
    ys = torch.arange(n, dtype=torch.float64)
    out = []
    for k in range(n - n // 2):
        phase = torch.exp(-2j * math.pi * k * (ys[:, None] + ys[None, :]) / n)
        f = (x.to(torch.complex128) * phase).sum(dim=(-2, -1))
        out.append(torch.log(f.abs() + eps).mean())
    out = torch.stack(out)
    return out - out[0]


def make_input(shape, dtype, device, offset=0.0, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def triton_small(backend, shape):
    """The Triton interpreter is slow: keep its shapes small."""
    return not interpreted(backend) or shape[0] * shape[1] * shape[2] * shape[3] <= 4000


# ---------------------------------------------------------------------------------------
# Ground truths agree with each other (checks the test's own math)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4, 7, 8, 14])
def test_paper_procedure_equals_unshifted_diagonal_bins(n):
    x = make_input((2, 3, n, n), torch.float64, "cpu")
    torch.testing.assert_close(paper_delta(x), brute_force_delta(x), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------
# delta_log_amplitude: every backend and dtype vs the float64 truth
# ---------------------------------------------------------------------------------------
SHAPES = [(2, 3, 7, 7), (2, 3, 8, 8), (1, 5, 14, 14), (3, 70, 5, 5), (1, 2, 33, 33), (1, 1, 1, 1),
          (2, 3, 17, 17), (1, 3, 24, 24), (2, 2, 28, 28), (1, 2, 32, 32), (70, 1, 3, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_delta_log_amplitude(backend, dtype, shape):
    device = skip_unless("delta_log_amplitude", backend, dtype)
    if not triton_small(backend, shape):
        pytest.skip("large for the Triton interpreter")
    x = make_input(shape, dtype, device)
    out = ao.delta_log_amplitude(x, backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (shape[2] - shape[2] // 2,)
    ref = paper_delta(x.cpu())
    naive = paper_delta(x.cpu().float()).float() if dtype != torch.float64 else None
    assert_close(out.cpu(), ref, naive)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_delta_channels_last_and_strided(backend):
    device = skip_unless("delta_log_amplitude", backend, torch.float32)
    x = make_input((2, 6, 9, 9), torch.float32, device, channels_last=True)
    ref = paper_delta(x.cpu())
    assert_close(ao.delta_log_amplitude(x, backend=backend).cpu(), ref, paper_delta(x.cpu().float()).float())
    big = make_input((2, 6, 12, 12), torch.float32, device)
    view = big[:, ::2, 1:10, 2:11]  # non-contiguous view
    assert_close(ao.delta_log_amplitude(view, backend=backend).cpu(), paper_delta(view.cpu()),
                 paper_delta(view.cpu().float()).float())
    assert torch.equal(big, make_input((2, 6, 12, 12), torch.float32, device)), "input was modified"
    for t in (x, view):
        assert_close(ao.feature_variance(t, backend=backend).cpu(), t.cpu().double().var(dim=(2, 3)).mean(),
                     t.cpu().var(dim=(2, 3)).mean())


def test_delta_float64_agrees_to_1e10():
    x = make_input((3, 4, 14, 14), torch.float64, "cpu")
    skip_unless("delta_log_amplitude", "cpu", torch.float64)
    torch.testing.assert_close(ao.delta_log_amplitude(x, backend="cpu"), paper_delta(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(ao.delta_log_amplitude(x, backend="reference"), paper_delta(x), rtol=0, atol=1e-12)


def test_delta_cpu_is_deterministic():
    skip_unless("delta_log_amplitude", "cpu", torch.float32)
    x = make_input((8, 40, 14, 14), torch.float32, "cpu")
    a = ao.delta_log_amplitude(x, backend="cpu")
    va = ao.feature_variance(x, backend="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = ao.delta_log_amplitude(x, backend="cpu")
        vb = ao.feature_variance(x, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and torch.equal(va, vb)


# ---------------------------------------------------------------------------------------
# Analytic cases
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("n", [6, 7])
def test_constant_map_has_all_energy_at_dc(backend, n):
    skip_unless("delta_log_amplitude", backend, torch.float64)
    c, eps = 2.5, 1e-6
    x = torch.full((2, 3, n, n), c, dtype=torch.float64)
    expected = torch.full((n - n // 2,), math.log(eps) - math.log(c * n * n + eps), dtype=torch.float64)
    expected[0] = 0.0
    torch.testing.assert_close(ao.delta_log_amplitude(x, eps, backend=backend), expected, rtol=0, atol=1e-6)
    spec = ao.log_amplitude_spectrum(x, eps)
    assert spec.shape == (n, n)
    assert spec[n // 2, n // 2].item() == pytest.approx(math.log(c * n * n + eps), abs=1e-9)
    off = torch.ones(n, n, dtype=torch.bool)
    off[n // 2, n // 2] = False
    torch.testing.assert_close(spec[off], torch.full_like(spec[off], math.log(eps)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("n,k0", [(8, 2), (9, 3), (14, 5)])
def test_single_diagonal_cosine(backend, n, k0):
    skip_unless("delta_log_amplitude", backend, torch.float64)
    eps = 1e-6
    ys = torch.arange(n, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * k0 * (ys[:, None] + ys[None, :]) / n)
    x = wave.expand(2, 3, n, n)
    out = ao.delta_log_amplitude(x, eps, backend=backend)
    # DC is 0, bin (k0, k0) has amplitude n^2 / 2, every other diagonal bin in range is 0.
    expected = torch.zeros(n - n // 2, dtype=torch.float64)
    expected[k0] = math.log(n * n / 2 + eps) - math.log(eps)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("h,w,ky,kx", [(6, 10, 1, 3), (7, 5, 2, -1)])
def test_cosine_peak_in_shifted_spectrum(h, w, ky, kx):
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    x = torch.cos(2 * math.pi * (ky * ys / h + kx * xs / w)).expand(1, 2, h, w)
    spec = ao.log_amplitude_spectrum(x)
    peaks = {(int(i), int(j)) for i, j in (spec > 0).nonzero()}
    assert peaks == {(h // 2 + ky, w // 2 + kx), (h // 2 - ky, w // 2 - kx)}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("n", [15, 16])
def test_white_noise_through_box_blur(backend, n):
    """A circular 2x2 box blur multiplies every DFT bin by (1+e^{-iωy})(1+e^{-iωx})/4, so on the
    diagonal the Δ curve drops by exactly 2 log|cos(πk/n)|."""
    skip_unless("delta_log_amplitude", backend, torch.float64)
    x = make_input((4, 8, n, n), torch.float64, "cpu")
    xp = F.pad(x, (0, 1, 0, 1), mode="circular")
    blur = getattr(ao, "box_blur2d", None)
    y = blur(xp, 2, stride=1, padding=0) if blur is not None else F.avg_pool2d(xp, 2, 1, 0)
    assert y.shape == x.shape
    k = torch.arange(n - n // 2, dtype=torch.float64)
    expected = 2 * torch.log(torch.cos(math.pi * k / n).abs())
    got = ao.delta_log_amplitude(y, 1e-12, backend=backend) - ao.delta_log_amplitude(x, 1e-12, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------
# radial_log_amplitude and log_amplitude_spectrum
# ---------------------------------------------------------------------------------------
def test_log_amplitude_spectrum_matches_paper_steps():
    x = make_input((2, 3, 6, 9), torch.float32, "cpu")
    a = torch.log(torch.fft.fft2(x.double()).abs() + 1e-6).mean(dim=(0, 1))
    expected = torch.roll(a, shifts=(3, 4), dims=(0, 1))
    out = ao.log_amplitude_spectrum(x)
    assert out.dtype == torch.float32
    assert_close(out, expected, torch.fft.fftshift(torch.log(torch.fft.fft2(x).abs() + 1e-6).mean((0, 1))))


def test_radial_log_amplitude_rings():
    x = make_input((2, 3, 8, 12), torch.float64, "cpu")
    bins = 5
    out = ao.radial_log_amplitude(x, bins=bins)
    a = torch.log(torch.fft.fft2(x).abs() + 1e-6).mean(dim=(0, 1))
    sums, counts = [0.0] * bins, [0] * bins
    for i in range(8):
        for j in range(12):
            wy = min(i, 8 - i) / 4.0  # |ω| / π
            wx = min(j, 12 - j) / 6.0
            r = math.sqrt(wy * wy + wx * wx)
            ring = round(r * (bins - 1))
            if ring < bins:
                sums[ring] += a[i, j].item()
                counts[ring] += 1
    expected = torch.tensor([s / c for s, c in zip(sums, counts)], dtype=torch.float64) - a[0, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    square = make_input((2, 3, 8, 8), torch.float64, "cpu")
    default = ao.radial_log_amplitude(square)
    assert default.shape == (5,) and default[0].item() == 0.0  # ring 0 is the DC bin alone


# ---------------------------------------------------------------------------------------
# feature_variance
# ---------------------------------------------------------------------------------------
VAR_SHAPES = [(2, 3, 7, 7), (3, 70, 5, 9), (1, 2, 70, 70), (2, 2, 1, 2), (2, 9, 4, 5)]  # 18 planes: > 1 Triton block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", VAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_feature_variance(backend, dtype, shape):
    device = skip_unless("feature_variance", backend, dtype)
    if not triton_small(backend, shape) and shape != (1, 2, 70, 70):
        pytest.skip("large for the Triton interpreter")
    x = make_input(shape, dtype, device, offset=3.0)
    out = ao.feature_variance(x, backend=backend)
    assert out.shape == () and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    xd = x.cpu().double()
    ref = xd.var(dim=(2, 3), unbiased=True).mean()
    naive = x.cpu().float().var(dim=(2, 3)).mean() if dtype != torch.float64 else None
    assert_close(out.cpu(), ref, naive)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_feature_variance_float64_matches_torch_var(backend):
    skip_unless("feature_variance", backend, torch.float64)
    for offset in (0.0, 1e4):  # a large mean must not cost accuracy (no naive sum of squares)
        x = make_input((4, 8, 33, 65), torch.float64, "cpu", offset=offset)  # planes > one block
        ref = x.var(dim=(2, 3), unbiased=True).mean()
        out = ao.feature_variance(x, backend=backend)
        assert abs(out.item() - ref.item()) <= 1e-10 * abs(ref.item())


def test_feature_variance_large_plane_blocks():
    skip_unless("feature_variance", "cpu", torch.float32)
    x = make_input((1, 3, 90, 100), torch.float32, "cpu", offset=100.0)  # 9000 > 4096-element blocks
    ref = x.double().var(dim=(2, 3)).mean()
    assert_close(ao.feature_variance(x, backend="cpu"), ref, x.var(dim=(2, 3)).mean())


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    skip_unless("delta_log_amplitude", backend, torch.float64)
    x = make_input((1, 2, 5, 5), torch.float64, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ao.delta_log_amplitude(t, backend=backend), (x,))
    y = make_input((1, 2, 4, 3), torch.float64, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ao.feature_variance(t, backend=backend), (y,))
    if backend == "reference":
        return
    z = make_input((1, 1, 4, 4), torch.float64, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda *ts: tuple(
        v for d in ao.feature_statistics(ts, backend=backend) for v in d.values()), (z, x))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_gradients_match_reference(backend, dtype):
    device = skip_unless("delta_log_amplitude", backend, dtype)
    x = make_input((2, 3, 6, 6), dtype, device).requires_grad_()
    g = torch.randn(3, dtype=torch.float64)
    (gx,) = torch.autograd.grad(ao.delta_log_amplitude(x, backend=backend), x, g.to(device).float())
    x64 = x.detach().cpu().double().requires_grad_()
    (ref,) = torch.autograd.grad(paper_delta(x64), x64, g)
    assert gx.dtype == dtype
    assert_close(gx.cpu(), ref, naive=None if dtype == torch.float32 else ref.to(dtype))
    (gv,) = torch.autograd.grad(ao.feature_variance(x, backend=backend), x)
    (refv,) = torch.autograd.grad(x64.var(dim=(2, 3)).mean(), x64)
    assert_close(gv.cpu(), refv, naive=None if dtype == torch.float32 else refv.to(dtype))


# ---------------------------------------------------------------------------------------
# Empty batch, bad inputs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_batch(backend):
    device = skip_unless("delta_log_amplitude", backend, torch.float32)
    x = torch.zeros(0, 3, 6, 6, device=device, requires_grad=True)
    d = ao.delta_log_amplitude(x, backend=backend)
    v = ao.feature_variance(x, backend=backend)
    assert d.shape == (3,) and torch.isnan(d).all()
    assert v.shape == () and torch.isnan(v)
    assert_fused(d, backend)
    assert_fused(v, backend)
    (g,) = torch.autograd.grad(d.nansum() + v.nan_to_num(), x)
    assert g is not None and g.shape == x.shape


def test_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        ao.delta_log_amplitude(torch.randn(1, 2, 4, 5))
    with pytest.raises(ValueError, match="square"):
        ao.feature_statistics([torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 5)])
    with pytest.raises(ValueError, match="4 dimensions"):
        ao.delta_log_amplitude(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="4 dimensions"):
        ao.feature_variance(torch.randn(2, 3, 4, 4, 1))
    with pytest.raises(TypeError, match="floating"):
        ao.feature_variance(torch.ones(1, 2, 3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="floating"):
        ao.delta_log_amplitude(torch.ones(1, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ao.feature_variance([[1.0, 2.0]])
    with pytest.raises(ValueError, match="H \\* W >= 2"):
        ao.feature_variance(torch.randn(2, 2, 1, 1))
    with pytest.raises(ValueError, match="eps"):
        ao.delta_log_amplitude(torch.randn(1, 1, 4, 4), eps=-1.0)
    with pytest.raises(ValueError, match="bins"):
        ao.radial_log_amplitude(torch.randn(1, 1, 4, 4), bins=0)
    with pytest.raises(ValueError, match="stats entry"):
        ao.feature_statistics([torch.randn(1, 1, 4, 4)], stats=("mean",))
    with pytest.raises(BackendUnavailableError, match="no 'cpu' backend"):
        ao.log_amplitude_spectrum(torch.randn(1, 1, 4, 4), backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        ao.feature_variance(torch.randn(1, 1, 4, 4), backend="gpu")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        ao.feature_variance(torch.randn(1, 1, 4, 4), backend="cuda")


# ---------------------------------------------------------------------------------------
# frequency_noise
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(16, 16), (15, 20)])
def test_frequency_noise_band(size):
    freq, width, eps = 0.5 * math.pi, 0.1 * math.pi, 0.7
    shape = (2, 3) + size
    g = torch.Generator().manual_seed(3)
    noise = ao.frequency_noise(shape, freq, width, eps, generator=g, dtype=torch.float64)
    assert noise.shape == shape and noise.dtype == torch.float64
    # The same sign noise, drawn again from the same seed.
    sign = eps * torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).sign()
    spec_sign = torch.fft.fft2(sign)
    spec = torch.fft.fft2(noise)
    h, w = size
    for i in range(h):
        for j in range(w):
            wy = 2 * math.pi * min(i, h - i) / h
            wx = 2 * math.pi * min(j, w - j) / w
            inside = freq - width <= max(wy, wx) < freq + width
            if inside:  # amplitude and phase kept
                torch.testing.assert_close(spec[..., i, j], spec_sign[..., i, j], rtol=1e-9, atol=1e-9)
            else:
                assert spec[..., i, j].abs().max() < 1e-9
    assert noise.abs().max() > 0


def test_frequency_noise_options():
    n32 = ao.frequency_noise((1, 8, 8), 0.3, 0.2, generator=torch.Generator().manual_seed(0))
    assert n32.dtype == torch.get_default_dtype() and n32.shape == (1, 8, 8)
    n16 = ao.frequency_noise((8, 8), 0.3, 0.2, dtype=torch.bfloat16)
    assert n16.dtype == torch.bfloat16
    low = ao.frequency_noise((4, 16, 16), 0.0, 0.05, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(low, low.mean(dim=(-2, -1), keepdim=True))  # only DC kept: constant maps
    with pytest.raises(ValueError, match="shape"):
        ao.frequency_noise((8,), 0.3, 0.2)
    with pytest.raises(ValueError, match="width"):
        ao.frequency_noise((8, 8), 0.3, 0.0)
    with pytest.raises(TypeError, match="dtype"):
        ao.frequency_noise((8, 8), 0.3, 0.2, dtype=torch.int32)


# ---------------------------------------------------------------------------------------
# feature_statistics (batched), op registration, torch.compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_feature_statistics_batched(backend):
    device = skip_unless("delta_log_amplitude", backend, torch.float32)
    maps = [make_input((2, 4, 8, 8), torch.float32, device, seed=1),
            make_input((2, 6, 5, 5), torch.float32, device, seed=2),
            make_input((1, 3, 7, 7), torch.float64 if backend != "triton" else torch.float16, device, seed=3),
            make_input((0, 3, 4, 4), torch.float32, device, seed=4)]
    stats = ("delta_log_amplitude", "feature_variance", "log_amplitude_spectrum", "radial_log_amplitude")
    res = ao.feature_statistics(maps, stats=stats, backend=backend)
    assert len(res) == len(maps)
    for x, r in zip(maps[:3], res[:3]):
        assert set(r) == set(stats)
        assert_close(r["delta_log_amplitude"].cpu(), paper_delta(x.cpu()), paper_delta(x.cpu().float()).float())
        xd = x.cpu().double()
        assert_close(r["feature_variance"].cpu(), xd.var(dim=(2, 3)).mean(), x.cpu().float().var(dim=(2, 3)).mean())
        torch.testing.assert_close(r["radial_log_amplitude"], ao.radial_log_amplitude(x))
    assert torch.isnan(res[3]["delta_log_amplitude"]).all() and torch.isnan(res[3]["feature_variance"])


def test_opcheck_compiled_ops():
    skip_unless("delta_log_amplitude", "cpu", torch.float32)
    xs = [torch.randn(2, 3, 6, 6), torch.randn(1, 2, 5, 5, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.alterops.delta_log_amplitude_fwd.default, (xs, 1e-6))
    torch.library.opcheck(torch.ops.alterops.feature_variance_fwd.default, (xs,))


def test_opcheck_triton_ops():
    device = skip_unless("delta_log_amplitude", "triton", torch.float32)
    x = torch.randn(2, 3, 6, 6, device=device)
    torch.library.opcheck(torch.ops.alterops.delta_log_amplitude_triton.default, (x, 1e-6))
    torch.library.opcheck(torch.ops.alterops.feature_variance_triton.default, (x,))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    device = skip_unless("delta_log_amplitude", backend, torch.float32)
    torch._dynamo.reset()
    import alterops.statistics as stats_module

    stats_module._TRIG_CACHE.clear()  # tracing must not depend on (or mutate) module caches

    def f(t):
        batched = ao.feature_statistics([t, t[:, :, :4, :4]], backend=backend)
        return (ao.delta_log_amplitude(t, backend=backend).sum() + ao.feature_variance(t, backend=backend)
                + batched[1]["delta_log_amplitude"].sum() + batched[0]["feature_variance"])

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 6, 6), torch.float32, device).requires_grad_()
    out = compiled(x)
    (g,) = torch.autograd.grad(out, x)
    x2 = x.detach().clone().requires_grad_()
    ref = f(x2)
    (g2,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-6)


def test_backend_table_and_auto_selection():
    skip_unless("delta_log_amplitude", "cpu", torch.float32)
    x = make_input((2, 3, 6, 6), torch.float32, "cpu")
    with ao.set_backend("reference"):
        a = ao.delta_log_amplitude(x)
    b = ao.delta_log_amplitude(x)  # auto: the C++ kernel on the CPU
    assert_close(b, paper_delta(x), paper_delta(x.float()).float())
    assert_close(a, paper_delta(x), paper_delta(x.float()).float())


@pytest.mark.parametrize("n", [9, 70])
def test_closed_form_used_beyond_kernel_limits(n):
    """Triton (H > 64) and CUDA (H > 512) hand large maps to this torch-ops closed form."""
    from alterops.statistics import _delta_closed_form

    x = make_input((2, 3, n, n), torch.float32, "cpu")
    assert_close(_delta_closed_form(x, 1e-6), paper_delta(x), paper_delta(x.float()).float())
    x64 = x.double()
    torch.testing.assert_close(_delta_closed_form(x64, 1e-6), paper_delta(x64), rtol=0, atol=1e-10)
