"""neighborhood_attention2d against an independent float64 brute force (explicit loops over
queries and neighbours, NATTEN's window-start rule written out), on every backend."""
from __future__ import annotations

import pytest
import torch

import alterops as ao
from alterops import _ext
from helpers import assert_close, assert_fused, interpreted, skip_unless

OP = "neighborhood_attention2d"
BACKENDS = ("reference", "cpu", "triton", "cuda")


# ---------------------------------------------------------------------------------------
# Independent brute force
# ---------------------------------------------------------------------------------------
def natten_window_start(index, length, kernel, dilation):
    """NATTEN's ``get_window_start`` (dilated version), as in its naive kernels."""
    ns = kernel // 2
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    ni = index - ns * dilation
    if ni < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel * dilation
    return ni


def axis_keys(y, length, kernel, dilation, border):
    if border == "clamp":
        s = natten_window_start(y, length, kernel, dilation)
        return [s + dilation * i for i in range(kernel)]
    r = kernel // 2
    return [y + dilation * (i - r) for i in range(kernel)]


def brute_force(q, k, v, kernel, dilation, border, table=None, scale=None, dtype=torch.float64):
    """Loops over every query and its neighbours; differentiable (for reference gradients)."""
    kh, kw = kernel
    dh, dw = dilation
    B, H, W, heads, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    tab = None if table is None else table.to(dtype).expand(heads, -1, -1)
    zero = torch.zeros(B, heads, d, dtype=dtype)
    rows = []
    for y in range(H):
        cols = []
        for x in range(W):
            logits, values = [], []
            for ky in axis_keys(y, H, kh, dh, border):
                for kx in axis_keys(x, W, kw, dw, border):
                    inside = 0 <= ky < H and 0 <= kx < W
                    if border == "clamp":
                        assert inside
                    if not inside and border == "mask":
                        continue
                    kvec = k[:, ky, kx] if inside else zero
                    vvec = v[:, ky, kx] if inside else zero
                    s = (q[:, y, x] * kvec).sum(-1) * scale  # (B, heads)
                    if tab is not None:
                        s = s + tab[:, (ky - y) // dh + kh - 1, (kx - x) // dw + kw - 1]
                    logits.append(s)
                    values.append(vvec)
            p = torch.softmax(torch.stack(logits, -1), -1)  # (B, heads, n)
            cols.append((p.unsqueeze(-1) * torch.stack(values, -2)).sum(-2))
        rows.append(torch.stack(cols, 1))
    return torch.stack(rows, 1)  # (B, H, W, heads, d)


def make_inputs(B, H, W, heads, d, dtype, device, bias=None, kernel=(3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, W, heads, d, generator=g, dtype=torch.float64) for _ in range(3))
    table = None
    if bias is not None:
        nt = heads if bias == "head" else 1
        table = torch.randn(nt, 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=g, dtype=torch.float64)
    return q, k, v, table


# (B, H, W, heads, head_dim, kernel, dilation, border, bias)
CASES = [
    (2, 7, 9, 2, 8, (3, 3), (1, 1), "clamp", "head"),
    (1, 9, 6, 2, 32, (5, 5), (1, 1), "clamp", "shared"),
    (1, 12, 10, 1, 16, (3, 3), (3, 3), "clamp", "head"),
    (1, 16, 9, 1, 8, (7, 3), (2, 3), "clamp", "head"),
    (1, 5, 7, 2, 8, (5, 7), (1, 1), "clamp", "head"),  # kernel = map size: global attention
    (1, 11, 13, 2, 8, (5, 5), (2, 2), "mask", "head"),
    (1, 6, 5, 2, 8, (1, 1), (1, 1), "mask", None),
    (1, 10, 9, 1, 64, (7, 7), (1, 1), "zero", "shared"),
    (1, 8, 8, 1, 80, (9, 9), (1, 1), "zero", "head"),  # kernel larger than the map
    (1, 9, 9, 1, 8, (5, 3), (3, 1), "zero", "head"),
]
CASE_IDS = [f"{c[7]}-{c[1]}x{c[2]}-d{c[4]}-k{c[5][0]}x{c[5][1]}-dil{c[6][0]}{c[6][1]}-{c[8]}" for c in CASES]
# The interpreter is slow: the Triton backend runs a representative subset.
TRITON_CASES = {0, 3, 5, 7, 8}

_BRUTE_CACHE: dict = {}


def brute_with_grads(case):
    """(out, dq, dk, dv, dtable) in float64 for a case and a fixed upstream gradient."""
    if case in _BRUTE_CACHE:
        return _BRUTE_CACHE[case]
    B, H, W, heads, d, kernel, dil, border, bias = case
    q, k, v, table = make_inputs(B, H, W, heads, d, torch.float64, "cpu", bias, kernel)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    tab = None if table is None else table.clone().requires_grad_()
    out = brute_force(*leaves, kernel, dil, border, tab)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves + ([tab] if tab is not None else []), gout)
    res = (out.detach(), gout, grads)
    _BRUTE_CACHE[case] = res
    return res


