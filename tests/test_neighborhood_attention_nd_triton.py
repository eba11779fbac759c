"""The Triton kernels of the N-d neighbourhood attention family, called through their opaque ops
(``alterops::neighborhood_attention_nd_triton_fwd`` / ``_bwd``), against a float64 brute force
written here: each query's window is built from the per-axis rule (loops over queries), the
softmax runs over the gathered neighbours, and autograd gives the reference gradients."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from helpers import assert_close, device_for
from na_brute_force import neighbour_table

triton = pytest.importorskip("triton")

import alterops._na_nd_triton  # noqa: E402,F401  (registers the ops)

DEVICE = device_for("triton")


# ---------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------
def neighbours(shape, kernel, dilation, stride, causal, border):
    """Per query (flat over T, H, W): key index (-1 for a zero key outside the map), bias cell per
    axis, and whether the neighbour takes part in the softmax (tests/na_brute_force.py's tables)."""
    idx, used, cell = neighbour_table(shape, kernel, dilation, stride, causal, border)
    key = torch.where(idx < math.prod(shape), idx, torch.full_like(idx, -1))
    return key, cell, used


def brute_force(q, k, v, table, dout, dlse, kernel, dilation, stride, causal, border, scale):
    """out, lse and the gradients of sum(out * dout) + sum(lse * dlse), in float64."""
    B, T, H, W, heads, D = q.shape
    heads_kv = k.shape[4]
    key, cell, used = neighbours((T, H, W), kernel, dilation, stride, causal, border)
    q64 = q.detach().double().reshape(B, T * H * W, heads, D).requires_grad_()
    k64 = k.detach().double().reshape(B, T * H * W, heads_kv, D).requires_grad_()
    v64 = v.detach().double().reshape(B, T * H * W, heads_kv, D).requires_grad_()
    tab = None if table is None else table.detach().double().requires_grad_()
    group = heads // heads_kv
    kx = k64.repeat_interleave(group, dim=2)
    vx = v64.repeat_interleave(group, dim=2)
    inside = key >= 0
    idx = key.clamp(min=0)
    kn = kx[:, idx] * inside[None, :, :, None, None]  # (B, N, n, heads, D); zero outside the map
    vn = vx[:, idx] * inside[None, :, :, None, None]
    s = torch.einsum("bnhd,bnjhd->bnhj", q64, kn) * scale
    if tab is not None:
        b = tab.expand(heads, -1, -1, -1)[:, cell[..., 0], cell[..., 1], cell[..., 2]]  # (heads, N, n)
        s = s + b.permute(1, 0, 2)[None]
    s = s.masked_fill(~used[None, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # (B, N, heads)
    out = torch.einsum("bnhj,bnjhd->bnhd", torch.softmax(s, -1), vn)
    out = out.reshape(B, T, H, W, heads, D)
    lse = lse.permute(0, 2, 1).reshape(B, heads, T, H, W)
    loss = (out * dout.double()).sum() + (lse * dlse.double()).sum()
    grads = torch.autograd.grad(loss, [q64, k64, v64] + ([tab] if tab is not None else []))
    dq, dk, dv = (g.reshape(t.shape) for g, t in zip(grads[:3], (q, k, v)))
    dbias = dbias_terms = None
    if tab is not None:
        dbias = grads[3]
        # per table cell, the sum of |P| (|dP| + |delta| + |dlse|) over its logits: the scale of
        # the rounding error of a dbias computed from half-precision out and dout
        with torch.no_grad():
            p = torch.softmax(s, -1)
            dout_n = dout.double().reshape(B, T * H * W, heads, D)
            dp = torch.einsum("bnhd,bnjhd->bnhj", dout_n, vn).abs()
            delta = (dout_n * out.reshape(B, T * H * W, heads, D)).sum(-1).abs()
            dl = dlse.double().reshape(B, heads, T * H * W).permute(0, 2, 1).abs()
            terms = (p * (dp + (delta + dl)[..., None])).sum(0)  # (N, heads, n)
            flat = (cell[..., 0] * tab.shape[2] + cell[..., 1]) * tab.shape[3] + cell[..., 2]  # (N, n)
            acc = torch.zeros(heads, tab[0].numel(), dtype=torch.float64)
            acc.index_add_(1, flat.reshape(-1), terms.permute(1, 0, 2).reshape(heads, -1))
            dbias_terms = acc.sum(0, keepdim=True) if tab.shape[0] == 1 else acc
            dbias_terms = dbias_terms.reshape(tab.shape)
    return out.detach(), lse.detach(), dq, dk, dv, dbias, dbias_terms


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------
# (spatial (T, H, W), kernel, dilation, stride, causal, border, heads, heads_kv, head_dim, bias_heads)
CASES = {
    # 1-D: 70 positions span two 64-query blocks; even kernel, dilation, stride
    "1d_clamp_even_dil_stride": ((1, 1, 70), (1, 1, 6), (1, 1, 3), (1, 1, 4), (0, 0, 0), "clamp", 2, 2, 16, "heads"),
    "1d_causal_gqa": ((1, 1, 37), (1, 1, 5), (1, 1, 2), (1, 1, 2), (0, 0, 1), "clamp", 4, 1, 8, 1),
    "1d_zero": ((1, 1, 21), (1, 1, 4), (1, 1, 3), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 8, "heads"),
    # 2-D: 9 x 11 spans two 8 x 8 blocks per axis (bfloat16 blocks; float32 ones are 4 x 8)
    "2d_clamp_gqa": ((1, 9, 11), (1, 3, 4), (1, 2, 2), (1, 2, 3), (0, 0, 0), "clamp", 4, 2, 16, "heads"),
    "2d_causal_mixed": ((1, 9, 13), (1, 4, 3), (1, 1, 2), (1, 3, 1), (0, 1, 0), "clamp", 2, 1, 8, 1),
    "2d_mask": ((1, 9, 11), (1, 5, 4), (1, 2, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 2, 8, "heads"),
    "2d_zero_gqa": ((1, 7, 10), (1, 3, 4), (1, 1, 3), (1, 1, 1), (0, 0, 0), "zero", 4, 2, 8, 1),
    # 3-D: 3 x 5 x 9 spans two blocks per axis (2 x 4 x 8 queries, 2 x 4 x 4 keys in bfloat16)
    "3d_clamp": ((3, 5, 9), (3, 2, 3), (1, 2, 3), (2, 1, 2), (0, 0, 0), "clamp", 2, 1, 16, "heads"),
    "3d_causal_t": ((3, 5, 9), (2, 3, 3), (1, 1, 2), (1, 2, 1), (1, 0, 0), "clamp", 2, 1, 8, 1),
    "3d_mask_no_bias": ((3, 5, 9), (3, 3, 3), (1, 2, 2), (1, 1, 1), (0, 0, 0), "mask", 2, 2, 8, None),
    "3d_zero": ((3, 5, 9), (2, 3, 3), (1, 1, 2), (1, 1, 1), (0, 0, 0), "zero", 2, 1, 8, "heads"),
}
FLOAT32 = ("1d_clamp_even_dil_stride", "1d_causal_gqa", "2d_clamp_gqa", "2d_zero_gqa", "3d_causal_t")


def make_case(name, dtype, layout, seed=0):
    shape, kernel, dilation, stride, causal, border, heads, heads_kv, D, bias_heads = CASES[name]
    g = torch.Generator().manual_seed(seed)
    T, H, W = shape
    B = 2 if (layout != "fused" and T == 1) else 1

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype)

    if layout == "fused":
        # q, k and v are views into one projection (B, T, H, W, heads + 2 heads_kv, D)
        qkv = rnd(B, T, H, W, heads + 2 * heads_kv, D).to(DEVICE)
        q, k, v = qkv.split([heads, heads_kv, heads_kv], dim=4)
    elif layout == "transposed":
        # head-major storage seen as heads-last: (B, heads, T, H, W, D).permute
        q = rnd(B, heads, T, H, W, D).to(DEVICE).permute(0, 2, 3, 4, 1, 5)
        k = rnd(B, heads_kv, T, H, W, D).to(DEVICE).permute(0, 2, 3, 4, 1, 5)
        v = rnd(B, heads_kv, T, H, W, D).to(DEVICE).permute(0, 2, 3, 4, 1, 5)
    else:
        q = rnd(B, T, H, W, heads, D).to(DEVICE)
        k = rnd(B, T, H, W, heads_kv, D).to(DEVICE)
        v = rnd(B, T, H, W, heads_kv, D).to(DEVICE)
    table = None
    if bias_heads is not None:
        nb = heads if bias_heads == "heads" else 1
        table = torch.randn(nb, *(2 * kk - 1 for kk in kernel), generator=g).to(DEVICE)
    dout = rnd(B, T, H, W, heads, D).to(DEVICE)
    dlse = torch.randn(B, heads, T, H, W, generator=g).to(DEVICE)
    return (q, k, v, table, dout, dlse), (list(kernel), list(dilation), list(stride), list(causal), border)


def run_and_compare(name, dtype, layout):
    (q, k, v, table, dout, dlse), (kernel, dilation, stride, causal, border) = make_case(name, dtype, layout)
    scale = q.shape[-1] ** -0.5 * 1.3
    out, lse = torch.ops.alterops.neighborhood_attention_nd_triton_fwd(
        q, k, v, kernel, dilation, stride, causal, border, table, scale)
    dq, dk, dv, dbias = torch.ops.alterops.neighborhood_attention_nd_triton_bwd(
        dout, q, k, v, out, lse, dlse, kernel, dilation, stride, causal, border, table, scale, True)
    ref = brute_force(q.cpu(), k.cpu(), v.cpu(), None if table is None else table.cpu(), dout.cpu(), dlse.cpu(),
                      kernel, dilation, stride, causal, border, scale)
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for got, want, what in zip((out, lse, dq, dk, dv), ref[:5], ("out", "lse", "dq", "dk", "dv")):
        assert_close(got, want, name=what)
    if table is None:
        assert dbias.shape == (0,)
    elif dtype == torch.float32:
        assert dbias.dtype == torch.float32
        assert_close(dbias, ref[5], name="dbias")
    else:
        # a float32 table gradient, from logit gradients whose delta = rowsum(dout * out) reads the
        # rounded out: the error of each cell scales with the magnitudes summed into it
        assert dbias.dtype == torch.float32 and dbias.shape == ref[5].shape
        err = (dbias.double().cpu() - ref[5]).abs()
        bound = 2e-2 * ref[6] + 1e-4
        assert (err <= bound).all(), f"dbias: error {err.max():.3e}, worst ratio {(err / bound).max():.2f}"


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16(name):
    run_and_compare(name, torch.bfloat16, "fused" if name.startswith("2d") else "plain")


@pytest.mark.parametrize("name", FLOAT32)
def test_float32(name):
    run_and_compare(name, torch.float32, "transposed" if name.startswith("3d") else "fused")


# the plain pass's dot meets the NaN before the IEEE pass replaces its result
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_nonfinite_values_stay_in_their_windows():
    """A NaN and an inf in v reach exactly the queries whose window holds them (IEEE: NaN where
    the NaN key is a neighbour, inf where only the inf one is), as in the float64 brute force."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 1, 40, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    v[0, 0, 0, 6, 0, 3] = float("nan")
    v[0, 0, 0, 30, 1, 5] = float("inf")
    window = ([1, 1, 3], [1, 1, 2], [1, 1, 1], [0, 0, 0], "clamp")
    out, lse = torch.ops.alterops.neighborhood_attention_nd_triton_fwd(q, k, v, *window, None, 0.25)
    zeros = torch.zeros(1, 1, 1, 40, 2, 16)
    ref = brute_force(q.cpu(), k.cpu(), v.cpu(), None, zeros, zeros[..., 0].permute(0, 4, 1, 2, 3), *window, 0.25)
    o, r = out.cpu().double(), ref[0]
    assert torch.equal(o.isnan(), r.isnan()) and torch.equal(o.isinf(), r.isinf())
    assert 0 < r.isnan().sum() and 0 < r.isinf().sum() and r.isfinite().sum() > o.numel() // 2
    fin = r.isfinite()
    assert (o[fin] - r[fin]).abs().max() < 1e-5
    assert_close(lse, ref[1], name="lse")


def test_opcheck():
    """Schemas, fake implementations and dispatch of both ops (a small 2-D case with GQA, bias
    and dlse)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 5, 6, 2, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 1, 5, 6, 1, 16, generator=g).to(DEVICE) for _ in range(2))
    table = torch.randn(2, 1, 5, 3, generator=g).to(DEVICE)
    window = ([1, 3, 2], [1, 1, 2], [1, 2, 1], [0, 0, 1], "clamp")
    fwd = torch.ops.alterops.neighborhood_attention_nd_triton_fwd
    bwd = torch.ops.alterops.neighborhood_attention_nd_triton_bwd
    torch.library.opcheck(fwd.default, (q, k, v, *window, table, 0.3))
    out, lse = fwd(q, k, v, *window, table, 0.3)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(bwd.default, (dout, q, k, v, out, lse, dlse, *window, table, 0.3, True))
    torch.library.opcheck(bwd.default, (dout, q, k, v, out, lse, None, *window, None, 0.3, False))


def test_ieee_pass_returns_unless_the_flag_says_nonfinite(monkeypatch):
    """The IEEE pass alone (as a GPU launches it after the plain one), on a NaN-poisoned output:
    with the flag of finite values (the sum of v) it returns at once and leaves the output
    untouched; with a flag of inf or NaN it computes the whole output."""
    from alterops import _checks
    from alterops.kernels import _attention_common, neighborhood_attention_nd as kern

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 3, 7, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    window = ([1, 3, 3], [1, 1, 2], [1, 1, 1], [0, 0, 0], "clamp")
    zeros = torch.zeros(1, 1, 3, 7, 2, 16)
    ref = brute_force(q.cpu(), k.cpu(), v.cpu(), None, zeros, zeros[..., 0].permute(0, 4, 1, 2, 3), *window, 0.25)
    monkeypatch.setattr(_checks, "_POISON", True)
    for flag_value in (None, float("inf"), float("-inf"), float("nan")):
        def ieee_only(v, flag_value=flag_value):
            flag, _ = _attention_common.nonfinite_passes(v)
            if flag_value is not None:
                flag = torch.full_like(flag, flag_value)
            return flag, [True]

        monkeypatch.setattr(kern, "nonfinite_passes", ieee_only)
        out, lse = torch.ops.alterops.neighborhood_attention_nd_triton_fwd(q, k, v, *window, None, 0.25)
        if flag_value is None:
            assert out.isnan().all() and lse.isnan().all(), "the IEEE pass ran with a finite flag"
        else:
            assert_close(out, ref[0], name=f"out, flag {flag_value}")
            assert_close(lse, ref[1], name=f"lse, flag {flag_value}")


def test_eager_calls_skip_the_op_and_traces_keep_it():
    """An eager call runs the launchers without the registered ops' dispatch (host time);
    a trace (make_fx, as torch.compile and export build on, and torch.jit.trace) must still
    see the opaque ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import alterops as ao

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 6, 5, 2, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    assert alterops._autograd.direct_call_ok((q, k, v, None, [1, 3], "clamp"))

    def step(q, k, v):
        out = ao.neighborhood_attention2d(q, k, v, 3, backend="triton")
        return (out,) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    graph = make_fx(step)(q, k, v)
    code = graph.code
    assert "neighborhood_attention_nd_triton_fwd" in code and "neighborhood_attention_nd_triton_bwd" in code
    eager = step(q, k, v)
    traced = graph(q, k, v)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)

    # torch.jit.trace records dispatcher calls: without the op, the graph would lack the kernels
    def forward(q, k, v):
        return ao.neighborhood_attention2d(q, k, v, 3, backend="triton")

    plain = [t.detach() for t in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent checks become constants
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace, deprecated but still used
        jit = torch.jit.trace(forward, tuple(plain), check_trace=False)
    assert "neighborhood_attention_nd_triton_fwd" in str(jit.graph)
    other = [torch.randn_like(t) for t in plain]
    assert torch.equal(jit(*other), forward(*other))
