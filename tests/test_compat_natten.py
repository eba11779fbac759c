"""alterops.compat.natten: NATTEN 0.14-0.17's unfused ops and modules, and Hugging Face DiNAT / NAT.

The oracle is written here from NATTEN 0.17.5's CPU reference kernels
(``csrc/include/natten/cpu/naive/natten_cpu_commons.h``: ``get_window_start``, ``get_window_end``,
``get_pb_start``; slot ``j`` of query ``i`` reads key ``start + j * dilation``, valid below the
window end, and bias cell ``pb_start + j``) and evaluated in float64 by a direct gather. It does
not use ``axis_window``. The Hugging Face tests (``-k "hf or transformers"``) pass with
transformers 5.x and with 4.57.6 (``PYTHONPATH=/tmp/tf4576``); they never need natten.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import alterops
import alterops._dispatch as dispatch
from alterops import _na_unfused
from alterops.compat import natten as cn
from alterops.neighborhood_attention_nd import axis_window
from helpers import assert_close, device_for

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# =============================================================================================
# NATTEN 0.17.5's rules, restated
# =============================================================================================
def natten_window(i, length, k, d, causal):
    """``(first key, end)`` of query ``i``: keys ``first + j * d`` below ``end`` (NATTEN's
    get_window_start / get_window_end)."""
    half = k // 2
    res, ig = i % d, i // d
    n_grid = -(-length // d)
    if res >= d - (n_grid * d - length):  # the sub-grids past the last full row are one shorter
        n_grid -= 1
    if causal:
        start = max(ig - k + 1, 0)
        return start * d + res, min(length, i + d)
    start = max(ig - half, 0)
    if ig + half >= n_grid:
        start += n_grid - ig - half - 1
    return start * d + res, min(length, start * d + res + k * d)


def natten_pb_start(i, length, k, d):
    """NATTEN's get_pb_start: the bias cell of slot 0 of query ``i``."""
    half = k // 2
    if d <= 1:
        return half + (half - i if i < half else 0) + (length - i - 1 - half if i + half >= length else 0)
    if i - half * d < 0:
        return k - 1 - i // d
    if i + half * d >= length:
        return (length - i - 1) // d
    return half


def natten_tables(spatial, ks, ds, causal):
    """``(key, valid, cell)``, each ``(N, K)``: flat key position (clamped where invalid), whether
    the slot holds a key, flat bias cell, for queries and slots in row-major order."""
    keys, valids, cells = [], [], []
    for p in itertools.product(*map(range, spatial)):
        per_axis = [natten_window(p[a], spatial[a], ks[a], ds[a], causal[a]) for a in range(len(spatial))]
        pbs = [natten_pb_start(p[a], spatial[a], ks[a], ds[a]) for a in range(len(spatial))]
        row_k, row_v, row_c = [], [], []
        for slots in itertools.product(*map(range, ks)):
            pos = [per_axis[a][0] + slots[a] * ds[a] for a in range(len(spatial))]
            ok = all(pos[a] < per_axis[a][1] for a in range(len(spatial)))
            flat = cell = 0
            for a in range(len(spatial)):
                flat = flat * spatial[a] + min(pos[a], spatial[a] - 1)
                cell = cell * (2 * ks[a] - 1) + pbs[a] + slots[a]
            row_k.append(flat)
            row_v.append(ok)
            row_c.append(cell)
        keys.append(row_k)
        valids.append(row_v)
        cells.append(row_c)
    return torch.tensor(keys), torch.tensor(valids), torch.tensor(cells)


def ref_qk(q, k, rpb, ks, ds, causal=None, extra_k=None):
    """float64 logits ``(B, heads, *spatial, K [+ n_extra])`` from heads-first q, k."""
    n = len(ks)
    causal = causal or (False,) * n
    B, h, *spatial, D = q.shape
    key, valid, cell = natten_tables(spatial, ks, ds, causal)
    qf, kf = q.double().cpu().reshape(B, h, -1, D), k.double().cpu().reshape(B, h, -1, D)
    logits = torch.einsum("bhnd,bhnkd->bhnk", qf, kf[:, :, key])
    if rpb is not None:
        logits = logits + rpb.double().cpu().reshape(h, -1)[:, cell]
    logits = logits.masked_fill(~valid, float("-inf"))
    if extra_k is not None:
        logits = torch.cat([logits, qf @ extra_k.double().cpu().transpose(-1, -2)], dim=-1)
    return logits.reshape(B, h, *spatial, -1)


