"""neighborhood_attention1d / 2d / 3d with stride, causal masks, even kernels, grouped heads,
biases and the logsumexp, against an independent float64 brute force (NATTEN's window rule written
out with Python integers, one query at a time), against NATTEN itself where it is installed, and
merge_attentions against attention over the union of the key sets."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import alterops as ao
from alterops.neighborhood_attention_nd import neighborhood_attention_nd_reference
from helpers import assert_close, assert_fused, interpreted, skip_unless
from na_brute_force import brute_force, neighbour_table

OP = "neighborhood_attention3d"  # the three ops share one backend table layout and kernels
BACKENDS = ("reference", "cpu", "triton", "cuda")
FNS = {1: ao.neighborhood_attention1d, 2: ao.neighborhood_attention2d, 3: ao.neighborhood_attention3d}


# ---------------------------------------------------------------------------------------
# Cases: (spatial, kernel, dilation, stride, causal, border), heads 4 over kv heads {4, 2, 1}
# ---------------------------------------------------------------------------------------
CASES = [
    ((13,), (5,), (2,), (1,), (False,), "clamp"),
    ((17,), (4,), (1,), (2,), (True,), "clamp"),
    ((19,), (6,), (2,), (3,), (False,), "clamp"),
    ((11,), (4,), (1,), (4,), (False,), "clamp"),        # stride == kernel: blocked attention
    ((12,), (5,), (3,), (1,), (False,), "mask"),
    ((10,), (4,), (2,), (1,), (False,), "zero"),         # even centred window, zero keys
    ((7, 9), (3, 4), (1, 2), (1, 2), (True, False), "clamp"),
    ((8, 9), (5, 3), (1, 3), (2, 1), (False, True), "clamp"),
    ((6, 7), (3, 5), (2, 1), (1, 1), (False, False), "clamp"),   # odd, stride 1: grouped heads or lse
    ((5, 6), (4, 3), (1, 1), (1, 1), (False, False), "mask"),
    ((5, 7), (3, 2), (2, 1), (1, 1), (False, False), "zero"),
    ((4, 5, 6), (3, 3, 3), (1, 1, 2), (1, 2, 1), (True, False, False), "clamp"),
    ((5, 4, 7), (2, 3, 5), (2, 1, 1), (2, 1, 3), (False, True, True), "clamp"),
    ((3, 5, 4), (3, 3, 2), (1, 1, 1), (1, 1, 1), (False, False, False), "zero"),
    ((4, 3, 5), (3, 3, 4), (1, 1, 1), (1, 1, 1), (False, False, False), "mask"),
    # maps smaller than the window (allowed for the centred rules)
    ((5,), (9,), (1,), (1,), (False,), "zero"),
    ((3, 4), (5, 6), (1, 2), (1, 1), (False, False), "mask"),
]
KV_HEADS = (4, 2, 1)


def case_id(case):
    spatial, kernel, dil, stride, causal, border = case
    c = "".join("c" if x else "-" for x in causal)
    return f"{'x'.join(map(str, spatial))}_k{''.join(map(str, kernel))}_d{''.join(map(str, dil))}" \
           f"_s{''.join(map(str, stride))}_{c}_{border}"


def make(case, heads_kv, dtype, device, bias, seed=0, D=8, B=2):
    spatial, kernel = case[0], case[1]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, *spatial, 4, D, generator=g)
    # k and v as views into one fused tensor (strided, as a Linear's output viewed)
    kv = torch.randn(B, *spatial, 2, heads_kv, D, generator=g)
    k, v = kv.unbind(-3)
    table = None
    if bias:
        table = 0.5 * torch.randn(1 if bias == "shared" else 4, *[2 * x - 1 for x in kernel], generator=g)
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(q), cast(k), cast(v), None if table is None else table.to(device)


def run(case, backend, q, k, v, table, **kw):
    spatial, kernel, dil, stride, causal, border = case
    return FNS[len(spatial)](q, k, v, kernel, dil, stride=stride, is_causal=causal, border=border,
                             rel_pos_bias=table, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads_kv", KV_HEADS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_float32(case, heads_kv, backend):
    """Output, logsumexp and every gradient (with a gradient flowing into the lse too)."""
    device = skip_unless(OP, backend, torch.float32)
    if interpreted(backend) and heads_kv != (4 if CASES.index(case) % 2 else 1):
        pytest.skip("Triton interpreter: one grouping per case (alternating 4 and 1 kv heads); "
                    "tests/test_neighborhood_attention_nd_triton.py has more")
    bias = {4: "head", 2: "shared", 1: None}[heads_kv]
    q, k, v, table = make(case, heads_kv, torch.float32, device, bias)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    tab = None if table is None else table.detach().clone().requires_grad_()
    out, lse = run(case, backend, *leaves, tab, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:-1]
    assert lse.dtype == torch.float32
    assert out.is_contiguous()
    assert_fused(out, backend)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    t64 = None if table is None else table.detach().cpu().double().requires_grad_()
    ref, ref_lse = brute_force(q64, k64, v64, *case[1:], table=t64)
    assert_close(out, ref, name="out")
    assert_close(lse, ref_lse, name="lse")
    g = torch.Generator().manual_seed(5)
    gout, glse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    inputs = [*leaves] + ([tab] if tab is not None else [])
    grads = torch.autograd.grad((out * gout.to(device)).sum() + (lse * glse.to(device)).sum(), inputs)
    refs = torch.autograd.grad((ref * gout.double()).sum() + (ref_lse * glse.double()).sum(),
                               [q64, k64, v64] + ([t64] if t64 is not None else []))
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), grads, refs):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[1], CASES[7], CASES[12], CASES[13]], ids=case_id)
def test_other_dtypes(case, dtype, backend):
    device = skip_unless(OP, backend, dtype)
    if interpreted(backend) and dtype == torch.float16:
        pytest.skip("Triton interpreter: bfloat16 covers the 16-bit path")
    q, k, v, table = make(case, 2, dtype, device, "head", seed=3)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = run(case, backend, *leaves, table, return_lse=True)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = brute_force(q64, k64, v64, *case[1:], table=table.cpu())
    # the same math in the input dtype: the error a plain implementation of that dtype makes
    naive = neighborhood_attention_nd_reference(q.cpu(), k.cpu(), v.cpu(), *case[1:5], border=case[5],
                                                   rel_pos_bias=table.cpu())
    assert_close(out, ref, naive, name="out")
    assert_close(lse, ref_lse, name="lse")
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, leaves, gout.to(dtype).to(device))
    refs = torch.autograd.grad(ref, [q64, k64, v64], gout.double())
    tol_dtype = torch.float32 if dtype != torch.float64 else dtype
    for name, a, b in zip(("dq", "dk", "dv"), grads, refs):
        assert a.dtype == dtype
        if dtype == torch.float64:
            assert_close(a, b, name=name)
        else:  # 16-bit gradients: relative to the gradient's scale
            err = (a.double().cpu() - b).abs().max().item()
            assert err <= 0.05 * b.abs().max().item() + 1e-2, f"{name}: {err} ({tol_dtype})"


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("case", [CASES[1], CASES[9], CASES[12]], ids=case_id)
def test_gradcheck_float64(case, backend):
    device = skip_unless(OP, backend, torch.float64)
    q, k, v, table = make(case, 2, torch.float64, device, "head", seed=4, D=3, B=1)
    args = [t.detach().clone().double().requires_grad_() for t in (q, k, v, table)]

    def f(q, k, v, t):
        out, lse = run(case, backend, q, k, v, t, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, args, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_attentions_equals_attention_over_the_union(backend):
    """Neighbourhood attention plus attention to extra (global) tokens, merged through the
    logsumexps, equals one softmax over both key sets (NATTEN's additional_keys)."""
    device = skip_unless(OP, backend, torch.float32)
    case = CASES[7]
    q, k, v, table = make(case, 2, torch.float32, device, "head", seed=6)
    g = torch.Generator().manual_seed(7)
    B, D = q.shape[0], q.shape[-1]
    xk, xv = torch.randn(B, 5, 2, D, generator=g).to(device), torch.randn(B, 5, 2, D, generator=g).to(device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, xk, xv, table)]
    lq, lk, lv, lxk, lxv, ltab = leaves
    na, na_lse = run(case, backend, lq, lk, lv, ltab, return_lse=True)
    # dense attention of every query to the 5 extra tokens (plain PyTorch, grouped heads)
    qe = lq.reshape(B, -1, 2, 2, D)
    s = torch.einsum("bnhgd,bmhd->bnhgm", qe, lxk) * D ** -0.5
    extra = torch.einsum("bnhgm,bmhd->bnhgd", torch.softmax(s, -1), lxv).reshape(na.shape)
    extra_lse = torch.logsumexp(s, -1).reshape(na_lse.shape)
    out, lse = ao.merge_attentions([na, extra], [na_lse, extra_lse])
    # brute force over the union: append the extra tokens' logits to each query's window
    q64, k64, v64, xk64, xv64, t64 = (t.detach().double().cpu().requires_grad_() for t in leaves)
    spatial = tuple(q.shape[1:-2])
    idx, valid, bidx = neighbour_table(spatial, *case[1:])
    N = math.prod(spatial)
    kf = torch.cat([k64.reshape(B, N, 2, D), torch.zeros(B, 1, 2, D, dtype=torch.float64)], 1)[:, idx]
    vf = torch.cat([v64.reshape(B, N, 2, D), torch.zeros(B, 1, 2, D, dtype=torch.float64)], 1)[:, idx]
    kf = torch.cat([kf, xk64[:, None].expand(B, N, 5, 2, D)], 2)
    vf = torch.cat([vf, xv64[:, None].expand(B, N, 5, 2, D)], 2)
    logits = torch.einsum("bnhgd,bnchd->bnhgc", q64.reshape(B, N, 2, 2, D), kf) * D ** -0.5
    bias = t64[(slice(None), *bidx.unbind(-1))].reshape(2, 2, N, -1).permute(2, 0, 1, 3)
    bias = torch.cat([bias, bias.new_zeros(N, 2, 2, 5)], -1)
    full_valid = torch.cat([valid, torch.ones(N, 5, dtype=torch.bool)], 1)
    logits = (logits + bias).masked_fill(~full_valid[None, :, None, None, :], float("-inf"))
    ref = torch.einsum("bnhgc,bnchd->bnhgd", torch.softmax(logits, -1), vf).reshape(na.shape)
    ref_lse = torch.logsumexp(logits, -1).reshape(na_lse.shape)
    assert_close(out, ref, name="merged out")
    assert_close(lse, ref_lse, name="merged lse")
    gout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * gout.to(device)).sum(), leaves)
    refs = torch.autograd.grad((ref * gout.double()).sum(), [q64, k64, v64, xk64, xv64, t64])
    for name, a, b in zip(("dq", "dk", "dv", "dxk", "dxv", "dbias"), grads, refs):
        assert_close(a, b, name=name)


