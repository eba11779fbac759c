"""csrc/window_attention/window_attention_cuda.cu executed on the CPU executor of tests/cuda_emu,
through its raw-pointer launchers, against a float64 brute force written here (loop over windows
and, inside a window, over its shift regions: pad, roll, partition and mask by index arithmetic,
independently of alterops' reference). Forward (output and logsumexp) and backward (dq, dk, dv and
the bias-table gradient) of the SIMT kernels (every dtype) and of the tensor-core kernels (float16 /
bfloat16, mma.sync m16n8k16 through the PTX wrappers): square and non-square windows, shifts 0 and
non-zero, maps that are not whole windows, several windows per axis, bias tables per head, shared
or absent, head_dim 1 to 128 (and 256 on the SIMT path), inputs read in place from a fused qkv
tensor, with a non-unit head_dim stride or a misaligned start, and NaN / inf values that only
their own shift region may see. Each case runs under the forward, reverse and seeded random thread
schedules (sm_90 and sm_80 limits), with guard pages around every buffer (the workspace included)
and the inputs read-only, and must give bitwise-identical results under all three."""
import ctypes
import os

import pytest
import torch

from cuda_emu import driver, testing

pytestmark = testing.pytestmark  # the module's marks
one_thread = testing.one_thread  # and its autouse fixture


DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PATHS = {"auto": 0, "simt": 1, "tc": 2}
# Error scale of each dtype: float32 accumulates in float32 (a few ulps per term over head_dim
# and window sums); 16-bit outputs are rounded once (unit roundoff), and the tensor-core path also
# rounds the probabilities (and dS) to the input dtype before the value (and dq / dk) products.
# Bounds: unit * (|ref| + max |ref|) for out and lse, 4x that for the gradients (the observed
# errors stay below half of these).
UNIT = {torch.float32: 2.0 ** -19, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
LSE_UNIT = 2.0 ** -20  # lse is float32 on every path


@pytest.fixture(scope="module")
def lib():
    lib = driver.load(os.path.join(driver.CSRC, "window_attention", "window_attention_cuda.cu"),
                      os.path.join(driver.HERE, "shim_window_attention.cpp"))
    ll, vp, fp = ctypes.POINTER(ctypes.c_longlong), ctypes.c_void_p, ctypes.c_void_p
    d = ctypes.c_double
    lib.resolve = lib.fn("emu_wa_resolve_path", [ll, d, fp, ctypes.c_int])
    lib.why = lib.fn("emu_wa_unsupported", [ll, d, fp, ctypes.c_int], ctypes.c_char_p)
    lib.fwd_ws = lib.fn("emu_wa_forward_workspace", [ll, d, fp, ctypes.c_int], ctypes.c_longlong)
    lib.bwd_ws = lib.fn("emu_wa_backward_workspace", [ll, d, fp, ctypes.c_int, ctypes.c_int], ctypes.c_longlong)
    lib.forward = lib.fn("emu_wa_forward", [ll, d, fp, vp, ll, vp, ll, vp, ll, vp, fp, vp, ctypes.c_int])
    lib.backward = lib.fn("emu_wa_backward", [ll, d, fp, vp, ll, vp, ll, vp, ll, vp, ll, vp, ll, fp, ll, vp, vp, vp,
                                              fp, vp, ctypes.c_int])
    return lib


# ---------------------------------------------------------------------------------------
# float64 brute force
# ---------------------------------------------------------------------------------------
def _region(r, length, w, s):
    if r < length - w:
        return 0
    return 2 if s > 0 and r >= length - s else 1


def windows(H, W, window, shift):
    """For each window, for each shift region in it that holds present tokens: the original (y, x)
    of those tokens and their in-window (iy, ix). Padded size Hp x Wp (whole windows), rolled by
    -shift."""
    wh, ww = window
    sh, sw = shift
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    out = []
    for wy in range(Hp // wh):
        for wx in range(Wp // ww):
            regions = {}
            for iy in range(wh):
                for ix in range(ww):
                    r, c = wy * wh + iy, wx * ww + ix
                    y, x = (r + sh) % Hp, (c + sw) % Wp  # torch.roll(-shift): rolled[r] = padded[r + shift]
                    if y >= H or x >= W:
                        continue  # absent (padding): never attended to, no output
                    reg = (_region(r, Hp, wh, sh), _region(c, Wp, ww, sw))
                    regions.setdefault(reg, []).append((y, x, iy, ix))
            out.append(list(regions.values()))
    return out


def mixed_windows(H, W, window, shift):
    """How many windows hold present tokens of more than one shift region."""
    return sum(len(w) > 1 for w in windows(H, W, window, shift))


def brute(q, k, v, window, shift, table, scale):
    """(out, lse) in float64: every window's present tokens attend to those of their own shift
    region (and to nothing else), logits scale q.k + table[h, dy + wh-1, dx + ww-1] with (dy, dx)
    key minus query. q, k, v: (B, H, W, heads, d) float64; table (1 | heads, 2wh-1, 2ww-1) or None."""
    B, H, W, nh, d = q.shape
    wh, ww = window
    pos, outs, lses = [], [], []
    for grp in (g for w in windows(H, W, window, shift) for g in w):
        ys = torch.tensor([t[0] for t in grp])
        xs = torch.tensor([t[1] for t in grp])
        qi, ki, vi = (t[:, ys, xs].transpose(1, 2) for t in (q, k, v))  # (B, heads, n, d)
        logits = scale * qi @ ki.transpose(-1, -2)
        if table is not None:
            iy = torch.tensor([t[2] for t in grp])
            ix = torch.tensor([t[3] for t in grp])
            dy = iy[None, :] - iy[:, None] + wh - 1
            dx = ix[None, :] - ix[:, None] + ww - 1
            logits = logits + table[:, dy, dx].expand(nh, -1, -1)
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - lse[..., None])
        outs.append(p @ vi)
        lses.append(lse)
        pos.append(ys * W + xs)
    pos = torch.cat(pos)
    out = torch.cat(outs, dim=2).transpose(1, 2)  # (B, n_all, heads, d)
    lse = torch.cat(lses, dim=2).transpose(1, 2)
    full = torch.zeros(B, H * W, nh, d, dtype=q.dtype).index_copy(1, pos, out)
    full_lse = torch.zeros(B, H * W, nh, dtype=q.dtype).index_copy(1, pos, lse)
    return full.view(B, H, W, nh, d), full_lse.view(B, H, W, nh)


# ---------------------------------------------------------------------------------------
# inputs in several layouts
# ---------------------------------------------------------------------------------------
def make_qkv(shape, dtype, layout, gen, scale=1.5):
    """(storage, [(offset, strides)] * 3, [q, k, v]): q, k, v are views of one storage tensor.
    contiguous: three tensors back to back; fused: a (B, H, W, 3, heads, d) projection;
    interleaved: (B, H, W, heads, d, 3) (head_dim stride 3); offset: fused, one element in (so
    rows are not 16-byte aligned)."""
    B, H, W, nh, d = shape
    n = B * H * W * nh * d
    if layout == "contiguous":
        st = torch.randn(3 * n, generator=gen, dtype=torch.float64)
        views = [(i * n, (H * W * nh * d, W * nh * d, nh * d, d, 1)) for i in range(3)]
    elif layout in ("fused", "offset"):
        extra = 1 if layout == "offset" else 0
        st = torch.randn(3 * n + extra, generator=gen, dtype=torch.float64)
        views = [(extra + i * nh * d, (H * W * 3 * nh * d, W * 3 * nh * d, 3 * nh * d, d, 1)) for i in range(3)]
    elif layout == "interleaved":
        st = torch.randn(3 * n, generator=gen, dtype=torch.float64)
        views = [(i, (H * W * nh * d * 3, W * nh * d * 3, nh * d * 3, d * 3, 3)) for i in range(3)]
    else:
        raise ValueError(layout)
    st = (scale * st).to(dtype)
    tensors = [st.as_strided(shape, s, off) for off, s in views]
    return st, views, tensors


def problem(dtype, shape, window, shift, table_heads):
    B, H, W, nh, d = shape
    return (ctypes.c_longlong * 11)(DTYPES[dtype], B, H, W, nh, d, window[0], window[1], shift[0], shift[1],
                                    table_heads)


def ll(vals):
    return (ctypes.c_longlong * len(vals))(*vals)


def ptr(buf, offset, dtype):
    return buf.ptr + offset * torch.empty((), dtype=dtype).element_size()


def run_forward(lib, prob, scale, table, st, views, dtype, shape, path):
    B, H, W, nh, d = shape
    n = B * H * W * nh * d
    ws_bytes = lib.fwd_ws(prob, scale, None, PATHS[path])

    def call(i, o, extra):
        ws = extra(ws_bytes, torch.uint8, "workspace")
        tp = i["table"].ptr if i["table"] is not None else None
        (qo, qs), (ko, ks), (vo, vs) = views
        return lib.forward(prob, scale, tp, ptr(i["qkv"], qo, dtype), ll(qs), ptr(i["qkv"], ko, dtype), ll(ks),
                           ptr(i["qkv"], vo, dtype), ll(vs), o["out"].ptr, o["lse"].ptr, ws.ptr, PATHS[path])

    res = driver.run_schedules(lib, {"qkv": st, "table": table},
                               {"out": (n, dtype), "lse": (B * H * W * nh, torch.float32)}, call)
    return res["out"].view(shape), res["lse"].view(B, H, W, nh), lib.take_launches()


def run_backward(lib, prob, scale, table, st, views, dtype, shape, gout, out, lse, lse_layout, bias_grad, path):
    B, H, W, nh, d = shape
    n = B * H * W * nh * d
    ws_bytes = lib.bwd_ws(prob, scale, None, int(bias_grad), PATHS[path])
    if lse_layout == "interleaved":  # (B, H, W, heads, 2)[..., 0]
        lse_st = torch.stack([lse, torch.full_like(lse, float("nan"))], dim=-1).reshape(-1)
        lse_strides = (H * W * nh * 2, W * nh * 2, nh * 2, 2)
    else:
        lse_st = lse.reshape(-1)
        lse_strides = (H * W * nh, W * nh, nh, 1)
    contig = (H * W * nh * d, W * nh * d, nh * d, d, 1)
    outputs = {"dq": (n, dtype), "dk": (n, dtype), "dv": (n, dtype)}
    if bias_grad:
        outputs["dtable"] = (table.numel(), torch.float32)

    def call(i, o, extra):
        ws = extra(ws_bytes, torch.uint8, "workspace")
        tp = i["table"].ptr if i["table"] is not None else None
        (qo, qs), (ko, ks), (vo, vs) = views
        return lib.backward(prob, scale, tp, i["grad_out"].ptr, ll(contig), ptr(i["qkv"], qo, dtype), ll(qs),
                            ptr(i["qkv"], ko, dtype), ll(ks), ptr(i["qkv"], vo, dtype), ll(vs), i["out"].ptr,
                            ll(contig), i["lse"].ptr, ll(lse_strides), o["dq"].ptr, o["dk"].ptr, o["dv"].ptr,
                            o["dtable"].ptr if bias_grad else None, ws.ptr, PATHS[path])

    res = driver.run_schedules(lib, {"qkv": st, "table": table, "grad_out": gout, "out": out, "lse": lse_st},
                               outputs, call)
    grads = [res[name].view(shape) for name in ("dq", "dk", "dv")]
    grads.append(res["dtable"].view(table.shape) if bias_grad else None)
    return grads, lib.take_launches()


def assert_close(got, ref, unit, what, factor=4.0):
    """|got - ref| <= factor * unit * (|ref| + max |ref|), NaN and inf exactly where ref has them."""
    got = got.double()
    nan_ref, nan_got = torch.isnan(ref), torch.isnan(got)
    assert torch.equal(nan_ref, nan_got), (f"{what}: NaN at {nan_got.nonzero()[:4].tolist()}, expected at "
                                           f"{nan_ref.nonzero()[:4].tolist()}")
    inf_ref = torch.isinf(ref)
    assert torch.equal(inf_ref, torch.isinf(got)) and torch.equal(ref[inf_ref], got[inf_ref]), f"{what}: infinities"
    fin = torch.isfinite(ref)
    r, g = ref[fin], got[fin]
    if r.numel() == 0:
        return
    scale = r.abs().max()
    tol = factor * unit * (r.abs() + scale) + 1e-12
    err = (g - r).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} off (max error {err.max().item():.3g}, "
                           f"max |ref| {scale.item():.3g}, first got {g[bad][0].item()} want {r[bad][0].item()})")


# ---------------------------------------------------------------------------------------
def check_case(lib, shape, window, shift, table_heads, dtype, layout="contiguous", path="auto", seed=0,
               nonfinite=False, expect_path=None, scale=None):
    gen = torch.Generator().manual_seed(seed)
    B, H, W, nh, d = shape
    wh, ww = window
    if scale is None:
        scale = d ** -0.5
    st, views, (q, k, v) = make_qkv(shape, dtype, layout, gen)
    if nonfinite:  # values only their own shift region may see (tokens of mixed windows)
        st = st.clone()
        q, k, v = (st.as_strided(shape, s, off) for off, s in views)
        for name, y, x, h, c, value in nonfinite:
            {"q": q, "k": k, "v": v}[name][0, y, x, h, c] = value
            assert any(len(w) > 1 and any((y, x) == t_[:2] for g in w for t_ in g)
                       for w in windows(H, W, window, shift)), f"({y}, {x}) is not in a mixed window"
    table = None
    if table_heads:
        table = (0.5 * torch.randn(table_heads, 2 * wh - 1, 2 * ww - 1, generator=gen, dtype=torch.float64)).float()
    prob = problem(dtype, shape, window, shift, table_heads)
    resolved = lib.resolve(prob, scale, None, PATHS[path])
    if expect_path is not None:
        assert resolved == PATHS[expect_path], (resolved, lib.why(prob, scale, None, PATHS[path]))
    what = f"{dtype} {shape} window={window} shift={shift} table_heads={table_heads} {layout} path={path}"

    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    t64 = table.double().requires_grad_(True) if table is not None else None
    out_ref, lse_ref = brute(q64, k64, v64, window, shift, t64, scale)

    out, lse, fwd_launches = run_forward(lib, prob, scale, table, st, views, dtype, shape, path)
    unit = UNIT[dtype]
    assert_close(out, out_ref.detach(), unit, f"out {what}", factor=1.0)
    assert_close(lse, lse_ref.detach(), LSE_UNIT, f"lse {what}", factor=1.0)
    if nonfinite:
        return resolved, fwd_launches, None

    gout = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    wrt = [q64, k64, v64] + ([t64] if t64 is not None else [])
    refs = torch.autograd.grad(out_ref, wrt, gout.double())
    got, bwd_launches = run_backward(lib, prob, scale, table, st, views, dtype, shape, gout, out, lse,
                                     "interleaved" if layout == "interleaved" else "contiguous", table is not None,
                                     path)
    for name, g, r in zip(("dq", "dk", "dv", "dtable"), got, refs):
        assert_close(g, r, unit, f"{name} {what}", factor=4.0)
    return resolved, fwd_launches, bwd_launches


def launch_names(launches):
    return [ln.split(" grid=")[0] for ln in launches]


def grid_x(launch):
    return int(launch.split(" grid=(")[1].split(",")[0])


def blocks(shape, window, tile):
    """Blocks of a per-tile launch: heads x images x windows x tiles per window."""
    B, H, W, nh, _ = shape
    wh, ww = window
    return nh * B * (-(-H // wh)) * (-(-W // ww)) * (-(-wh * ww // tile))


# ---------------------------------------------------------------------------------------
# cases: (shape (B, H, W, heads, head_dim), window, shift, table heads (0: no table), layout)
# ---------------------------------------------------------------------------------------
GEOMETRIES = {
    # whole 7x7 windows, 2x2 per image, no shift, a table per head
    "7x7-whole": ((2, 14, 14, 2, 32), (7, 7), (0, 0), 2, "contiguous"),
    # 20x19 map: 3x3 windows of 7x7, padded by 1 and 2; Swin's shift (3, 3): windows where up to
    # four shift regions hold present tokens; one shared table; fused qkv
    "7x7-pad-shift": ((1, 20, 19, 2, 32), (7, 7), (3, 3), 1, "fused"),
    # non-square 4x6 windows, padded on both axes, shift (1, 3) (mixed regions), head_dim 80,
    # head_dim stride 3, lse with a stride
    "4x6-shift-d80": ((2, 10, 16, 3, 80), (4, 6), (1, 3), 3, "interleaved"),
    # head_dim 1, no table, shift on one axis only, a misaligned start
    "4x6-d1-notable": ((1, 10, 11, 2, 1), (4, 6), (1, 0), 0, "offset"),
    # head_dim 128; an 8x8 map in 7x7 windows: mostly padding (the shifted-in regions hold only
    # absent tokens, as in Swin's padded stages)
    "7x7-d128-mostly-padding": ((1, 8, 8, 1, 128), (7, 7), (3, 3), 1, "fused"),
    # 12x12 windows (144 tokens: several key chunks and query tiles), Swin-B's shift (6, 6)
    "12x12-shift": ((1, 12, 24, 2, 32), (12, 12), (6, 6), 2, "contiguous"),
    # 16x16 windows: 256 tokens, the largest table (31 x 31), an odd shift; head_dim 24 (not a
    # multiple of 16: the tensor-core path's last k step is half zeros)
    "16x16-shift": ((1, 16, 16, 1, 24), (16, 16), (7, 9), 1, "contiguous"),
    # a window larger than the map (padded up to one window of mostly absent tokens)
    "7x7-larger-than-map": ((2, 5, 3, 2, 16), (7, 7), (3, 2), 2, "fused"),
    # 1x8 strips: one-row windows, shift along W only
    "1x8-strips": ((1, 3, 19, 2, 32), (1, 8), (0, 5), 1, "contiguous"),
    # three images, 8x8 windows with shift (4, 4), head_dim 64
    "8x8-3-images": ((3, 16, 16, 3, 64), (8, 8), (4, 4), 3, "fused"),
}

SIMT_CASES = [(name, torch.float32) for name in GEOMETRIES] + [
    ("7x7-pad-shift", torch.float16), ("4x6-shift-d80", torch.bfloat16), ("4x6-d1-notable", torch.float16),
    ("12x12-shift", torch.bfloat16), ("7x7-d128-mostly-padding", torch.float16)]


@pytest.mark.parametrize("name,dtype", SIMT_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in SIMT_CASES])
def test_simt(lib, name, dtype):
    shape, window, shift, table_heads, layout = GEOMETRIES[name]
    resolved, fwd, bwd = check_case(lib, shape, window, shift, table_heads, dtype, layout, path="simt",
                                    seed=len(name), expect_path="simt")
    n = blocks(shape, window, 32)
    assert launch_names(fwd) == ["fwd_simt_kernel<T, C>"] and grid_x(fwd[0]) == n, fwd
    names = ["dq_simt_kernel<T, C>", "dkdv_simt_kernel<T, C>"] + (["bias_reduce_kernel"] if table_heads else [])
    assert launch_names(bwd) == names and grid_x(bwd[0]) == grid_x(bwd[1]) == n, bwd


def test_simt_head_dim_256(lib):
    """The SIMT kernels' widest instantiation (8 columns per lane, 140 KiB of shared memory in the
    backward: above sm_80's default, within its opt-in limit)."""
    check_case(lib, (1, 7, 9, 2, 256), (7, 7), (3, 3), 2, torch.float32, "fused", path="simt", seed=3)
    check_case(lib, (1, 5, 5, 1, 200), (5, 5), (0, 2), 1, torch.bfloat16, "offset", path="auto", seed=4,
               expect_path="simt")


# (tensor, y, x, head, channel, value): tokens of windows whose present tokens span several
# shift regions (8x12 map, 4x6 windows, shift (2, 3)); only their own region may see them.
NONFINITE = [("v", 0, 0, 0, 0, float("inf")), ("v", 7, 10, 0, 31, float("-inf")), ("k", 1, 2, 1, 0, float("nan")),
             ("q", 6, 11, 1, 5, float("nan"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_simt_nonfinite_values_stay_in_their_region(lib, dtype):
    """inf and NaN in v and k reach only the queries of their own shift region (no 0 * inf)."""
    check_case(lib, (1, 8, 12, 2, 32), (4, 6), (2, 3), 2, dtype, path="simt", nonfinite=NONFINITE)


# ---------------------------------------------------------------------------------------
# tensor cores (float16 / bfloat16, head_dim <= 128): what `auto` picks for them on sm_80+
# ---------------------------------------------------------------------------------------
TC_CASES = [(name, dt) for name in GEOMETRIES for dt in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", TC_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in TC_CASES])
def test_tensor_cores(lib, name, dtype):
    shape, window, shift, table_heads, layout = GEOMETRIES[name]
    resolved, fwd, bwd = check_case(lib, shape, window, shift, table_heads, dtype, layout, path="auto",
                                    seed=len(name) + 7, expect_path="tc")
    n = blocks(shape, window, 64)
    # the tensor-core forward, then the SIMT fix-up for non-finite values: a small grid that
    # returns at once when the flag is clear
    assert launch_names(fwd) == ["fwd_tc_kernel<T, DMAX>", "fwd_simt_kernel<T, C>"], fwd
    assert grid_x(fwd[0]) == n and grid_x(fwd[1]) == min(blocks(shape, window, 32), 1024), fwd
    names = ["dq_tc_kernel<T, DMAX>", "dkdv_tc_kernel<T, DMAX>"] + (["bias_reduce_kernel"] if table_heads else [])
    assert launch_names(bwd) == names and grid_x(bwd[0]) == grid_x(bwd[1]) == n, bwd


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_cores_nonfinite_values_stay_in_their_region(lib, dtype):
    """A 0 * inf in the P V product would turn the other regions' queries NaN: the tensor-core
    forward flags the window's non-finite v and the SIMT fix-up recomputes."""
    check_case(lib, (1, 8, 12, 2, 32), (4, 6), (2, 3), 2, dtype, path="tc", nonfinite=NONFINITE)


@pytest.mark.parametrize("path", ["simt", "tc"])
def test_scale(lib, path):
    """A scale other than head_dim ** -0.5 (and a negative one)."""
    check_case(lib, (1, 8, 12, 2, 32), (4, 6), (2, 3), 2, torch.bfloat16, path=path, seed=13, scale=0.71)
    check_case(lib, (1, 8, 12, 2, 32), (4, 6), (2, 3), 0, torch.float16, path=path, seed=14, scale=-0.2)


def test_tensor_cores_head_dim_64_and_96(lib):
    """Both tensor-core instantiations at their edges: head_dim 64 (the 64-wide one, full) and 96
    (the 128-wide one, six of eight k steps)."""
    check_case(lib, (2, 7, 7, 2, 64), (7, 7), (0, 0), 2, torch.float16, "fused", path="tc", seed=11)
    check_case(lib, (1, 10, 16, 2, 96), (4, 6), (1, 3), 1, torch.bfloat16, "contiguous", path="tc", seed=12)


def test_refused(lib):
    """What the launchers do not take: resolve_path answers -1 and the forward returns
    cudaErrorInvalidValue without launching."""
    cases = [((1, 17, 16, 1, 8), (17, 16), torch.float32, "auto", "256 tokens"),
             ((1, 7, 7, 1, 257), (7, 7), torch.float32, "auto", "head_dim up to 256"),
             ((1, 7, 7, 1, 32), (7, 7), torch.float32, "tc", "float16 and bfloat16"),
             ((1, 7, 7, 1, 136), (7, 7), torch.float16, "tc", "head_dim up to 128")]
    for shape, window, dtype, path, why in cases:
        prob = problem(dtype, shape, window, (0, 0), 0)
        assert lib.resolve(prob, 1.0, None, PATHS[path]) == -1, (shape, window, path)
        assert why in lib.why(prob, 1.0, None, PATHS[path]).decode()
        lib.configure()
        assert lib.forward(prob, 1.0, None, None, ll([0] * 5), None, ll([0] * 5), None, ll([0] * 5), None, None, None,
                           PATHS[path]) == 1  # cudaErrorInvalidValue
        assert lib.take_launches() == []
    # head_dim 129..256 in 16 bits: auto takes the SIMT kernels
    assert lib.resolve(problem(torch.float16, (1, 7, 7, 1, 136), (7, 7), (0, 0), 0), 1.0, None, 0) == PATHS["simt"]


def test_empty_batch_launches_nothing(lib):
    for path in ("auto", "simt"):
        prob = problem(torch.float16, (0, 7, 7, 2, 32), (7, 7), (3, 3), 0)
        lib.configure()
        assert lib.forward(prob, 1.0, None, None, ll([0] * 5), None, ll([0] * 5), None, ll([0] * 5), None, None, None,
                           PATHS[path]) == 0
        assert lib.backward(prob, 1.0, None, None, ll([0] * 5), None, ll([0] * 5), None, ll([0] * 5), None,
                            ll([0] * 5), None, ll([0] * 5), None, ll([0] * 4), None, None, None, None, None,
                            PATHS[path]) == 0
        assert lib.take_launches() == []