def ref_av(attn, v, ks, ds, causal=None, extra_v=None):
    n = len(ks)
    causal = causal or (False,) * n
    B, h, *spatial, D = v.shape
    key, valid, _ = natten_tables(spatial, ks, ds, causal)
    K = key.shape[1]
    a = attn.double().cpu().reshape(B, h, -1, attn.shape[-1])
    neighbours = v.double().cpu().reshape(B, h, -1, D)[:, :, key]
    out = torch.einsum("bhnk,bhnkd->bhnd", a[..., :K].masked_fill(~valid, 0), neighbours)
    if extra_v is not None:
        out = out + a[..., K:] @ extra_v.double().cpu()
    return out.reshape(v.shape)


# =============================================================================================
# The window rule and bias index equal axis_window's (odd kernels, stride 1)
# =============================================================================================
def test_natten_window_rule_equals_axis_window():
    cases = 0
    for length in range(3, 33):
        for k in range(3, length + 1, 2):
            for d in range(1, length // k + 1):
                for causal in (False, True):
                    pos, valid, bias_index = axis_window(length, k, d, 1, causal, "clamp")
                    for i in range(length):
                        first, end = natten_window(i, length, k, d, causal)
                        keys = [first + j * d for j in range(k)]
                        ok = [key < end for key in keys]
                        assert valid[i].tolist() == ok, (length, k, d, causal, i)
                        assert [p for p, o in zip(pos[i].tolist(), ok) if o] == [x for x, o in zip(keys, ok) if o]
                        if not causal:
                            pb = natten_pb_start(i, length, k, d)
                            assert bias_index[i].tolist() == [pb + j for j in range(k)], (length, k, d, i)
                    cases += 1
    assert cases > 1000  # (length, kernel, dilation, causal) combinations


# =============================================================================================
# The unfused ops against the float64 oracle
# =============================================================================================
SHAPES = {1: (11,), 2: (7, 9), 3: (4, 5, 6)}
CONFIGS = [  # (n, kernel, dilation, causal)
    (1, 3, 1, False), (1, 5, 2, False), (1, 3, 3, True),
    (2, 3, 2, False), (2, (5, 3), (1, 3), False), (2, 3, (2, 1), (True, False)),
    (3, 3, (1, 1, 2), False), (3, (3, 5, 3), 1, (False, True, True)),
]


def _tuple(v, n):
    return tuple(v) if isinstance(v, tuple) else (v,) * n


UNFUSED_BACKENDS = ("reference", "cpu", "triton")


def unfused_device(backend, dtype):
    """The device the unfused ops of ``backend`` run on, or a skip saying why they cannot."""
    device = device_for(backend)
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    reason = dispatch.registry()["natten_qk_av"].why_not(backend, device, compute)
    if reason:
        pytest.skip(reason)
    return device


@pytest.mark.parametrize("backend", UNFUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,kernel,dilation,causal", CONFIGS)
def test_qk_av_forward_backward(n, kernel, dilation, causal, dtype, backend, monkeypatch):
    device = unfused_device(backend, dtype)
    torch.manual_seed(n * 7 + hash(str(kernel)) % 5)
    ks, ds, cs = _tuple(kernel, n), _tuple(dilation, n), _tuple(causal, n)
    B, h, D = 2, 2, 8
    shape = (B, h, *SHAPES[n], D)
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    rpb = None if any(cs) else (0.5 * torch.randn(h, *(2 * x - 1 for x in ks), dtype=dtype,
                                                  device=device)).requires_grad_()
    qk, av = getattr(cn, f"na{n}d_qk"), getattr(cn, f"na{n}d_av")
    ran = []
    for prim in ("_dot", "_sum", "_scatter"):  # record which backend each primitive ran on
        real = getattr(_na_unfused, prim)
        monkeypatch.setattr(_na_unfused, prim, lambda b, *a, _real=real, _p=prim: ran.append((_p, b)) or _real(b, *a))
    with alterops.set_backend(backend):
        logits = qk(q, k, kernel, dilation, is_causal=causal, rpb=rpb)
        assert logits.dtype == dtype and logits.shape == (*shape[:-1], math.prod(ks))
        assert logits.device == q.device
        attn = torch.softmax(logits.float(), -1).to(dtype).detach().requires_grad_()
        out = av(attn, v, kernel, dilation, is_causal=causal)
        g_logits = torch.randn(logits.shape, dtype=dtype, device=device)
        g_out = torch.randn(shape, dtype=dtype, device=device)
        inputs = [t for t in (q, k, rpb) if t is not None]
        grads = torch.autograd.grad(logits, inputs, g_logits)
        grads_av = torch.autograd.grad(out, (attn, v), g_out)
    assert {b for _, b in ran} == {backend} and {p for p, _ in ran} == {"_dot", "_sum", "_scatter"}
    q, k, v, attn, g_logits, g_out, logits, out = (t.cpu() for t in (q, k, v, attn, g_logits, g_out, logits, out))
    rpb = None if rpb is None else rpb.cpu()
    grads = [g.cpu() for g in grads]
    grads_av = [g.cpu() for g in grads_av]
    want = ref_qk(q, k, rpb, ks, ds, cs)
    assert torch.equal(torch.isinf(logits), torch.isinf(want))
    assert_close(logits.masked_fill(torch.isinf(logits), 0), want.masked_fill(torch.isinf(want), 0), name="qk")
    assert out.dtype == dtype and out.shape == shape
    assert_close(out, ref_av(attn, v, ks, ds, cs), name="av")

    inputs = [t for t in (q, k, rpb) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    q64, k64 = leaves64[:2]
    want64 = ref_qk(q64, k64, leaves64[2] if rpb is not None else None, ks, ds, cs)
    want64 = want64.masked_fill(torch.isinf(want64), 0)  # -inf slots pass no gradient
    for got, ref, name in zip(grads, torch.autograd.grad(want64, leaves64, g_logits.double()), ("dq", "dk", "drpb")):
        assert got.dtype == dtype
        assert_close(got, ref, name=name)
    a64, v64 = attn.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    ref_grads = torch.autograd.grad(ref_av(a64, v64, ks, ds, cs), (a64, v64), g_out.double())
    for got, ref, name in zip(grads_av, ref_grads, ("dattn", "dv")):
        assert_close(got, ref, name=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qk_av_on_cuda(dtype):
    q, k, v = (torch.randn(2, 2, 9, 7, 16, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, device="cuda", dtype=dtype, requires_grad=True)
    attn = cn.na2d_qk(q, k, 3, (2, 1), rpb=rpb).softmax(-1)
    out = cn.na2d_av(attn, v, 3, (2, 1))
    out.sum().backward()
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, rpb)]
    want = ref_av(ref_qk(leaves[0], leaves[1], leaves[3], (3, 3), (2, 1)).softmax(-1), leaves[2], (3, 3), (2, 1))
    assert_close(out, want)
    want.sum().backward()
    for t, ref in zip((q, k, v, rpb), leaves):
        assert_close(t.grad, ref.grad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])  # triton: minutes under the interpreter; compared above
def test_gradcheck_float64(backend):
    device = unfused_device(backend, torch.float64)
    q, k, v = (torch.randn(1, 2, 5, 6, 3, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)

    def f(q, k, v, rpb):
        return cn.na2d_av(cn.na2d_qk(q, k, 3, (1, 2), rpb=rpb).softmax(-1), v, 3, (1, 2))

    with alterops.set_backend(backend):
        assert torch.autograd.gradcheck(f, (q, k, v, rpb))


def test_additional_keys_and_values():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 7, 4, dtype=torch.float64) for _ in range(3))
    ek, ev = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 3, 5, 4, dtype=torch.float64)
    rpb = torch.randn(3, 5, 5, dtype=torch.float64)
    logits = cn.na2d_qk(q, k, 3, 2, additional_keys=ek, rpb=rpb)
    assert logits.shape == (2, 3, 6, 7, 9 + 5)
    assert_close(logits, ref_qk(q, k, rpb, (3, 3), (2, 2), extra_k=ek))
    attn = logits.softmax(-1)
    out = cn.na2d_av(attn, v, 3, 2, additional_values=ev)
    assert_close(out, ref_av(attn, v, (3, 3), (2, 2), extra_v=ev))
    # the fused na2d (heads-last) with the same additional tokens: one softmax over both sets
    fused = cn.na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), 3, 2, rpb=rpb, scale=1.0,
                    additional_keys=ek, additional_values=ev)
    assert_close(fused, out.permute(0, 2, 3, 1, 4))
    with pytest.raises(ValueError, match="neighbourhood weights"):
        cn.na2d_av(attn, v, 3, 2)


