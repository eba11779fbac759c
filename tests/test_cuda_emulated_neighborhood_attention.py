"""csrc/neighborhood_attention/neighborhood_attention_cuda.cu executed on the CPU executor of
tests/cuda_emu, through its raw-pointer launchers, against the float64 brute force of
tests/na_brute_force.py: forward (out, lse) and backward (dq, dk, dv, dbias, with a gradient
flowing into the lse too) of 1-D, 2-D and 3-D maps with odd sizes spanning several tiles per axis,
even and odd kernels, dilation, stride, causal axes, the three borders (maps smaller than the
window where the rule allows it), a bias table (per head or shared) with its gradient, grouped
heads (heads 4 over 4, 2 and 1 key/value heads), head_dim 1, 32, 80 and 128, float32 (SIMT),
float16 and bfloat16 (tensor cores), strided views (k and v inside one fused tensor, a transposed
q, a dout with a non-unit head_dim stride), batches of one and two images; NaN and infinities in
v (the forward leaves keys outside a window out exactly). Each case runs under the forward,
reverse and seeded random thread schedules (sm_90 and sm_80 limits), with guard pages around every
buffer (the workspace included; output and workspace start as NaN) and the inputs read-only; the
results must be bitwise identical across schedules (the kernels are deterministic: no atomics)."""
import ctypes
import math
import os

import pytest
import torch

from cuda_emu import driver
from cuda_emu.testing import one_thread, pytestmark  # noqa: F401 (the module's marks and fixture)
from na_brute_force import brute_force

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BORDERS = {"clamp": 0, "mask": 1, "zero": 2}
# error bound per dtype, relative to the largest reference magnitude of the tensor compared
# (float32: exact products, float32 sums; 16-bit: probabilities and logit gradients rounded to the
# input type before their tensor-core products, outputs rounded once). The worst errors seen over
# the cases below are about 6x smaller (1.7e-6, 8e-4, 5.4e-3). lse (float32 from float32
# accumulators of the inputs the reference gets too) takes the float32 bound in every dtype.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

LL = ctypes.POINTER(ctypes.c_longlong)
VP = ctypes.c_void_p
SMEM_LIMIT = 99 * 1024  # per block: the opt-in limit of sm_86 / sm_89 (sm_80 and sm_90 allow more)
LAUNCHES = []  # the launches of the last schedule of every run_forward / run_backward


@pytest.fixture(scope="module")
def lib():
    lib = driver.load(os.path.join(driver.CSRC, "neighborhood_attention", "neighborhood_attention_cuda.cu"),
                      os.path.join(driver.HERE, "shim_neighborhood_attention.cpp"))
    lib.fwd_ws = lib.fn("emu_na_forward_workspace", [ctypes.c_int, LL, LL, LL], ctypes.c_longlong)
    lib.fwd = lib.fn("emu_na_forward", [ctypes.c_int, VP, LL, VP, LL, VP, LL, VP, VP, VP, ctypes.c_longlong, LL,
                                        ctypes.c_double, VP])
    lib.bwd_ws = lib.fn("emu_na_backward_workspace", [ctypes.c_int, LL, LL, LL, ctypes.c_int], ctypes.c_longlong)
    lib.bwd = lib.fn("emu_na_backward", [ctypes.c_int, VP, LL, VP, LL, VP, LL, VP, LL, VP, LL, VP, VP, VP,
                                         ctypes.c_longlong, VP, VP, VP, VP, LL, ctypes.c_double, VP])
    lib.set_time_limit(600)
    return lib


# ---------------------------------------------------------------------------------------
# Inputs: views into base tensors (the guarded buffers hold the bases)
# ---------------------------------------------------------------------------------------
def as3(t, n):
    """(B, *spatial, heads, D) -> (B, T, H, W, heads, D): size-1 leading axes."""
    return t[(slice(None),) + (None,) * (3 - n)]


def desc(view, base):
    """(element offset into base, 12 longs: sizes then strides) of a view of `base`."""
    off = view.storage_offset() - base.storage_offset()
    return off, (ctypes.c_longlong * 12)(*view.shape, *view.stride())