def run_case(case, backend, dtype, device, strided=False):
    B, H, W, heads, d, kernel, dil, border, bias = case
    q, k, v, table = make_inputs(B, H, W, heads, d, torch.float64, "cpu", bias, kernel)
    if strided:  # views into a fused qkv (B, H, W, 3, heads, d): no input is contiguous
        qkv = torch.stack([q, k, v], dim=3).to(device=device, dtype=dtype)
        qd, kd, vd = qkv.unbind(3)
        qd, kd, vd = (t.detach().requires_grad_() for t in (qd, kd, vd))
        assert not qd.is_contiguous()
    else:
        qd, kd, vd = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    tab = None if table is None else table.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
    out = ao.neighborhood_attention2d(qd, kd, vd, kernel, dil, border=border, rel_pos_bias=tab, backend=backend)
    return (qd, kd, vd, tab), out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_forward_backward_float32(case, backend):
    if interpreted(backend) and case not in TRITON_CASES:
        pytest.skip("interpreter: representative subset only")
    case = CASES[case]
    device = skip_unless(OP, backend, torch.float32)
    ref_out, gout, ref_grads = brute_with_grads(case)
    leaves, out = run_case(case, backend, torch.float32, device, strided=(backend != "reference"))
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, ref_out, name="out")
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, inputs, gout.to(device=device, dtype=torch.float32))
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        # float32 gradients sum many terms: allow the error of float32 math done naively.
        assert_close(g, r, name=name, naive=r.float().double() + 1e-5 * r.abs().max())


# Shapes for the float32 CPU kernel's vector paths that CASES does not reach: head_dim 48, rows
# with several full P.V tiles (dilation 1 and 2) and a narrower tail tile, 8-column blocks
# mixing interior and border queries.
WIDE_CASES = [
    (1, 9, 21, 2, 48, (5, 5), (1, 2), "clamp", "head"),
    (2, 8, 19, 1, 48, (7, 3), (1, 1), "zero", None),
    (1, 10, 22, 1, 32, (3, 5), (2, 1), "mask", "shared"),
]


@pytest.mark.parametrize("strided", (False, True))
@pytest.mark.parametrize("case", range(len(WIDE_CASES)))
def test_forward_backward_float32_cpu_tiles(case, strided):
    case = WIDE_CASES[case]
    skip_unless(OP, "cpu", torch.float32)
    ref_out, gout, ref_grads = brute_with_grads(case)
    leaves, out = run_case(case, "cpu", torch.float32, "cpu", strided=strided)
    assert_close(out, ref_out, name="out")
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, inputs, gout.float())
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert_close(g, r, name=name, naive=r.float().double() + 1e-5 * r.abs().max())


LOW_PRECISION = [
    ("cpu", torch.bfloat16, 7),
    ("cpu", torch.float64, 2),
    ("cpu", torch.float64, 5),
    ("triton", torch.bfloat16, 0),
    ("triton", torch.float16, 5),
    ("reference", torch.bfloat16, 1),
]