def test_old_names_and_argument_orders():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 7, 6, 3, dtype=torch.float64) for _ in range(3))
    # 3-D: (kernel_size_d, kernel_size, dilation_d, dilation)
    rpb3 = torch.randn(2, 9, 5, 5, dtype=torch.float64)
    a = cn.natten3dqkrpb(q, k, rpb3, 5, 3, 1, 2)
    assert_close(a, ref_qk(q, k, rpb3, (5, 3, 3), (1, 2, 2)))
    assert torch.equal(a, cn.na3d_qk_with_bias(q, k, rpb3, 5, 3, 1, 2))
    assert torch.equal(a, cn.na3d_qk(q, k, (5, 3, 3), (1, 2, 2), rpb=rpb3))
    assert torch.equal(cn.natten3dqk(q, k, 5, 3, 1, 2), cn.na3d_qk(q, k, (5, 3, 3), (1, 2, 2)))
    attn = a.softmax(-1)
    assert torch.equal(cn.natten3dav(attn, v, 5, 3, 1, 2), cn.na3d_av(attn, v, (5, 3, 3), (1, 2, 2)))
    q2, k2 = q[:, :, 0], k[:, :, 0]
    rpb2 = torch.randn(2, 5, 5, dtype=torch.float64)
    assert torch.equal(cn.natten2dqkrpb(q2, k2, rpb2, 3, 2), cn.na2d_qk(q2, k2, 3, 2, rpb=rpb2))
    assert torch.equal(cn.na2d_qk_with_bias(q2, k2, rpb2, 3, 2), cn.na2d_qk(q2, k2, 3, 2, rpb=rpb2))
    assert torch.equal(cn.natten2dqk(q2, k2, 3, 2), cn.na2d_qk(q2, k2, 3, 2))
    q1, k1 = q2[:, :, 0], k2[:, :, 0]
    rpb1 = torch.randn(2, 5, dtype=torch.float64)
    assert torch.equal(cn.natten1dqkrpb(q1, k1, rpb1, 3, 2), cn.na1d_qk(q1, k1, 3, 2, rpb=rpb1))
    assert torch.equal(cn.na1d_qk_with_bias(q1, k1, rpb1, 3, 2), cn.na1d_qk(q1, k1, 3, 2, rpb=rpb1))
    attn1 = cn.natten1dqk(q1, k1, 3, 2).softmax(-1)
    assert torch.equal(cn.natten1dav(attn1, v[:, :, 0, 0], 3, 2), cn.na1d_av(attn1, v[:, :, 0, 0], 3, 2))


