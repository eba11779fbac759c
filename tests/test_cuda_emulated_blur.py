"""csrc/blur/blur_cuda.cu executed on the CPU executor of tests/cuda_emu, through its raw-pointer
launchers, against float64 references written here: forward and backward, every pad mode, kernel
sizes 1-7 on both axes, strides 1 and 2, every pointwise op, float32 / float16 / bfloat16, odd
sizes, and shapes that launch several hundred blocks. Each case runs under the forward, reverse
and seeded random thread schedules (sm_90 and sm_80 limits), with guard pages around every buffer
and the inputs read-only."""
import ctypes
import os

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from cuda_emu import driver
from cuda_emu.testing import one_thread, pytestmark  # noqa: F401 (the module's marks and fixture)


DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# unit roundoff of the output (float32 accumulation, one rounding to the output dtype)
UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
MODES = {"zeros": 0, "replicate": 1, "reflect": 2}
THREADS = 256  # the launchers' block size


@pytest.fixture(scope="module")
def lib():
    lib = driver.load(os.path.join(driver.CSRC, "blur", "blur_cuda.cu"),
                      os.path.join(driver.HERE, "shim_blur.cpp"))
    geo = ctypes.POINTER(ctypes.c_longlong)
    lib.forward = lib.fn("emu_blur2d_forward", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, geo, ctypes.c_int,
                                                ctypes.c_float])
    lib.backward = lib.fn("emu_blur2d_backward", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                  geo, ctypes.c_int, ctypes.c_float])
    return lib


# ---------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------
def act_ref(x, act, tau):
    if act == 0:
        return x
    y = tau * torch.tanh(x / tau)
    return torch.relu(y) if act == 2 else y


def blur_ref(x, k, s, pads, mode):
    """Pad (F.pad, top/bottom/left/right), then the mean of every k window with stride s."""
    pt, pb, pl, pr = pads
    if any(pads):
        x = F.pad(x, (pl, pr, pt, pb), mode={"zeros": "constant", "replicate": "replicate", "reflect": "reflect"}[mode])
    return x.unfold(2, k[0], s[0]).unfold(3, k[1], s[1]).mean(dim=(-2, -1))


def forward_ref(x, k, s, pads, mode, act, tau):
    return blur_ref(act_ref(x.double(), act, tau), k, s, pads, mode)


def backward_ref(x, gout, k, s, pads, mode, act, tau):
    xd = x.double().requires_grad_(True)
    y = forward_ref(xd, k, s, pads, mode, act, tau)
    (g,) = torch.autograd.grad(y, xd, gout.double())
    return g


# ---------------------------------------------------------------------------------------
def geometry(x_shape, k, s, pads, mode):
    B, C, H, W = x_shape
    Ho = (H + pads[0] + pads[1] - k[0]) // s[0] + 1
    Wo = (W + pads[2] + pads[3] - k[1]) // s[1] + 1
    vals = [B * C, H, W, Ho, Wo, k[0], k[1], s[0], s[1], *pads, MODES[mode]]
    return (ctypes.c_longlong * 14)(*vals), (Ho, Wo)


def run_forward(lib, x, k, s, pads, mode, act, tau):
    geo, (Ho, Wo) = geometry(x.shape, k, s, pads, mode)
    B, C = x.shape[:2]
    out = driver.run_schedules(
        lib, {"x": x}, {"out": (B * C * Ho * Wo, x.dtype)},
        lambda i, o, _: lib.forward(i["x"].ptr, o["out"].ptr, DTYPES[x.dtype], geo, act, tau))["out"]
    return out.view(B, C, Ho, Wo), lib.take_launches()


def run_backward(lib, x, gout, k, s, pads, mode, act, tau):
    geo, _ = geometry(x.shape, k, s, pads, mode)
    # the kernel must not touch x when act == 0: it gets a null pointer then
    inputs = {"grad_out": gout, "x": x if act else None}
    gin = driver.run_schedules(
        lib, inputs, {"grad_in": (x.numel(), x.dtype)},
        lambda i, o, _: lib.backward(i["grad_out"].ptr, i["x"].ptr if i["x"] else None, o["grad_in"].ptr,
                                     DTYPES[x.dtype], geo, act, tau))["grad_in"]
    return gin.view(x.shape), lib.take_launches()


def assert_bound(got, ref, abs_ref, dtype, what, approx=0.0):
    """|got - ref| <= u |ref| + 64 eps32 sum|terms| + approx (the tanh approximation's share)."""
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (an element not written?)"
    tol = UNIT[dtype] * ref.abs() + 64 * 2.0 ** -24 * abs_ref + approx + 1e-7
    err = (got.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off, first at "
                           f"{bad.nonzero()[0].tolist()}: got {got.double()[bad][0].item()}, "
                           f"want {ref[bad][0].item()} (max error {err.max().item():.3g})")