def window_desc(kernel, dilation, stride, causal, border):
    n = len(kernel)
    pad = 3 - n
    vals = [1] * pad + list(kernel) + [1] * pad + list(dilation) + [1] * pad + list(stride) + \
        [0] * pad + [int(c) for c in causal] + [BORDERS[border]]
    return (ctypes.c_longlong * 13)(*vals)


def make_inputs(spatial, heads, heads_kv, D, dtype, gen, layout, B=1):
    """q, k, v (and their bases) in the given layout: "fused" (k, v views of one kv tensor,
    q contiguous) or "transposed" (q a heads/spatial-transposed view, k and v contiguous)."""
    n = len(spatial)
    if layout == "fused":
        q = torch.randn(B, *spatial, heads, D, generator=gen, dtype=torch.float64).to(dtype)
        kv = torch.randn(B, *spatial, 2, heads_kv, D, generator=gen, dtype=torch.float64).to(dtype)
        k, v = kv.select(n + 1, 0), kv.select(n + 1, 1)
        return {"q": (q, q), "k": (k, kv), "v": (v, kv)}
    qb = torch.randn(B, heads, *spatial, D, generator=gen, dtype=torch.float64).to(dtype)
    q = qb.movedim(1, n + 1)
    k = torch.randn(B, *spatial, heads_kv, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, *spatial, heads_kv, D, generator=gen, dtype=torch.float64).to(dtype)
    return {"q": (q, qb), "k": (k, k), "v": (v, v)}


def run_forward(lib, views, n, window, table, bias_heads, scale):
    q = views["q"][0]
    B, heads, D = q.shape[0], q.shape[-2], q.shape[-1]
    spatial = q.shape[1:1 + n]
    N = math.prod(spatial)
    dt = DTYPES[q.dtype]
    inputs = {}
    descs = {}
    for name in ("q", "k", "v"):
        view, base = views[name]
        key = f"base_{id(base)}"
        inputs.setdefault(key, base)
        descs[name] = (key,) + desc(as3(view, n), base)
    inputs["bias"] = table
    esize = q.element_size()
    ws_bytes = lib.fwd_ws(dt, descs["q"][2], descs["k"][2], window)

    def call(i, o, extra):
        ptr = {name: i[d[0]].ptr + d[1] * esize for name, d in descs.items()}
        ws = extra(max(ws_bytes, 1), torch.uint8, "workspace")
        return lib.fwd(dt, ptr["q"], descs["q"][2], ptr["k"], descs["k"][2], ptr["v"], descs["v"][2],
                       o["out"].ptr, o["lse"].ptr, i["bias"].ptr if table is not None else None, bias_heads,
                       window, scale, ws.ptr)

    outputs = {"out": (B * N * heads * D, q.dtype), "lse": (B * heads * N, torch.float32)}
    res = driver.run_schedules(lib, inputs, outputs, call)
    LAUNCHES.extend(lib.take_launches())
    out = res["out"].view(B, *spatial, heads, D)
    lse = res["lse"].view(B, heads, *spatial).movedim(1, -1)
    return out, lse