def test_argument_errors():
    q = torch.randn(1, 2, 6, 6, 4)
    with pytest.raises(ValueError, match="odd"):
        cn.na2d_qk(q, q, 4)
    with pytest.raises(ValueError, match="odd"):
        cn.na2d_qk(q, q, 1)
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        cn.na2d_qk(q, q, 3, 3)
    with pytest.raises(ValueError, match="rpb must have shape"):
        cn.na2d_qk(q, q, 3, rpb=torch.zeros(2, 3, 3))
    with pytest.raises(NotImplementedError, match="causal"):
        cn.na2d_qk(q, q, 3, is_causal=True, rpb=torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="4 spatial|5-D|\\(B, heads"):
        cn.na2d_qk(q[0], q[0], 3)
    with pytest.raises(ValueError, match="is_causal"):
        cn.na2d_qk(q, q, 3, is_causal=1)


# =============================================================================================
# The modules of NATTEN 0.17 (checkpoint layout, fused and unfused paths)
# =============================================================================================
def module_ref(m, x, drop_mask=None, params=None):
    """float64 computation (on the CPU) of NATTEN 0.17.5's module (its unfused path) with m's
    parameters, or with ``params`` (a state dict) when given."""
    n = x.dim() - 2
    B, *spatial, C = x.shape
    p = params or {name: t.detach().double().cpu() for name, t in m.state_dict().items()}
    qkv = F.linear(x.double().cpu(), p["qkv.weight"], p.get("qkv.bias"))
    qkv = qkv.reshape(B, *spatial, 3, m.num_heads, m.head_dim).movedim(n + 1, 0).movedim(-2, 2)
    q, k, v = qkv.unbind(0)
    attn = ref_qk(q * m.scale, k, p.get("rpb"), m.kernel_size, m.dilation, m.is_causal).softmax(-1)
    if drop_mask is not None:
        attn = attn * drop_mask
    out = ref_av(attn, v, m.kernel_size, m.dilation, m.is_causal).movedim(1, -2).reshape(B, *spatial, C)
    return F.linear(out, p["proj.weight"], p["proj.bias"])


