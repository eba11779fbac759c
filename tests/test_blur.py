"""box_blur2d / tanh_blur2d on every backend and dtype against independent float64 references:
``F.avg_pool2d(count_include_pad=True)`` for zero padding and ``F.pad`` + ``F.unfold`` (the
window mean written out) for every padding mode."""
import pytest
import torch
import torch.nn.functional as F

import alterops as ao
from alterops import BackendUnavailableError, _ext
from alterops.blur import _pads
from helpers import assert_close, assert_fused, skip_unless

DTYPES = {
    "reference": (torch.float32, torch.float64, torch.bfloat16),
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
BACKEND_DTYPES = [(b, d) for b, ds in DTYPES.items() for d in ds]


def _id(v):
    return str(v).replace("torch.", "").replace(" ", "")


# (shape, kernel_size, stride, padding, pad_mode)
CASES = [
    ((2, 3, 7, 9), 2, 1, 1, "zeros"),  # the paper's AvgPool2d(2, 1, 1)
    ((2, 3, 6, 5), 3, 1, "same", "zeros"),
    ((1, 2, 9, 7), 3, 1, "same", "reflect"),
    ((1, 2, 5, 8), 4, 1, "same", "replicate"),
    ((2, 2, 8, 11), (3, 2), (2, 1), (1, 2), "replicate"),
    ((1, 3, 10, 9), 5, 2, 2, "reflect"),
    ((1, 2, 9, 10), 7, (1, 2), "same", "zeros"),
    ((1, 1, 8, 8), (1, 6), 2, (0, 3), "reflect"),
    ((1, 2, 12, 7), (7, 3), 1, 3, "replicate"),
    ((2, 2, 1, 1), 2, 1, 1, "zeros"),  # tiny maps
    ((1, 2, 2, 3), 2, 1, 1, "reflect"),
    ((1, 1, 1, 3), 3, 2, 1, "replicate"),
    ((1, 2, 6, 6), 1, 1, 0, "zeros"),
    ((1, 2, 5, 37), 2, 1, 1, "zeros"),  # rows wider than one or two 16-lane vectors
    ((1, 2, 4, 33), 3, 1, "same", "zeros"),
    ((1, 1, 3, 48), 3, 1, (1, 2), "zeros"),
    ((1, 1, 4, 40), 2, 1, (0, 1), "reflect"),
    ((3, 2, 8, 8), 2, 1, 1, "zeros"),  # widths around 8-lane vectors, small planes
    ((2, 3, 7, 15), 3, 1, "same", "zeros"),
    ((2, 2, 6, 16), 2, 1, (0, 1), "zeros"),
    ((2, 3, 5, 23), 3, 1, (2, 1), "zeros"),
    ((4, 2, 2, 3), 3, 1, 1, "zeros"),
    ((2, 2, 3, 2), 2, 1, 0, "zeros"),
]
# the Triton interpreter is slow: a subset that still covers every mode, stride and size kind
TRITON_CASES = [CASES[i] for i in (0, 2, 4, 6, 9, 11)] + [((1, 1, 6, 5), (5, 3), 2, (2, 1), "reflect")]

OPS = ["box", "tanh", "tanh_norelu"]


# ---------------------------------------------------------------------------------------
# Independent references (float64)
# ---------------------------------------------------------------------------------------
def pointwise(x, op, tau):
    if op == "box":
        return x
    y = tau * torch.tanh(x / tau)
    return torch.relu(y) if op == "tanh" else y


def unfold_blur(x, kernel_size, stride, padding, pad_mode):
    """The window mean written out: F.pad, then the mean of F.unfold's columns."""
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    top, bottom, left, right = _pads(padding, kernel)
    mode = {"zeros": "constant", "replicate": "replicate", "reflect": "reflect"}[pad_mode]
    xp = F.pad(x, (left, right, top, bottom), mode=mode) if (top + bottom + left + right) else x
    B, C, Hp, Wp = xp.shape
    Ho = (Hp - kernel[0]) // strides[0] + 1
    Wo = (Wp - kernel[1]) // strides[1] + 1
    cols = F.unfold(xp, kernel, stride=strides)  # (B, C*kh*kw, Ho*Wo)
    return cols.view(B, C, kernel[0] * kernel[1], Ho * Wo).mean(2).view(B, C, Ho, Wo)


def call(op, x, case_args, backend):
    kernel_size, stride, padding, pad_mode = case_args
    if op == "box":
        return ao.box_blur2d(x, kernel_size, stride, padding, pad_mode=pad_mode, backend=backend)
    return ao.tanh_blur2d(x, 3.0, kernel_size, stride, padding, relu=(op == "tanh"), pad_mode=pad_mode,
                          backend=backend)


def naive(op, x, case_args):
    """The same math, unfused, in x's dtype (for the error bound)."""
    return unfold_blur(pointwise(x, op, 3.0), *case_args)


def check_against_reference(backend, dtype, op, case):
    shape, *args = case
    device = skip_unless("box_blur2d" if op == "box" else "tanh_blur2d", backend, dtype)
    x64 = (torch.randn(shape, dtype=torch.float64) * 4).requires_grad_()
    ref = naive(op, x64, args)
    g64 = torch.randn_like(ref)
    (gref,) = torch.autograd.grad(ref, x64, g64)

    xl = x64.detach().to(dtype).requires_grad_()
    nv = naive(op, xl, args)
    (gnv,) = torch.autograd.grad(nv, xl, g64.to(dtype))

    x = x64.detach().to(device=device, dtype=dtype).requires_grad_()
    x_before = x.detach().clone()
    out = call(op, x, args, backend)
    assert out.dtype == dtype and out.device.type == device.type
    assert_close(out, ref, nv, name=f"{backend}/{op} output")
    (gx,) = torch.autograd.grad(out, x, g64.to(device=device, dtype=dtype))
    assert gx.dtype == dtype
    assert_close(gx, gref, gnv, name=f"{backend}/{op} grad_x")
    assert torch.equal(x.detach(), x_before), "the input was modified"


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend,dtype", [p for p in BACKEND_DTYPES if p[0] != "triton"], ids=_id)
def test_matches_float64_reference(backend, dtype, op, case):
    check_against_reference(backend, dtype, op, case)


@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
@pytest.mark.parametrize("op", ["box", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES["triton"], ids=_id)
def test_triton_matches_float64_reference(dtype, op, case):
    check_against_reference("triton", dtype, op, case)


# float16 on the CPU takes bfloat16's route (float32 copies, rounded back): every padding mode,
# stride and size kind once.
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 2, 4, 5, 9, 13, 21)], ids=_id)
@pytest.mark.parametrize("op", OPS)
def test_cpu_float16_matches_float64_reference(op, case):
    check_against_reference("cpu", torch.float16, op, case)