def run_backward(lib, views, n, window, table, bias_heads, scale, out, lse, dout_view, dout_base, dlse):
    q = views["q"][0]
    B, heads, D = q.shape[0], q.shape[-2], q.shape[-1]
    hkv = views["k"][0].shape[-2]
    spatial = q.shape[1:1 + n]
    N = math.prod(spatial)
    dt = DTYPES[q.dtype]
    inputs, descs = {}, {}
    for name, (view, base) in list(views.items()) + [("dout", (dout_view, dout_base)), ("out", (out, out))]:
        key = f"base_{id(base)}"
        inputs.setdefault(key, base)
        descs[name] = (key,) + desc(as3(view, n), base)
    inputs["lse"] = lse.movedim(-1, 1).contiguous()
    inputs["dlse"] = None if dlse is None else dlse.movedim(-1, 1).contiguous()
    inputs["bias"] = table
    want_db = table is not None
    esize = q.element_size()
    ws_bytes = lib.bwd_ws(dt, descs["q"][2], descs["k"][2], window, int(want_db))
    outputs = {"dq": (B * N * heads * D, q.dtype), "dk": (B * N * hkv * D, q.dtype), "dv": (B * N * hkv * D, q.dtype)}
    if want_db:
        outputs["dbias"] = (table.numel(), torch.float32)

    def call(i, o, extra):
        ptr = {name: i[d[0]].ptr + d[1] * esize for name, d in descs.items()}
        ws = extra(max(ws_bytes, 1), torch.uint8, "workspace")
        return lib.bwd(dt, ptr["dout"], descs["dout"][2], ptr["q"], descs["q"][2], ptr["k"], descs["k"][2],
                       ptr["v"], descs["v"][2], ptr["out"], descs["out"][2], i["lse"].ptr,
                       i["dlse"].ptr if dlse is not None else None, i["bias"].ptr if want_db else None,
                       bias_heads, o["dq"].ptr, o["dk"].ptr, o["dv"].ptr, o["dbias"].ptr if want_db else None,
                       window, scale, ws.ptr)

    res = driver.run_schedules(lib, inputs, outputs, call)
    LAUNCHES.extend(lib.take_launches())
    grads = {"dq": res["dq"].view(q.shape), "dk": res["dk"].view(views["k"][0].shape),
             "dv": res["dv"].view(views["v"][0].shape)}
    if want_db:
        grads["dbias"] = res["dbias"].view(table.shape)
    return grads


def assert_near(got, ref, dtype, what):
    got = got.double()
    assert not torch.isnan(got).any(), f"{what}: NaN in the result (an element not written?)"
    scale = max(ref.abs().max().item(), 1e-3)
    err = (got - ref).abs()
    tol = TOL[dtype] * scale
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off, first at "
                           f"{bad.nonzero()[0].tolist()}: got {got[bad][0].item()}, want {ref[bad][0].item()} "
                           f"(max error {err.max().item():.3g}, tolerance {tol:.3g})")


def check(lib, spatial, kernel, dilation=None, stride=None, causal=None, border="clamp", heads=4, heads_kv=2,
          D=32, dtype=torch.float32, bias=None, layout="fused", dlse=True, strided_dout=False, seed=0, B=1):
    n = len(spatial)
    dilation = dilation or (1,) * n
    stride = stride or (1,) * n
    causal = causal or (False,) * n
    gen = torch.Generator().manual_seed(seed)
    views = make_inputs(spatial, heads, heads_kv, D, dtype, gen, layout, B)
    table = None
    bias_heads = 1
    if bias is not None:
        bias_heads = heads if bias == "heads" else 1
        table = (0.5 * torch.randn(bias_heads, *[2 * x - 1 for x in kernel], generator=gen,
                                   dtype=torch.float64)).float()
    scale = D ** -0.5
    window = window_desc(kernel, dilation, stride, causal, border)
    what = f"{spatial} k={kernel} d={dilation} s={stride} c={causal} {border} {dtype} D={D} h={heads}/{heads_kv}"

    out, lse = run_forward(lib, views, n, window, table, bias_heads, scale)
    qd, kd, vd = (views[x][0].double().requires_grad_(True) for x in ("q", "k", "v"))
    td = table.double().requires_grad_(True) if table is not None else None
    ref_out, ref_lse = brute_force(qd, kd, vd, kernel, dilation, stride, causal, border, td, scale)
    assert_near(out, ref_out.detach(), dtype, f"out {what}")
    assert_near(lse, ref_lse.detach(), torch.float32, f"lse {what}")

    # backward from the kernel's own out / lse, with a gradient into the lse too
    if strided_dout:
        dout_base = torch.randn(*out.shape[:-1], 2 * D, generator=gen, dtype=torch.float64).to(dtype)
        dout = dout_base[..., ::2]
    else:
        dout_base = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        dout = dout_base
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).float() if dlse else None
    grads = run_backward(lib, views, n, window, table, bias_heads, scale, out, lse, dout, dout_base, g_lse)
    loss = (ref_out * dout.double()).sum()
    if dlse:
        loss = loss + (ref_lse * g_lse.double()).sum()
    wrt = [qd, kd, vd] + ([td] if td is not None else [])
    refs = torch.autograd.grad(loss, wrt)
    for name, ref in zip(("dq", "dk", "dv", "dbias"), refs):
        assert_near(grads[name], ref, dtype, f"{name} {what}")