@pytest.mark.parametrize("backend,dtype,case", LOW_PRECISION)
def test_other_dtypes(backend, dtype, case):
    case = CASES[case]
    device = skip_unless(OP, backend, dtype)
    ref_out, gout, ref_grads = brute_with_grads(case)
    leaves, out = run_case(case, backend, dtype, device)
    assert out.dtype == dtype
    B, H, W, heads, d, kernel, dil, border, bias = case
    q, k, v, table = make_inputs(B, H, W, heads, d, torch.float64, "cpu", bias, kernel)
    naive = brute_force(q.to(dtype), k.to(dtype), v.to(dtype), kernel, dil, border,
                        None if table is None else table.to(dtype), dtype=dtype)
    assert_close(out, ref_out, naive, name="out")
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], gout.to(device=device, dtype=dtype))
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        scale = r.abs().max().item()
        tol = {torch.float64: 1e-9, torch.bfloat16: 4e-2, torch.float16: 5e-3}[dtype]
        err = (g.double().cpu() - r).abs().max().item()
        assert err <= tol * max(scale, 1.0), f"{name}: {err:.3e} > {tol * max(scale, 1.0):.3e}"


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("border", ("clamp", "mask", "zero"))
def test_gradcheck_float64(backend, border):
    device = skip_unless(OP, backend, torch.float64)
    q, k, v, table = make_inputs(1, 4, 5, 2, 3, torch.float64, device, "head", (3, 3))
    args = [t.requires_grad_() for t in (q, k, v, table)]
    dil = (1, 2) if border != "clamp" else (1, 1)
    fn = lambda q, k, v, t: ao.neighborhood_attention2d(q, k, v, 3, dil, border=border, rel_pos_bias=t, backend=backend)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_matches_reference_bigger_map(backend):
    """A map spanning several query tiles, against the library reference in float64."""
    device = skip_unless(OP, backend, torch.float32)
    big = (1, 13, 17, 1, 32) if backend == "triton" else (2, 30, 27, 3, 32)
    q, k, v, table = make_inputs(*big, torch.float64, "cpu", "head", (7, 7))
    for border in ("clamp", "zero"):
        ref = ao.neighborhood_attention2d(q, k, v, 7, border=border, rel_pos_bias=table, backend="reference")
        out = ao.neighborhood_attention2d(*(t.float().to(device) for t in (q, k, v)), 7, border=border,
                                          rel_pos_bias=table.float().to(device), backend=backend)
        assert_close(out, ref, name=f"out ({border})")