def natten_checkpoint(n, dim, heads, ks, rpb=True, qkv_bias=True):
    """A state dict in the key layout and shapes NATTEN 0.14-0.17 modules save."""
    g = torch.Generator().manual_seed(5)
    sd = {"qkv.weight": torch.randn(3 * dim, dim, generator=g) / dim ** 0.5}
    if qkv_bias:
        sd["qkv.bias"] = 0.1 * torch.randn(3 * dim, generator=g)
    if rpb:
        sd["rpb"] = 0.5 * torch.randn(heads, *(2 * k - 1 for k in ks), generator=g)
    sd["proj.weight"] = torch.randn(dim, dim, generator=g) / dim ** 0.5
    sd["proj.bias"] = 0.1 * torch.randn(dim, generator=g)
    return sd


@pytest.mark.parametrize("n,kwargs", [
    (1, dict(kernel_size=5, dilation=2, rel_pos_bias=True)),
    (2, dict(kernel_size=3, dilation=(2, 1), rel_pos_bias=True)),
    (2, dict(kernel_size=(3, 5), is_causal=(True, False), qkv_bias=False)),
    (3, dict(kernel_size=3, dilation=(1, 1, 2), rel_pos_bias=True)),
])
def test_module_checkpoint_loads_and_matches(n, kwargs):
    cls = getattr(cn, f"NeighborhoodAttention{n}D")
    m = cls(8, 2, **kwargs).eval()
    ks = m.kernel_size
    sd = natten_checkpoint(n, 8, 2, ks, rpb=kwargs.get("rel_pos_bias", False), qkv_bias=kwargs.get("qkv_bias", True))
    assert set(m.state_dict()) == set(sd)
    assert all(m.state_dict()[k].shape == t.shape for k, t in sd.items())
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, *SHAPES[n], 8)
    assert_close(m(x), module_ref(m, x), name="module output")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_module_fused_backends(backend, dtype):
    device = device_for(backend)
    reason = dispatch.registry()["neighborhood_attention2d"].why_not(backend, device, dtype)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(3)
    m = cn.NeighborhoodAttention2D(8, 2, 3, dilation=(1, 2), rel_pos_bias=True).to(device, dtype).eval()
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(2, 5, 7, 8, dtype=dtype, device=device, requires_grad=True)
    with alterops.set_backend(backend):
        out = m(x)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, m.rpb, m.qkv.weight), g)
    x64 = x.detach().double().cpu().requires_grad_()
    p64 = {name: t.detach().double().cpu().requires_grad_() for name, t in m.state_dict().items()}
    want = module_ref(m, x64, params=p64)
    assert_close(out, want, name="output")
    ref_grads = torch.autograd.grad(want, (x64, p64["rpb"], p64["qkv.weight"]), g.double().cpu())
    for got, ref, name in zip(grads, ref_grads, ("dx", "drpb", "dqkv")):
        assert got.dtype == dtype
        assert_close(got, ref, name=name)