# ---------------------------------------------------------------------------------------
# Cases: (spatial, kernel, dilation, stride, causal, border, head_dim, heads_kv, bias, layout, dtypes)
# Maps are odd-sized and span more than one 64-query tile along some axis; heads 4 throughout.
# ---------------------------------------------------------------------------------------
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ALL = (F32, F16, BF16)
CASES = {
    # 1-D
    "1d_k5_d2": ((131,), (5,), (2,), (1,), (False,), "clamp", 32, 2, "heads", "fused", ALL),
    "1d_k4_s2_causal": ((70,), (4,), (1,), (2,), (True,), "clamp", 80, 1, "shared", "transposed", ALL),
    "1d_k6_d2_s3": ((29,), (6,), (2,), (3,), (False,), "clamp", 32, 4, None, "fused", (F32, BF16)),
    "1d_k4_blocked": ((11,), (4,), (1,), (4,), (False,), "clamp", 32, 2, "heads", "transposed", (F16,)),
    "1d_k5_d3_mask": ((23,), (5,), (3,), (1,), (False,), "mask", 32, 2, "heads", "fused", (F32, F16)),
    "1d_k4_d2_zero": ((19,), (4,), (2,), (1,), (False,), "zero", 32, 1, "shared", "fused", (BF16,)),
    "1d_k9_zero_small_map": ((5,), (9,), (1,), (1,), (False,), "zero", 32, 2, "heads", "transposed", (F32, F16)),
    # 2-D
    "2d_k3_4_causal_s2": ((9, 11), (3, 4), (1, 2), (1, 2), (True, False), "clamp", 32, 2, "heads", "fused", ALL),
    "2d_k5_6_d2_s3_causal": ((19, 21), (5, 6), (2, 1), (2, 3), (True, False), "clamp", 32, 4, "shared", "fused",
                             (F32, BF16)),
    "2d_k5_3_causal_w": ((8, 9), (5, 3), (1, 3), (2, 1), (False, True), "clamp", 32, 1, None, "transposed", (F16,)),
    "2d_k5_7_zero": ((19, 21), (5, 7), (1, 2), (1, 1), (False, False), "zero", 32, 2, "heads", "fused", (F32, F16)),
    "2d_k4_3_mask": ((5, 6), (4, 3), (1, 1), (1, 1), (False, False), "mask", 32, 4, "shared", "transposed",
                     (BF16,)),
    "2d_k5_6_mask_small_map": ((3, 4), (5, 6), (1, 2), (1, 1), (False, False), "mask", 32, 2, "heads", "fused",
                               (F32, F16)),
    "2d_k3_zero_d2": ((5, 7), (3, 2), (2, 1), (1, 1), (False, False), "zero", 32, 1, "heads", "fused", (BF16,)),
    # 3-D
    "3d_k2_3_5_causal": ((5, 4, 7), (2, 3, 5), (2, 1, 1), (2, 1, 3), (False, True, True), "clamp", 32, 2, "heads",
                         "fused", ALL),
    "3d_k3_causal_t": ((6, 5, 7), (3, 3, 3), (1, 1, 2), (1, 2, 1), (True, False, False), "clamp", 32, 4, "shared",
                       "transposed", (F32, F16)),
    "3d_k3_3_2_zero": ((3, 5, 4), (3, 3, 2), (1, 1, 1), (1, 1, 1), (False, False, False), "zero", 32, 1, "heads",
                       "fused", (BF16, F32)),
    "3d_k3_3_4_mask": ((4, 3, 5), (3, 3, 4), (1, 1, 1), (1, 1, 1), (False, False, False), "mask", 32, 2, "shared",
                       "fused", (F16,)),
    # head dims: 1 (element-wise loads), 80 (not a power of two), 128
    "2d_hd1": ((7, 9), (3, 3), (1, 1), (1, 1), (False, False), "clamp", 1, 2, "heads", "fused", ALL),
    "1d_hd80": ((40,), (7,), (1,), (1,), (False,), "mask", 80, 2, "heads", "transposed", (F32, BF16)),
    "2d_hd128": ((9, 10), (3, 5), (1, 1), (1, 1), (False, False), "clamp", 128, 2, "heads", "fused", ALL),
    "1d_hd256": ((37,), (5,), (1,), (2,), (True,), "clamp", 256, 2, "shared", "fused", ALL),
}