def test_triton_tanh_without_relu():
    check_against_reference("triton", torch.float32, "tanh_norelu", CASES[2])


@pytest.mark.parametrize("padding", [0, 1, (1, 0), (0, 2)], ids=_id)
@pytest.mark.parametrize("kernel_size,stride", [(2, 1), (3, 2), ((4, 3), (1, 2)), (5, 1)], ids=_id)
def test_zeros_equals_avg_pool2d(kernel_size, stride, padding):
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    pads = (padding, padding) if isinstance(padding, int) else padding
    if pads[0] > kernel[0] // 2 or pads[1] > kernel[1] // 2:
        pytest.skip("avg_pool2d allows padding <= kernel_size / 2 only")
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    ref = F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=True)
    for backend in ("reference", "cpu"):
        skip_unless("box_blur2d", backend, torch.float64)
        out = ao.box_blur2d(x, kernel_size, stride, padding, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_defaults_are_the_papers_blur():
    x = torch.randn(2, 4, 6, 7)
    y = ao.box_blur2d(x.requires_grad_())
    assert y.shape == (2, 4, 7, 8)
    torch.testing.assert_close(y, F.avg_pool2d(x, 2, 1, 1), rtol=1e-6, atol=1e-6)
    t = ao.tanh_blur2d(x)
    torch.testing.assert_close(t, F.avg_pool2d(F.relu(10 * torch.tanh(x / 10)), 2, 1, 1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Layouts, empty batches
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(backend, layout):
    device = skip_unless("tanh_blur2d", backend, torch.float32)
    base = torch.randn(1, 4, 7, 10, dtype=torch.float64)
    if layout == "channels_last":
        x = base.to(device=device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    else:
        x = base.to(device=device, dtype=torch.float32).transpose(2, 3).contiguous().transpose(2, 3)[:, ::2]
        base = base[:, ::2]
        assert not x.is_contiguous()
    x_before = x.clone()
    for op, args in (("box", (3, 1, "same", "reflect")), ("tanh", (2, 1, 1, "zeros"))):
        xg = x.detach().requires_grad_()
        out = call(op, xg, args, backend)
        assert_close(out, naive(op, base, args), name=f"{layout} {op}")
        out.sum().backward()
        b64 = base.clone().requires_grad_()
        naive(op, b64, args).sum().backward()
        assert_close(xg.grad, b64.grad, name=f"{layout} {op} grad")
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_empty_batch(backend):
    device = skip_unless("box_blur2d", backend, torch.float32)
    x = torch.randn(0, 3, 5, 6, device=device, requires_grad=True)
    for fn in (ao.box_blur2d, ao.tanh_blur2d):
        y = fn(x, backend=backend)
        assert y.shape == (0, 3, 6, 7)
        assert_fused(y, backend)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g is not None and g.shape == x.shape


# ---------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------
GRADCHECK_CASES = [((1, 2, 4, 5), 2, 1, 1, "zeros"), ((1, 1, 5, 4), 3, 1, "same", "reflect"),
                   ((1, 2, 5, 6), (3, 2), (2, 1), (1, 2), "replicate"), ((1, 1, 6, 5), 5, 2, 2, "reflect"),
                   CASES[11]]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=_id)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend, case):
    skip_unless("tanh_blur2d", backend, torch.float64)
    shape, *args = case
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for op in OPS:
        assert torch.autograd.gradcheck(lambda t: call(op, t, args, backend), (x,))


OPCHECK_ARGS = [([2, 2], [1, 1], [1, 1, 1, 1], 0, 0), ([3, 3], [2, 1], [1, 1, 0, 2], 2, 2),
                ([2, 3], [1, 2], [0, 1, 2, 1], 1, 1)]


@pytest.mark.parametrize("args", OPCHECK_ARGS, ids=_id)
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(backend, args):
    device = skip_unless("tanh_blur2d", backend, torch.float32)
    kernel, stride, pads, mode, act = args
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.alterops, "blur2d_forward" + suffix)
    bwd = getattr(torch.ops.alterops, "blur2d_backward" + suffix)
    x = torch.randn(1, 2, 4, 5, device=device)
    y = fwd(x, kernel, stride, pads, mode, act, 4.0)
    torch.library.opcheck(fwd, (x, kernel, stride, pads, mode, act, 4.0))
    g = torch.randn_like(y)
    torch.library.opcheck(bwd, (g, x if act else None, [4, 5], kernel, stride, pads, mode, act, 4.0))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_torch_compile_fullgraph(backend):
    device = skip_unless("tanh_blur2d", backend, torch.float32)
    torch._dynamo.reset()

    def f(x):
        return ao.tanh_blur2d(x, 5.0, backend=backend) + ao.box_blur2d(x, 3, 1, "same", pad_mode="reflect",
                                                                        backend=backend).mean()

    x = torch.randn(2, 3, 6, 7, device=device)
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    eager = f(xe)
    compiled = torch.compile(f, fullgraph=True)(xc)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    eager.square().sum().backward()
    compiled.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Bad inputs and unavailable backends
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.randn(3, 5, 5)), ValueError, r"x must have 4 dimensions"),
    (dict(x=torch.randint(0, 3, (1, 1, 5, 5))), TypeError, r"x must have a floating-point dtype"),
    (dict(x="nope"), TypeError, r"x must be a torch.Tensor"),
    (dict(kernel_size=9, padding=1), ValueError, r"kernel_size \(9, 9\) is larger than the padded input"),
    (dict(kernel_size=(2, 8), padding=0), ValueError, r"larger than the padded input"),
    (dict(padding=-1), ValueError, r"padding must be >= 0"),
    (dict(padding="valid"), ValueError, r"padding must be an int, a pair of ints or 'same'"),
    (dict(kernel_size=0), ValueError, r"kernel_size must be >= 1"),
    (dict(kernel_size=2.5), TypeError, r"kernel_size must be an int or a pair"),
    (dict(stride=0), ValueError, r"stride must be >= 1"),
    (dict(pad_mode="circular"), ValueError, r"pad_mode must be one of \('zeros', 'replicate', 'reflect'\)"),
    (dict(pad_mode="reflect", padding=5), ValueError, r"reflect padding must be < the input size"),
    (dict(pad_mode="reflect", padding=(0, 6), kernel_size=(1, 2)), ValueError, r"reflect padding must be <"),
    (dict(x=torch.randn(1, 1, 0, 4)), ValueError, r"H, W >= 1"),
    (dict(backend="gpu"), ValueError, r"backend must be one of"),
])
@pytest.mark.parametrize("fn", ["box", "tanh"])
def test_bad_inputs(fn, kwargs, exc, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", torch.randn(1, 2, 5, 6))
    f = ao.box_blur2d if fn == "box" else ao.tanh_blur2d
    for backend in ("reference", "cpu"):
        kw = dict(kwargs)
        kw.setdefault("backend", backend)
        with pytest.raises(exc, match=match):
            f(x, **kw)


def test_bad_tau_and_relu():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"tau must be > 0"):
        ao.tanh_blur2d(x, tau=0.0)
    with pytest.raises(TypeError, match=r"tau must be a number"):
        ao.tanh_blur2d(x, tau="10")
    with pytest.raises(TypeError, match=r"relu must be a bool"):
        ao.tanh_blur2d(x, relu=1)


def test_unavailable_backend_says_why():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match=r"'cpu' backend of box_blur2d supports float32.*"
                                                      r"not float8_e4m3fn"):
        ao.box_blur2d(x.to(torch.float8_e4m3fn), backend="cpu")
    with pytest.raises(BackendUnavailableError, match=r"'cuda' cannot run here"):
        ao.tanh_blur2d(x.float(), backend="cuda")
    # automatic selection takes the kernels for every floating dtype they have (float16 too)
    y = ao.box_blur2d(x.requires_grad_())
    assert y.dtype == torch.float16
    if _ext.has_op("blur2d_forward"):
        assert_fused(y, "cpu")
