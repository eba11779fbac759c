"""Inputs users will send: NaN and +-inf in every input, large logits, non-default / zero /
negative scales, only some inputs requiring grad, and double backward through the fused ops.

The oracle is an independent float64 brute force written here: the windows are enumerated with
plain Python loops from the rules in ``docs/semantics.md``, then the logits, the max-subtracted
softmax and the weighted sum are evaluated in float64 over exactly those keys ("Non-finite
inputs" in the docs: keys outside a query's window take no part at all, IEEE arithmetic inside
it). NaN placement is compared exactly (``torch.isnan`` masks, and the +-inf masks), finite
entries by value. Every non-finite case also checks that its reference has both NaN (or inf)
and finite entries, so a kernel that returns all-NaN or never-NaN cannot pass.

The Triton cases run under the interpreter on a machine without a GPU and are kept tiny.
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

import alterops as ao
from helpers import assert_close, device_for, interpreted, skip_unless

NAN, INF = float("nan"), float("inf")
FUSED = ("cpu", "triton")


# =========================================================================================
# Independent geometry (Python loops over the rules of docs/semantics.md)
# =========================================================================================
def _clamp_axis(L, K, D, i):
    """NATTEN's clamped window on one axis: the K keys of query i in its dilation sub-grid."""
    res, j = i % D, i // D
    n = len(range(res, L, D))
    start = min(max(j - (K - 1) // 2, 0), n - K)
    return [res + D * (start + t) for t in range(K)]


@functools.lru_cache(maxsize=None)
def na_pairs(H, W, kh, kw, dh, dw, border):
    """For every query (row-major): (key flat index or H*W for a zero-vector key, bias-table
    flat index). Keys outside the window are simply not listed."""
    tw = 2 * kw - 1
    rows = []
    for y in range(H):
        for x in range(W):
            if border == "clamp":
                ys, xs = _clamp_axis(H, kh, dh, y), _clamp_axis(W, kw, dw, x)
            else:
                ys = [y + dh * (t - (kh - 1) // 2) for t in range(kh)]
                xs = [x + dw * (t - (kw - 1) // 2) for t in range(kw)]
            keys = []
            for py in ys:
                for px in xs:
                    inside = 0 <= py < H and 0 <= px < W
                    if not inside and border == "mask":
                        continue
                    bi = ((py - y) // dh + kh - 1) * tw + (px - x) // dw + kw - 1
                    keys.append((py * W + px if inside else H * W, bi))
            rows.append(keys)
    return rows


@functools.lru_cache(maxsize=None)
def wa_pairs(H, W, wh, ww, sh, sw):
    """Swin shifted windows: query (y, x) sees the present keys of its window in its region."""
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww

    def rolled(y, x):
        return (y - sh) % Hp, (x - sw) % Wp

    def region(r, L, w, s):
        return 0 if s == 0 or r < L - w else (1 if r < L - s else 2)

    def tag(y, x):
        ry, rx = rolled(y, x)
        return (ry // wh, rx // ww, region(ry, Hp, wh, sh), region(rx, Wp, ww, sw))

    tw = 2 * ww - 1
    rows = []
    for y in range(H):
        for x in range(W):
            ry, rx = rolled(y, x)
            keys = []
            for y2 in range(H):
                for x2 in range(W):
                    if tag(y2, x2) != tag(y, x):
                        continue
                    ky, kx = rolled(y2, x2)
                    bi = (ky % wh - ry % wh + wh - 1) * tw + (kx % ww - rx % ww + ww - 1)
                    keys.append((y2 * W + x2, bi))
            rows.append(keys)
    return rows


def attention_brute(q, k, v, table, rows, scale):
    """float64 brute force over the listed (key, bias index) pairs; differentiable."""
    B, H, W, nh, d = q.shape
    q, k, v = q.double(), k.double(), v.double()
    J = max(len(r) for r in rows)
    idx = torch.full((H * W, J), H * W, dtype=torch.long)
    bidx = torch.zeros((H * W, J), dtype=torch.long)
    listed = torch.zeros((H * W, J), dtype=torch.bool)
    for i, r in enumerate(rows):
        for j, (key, bi) in enumerate(r):
            idx[i, j], bidx[i, j], listed[i, j] = key, bi, True
    zero = q.new_zeros(B, 1, nh, d)
    kf = torch.cat([k.reshape(B, H * W, nh, d), zero], 1)[:, idx]  # (B, HW, J, nh, d)
    vf = torch.cat([v.reshape(B, H * W, nh, d), zero], 1)[:, idx]
    s = (q.reshape(B, H * W, 1, nh, d) * kf).sum(-1) * scale  # (B, HW, J, nh)
    if table is not None:
        t = table.double().reshape(table.shape[0], -1)[:, bidx]  # (nh|1, HW, J)
        s = s + t.permute(1, 2, 0).unsqueeze(0)
    s = s.masked_fill(~listed[None, :, :, None], -INF)
    m = s.amax(2, keepdim=True)  # NaN propagates, as in the spec's softmax
    e = torch.exp(s - m)
    w = e / e.sum(2, keepdim=True)
    # unlisted slots hold the zero sentinel key/value and weight 0: no contribution
    out = torch.where(listed[None, :, :, None, None], w.unsqueeze(-1) * vf, 0.0).sum(2)
    return out.reshape(B, H, W, nh, d)


def blur_brute(x, kernel, stride, pads, mode, act, tau=10.0):
    """Window sums written out per output pixel (float64), f applied before padding."""
    x = x.double()
    if act:
        x = tau * torch.tanh(x / tau)
        if act == "relu":
            x = torch.relu(x)
    B, C, H, W = x.shape
    kh, kw = kernel
    top, bottom, left, right = pads

    def src(p, n):
        if 0 <= p < n:
            return p
        if mode == "zeros":
            return None
        if mode == "replicate":
            return 0 if p < 0 else n - 1
        return -p if p < 0 else 2 * (n - 1) - p

    Ho = (H + top + bottom - kh) // stride[0] + 1
    Wo = (W + left + right - kw) // stride[1] + 1
    out = x.new_zeros(B, C, Ho, Wo)
    for i in range(Ho):
        for j in range(Wo):
            acc = x.new_zeros(B, C)
            for a in range(kh):
                sy = src(i * stride[0] + a - top, H)
                for e in range(kw):
                    sx = src(j * stride[1] + e - left, W)
                    if sy is not None and sx is not None:
                        acc = acc + x[:, :, sy, sx]
            out[:, :, i, j] = acc / (kh * kw)
    return out


# =========================================================================================
# Helpers
# =========================================================================================
def assert_same_nonfinite(out, ref, *, atol=2e-5, rtol=2e-5, name="output"):
    """NaN exactly where ``ref`` has NaN, +inf / -inf exactly where it has them, finite
    entries close."""
    o, r = out.detach().double(), ref.detach().double()
    assert o.shape == r.shape
    for kind, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = f(o) != f(r)
        assert not bad.any(), (
            f"{name}: {kind} placement differs at {bad.nonzero()[:6].tolist()} "
            f"({int(f(o).sum())} in output, {int(f(r).sum())} in reference)")
    fin = torch.isfinite(r)
    err = (o[fin] - r[fin]).abs()
    bound = atol + rtol * r[fin].abs()
    assert (err <= bound).all(), f"{name}: finite entries differ by up to {err.max().item():.3e}"


def _qkv(shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(3)]


def _table(nh, kh, kw, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nh, 2 * kh - 1, 2 * kw - 1, generator=g) * 0.5


# Non-finite values are put at an interior position, a corner and an edge, in different heads
# and channels, so NaN from one of them must not reach queries that do not see it.
def _poison(t, which, H, W):
    if which == "nan":
        spots = [((0, 0, 0, 0, 1), NAN), ((0, H - 1, 2, 1, 0), NAN), ((0, 2, W - 1, 1, 3), NAN)]
    elif which == "inf":
        spots = [((0, 0, 0, 0, 1), INF), ((0, H - 1, 2, 1, 0), -INF), ((0, 2, W - 1, 1, 3), INF)]
    else:  # one NaN, one +inf, one -inf
        spots = [((0, 0, 0, 0, 1), NAN), ((0, H - 1, 2, 1, 0), INF), ((0, 2, W - 1, 1, 3), -INF)]
    t = t.clone()
    for ix, val in spots:
        t[ix] = val
    return t


def _poison_table(t, which, one_head=False):
    """With ``one_head`` both values go to head 0 (with border="zero" every query has every
    offset, so a poisoned head is all NaN and only the other head can stay finite)."""
    t = t.clone()
    vals = {"nan": (NAN, NAN), "inf": (INF, -INF), "mixed": (NAN, INF)}[which]
    kh, kw = (t.shape[1] + 1) // 2, (t.shape[2] + 1) // 2
    t[0, kh - 2, kw] = vals[0]  # offset (-1, +1): only the queries with that key in the window
    t[0 if one_head else -1, kh, kw - 2] = vals[1]  # offset (+1, -1)
    return t


def _check_case(out, ref):
    r = ref.double()
    assert torch.isfinite(r).any(), "case has no finite output: it cannot tell placement apart"
    assert (~torch.isfinite(r)).any(), "case has no non-finite output: it does not test anything"
    assert_same_nonfinite(out, ref)


# =========================================================================================
# 1. NaN / +-inf in q, k, v and the bias table
# =========================================================================================
NA_GEOM = [("clamp", 3, 1), ("mask", 3, 1), ("zero", 3, 1), ("mask", (3, 5), (1, 2)), ("clamp", 3, 2)]
WA_GEOM = [(3, 0), (3, 1), ((3, 4), (2, 1))]
WHERE = ("q", "k", "v", "bias")
VALUES = ("nan", "inf", "mixed")


def _nonfinite_inputs(where, which, H, W, nh, d, kh, kw, border=None):
    q, k, v = _qkv((1, H, W, nh, d))
    table = _table(nh, kh, kw)
    if where == "bias":
        table = _poison_table(table, which, one_head=border == "zero")
    else:
        t = {"q": q, "k": k, "v": v}[where]
        t = _poison(t, which, H, W)
        q, k, v = (t if n == where else x for n, x in zip("qkv", (q, k, v)))
    return q, k, v, table


def _na_nonfinite(backend, border, ks, dil, where, which):
    H, W, nh, d = 6, 7, 2, 4
    kh, kw = (ks, ks) if isinstance(ks, int) else ks
    dh, dw = (dil, dil) if isinstance(dil, int) else dil
    q, k, v, table = _nonfinite_inputs(where, which, H, W, nh, d, kh, kw, border)
    dev = device_for(backend)
    out = ao.neighborhood_attention2d(q.to(dev), k.to(dev), v.to(dev), (kh, kw), (dh, dw), border=border,
                                      rel_pos_bias=table.to(dev), backend=backend).cpu()
    ref = attention_brute(q, k, v, table, na_pairs(H, W, kh, kw, dh, dw, border), d ** -0.5)
    _check_case(out, ref)
    if backend != "reference":  # the spec in code gives the same placement
        spec = ao.neighborhood_attention2d(q, k, v, (kh, kw), (dh, dw), border=border, rel_pos_bias=table,
                                           backend="reference")
        assert_same_nonfinite(out, spec, name="vs reference backend")


def _wa_nonfinite(backend, window, shift, where, which):
    H, W, nh, d = 7, 8, 2, 4  # partial windows (absent tokens) and mixed shift regions
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (shift, shift) if isinstance(shift, int) else shift
    q, k, v, table = _nonfinite_inputs(where, which, H, W, nh, d, wh, ww)
    dev = device_for(backend)
    out = ao.window_attention2d(q.to(dev), k.to(dev), v.to(dev), (wh, ww), shift=(sh, sw),
                                rel_pos_bias=table.to(dev), backend=backend).cpu()
    ref = attention_brute(q, k, v, table, wa_pairs(H, W, wh, ww, sh, sw), d ** -0.5)
    _check_case(out, ref)
    if backend != "reference":
        spec = ao.window_attention2d(q, k, v, (wh, ww), shift=(sh, sw), rel_pos_bias=table, backend="reference")
        assert_same_nonfinite(out, spec, name="vs reference backend")


# the compiled kernels get every kind of value; the reference (which the CPU cases are also
# compared with) the mixed one
BACKEND_VALUES = [("cpu", w) for w in VALUES] + [("reference", "mixed")]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("geom", NA_GEOM, ids=lambda g: f"{g[0]}-k{g[1]}-d{g[2]}")
@pytest.mark.parametrize("backend,which", BACKEND_VALUES)
def test_neighborhood_attention_nonfinite(backend, which, geom, where):
    skip_unless("neighborhood_attention2d", backend, torch.float32)
    _na_nonfinite(backend, *geom, where, which)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("geom", WA_GEOM, ids=lambda g: f"w{g[0]}-s{g[1]}")
@pytest.mark.parametrize("backend,which", BACKEND_VALUES)
def test_window_attention_nonfinite(backend, which, geom, where):
    skip_unless("window_attention2d", backend, torch.float32)
    _wa_nonfinite(backend, *geom, where, which)


# Triton under the interpreter: one mixed (NaN, +inf, -inf) case per input and border.
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("border", ("clamp", "mask", "zero"))
def test_neighborhood_attention_nonfinite_triton(border, where):
    skip_unless("neighborhood_attention2d", "triton", torch.float32)
    _na_nonfinite("triton", border, 3, 1, where, "mixed")


@pytest.mark.parametrize("where", WHERE)
def test_window_attention_nonfinite_triton(where):
    skip_unless("window_attention2d", "triton", torch.float32)
    _wa_nonfinite("triton", 3, 1, where, "mixed")


def test_nan_key_poisons_exactly_the_queries_that_see_it():
    """The rule spelt out on one case: a NaN key at a corner makes NaN exactly the rows of the
    queries whose window holds it (all channels, that head only); with border="mask" the
    keys a clamped index would alias must not leak it."""
    H, W, nh, d = 5, 5, 2, 3
    q, k, v = _qkv((1, H, W, nh, d))
    k[0, 0, 0, 1, 0] = NAN
    for backend in ("reference", "cpu"):
        out = ao.neighborhood_attention2d(q, k, v, 3, border="mask", backend=backend)
        rows = torch.isnan(out[0, :, :, 1]).all(-1)
        want = torch.zeros(H, W, dtype=torch.bool)
        want[:2, :2] = True  # the queries within one step of the corner
        assert torch.equal(rows, want), backend
        assert not torch.isnan(out[0, :, :, 0]).any() and not torch.isnan(out[0, :, :, 1][~want]).any()


# -----------------------------------------------------------------------------------------
# blur: NaN / inf in x (every pad mode; zero padding with strides; wide rows)
# -----------------------------------------------------------------------------------------
BLUR_CASES = [
    ((2, 2, 7, 9), (2, 2), (1, 1), 1, "zeros"),
    ((1, 2, 6, 8), (3, 3), (1, 1), "same", "reflect"),
    ((1, 2, 6, 7), (3, 2), (2, 1), (1, 2), "replicate"),
    ((1, 1, 5, 40), (3, 3), (1, 1), "same", "zeros"),  # one NaN must not spread along a wide row
    ((1, 1, 9, 8), (5, 5), (2, 2), 2, "zeros"),
    ((1, 1, 12, 7), (9, 3), (1, 1), 4, "zeros"),  # tall kernels
]
BLUR_OPS = ("box", "tanh", "tanh_norelu")


def _blur(op, x, kernel, stride, padding, mode, backend):
    if op == "box":
        return ao.box_blur2d(x, kernel, stride, padding, pad_mode=mode, backend=backend)
    return ao.tanh_blur2d(x, 10.0, kernel, stride, padding, relu=op == "tanh", pad_mode=mode, backend=backend)


def _blur_nonfinite(backend, op, case, which):
    from alterops.blur import _pads

    shape, kernel, stride, padding, mode = case
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    H, W = shape[-2:]
    vals = {"nan": (NAN, NAN, NAN), "inf": (INF, -INF, INF), "mixed": (NAN, INF, -INF)}[which]
    x[0, 0, 0, 1] = vals[0]
    x[0, -1, H - 1, W - 1] = vals[1]
    x[-1, 0, H // 2, W // 2] = vals[2]
    if which == "inf":  # +inf and -inf meeting in one window give NaN
        x[-1, 0, H // 2, W // 2 + 1] = -INF
    out = _blur(op, x.to(device_for(backend)), kernel, stride, padding, mode, backend).cpu()
    act = {"box": None, "tanh": "relu", "tanh_norelu": "tanh"}[op]
    ref = blur_brute(x, kernel, stride, _pads(padding, kernel), mode, act)
    if op == "box" or which != "inf":
        _check_case(out, ref)
    else:  # tanh maps +-inf to +-tau: finite everywhere
        assert torch.isfinite(ref).all()
        assert_same_nonfinite(out, ref, atol=1e-5)
    if backend != "reference":
        spec = _blur(op, x, kernel, stride, padding, mode, "reference")
        assert_same_nonfinite(out, spec, atol=1e-5, name="vs reference backend")


@pytest.mark.parametrize("case", BLUR_CASES, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}-{c[4]}")
@pytest.mark.parametrize("op", BLUR_OPS)
@pytest.mark.parametrize("backend,which", BACKEND_VALUES)
def test_blur_nonfinite(backend, which, op, case):
    skip_unless("box_blur2d", backend, torch.float32)
    _blur_nonfinite(backend, op, case, which)


@pytest.mark.parametrize("op", BLUR_OPS)
@pytest.mark.parametrize("case", [BLUR_CASES[0], BLUR_CASES[2]], ids=("k2", "k3x2-s2"))
def test_blur_nonfinite_triton(op, case):
    skip_unless("box_blur2d", "triton", torch.float32)
    _blur_nonfinite("triton", op, case, "mixed")


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_statistics_nonfinite(backend):
    """A NaN anywhere in x enters every DFT bin and the variance of its plane: all NaN."""
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 3, 4] = NAN
    d = ao.delta_log_amplitude(x, backend=backend)
    assert d.shape == (4,) and torch.isnan(d).all()
    assert torch.isnan(ao.feature_variance(x, backend=backend))
    x[1, 2, 3, 4] = 0.0
    assert torch.isfinite(ao.delta_log_amplitude(x, backend=backend)).all()


# =========================================================================================
# 2. Large logits (q.k in the thousands)
# =========================================================================================
def _large(op, backend, dtype, grad):
    H, W, nh, d = 6, 7, 2, 8
    q, k, v = _qkv((1, H, W, nh, d), scale=1.0, seed=5)
    q, k = q * 30, k * 30  # |q.k| up to a few thousand; scaled logits in the hundreds+
    table = _table(nh, 3, 3) * 50
    q, k, v, table = (t.to(dtype) for t in (q, k, v, table))
    dev = device_for(backend)
    ins = [t.to(dev).requires_grad_(grad) for t in (q, k, v, table)]
    if op == "na":
        rows = na_pairs(H, W, 3, 3, 1, 1, "mask")

        def f(*a, backend):
            return ao.neighborhood_attention2d(*a[:3], 3, border="mask", rel_pos_bias=a[3], backend=backend)
    else:
        rows = wa_pairs(H, W, 3, 3, 1, 1)

        def f(*a, backend):
            return ao.window_attention2d(*a[:3], 3, shift=1, rel_pos_bias=a[3], backend=backend)

    assert (q.double() * k.double()).sum(-1).abs().max() > 1000
    out = f(*ins, backend=backend)
    ins64 = [t.detach().double().cpu().requires_grad_(grad) for t in ins]
    ref = attention_brute(*ins64, rows, d ** -0.5)
    naive = f(*[t.detach().cpu() for t in ins], backend="reference")
    assert torch.isfinite(out).all()
    # factor 8: the fused kernels work in base 2 (log2(e) folded into the scale), where logits
    # in the thousands have twice the float32 spacing, and round once more; the CAP ceiling of
    # helpers.assert_close still bounds the error
    assert_close(out, ref, naive, factor=8.0)
    if grad:
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        got = torch.autograd.grad(out, ins, g.to(out.dtype).to(dev))
        want = torch.autograd.grad(ref, ins64, g)
        insr = [t.detach().cpu().requires_grad_() for t in ins]
        naive_g = torch.autograd.grad(f(*insr, backend="reference"), insr, g.to(out.dtype))
        for n, a, b, c in zip(("dq", "dk", "dv", "dbias"), got, want, naive_g):
            assert torch.isfinite(a).all(), n
            # the fused backward recomputes the weights from the saved float32 logsumexp, whose
            # spacing at logits in the thousands is ~1e-4: a relative error of that size in every
            # weight, which the autograd reference does not have (still capped by CAP)
            assert_close(a, b, c, factor=16.0, name=n)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("op", ("na", "wa"))
def test_large_logits_cpu(op, dtype):
    skip_unless("neighborhood_attention2d", "cpu", dtype)
    _large(op, "cpu", dtype, grad=dtype == torch.float32)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("op", ("na", "wa"))
def test_large_logits_triton(op, dtype):
    skip_unless("neighborhood_attention2d", "triton", dtype)
    _large(op, "triton", dtype, grad=dtype == torch.float32 and not interpreted("triton"))


# =========================================================================================
# 3. Non-default, zero and negative scales (forward and every gradient)
# =========================================================================================
def _scaled(op, backend, scale, border="mask"):
    H, W, nh, d = 5, 6, 2, 4
    q, k, v = _qkv((2, H, W, nh, d), dtype=torch.float64, seed=7)
    table = _table(nh, 3, 3).double()
    dtype = torch.float64 if backend == "cpu" else torch.float32
    dev = device_for(backend)
    ins = [t.to(dtype).to(dev).requires_grad_() for t in (q, k, v, table)]
    if op == "na":
        rows = na_pairs(H, W, 3, 3, 1, 1, border)
        out = ao.neighborhood_attention2d(*ins[:3], 3, border=border, rel_pos_bias=ins[3], scale=scale,
                                          backend=backend)
    else:
        rows = wa_pairs(H, W, 3, 3, 1, 1)
        out = ao.window_attention2d(*ins[:3], 3, shift=1, rel_pos_bias=ins[3], scale=scale, backend=backend)
    ins64 = [t.detach().double().cpu().requires_grad_() for t in ins]
    ref = attention_brute(*ins64, rows, scale)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    got = torch.autograd.grad(out, ins, g.to(dtype).to(dev))
    want = torch.autograd.grad(ref, ins64, g)
    for n, a, b in zip(("dq", "dk", "dv", "dbias"), got, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=tol * 10, rtol=tol * 10, msg=lambda m: f"{n}: {m}")
    if scale == 0.0:
        # zero scale, no q.k term: dq and dk are exactly zero
        assert not got[0].any() and not got[1].any()
    return ins, out


@pytest.mark.parametrize("scale", (0.0, -0.7, 2.5, 1e-3))
@pytest.mark.parametrize("op", ("na", "wa"))
def test_scale_cpu(op, scale):
    skip_unless("neighborhood_attention2d", "cpu", torch.float64)
    _scaled(op, "cpu", scale)


@pytest.mark.parametrize("border", ("clamp", "zero"))
def test_scale_cpu_borders(border):
    _scaled("na", "cpu", -1.3, border)


@pytest.mark.parametrize("op", ("na", "wa"))
def test_scale_triton(op):
    skip_unless("neighborhood_attention2d", "triton", torch.float32)
    _scaled(op, "triton", -0.7)


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
def test_zero_scale_is_window_mean(backend):
    """scale=0 and no bias: every key has the same weight, the output is the mean of the
    values of the window (clamp: always k*k keys)."""
    skip_unless("neighborhood_attention2d", backend, torch.float32)
    H, W, nh, d = 5, 5, 1, 2
    q, k, v = _qkv((1, H, W, nh, d), seed=9)
    dev = device_for(backend)
    out = ao.neighborhood_attention2d((q * 100).to(dev), (k * 100).to(dev), v.to(dev), 3, border="clamp", scale=0.0,
                                      backend=backend).cpu()
    rows = na_pairs(H, W, 3, 3, 1, 1, "clamp")
    vf = v.double().reshape(H * W, nh, d)
    want = torch.stack([vf[[key for key, _ in r]].mean(0) for r in rows]).reshape(1, H, W, nh, d)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=2e-6)


# =========================================================================================
# 4. Only some inputs requiring grad
# =========================================================================================
SUBSETS = [s for n in range(0, 5) for s in itertools.combinations(("q", "k", "v", "bias"), n)]


def _partial(op, backend, subset):
    H, W, nh, d = 5, 6, 2, 4
    dtype = torch.float64 if backend == "cpu" else torch.float32
    q, k, v = _qkv((1, H, W, nh, d), dtype=dtype, seed=11)
    table = _table(nh, 3, 3).to(dtype)
    names = ("q", "k", "v", "bias")
    dev = device_for(backend)
    ins = [t.to(dev).requires_grad_(n in subset) for n, t in zip(names, (q, k, v, table))]
    if op == "na":
        rows = na_pairs(H, W, 3, 3, 1, 1, "zero")
        out = ao.neighborhood_attention2d(*ins[:3], 3, border="zero", rel_pos_bias=ins[3], backend=backend)
    else:
        rows = wa_pairs(H, W, 3, 3, 1, 1)
        out = ao.window_attention2d(*ins[:3], 3, shift=1, rel_pos_bias=ins[3], backend=backend)
    assert out.requires_grad == bool(subset)
    ins64 = [t.detach().double().cpu().requires_grad_(n in subset) for n, t in zip(names, ins)]
    ref = attention_brute(*ins64, rows, d ** -0.5)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=tol, rtol=tol)
    if not subset:
        return
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out.backward(g.to(dtype).to(dev))
    ref.backward(g)
    for n, a, b in zip(names, ins, ins64):
        if n in subset:
            assert a.grad is not None and a.grad.shape == a.shape and a.grad.dtype == a.dtype, n
            torch.testing.assert_close(a.grad.double().cpu(), b.grad, atol=tol * 10, rtol=tol * 10,
                                       msg=lambda m: f"{n}: {m}")
        else:
            assert a.grad is None, f"{n} does not require grad but got one"


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s) or "none")
@pytest.mark.parametrize("op", ("na", "wa"))
def test_partial_requires_grad_cpu(op, subset):
    skip_unless("neighborhood_attention2d", "cpu", torch.float64)
    _partial(op, "cpu", subset)


@pytest.mark.parametrize("subset", [("q",), ("k", "bias"), ("v",)], ids=lambda s: "+".join(s))
@pytest.mark.parametrize("op", ("na", "wa"))
def test_partial_requires_grad_triton(op, subset):
    skip_unless("neighborhood_attention2d", "triton", torch.float32)
    _partial(op, "triton", subset)


def test_bias_table_grad_only_in_its_own_dtype():
    """A float32 table with float64 activations that need no grad: only the table gets one."""
    q, k, v = _qkv((1, 5, 5, 2, 4), dtype=torch.float64, seed=13)
    table = _table(2, 3, 3).requires_grad_()
    out = ao.neighborhood_attention2d(q, k, v, 3, rel_pos_bias=table, backend="cpu")
    out.sum().backward()
    assert table.grad is not None and table.grad.dtype == torch.float32
    assert q.grad is None and k.grad is None and v.grad is None
    t64 = table.detach().double().requires_grad_()
    ref = attention_brute(q, k, v, t64, na_pairs(5, 5, 3, 3, 1, 1, "clamp"), 4 ** -0.5)
    ref.sum().backward()
    torch.testing.assert_close(table.grad.double(), t64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("op", ("box", "tanh"))
def test_blur_without_grad(backend, op):
    skip_unless("box_blur2d", backend, torch.float32)
    x = torch.randn(1, 2, 5, 6, device=device_for(backend))
    out = _blur(op, x, (2, 2), (1, 1), 1, "zeros", backend)
    assert not out.requires_grad and out.grad_fn is None


# =========================================================================================
# 5. Double backward: a clear error (fused backends), never a silent wrong answer
# =========================================================================================
def _double_inputs(op):
    g = torch.Generator().manual_seed(17)
    if op in ("box", "tanh"):
        x = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64)
        return [x]
    q, k, v = _qkv((1, 5, 6, 2, 4), dtype=torch.float64, seed=17)
    return [q, k, v, _table(2, 3, 3).double()]


def ins_of(op):
    return _double_inputs(op)


def _double_apply(op, ins, backend):
    if op == "na":
        return ao.neighborhood_attention2d(*ins[:3], 3, border="mask", rel_pos_bias=ins[3], backend=backend)
    if op == "wa":
        return ao.window_attention2d(*ins[:3], 3, shift=1, rel_pos_bias=ins[3], backend=backend)
    if op == "box":
        return ao.box_blur2d(ins[0], 3, 1, "same", backend=backend)
    return ao.tanh_blur2d(ins[0], 2.0, 3, 1, "same", backend=backend)


_OP_NAME = {"na": "neighborhood_attention2d", "wa": "window_attention2d", "box": "box_blur2d",
            "tanh": "tanh_blur2d"}


def _second_order(op, backend, dtype, weighted_by_param):
    """d/d(inputs) of |d loss / d inputs|^2; with ``weighted_by_param`` the loss is
    ``(y * w).sum()`` with a parameter ``w`` and the second derivative is taken w.r.t. ``w``
    too (a gradient penalty)."""
    dev = device_for(backend)
    ins = [t.to(dtype).to(dev).requires_grad_() for t in _double_inputs(op)]
    y = _double_apply(op, ins, backend)
    w = torch.linspace(-1, 1, y.numel(), dtype=dtype, device=dev).reshape(y.shape).requires_grad_(weighted_by_param)
    grads = torch.autograd.grad((y * w).sum(), ins, create_graph=True)
    penalty = sum((t ** 2).sum() for t in grads)
    wrt = ins + ([w] if weighted_by_param else [])
    return torch.autograd.grad(penalty, wrt, allow_unused=True), grads


# box_blur2d is linear: its gradient does not depend on x, and the second derivative w.r.t. x
# alone is one PyTorch refuses to take (nothing requires grad); only the penalty form applies.
DOUBLE_CASES = [(op, w) for op in ("na", "wa", "box", "tanh") for w in (False, True) if op != "box" or w]


@pytest.mark.parametrize("op,weighted", DOUBLE_CASES, ids=lambda v: {True: "penalty", False: "plain"}.get(v, v))
@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_raises_or_is_right(backend, op, weighted):
    dtype = torch.float64 if backend == "cpu" else torch.float32
    table = {"na": "neighborhood_attention2d", "wa": "window_attention2d"}.get(op, "box_blur2d")
    skip_unless(table, backend, dtype)
    want, first_want = _second_order(op, "reference", torch.float64, weighted)
    try:
        got, first = _second_order(op, backend, dtype, weighted)
    except RuntimeError as e:
        msg = str(e)
        assert "double backward" in msg and _OP_NAME[op] in msg and backend in msg, msg
        return
    # it worked: then it must be right (never zeros or None where the reference has values)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    for a, b in zip(first, first_want):
        torch.testing.assert_close(a.double().cpu(), b, atol=tol, rtol=tol)
    for a, b, t in zip(got, want, ins_of(op) + [None]):
        # None (not reached) and zeros are the same second derivative; anything else must match
        if a is None and b is None:
            continue
        a = torch.zeros_like(b if b is not None else t, dtype=torch.float64) if a is None else a.double().cpu()
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("op", ("na", "wa", "box", "tanh"))
def test_create_graph_first_order_still_right(op):
    """create_graph=True alone (no second backward) is allowed and gives the same gradients."""
    ins = [t.requires_grad_() for t in _double_inputs(op)]
    y = _double_apply(op, ins, "cpu")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(18), dtype=y.dtype)
    got = torch.autograd.grad(y, ins, g, create_graph=True)
    ins_r = [t.detach().requires_grad_() for t in ins]
    want = torch.autograd.grad(_double_apply(op, ins_r, "reference"), ins_r, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