# cases run with two images (batch offsets)
BATCH2 = {"1d_k4_s2_causal", "2d_k5_7_zero", "3d_k3_causal_t", "2d_hd128"}


def _params():
    out = []
    for name, case in CASES.items():
        for dtype in case[-1]:
            out.append(pytest.param(case, dtype, 2 if name in BATCH2 else 1,
                                    id=f"{name}-{str(dtype).replace('torch.', '')}"))
    return out


@pytest.mark.parametrize("case,dtype,batch", _params())
def test_forward_backward(lib, case, dtype, batch):
    spatial, kernel, dil, stride, causal, border, D, heads_kv, bias, layout, _ = case
    seed = sum(spatial) + D + len(kernel)
    check(lib, spatial, kernel, dil, stride, causal, border, heads=4, heads_kv=heads_kv, D=D, dtype=dtype,
          bias=bias, layout=layout, dlse=seed % 2 == 0 or bias is None, strided_dout=layout == "transposed",
          seed=seed, B=batch)


def test_shared_memory_per_block():
    """Every launch of the cases above (head_dim up to 256, each dtype) fits the smallest opt-in
    limit of the GPUs the kernels target (sm_86 / sm_89: 99 KiB per block)."""
    import re

    sizes = [int(m.group(1)) for ln in LAUNCHES for m in [re.search(r"smem=(\d+)", ln)] if m]
    if not sizes:
        pytest.skip("no launches recorded (run with the forward/backward cases)")
    assert max(sizes) <= SMEM_LIMIT, [ln for ln in LAUNCHES if int(re.search(r"smem=(\d+)", ln).group(1)) > SMEM_LIMIT]


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_nonfinite_values(lib, dtype):
    """NaN and infinities in v: a query's output takes them in only when its window holds them (IEEE
    arithmetic on its own keys), whatever keys of the same tile outside its window hold."""
    spatial, kernel = (6, 21), (3, 5)
    gen = torch.Generator().manual_seed(5)
    views = make_inputs(spatial, 4, 2, 32, dtype, gen, "fused")
    v, kv = views["v"]
    v[0, 1, 2, 0, 3] = float("inf")
    v[0, 4, 17, 1, 5] = float("nan")
    v[0, 0, 9, 1, 7] = float("-inf")
    window = window_desc(kernel, (1, 1), (1, 1), (False, False), "clamp")
    out, lse = run_forward(lib, views, 2, window, None, 1, 32 ** -0.5)
    ref, ref_lse = brute_force(views["q"][0].double(), views["k"][0].double(), v.double(), kernel, (1, 1), (1, 1),
                               (False, False), "clamp", None, 32 ** -0.5)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN pattern differs"
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), "infinity pattern differs"
    assert torch.isnan(out).any() and torch.isinf(out).any() and torch.isfinite(out).any()
    fin = torch.isfinite(ref)
    assert_near(out[fin], ref[fin], dtype, "finite outputs")
    assert_near(lse, ref_lse, torch.float32, "lse")


def test_refuses_what_it_cannot_index(lib):
    """head_dim past the limit, and a head count that is not a multiple of the key/value heads:
    cudaErrorInvalidValue before any launch."""
    q6 = (ctypes.c_longlong * 12)(1, 1, 1, 8, 4, 300, 0, 0, 0, 1200, 300, 1)
    window = window_desc((3,), (1,), (1,), (False,), "clamp")
    assert lib.fwd(0, None, q6, None, q6, None, q6, None, None, None, 1, window, 1.0, None) == 1
    q6 = (ctypes.c_longlong * 12)(1, 1, 1, 8, 4, 32, 0, 0, 0, 128, 32, 1)
    k6 = (ctypes.c_longlong * 12)(1, 1, 1, 8, 3, 32, 0, 0, 0, 96, 32, 1)
    assert lib.fwd(0, None, q6, None, k6, None, k6, None, None, None, 1, window, 1.0, None) == 1
    assert lib.take_log() == ""