def check(lib, x, k, s, pads, mode, act, tau, gen, what):
    """Forward and backward of one geometry against the references."""
    out, launches = run_forward(lib, x, k, s, pads, mode, act, tau)
    ref = forward_ref(x, k, s, pads, mode, act, tau)
    abs_ref = blur_ref(act_ref(x.double(), act, tau).abs(), k, s, pads, mode)
    # the kernel's tanh is a rational approximation (abs error < 3.6e-7 on tanh)
    assert_bound(out, ref, abs_ref, x.dtype, f"forward {what}", 4e-7 * tau if act else 0.0)
    total = out.numel()
    assert launches == [f"blur2d_forward_kernel<T, {act}> grid=({-(-total // THREADS)},1,1) block=(256,1,1) smem=0"]

    gout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    gin, launches = run_backward(lib, x, gout, k, s, pads, mode, act, tau)
    ref = backward_ref(x, gout, k, s, pads, mode, act, tau)
    abs_ref = backward_ref(x, gout.abs(), k, s, pads, mode, act, tau).abs()
    # its derivative 1 - t^2 is then off by up to 2 * 3.6e-7 (+ rounding), times sum |grad_out| / (kh kw)
    sum_abs = backward_ref(x, gout.abs(), k, s, pads, mode, 0, tau) if act else None
    assert_bound(gin, ref, abs_ref, x.dtype, f"backward {what}", 1e-6 * sum_abs if act else 0.0)
    assert launches == [f"blur2d_backward_kernel<T, {act}> grid=({-(-x.numel() // THREADS)},1,1) block=(256,1,1) "
                        f"smem=0"]


def cases():
    """Kernel sizes 1-7 on each axis, strides (1,1) (2,2) and one mixed, three padding shapes."""
    out = []
    for i, kh in enumerate(range(1, 8)):
        kw = (kh * 3) % 7 + 1  # 4 7 3 6 2 5 1: every size on this axis too
        for j, s in enumerate([(1, 1), (2, 2), (2, 1) if kh % 2 else (1, 2)]):
            variant = (i + j) % 3
            if variant == 0:
                pads = (0, 0, 0, 0)
            elif variant == 1:  # "same"-like, asymmetric for even k
                pads = (kh // 2, (kh - 1) // 2, kw // 2, (kw - 1) // 2)
            else:  # wide and lopsided: several border candidates per axis in the backward
                pads = (min(kh, 4), 1, 0, min(kw, 5))
            out.append(((kh, kw), s, pads, (i + j) % 3))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_every_geometry(lib, mode, dtype):
    gen = torch.Generator().manual_seed(10 * list(MODES).index(mode) + list(DTYPES).index(dtype))
    x = (2.5 * torch.randn(2, 3, 13, 11, generator=gen, dtype=torch.float64)).to(dtype)
    for k, s, pads, act in cases():
        tau = 3.0 if act != 1 else 0.7
        check(lib, x, k, s, pads, mode, act, tau, gen, f"{mode} {dtype} k={k} s={s} pads={pads} act={act}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_hundred_blocks(lib, dtype):
    gen = torch.Generator().manual_seed(11)
    x = (2.0 * torch.randn(3, 5, 97, 75, generator=gen, dtype=torch.float64)).to(dtype)
    # 15 * 97 * 75 = 109125 elements: 427 blocks forward (stride 1) and backward
    check(lib, x, (5, 3), (1, 1), (2, 2, 1, 1), "reflect", 2, 3.0, gen, f"large {dtype}")


@pytest.mark.parametrize("mode", MODES)
def test_tiny_maps(lib, mode):
    """1x1 and 1-wide maps: every tap maps to the same element (replicate) or to zeros."""
    gen = torch.Generator().manual_seed(3)
    for shape, k, pads in [((1, 1, 1, 1), (1, 1), (0, 0, 0, 0)), ((2, 1, 1, 5), (1, 3), (0, 0, 1, 1)),
                           ((1, 3, 3, 1), (3, 1), (1, 1, 0, 0))]:
        if mode == "reflect" and any(p >= n for p, n in zip(pads, (shape[2], shape[2], shape[3], shape[3]))):
            continue
        if mode != "reflect" and shape == (1, 1, 1, 1):
            pads, k = (2, 1, 0, 3), (4, 4)
        x = torch.randn(shape, generator=gen)
        check(lib, x, k, (1, 1), pads, mode, 1, 3.0, gen, f"tiny {shape} {mode}")