def test_module_attention_dropout_runs_unfused_path():
    torch.manual_seed(4)
    m = cn.NeighborhoodAttention2D(8, 2, 3, dilation=2, rel_pos_bias=True, attn_drop=0.3, qkv_bias=True)
    x = torch.randn(2, 7, 6, 8)
    torch.manual_seed(10)
    out = m.train()(x)
    # the module draws one dropout mask over the attention weights (B, heads, H, W, K)
    torch.manual_seed(10)
    mask = F.dropout(torch.ones(2, 2, 7, 6, 9), 0.3, training=True).double()
    assert_close(out, module_ref(m, x, drop_mask=mask), name="output with attention dropout")
    out.sum().backward()
    assert m.rpb.grad is not None and m.rpb.grad.abs().sum() > 0
    assert_close(m.eval()(x), module_ref(m, x), name="eval output")


def test_module_torch_compile_both_paths():
    torch.manual_seed(5)
    m = cn.NeighborhoodAttention2D(8, 2, 3, dilation=2, rel_pos_bias=True, attn_drop=0.2)
    x = torch.randn(2, 7, 6, 8)
    for training in (True, False):  # unfused ops (dropout), fused op
        m.train(training)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        torch.manual_seed(0)
        got = compiled(x)
        torch.manual_seed(0)
        assert torch.equal(got, m(x))
        got.sum().backward()
        assert m.rpb.grad.abs().sum() > 0
        m.zero_grad()


def test_module_natten015_arguments_and_errors():
    m = cn.NeighborhoodAttention3D(8, 2, 3, kernel_size_d=5, dilation=2, dilation_d=1, bias=True)
    assert m.kernel_size == (5, 3, 3) and m.dilation == (1, 2, 2) and m.rpb.shape == (2, 9, 5, 5)
    assert cn.NeighborhoodAttention2D(8, 2, 3).rpb is None  # 0.17 default: no bias
    assert set(cn.NeighborhoodAttention2D(8, 2, 3, bias=True).state_dict()) == {
        "qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
    with pytest.raises(NotImplementedError):
        cn.NeighborhoodAttention1D(8, 2, 3, is_causal=True, rel_pos_bias=True)
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):  # NATTEN 0.17.5 does not pad
        cn.NeighborhoodAttention2D(8, 2, 5).eval()(torch.randn(1, 4, 9, 8))
    report = alterops.swap(torch.nn.Sequential(cn.NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True)))
    assert report.count() == 0 and [fam for _, fam, _ in report.skipped] == ["compat_natten"], str(report)


# =============================================================================================
# Hugging Face DiNAT / NAT
# =============================================================================================
try:
    import transformers
except ImportError:  # the tests above do not need it
    transformers = None


@pytest.fixture(scope="module")
def hf():
    if transformers is None:
        pytest.skip("transformers is not installed")
    cn.enable_transformers()
    return transformers


def hf_attention_ref64(a, x):
    """float64: the math DiNAT / NAT were trained with, on module ``a``'s parameters."""
    B, H, W, C = x.shape
    heads, d = a.num_attention_heads, a.attention_head_size
    dil = getattr(a, "dilation", 1)

    def proj(layer):
        t = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        return t.view(B, H, W, heads, d).permute(0, 3, 1, 2, 4)

    q, k, v = proj(a.query) * d ** -0.5, proj(a.key), proj(a.value)
    attn = ref_qk(q, k, a.rpb.double(), (a.kernel_size,) * 2, (dil, dil)).softmax(-1)
    return ref_av(attn, v, (a.kernel_size,) * 2, (dil, dil)).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)


def dinat_config(**kw):
    cfg = dict(image_size=28, patch_size=4, embed_dim=8, depths=[1, 2, 1], num_heads=[1, 2, 2], kernel_size=3,
               dilations=[[2], [1, 2], [1]], mlp_ratio=2.0, drop_path_rate=0.0, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return transformers.DinatConfig(**cfg)


def float64_reference(model):
    """A float64 copy whose attention modules compute hf_attention_ref64."""
    ref = copy.deepcopy(model).double()
    for m in ref.modules():
        if type(m).__name__ == "NeighborhoodAttention":
            def forward(self, hidden_states, output_attentions=False):
                return (hf_attention_ref64(self, hidden_states).to(hidden_states.dtype),)
            m.forward = types.MethodType(forward, m)
    return ref


def grads_of(model, x, out_fn):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = out_fn(model(x))
    g = torch.Generator().manual_seed(0)
    out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype))
    return out.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()}