def test_merge_attentions_empty_partial_and_errors():
    o = torch.randn(1, 3, 2, 4)
    l = torch.randn(1, 3, 2)
    out, lse = ao.merge_attentions([o, torch.full_like(o, 7.0)], [l, torch.full_like(l, float("-inf"))])
    assert torch.equal(out, o) and torch.equal(lse, l)
    out, lse = ao.merge_attentions([o, o], [torch.full_like(l, -math.inf)] * 2)
    assert torch.isfinite(out).all() and (out == 0).all() and (lse == -math.inf).all()
    with pytest.raises(ValueError, match="two or more"):
        ao.merge_attentions([o], [l])
    with pytest.raises(ValueError, match=r"lses\[1\] must have shape"):
        ao.merge_attentions([o, o], [l, l[..., :1]])


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_matches_natten(dim):
    """NATTEN 0.21's na1d/na2d/na3d (its Flex path on the CPU): outputs and logsumexps for
    even and odd kernels, dilation, stride and causal masks per axis."""
    natten = pytest.importorskip("natten")
    spatial = {1: (23,), 2: (9, 11), 3: (5, 6, 7)}[dim]
    g = torch.Generator().manual_seed(dim)
    import random

    rnd = random.Random(dim)
    checked = 0
    for _ in range(8):
        ks = tuple(rnd.randint(2, min(5, s)) for s in spatial)
        ds = tuple(rnd.randint(1, max(1, s // kk)) for kk, s in zip(ks, spatial))
        ss = tuple(rnd.randint(1, kk) for kk in ks)
        cs = tuple(rnd.random() < 0.4 for _ in ks)
        q, k, v = (torch.randn(2, *spatial, 2, 16, generator=g) for _ in range(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ref, ref_lse = getattr(natten, f"na{dim}d")(q, k, v, kernel_size=ks, dilation=ds, stride=ss,
                                                            is_causal=cs, return_lse=True)
            except NotImplementedError:  # NATTEN's CPU path does not take every configuration
                continue
        for backend in ("reference", "cpu"):
            if ao._dispatch.registry()[OP].why_not(backend, q.device, q.dtype):
                continue
            out, lse = FNS[dim](q, k, v, ks, ds, stride=ss, is_causal=cs, return_lse=True, backend=backend)
            assert (out - ref).abs().max() < 1e-4, (backend, ks, ds, ss, cs)
            assert (lse - ref_lse).abs().max() < 1e-4, (backend, ks, ds, ss, cs)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_inputs_untouched(backend):
    device = skip_unless(OP, backend, torch.float32)
    case = CASES[12]
    q, k, v, table = make(case, 2, torch.float32, device, "head", B=1)
    copies = [t.clone() for t in (q, k, v, table)]
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = run(case, backend, *leaves, table, return_lse=True)
    (out.sum() + lse.sum()).backward()
    for a, b in zip((q, k, v, table), copies):
        assert torch.equal(a.detach(), b)
    e = [t[:0].detach().requires_grad_() for t in (q, k, v)]
    out, lse = run(case, backend, *e, table, return_lse=True)
    assert out.shape == (0, *q.shape[1:]) and lse.shape == (0, *q.shape[1:-1])
    out.sum().backward()
    assert e[0].grad.shape == e[0].shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_only_where_a_gradient_is_wanted(backend):
    """Without an input that requires grad (or under no_grad) the public functions call the fused
    forward directly: the same bits as the autograd path, no graph. With only the bias table
    requiring grad, the table's gradient is the one the full graph gives."""
    device = skip_unless(OP, backend, torch.float32)
    case = CASES[7]
    q, k, v, table = make(case, 2, torch.float32, device, "head", B=1)
    plain_out, plain_lse = run(case, backend, q, k, v, table, return_lse=True)
    assert plain_out.grad_fn is None and plain_lse.grad_fn is None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
    with torch.no_grad():
        nograd_out = run(case, backend, *leaves)
    assert nograd_out.grad_fn is None and not nograd_out.requires_grad
    out, lse = run(case, backend, *leaves, return_lse=True)
    assert_fused(out, backend)
    assert torch.equal(out.detach(), plain_out) and torch.equal(lse.detach(), plain_lse)
    assert torch.equal(nograd_out, plain_out)
    gout, glse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * gout).sum() + (lse * glse).sum(), leaves[3])[0]
    tab = table.detach().clone().requires_grad_()
    out2, lse2 = run(case, backend, q, k, v, tab, return_lse=True)
    assert_fused(out2, backend)
    got = torch.autograd.grad((out2 * gout).sum() + (lse2 * glse).sum(), tab)[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    device = skip_unless(OP, backend, torch.float32)
    case = CASES[12]
    q, k, v, table = make(case, 2, torch.float32, device, "head", B=1)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]

    def f(q, k, v, t):
        out, lse = run(case, backend, q, k, v, t, return_lse=True)
        return out.sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g1 = torch.autograd.grad(compiled(*args), args)
    g2 = torch.autograd.grad(f(*args), args)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_opcheck_cpu():
    from alterops import _ext

    if not _ext.has_op("neighborhood_attention_nd_fwd"):
        pytest.skip("compiled kernels not loaded")
    q, k, v, table = make(CASES[12], 2, torch.float32, "cpu", "head", B=1)
    bias = table.contiguous()
    args = (q, k, v, [2, 3, 5], [2, 1, 1], [2, 1, 3], [0, 1, 1], "clamp", bias, 0.3)
    torch.library.opcheck(torch.ops.alterops.neighborhood_attention_nd_fwd, args)
    out, lse = torch.ops.alterops.neighborhood_attention_nd_fwd(*args)
    bargs = (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), *args[3:], True)
    torch.library.opcheck(torch.ops.alterops.neighborhood_attention_nd_bwd, bargs)


def test_bad_inputs():
    x = torch.randn(1, 9, 2, 8)
    na1 = ao.neighborhood_attention1d
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        na1(x[0], x[0], x[0], 3)
    with pytest.raises(ValueError, match="stride must be <= kernel_size"):
        na1(x, x, x, 3, stride=4)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        na1(x, x, x, 3, stride=0)
    with pytest.raises(ValueError, match="no stride groups and no causal form"):
        na1(x, x, x, 3, is_causal=True, border="mask")
    with pytest.raises(ValueError, match="no stride groups and no causal form"):
        na1(x, x, x, 3, stride=2, border="zero")
    with pytest.raises(ValueError, match="kernel_size \\* dilation <= the map size"):
        na1(x, x, x, 5, dilation=2)
    with pytest.raises(TypeError, match="is_causal must be a bool or a sequence of bools"):
        na1(x, x, x, 3, is_causal=1)
    with pytest.raises(TypeError, match="one entry per spatial axis"):
        ao.neighborhood_attention3d(torch.randn(1, 4, 4, 4, 2, 8), *[torch.randn(1, 4, 4, 4, 2, 8)] * 2, (3, 3))
    with pytest.raises(ValueError, match="k has shape"):
        na1(x, torch.randn(1, 9, 3, 8), torch.randn(1, 9, 3, 8), 3)  # 3 kv heads do not divide 2
    with pytest.raises(ValueError, match="k has shape"):
        na1(x, torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4), 3)
    with pytest.raises(ValueError, match="v has shape"):
        na1(x, x, torch.randn(1, 9, 1, 8), 3)
    with pytest.raises(ValueError, match="rel_pos_bias must have shape"):
        na1(x, x, x, 4, rel_pos_bias=torch.randn(2, 8))
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        na1(x, x, x, 3, return_lse=1)