def test_reference_is_the_spec_sign_convention():
    """Key-minus-query: a table that is large only at (dy, dx) = (+1, 0) pulls each query to the key below."""
    q = torch.zeros(1, 5, 5, 1, 4, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.arange(25, dtype=torch.float64).view(1, 5, 5, 1, 1).expand(1, 5, 5, 1, 4).contiguous()
    table = torch.full((1, 5, 5), -1e4, dtype=torch.float64)
    table[0, 1 + 2, 0 + 2] = 0.0
    for backend in BACKENDS:
        try:
            dt = torch.float64 if backend in ("reference", "cpu") else torch.float32
            device = skip_unless(OP, backend, dt)
        except pytest.skip.Exception:
            continue
        out = ao.neighborhood_attention2d(q.to(device, dt), k.to(device, dt), v.to(device, dt), 3, border="mask",
                                          rel_pos_bias=table.to(device, dt), backend=backend)
        # interior query (2, 2) reads the value of key (3, 2)
        assert abs(out[0, 2, 2, 0, 0].item() - 17.0) < 1e-3, backend


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_head_dim_above_128(backend):
    """head_dim 160: the Triton kernels' 256-wide head_dim block, the CPU kernel's long rows."""
    case = (1, 5, 6, 2, 160, (3, 3), (1, 1), "clamp", "head")
    device = skip_unless(OP, backend, torch.float32)
    ref_out, gout, ref_grads = brute_with_grads(case)
    leaves, out = run_case(case, backend, torch.float32, device)
    assert_fused(out, backend)
    assert_close(out, ref_out, name="out")
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], gout.to(device=device, dtype=torch.float32))
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert_close(g, r, name=name, naive=r.float().double() + 1e-5 * r.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = skip_unless(OP, backend, torch.float32)
    q = torch.randn(0, 5, 6, 2, 8, device=device, requires_grad=True)
    table = torch.randn(2, 5, 5, device=device, requires_grad=True)
    k = torch.randn(0, 5, 6, 2, 8, device=device, requires_grad=True)
    v = torch.randn(0, 5, 6, 2, 8, device=device, requires_grad=True)
    out = ao.neighborhood_attention2d(q, k, v, 3, rel_pos_bias=table, backend=backend)
    assert out.shape == q.shape
    assert_fused(out, backend)  # an empty batch still goes through the backend asked for
    grads = torch.autograd.grad(out.sum(), (q, k, v, table))
    for t, gr in zip((q, k, v, table), grads):
        assert gr is not None and gr.shape == t.shape
    assert torch.equal(grads[3], torch.zeros_like(table))


def test_does_not_write_inputs():
    q, k, v, table = make_inputs(1, 6, 7, 2, 8, torch.float32, "cpu", "head")
    q, k, v, table = (t.float() for t in (q, k, v, table))
    copies = [t.clone() for t in (q, k, v, table)]
    for backend in ("reference", "cpu"):
        if _ext.has_op("neighborhood_attention_nd_fwd") or backend == "reference":
            ao.neighborhood_attention2d(q, k, v, 3, rel_pos_bias=table, backend=backend)
    for a, b in zip((q, k, v, table), copies):
        assert torch.equal(a, b)


@pytest.mark.skipif(not _ext.has_op("neighborhood_attention_nd_fwd"), reason="alterops._C not built")
def test_opcheck_cpu():
    """The opaque ops a 2-D call runs (the N-d ops, with a leading axis of size 1)."""
    q, k, v, table = make_inputs(1, 6, 7, 2, 8, torch.float32, "cpu", "head")
    q, k, v = (t.float().unsqueeze(1) for t in (q, k, v))
    table = table.float().unsqueeze(1)
    for border in ("clamp", "zero"):
        args = (q, k, v, [1, 3, 3], [1, 1, 1], [1, 1, 1], [0, 0, 0], border, table, 0.3)
        torch.library.opcheck(torch.ops.alterops.neighborhood_attention_nd_fwd.default, args)
        out, lse = torch.ops.alterops.neighborhood_attention_nd_fwd(*args)
        torch.library.opcheck(torch.ops.alterops.neighborhood_attention_nd_bwd.default,
                              (torch.randn_like(out), q, k, v, out, lse, None, *args[3:], True))


def test_opcheck_triton():
    device = skip_unless(OP, "triton", torch.float32)
    q, k, v, table = make_inputs(1, 5, 6, 1, 16, torch.float32, device, "head")
    q, k, v = (t.float().to(device).unsqueeze(1) for t in (q, k, v))
    table = table.float().to(device).unsqueeze(1)
    args = (q, k, v, [1, 3, 3], [1, 1, 1], [1, 1, 1], [0, 0, 0], "zero", table, 0.3)
    torch.library.opcheck(torch.ops.alterops.neighborhood_attention_nd_triton_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.alterops.neighborhood_attention_nd_triton_fwd(*args)
    torch.library.opcheck(torch.ops.alterops.neighborhood_attention_nd_triton_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, None, *args[3:], True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    device = skip_unless(OP, backend, torch.float32)
    q, k, v, table = make_inputs(1, 6, 7, 2, 16, torch.float32, device, "head")
    q, k, v, table = (t.float().to(device).requires_grad_() for t in (q, k, v, table))

    def f(q, k, v, t):
        return ao.neighborhood_attention2d(q, k, v, 3, border="zero", rel_pos_bias=t, backend=backend)

    # aot_eager: the full dynamo + autograd tracing path; inductor codegen would only add minutes
    # of C++ compilation on this machine (the fused backends are opaque ops either way).
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, table)
    ref = f(q, k, v, table)
    assert_close(out, ref.detach().double(), name="compiled out")
    g1 = torch.autograd.grad(out.sum(), (q, k, v, table))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v, table))
    for a, b in zip(g1, g2):
        assert_close(a, b.double())