def ran_fused_op(t, depth=4):
    """Whether ``t`` comes, within a few autograd steps, from one of alterops' fused Functions."""
    frontier = [t.grad_fn]
    for _ in range(depth):
        nxt = []
        for fn in frontier:
            if fn is None:
                continue
            cls = getattr(fn, "_forward_cls", None)
            if cls is not None and cls.__module__.startswith("alterops") and "Neighbo" in cls.__name__:
                return True
            nxt += [f for f, _ in fn.next_functions]
        frontier = nxt
    return False


def compare_grads(got, want):
    out, dx, dp = got
    ref_out, ref_dx, ref_dp = want
    assert_close(out, ref_out, name="output")
    assert_close(dx, ref_dx, name="d pixel_values")
    for name, g in dp.items():
        assert g is not None, name
        assert_close(g, ref_dp[name], name=f"d {name}")


@pytest.mark.parametrize("backend", [None, "reference", "cpu", "triton"])
def test_hf_dinat_forward_backward_match_float64(backend, hf):
    torch.manual_seed(0)
    model = transformers.DinatModel(dinat_config()).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "rpb"):
                m.rpb.normal_()
    x = torch.randn(2, 3, 28, 20)  # maps 7x5 (dilation 2 pads W), 4x3, 2x2 (padded to the window)
    last = lambda o: o.last_hidden_state  # noqa: E731
    want = grads_of(float64_reference(model), x.double(), last)
    if backend is None:  # enable_transformers alone: the model's own math through the unfused ops
        compare_grads(grads_of(model, x, last), want)
        return
    device = device_for(backend)
    reason = dispatch.registry()["neighborhood_attention2d"].why_not(backend, device, torch.float32)
    if reason:
        pytest.skip(reason)
    model, x = model.to(device), x.to(device)
    keys = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    report = alterops.swap(model, backend=backend)
    assert report.count("hf_natten") == 4 and not report.skipped, str(report)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(keys) and all(after[k] is keys[k] for k in keys)
    contexts = []
    hooks = [m.output.register_forward_hook(lambda mod, args, out: contexts.append(args[0]))
             for m in model.modules() if type(m).__name__.startswith("FusedNeighborhoodAttentionModule")]
    compare_grads(grads_of(model, x, last), want)
    for h in hooks:
        h.remove()
    assert len(contexts) == 4 and all(ran_fused_op(c) == (backend != "reference") for c in contexts)


def test_hf_dinat_swapped_output_attentions_and_dropout(hf):
    torch.manual_seed(1)
    model = transformers.DinatModel(dinat_config(attention_probs_dropout_prob=0.2))
    swapped = copy.deepcopy(model)
    alterops.swap(swapped)
    x = torch.randn(1, 3, 28, 20)
    # attention dropout active in training: the unfused path, the same dropout draws
    for m in (model, swapped):
        m.train()
    torch.manual_seed(7)
    a = model(x).last_hidden_state
    torch.manual_seed(7)
    b = swapped(x).last_hidden_state
    assert torch.equal(a, b)
    model.eval()
    swapped.eval()
    oa = model(x, output_attentions=True)
    ob = swapped(x, output_attentions=True)
    assert all(torch.equal(p, q) for p, q in zip(oa.attentions, ob.attentions))
    assert oa.attentions[0].shape == (1, 1, 7, 6, 9)  # (B, heads, H, W padded, kernel^2)
    assert_close(swapped(x).last_hidden_state, model(x).last_hidden_state)


def test_hf_dinat_swapped_torch_compile(hf):
    torch.manual_seed(2)
    model = transformers.DinatModel(dinat_config()).eval()
    alterops.swap(model)
    x = torch.randn(2, 3, 28, 20)
    eager = model(x).last_hidden_state
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x).last_hidden_state
    assert_close(out, eager.double())
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("rpb"))


def test_hf_dinat_classification_finetune_step(hf):
    torch.manual_seed(3)
    model = transformers.DinatForImageClassification(dinat_config(num_labels=3, hidden_dropout_prob=0.1))
    report = alterops.swap(model)
    assert report.count("hf_natten") == 4, str(report)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(pixel_values=torch.randn(4, 3, 28, 20), labels=torch.tensor([0, 1, 2, 1]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    opt.step()
    rpbs = [n for n in before if n.endswith("rpb")]
    assert len(rpbs) == 4 and all(not torch.equal(before[n], model.get_parameter(n)) for n in rpbs)


def test_hf_dinat_backbone_runs(hf):
    cfg = dinat_config(out_features=["stage1", "stage3"])
    backbone = transformers.DinatBackbone(cfg).eval()
    x = torch.randn(1, 3, 28, 20)
    want = [f.detach().clone() for f in backbone(x).feature_maps]
    alterops.swap(backbone)
    got = backbone(x).feature_maps
    assert len(got) == 2 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
    # a bare NeighborhoodAttention (outside its NeighborhoodAttentionModule) is swapped alone
    attention = transformers.DinatModel(cfg).eval().encoder.levels[1].layers[1].attention.self
    h = torch.randn(2, 7, 9, attention.all_head_size)  # dilation 2: at least 6 x 6
    want = attention(h)[0]
    report = alterops.swap(attention)
    assert [kind for _, kind, _ in report.replaced] == ["hf_natten_attention"], str(report)
    assert_close(attention(h)[0], hf_attention_ref64(attention, h))
    assert_close(want, hf_attention_ref64(attention, h))


def test_hf_nat_forward_backward_match_float64(hf):
    nat = getattr(hf, "NatModel", None)  # after enable_transformers: its import needs natten's names
    if nat is None:
        pytest.skip("NAT is only in transformers 4.x (models.deprecated.nat)")
    torch.manual_seed(4)
    cfg = transformers.NatConfig(image_size=28, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                 kernel_size=3, mlp_ratio=2.0, drop_path_rate=0.0)
    model = nat(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "rpb"):
                m.rpb.normal_()
    x = torch.randn(2, 3, 28, 20)
    last = lambda o: o.last_hidden_state  # noqa: E731
    want = grads_of(float64_reference(model), x.double(), last)
    compare_grads(grads_of(model, x, last), want)
    report = alterops.swap(model)
    assert report.count("hf_natten") == 2, str(report)
    compare_grads(grads_of(model, x, last), want)


def test_hf_enable_transformers_without_natten():
    """No natten importable at all: the models construct and run after enable_transformers()."""
    if transformers is None:
        pytest.skip("transformers is not installed")
    script = textwrap.dedent("""
        import sys
        sys.modules["natten"] = None  # import natten -> ModuleNotFoundError; find_spec -> None
        import torch, transformers, alterops
        from alterops.compat.natten import enable_transformers
        assert not transformers.utils.is_natten_available()
        enable_transformers()
        enable_transformers()  # idempotent
        cfg = transformers.DinatConfig(image_size=28, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                       kernel_size=3, dilations=[[2], [1]], num_labels=2, out_features=["stage2"])
        x = torch.randn(1, 3, 28, 20)
        first = lambda out: out.feature_maps[0] if hasattr(out, "feature_maps") else out[0]
        for cls in (transformers.DinatModel, transformers.DinatForImageClassification, transformers.DinatBackbone):
            model = cls(cfg).eval()
            before = first(model(x))
            assert alterops.swap(model).count("hf_natten") == 2
            assert torch.allclose(first(model(x)), before, atol=1e-5)
        if hasattr(transformers, "NatModel"):
            nat = transformers.NatModel(transformers.NatConfig(image_size=28, patch_size=4, embed_dim=8, depths=[1],
                                                               num_heads=[2], kernel_size=3)).eval()
            before = nat(x).last_hidden_state
            assert alterops.swap(nat).count("hf_natten") == 1
            assert torch.allclose(nat(x).last_hidden_state, before, atol=1e-5)
        print("ok", transformers.__version__)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__)] + [p for p in sys.path if p])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