def test_bad_inputs():
    q = torch.randn(1, 6, 7, 2, 8)
    na = ao.neighborhood_attention2d
    with pytest.raises(ValueError, match="stride must be <= kernel_size"):
        na(q, q, q, 3, stride=4)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        na(q, q, q, 0)
    with pytest.raises(ValueError, match="kernel_size \\* dilation <= the map size"):
        na(q, q, q, 7)  # 7 > H = 6
    with pytest.raises(ValueError, match="kernel_size \\* dilation <= the map size"):
        na(q, q, q, 3, dilation=3)
    na(q, q, q, 7, border="mask")  # allowed: keys outside the image are left out
    with pytest.raises(ValueError, match="rel_pos_bias must have shape"):
        na(q, q, q, 3, rel_pos_bias=torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="rel_pos_bias must have shape"):
        na(q, q, q, 3, rel_pos_bias=torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="rel_pos_bias must have 3 dimensions"):
        na(q, q, q, 3, rel_pos_bias=torch.randn(5, 5))
    with pytest.raises(ValueError, match="k has shape"):
        na(q, torch.randn(1, 6, 7, 2, 4), q, 3)
    with pytest.raises(TypeError, match="v has dtype"):
        na(q, q, q.double(), 3)
    with pytest.raises(TypeError, match="floating-point"):
        na(q.long(), q.long(), q.long(), 3)
    with pytest.raises(ValueError, match="q must have 5 dimensions"):
        na(q[0], q[0], q[0], 3)
    with pytest.raises(ValueError, match="border must be one of"):
        na(q, q, q, 3, border="reflect")
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        na(q, q, q, 3, dilation=0)
    with pytest.raises(ValueError, match="is on meta"):
        na(q, q.to("meta"), q, 3)
    with pytest.raises(ValueError, match="rel_pos_bias is on meta"):
        na(q, q, q, 3, rel_pos_bias=torch.randn(2, 5, 5, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        na(q, q, q, 3, backend="gpu")
    with pytest.raises(ao.BackendUnavailableError, match="'cuda' backend needs CUDA tensors"):
        na(q, q, q, 3, backend="cuda")
    with pytest.raises(ao.BackendUnavailableError, match="supports.*not float8_e4m3fn"):
        qf8 = q.to(torch.float8_e4m3fn)
        na(qf8, qf8, qf8, 3, backend="cpu")


def test_natten_clamp_matches():
    natten = pytest.importorskip("natten")
    q, k, v, _ = make_inputs(1, 10, 12, 2, 32, torch.float32, "cpu")
    q, k, v = (t.float() for t in (q, k, v))
    ref = natten.na2d(q, k, v, kernel_size=5, dilation=2)
    out = ao.neighborhood_attention2d(q, k, v, 5, 2)
    assert_close(out, ref.double(), name="vs natten")


@pytest.mark.skipif(not _ext.has_op("neighborhood_attention_nd_fwd"), reason="compiled kernels not loaded")
@pytest.mark.parametrize("shape,dtype,border,d,kernel,dilation", [
    ((1, 20, 23, 1), torch.float32, "clamp", 32, 5, 1),   # few (batch, head) pairs: split rows
    ((1, 40, 41, 2), torch.float64, "mask", 16, 5, 2),
    ((1, 21, 26, 1), torch.bfloat16, "zero", 32, 7, 1),
    ((5, 12, 13, 4), torch.float32, "zero", 24, 3, 1),    # many pairs: one task per pair
])
def test_cpu_bitwise_identical_for_any_thread_count(shape, dtype, border, d, kernel, dilation):
    """Outputs and every gradient are the same bits with 1, 2 and 3 threads, and on repeated runs
    (the work split depends on the shapes only; the threads take its tasks as they come free, so
    which thread computes a task differs from run to run)."""
    B, H, W, heads = shape
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, H, W, 3, heads, d, generator=g).to(dtype)
    table = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g)
    gout = torch.randn(B, H, W, heads, d, generator=g).to(dtype)

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            q, k, v = (t.clone().requires_grad_() for t in qkv.unbind(3))
            tab = table.clone().requires_grad_()
            out = ao.neighborhood_attention2d(q, k, v, kernel, dilation=dilation, border=border, rel_pos_bias=tab,
                                              backend="cpu")
            return [out.detach(), *torch.autograd.grad(out, [q, k, v, tab], gout)]
        finally:
            torch.set_num_threads(before)

    one = run(1)
    for threads in (2, 3, 2, 2):
        for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), one, run(threads)):
            assert torch.equal(a, b), f"{name} differs between 1 and {threads} threads"
