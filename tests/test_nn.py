"""alterops.nn layers against independent float64 brute force, per backend and dtype."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import alterops
from alterops.nn import BoxBlur2d, DropPath, NeighborhoodMSA2d, TanhBlur2d, WindowMSA2d
from helpers import assert_close, skip_unless

BACKENDS = ("reference", "cpu", "triton", "cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


# =============================================================================================
# Independent brute force (float64, explicit loops over queries)
# =============================================================================================
def project(module, x):
    """q, k, v as (B, H, W, heads, d) from the module's weights, computed plainly."""
    B, C, H, W = x.shape
    w = module.to_qkv.weight.to(x.dtype).reshape(3, module.heads, module.dim_head, C)
    return torch.einsum("bcyx,thdc->tbyxhd", x, w)  # (3, B, H, W, heads, d)


def output(module, o):
    B, H, W = o.shape[:3]
    w = module.to_out.weight.to(o.dtype).reshape(module.dim_out, -1)
    y = o.reshape(B, H, W, -1) @ w.t() + module.to_out.bias.to(o.dtype)
    return y.permute(0, 3, 1, 2)


def table_of(module, dtype):
    t = module.rel_pos_bias
    if t is None:
        return None
    t = t.to(dtype)
    return t.expand(module.heads, -1, -1) if t.shape[0] == 1 else t


def brute_window(module, x):
    """Swin's shifted-window MSA, query by query, in the dtype of x."""
    q, k, v = project(module, x)
    B, H, W, nh, d = q.shape
    (wh, ww), (sh, sw) = module.window_size, module.shift
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    table = table_of(module, x.dtype)

    def region(r, L, w, s):
        return 0 if s == 0 or r < L - w else (1 if r < L - s else 2)

    out = torch.zeros_like(q)
    for y in range(H):
        for xx in range(W):
            ry, rx = (y - sh) % Hp, (xx - sw) % Wp  # position in the rolled, padded map
            keys, offs = [], []
            for y2 in range(H):
                for x2 in range(W):
                    ry2, rx2 = (y2 - sh) % Hp, (x2 - sw) % Wp
                    if ry2 // wh != ry // wh or rx2 // ww != rx // ww:
                        continue
                    if region(ry2, Hp, wh, sh) != region(ry, Hp, wh, sh) or region(rx2, Wp, ww, sw) != region(rx, Wp, ww, sw):
                        continue
                    keys.append((y2, x2))
                    offs.append((ry2 - ry + wh - 1, rx2 - rx + ww - 1))
            ky = torch.tensor([p[0] for p in keys])
            kx = torch.tensor([p[1] for p in keys])
            logits = torch.einsum("bhd,bnhd->bhn", q[:, y, xx], k[:, ky, kx]) * module.scale
            if table is not None:
                logits = logits + torch.stack([table[:, a, b] for a, b in offs], -1)[None]
            p = logits.softmax(-1)
            out[:, y, xx] = torch.einsum("bhn,bnhd->bhd", p, v[:, ky, kx])
    return output(module, out)


def brute_neighborhood(module, x):
    q, k, v = project(module, x)
    B, H, W, nh, d = q.shape
    (kh, kw), (dh, dw), border = module.kernel_size, module.dilation, module.border
    table = table_of(module, x.dtype)

    def keys_1d(i, L, kk, dil):
        r = (kk - 1) // 2
        if border == "clamp":
            g = i % dil
            n = len(range(g, L, dil))
            start = min(max(i // dil - r, 0), n - kk)
            return [(start + j) * dil + g for j in range(kk)]
        return [i + dil * (j - r) for j in range(kk)]

    out = torch.zeros_like(q)
    for y in range(H):
        for xx in range(W):
            logits, vals = [], []
            for ky in keys_1d(y, H, kh, dh):
                for kx in keys_1d(xx, W, kw, dw):
                    inside = 0 <= ky < H and 0 <= kx < W
                    if not inside and border == "mask":
                        continue
                    kvec = k[:, ky, kx] if inside else torch.zeros_like(k[:, 0, 0])
                    vvec = v[:, ky, kx] if inside else torch.zeros_like(v[:, 0, 0])
                    lg = (q[:, y, xx] * kvec).sum(-1) * module.scale
                    if table is not None:
                        lg = lg + table[:, (ky - y) // dh + kh - 1, (kx - xx) // dw + kw - 1][None]
                    logits.append(lg)
                    vals.append(vvec)
            p = torch.stack(logits, -1).softmax(-1)
            out[:, y, xx] = torch.einsum("bhn,bnhd->bhd", p, torch.stack(vals, 1))
    return output(module, out)


# =============================================================================================
# Forward against the brute force, per backend and dtype
# =============================================================================================
WINDOW_CASES = {
    "plain-4": dict(window_size=4, shift=0, pos_bias="shared", hw=(8, 8)),
    "shift-odd": dict(window_size=(4, 3), shift=(2, 1), pos_bias="per_head", hw=(6, 7)),
    "pad-nobias": dict(window_size=3, shift=1, pos_bias=None, hw=(5, 4)),
}
NEIGHBOR_CASES = {
    "clamp-3": dict(kernel_size=3, dilation=1, border="clamp", pos_bias="shared", hw=(5, 6)),
    "clamp-dil": dict(kernel_size=(3, 1), dilation=(2, 1), border="clamp", pos_bias="per_head", hw=(7, 4)),
    "zero-paper": dict(kernel_size=3, dilation=1, border="zero", pos_bias=None, hw=(4, 5)),
    "mask-5": dict(kernel_size=5, dilation=1, border="mask", pos_bias="shared", hw=(4, 6)),
}


def make_module(kind, case, backend=None, dtype=torch.float32):
    torch.manual_seed(0)
    kw = {k: v for k, v in case.items() if k != "hw"}
    cls = WindowMSA2d if kind == "window" else NeighborhoodMSA2d
    m = cls(6, 10, heads=2, dim_head=4, backend=backend, **kw)
    with torch.no_grad():
        if m.rel_pos_bias is not None:
            m.rel_pos_bias.normal_(0, 0.5)  # larger than the init so that a wrong index shows
    return m.to(dtype)


def op_name(kind):
    return "window_attention2d" if kind == "window" else "neighborhood_attention2d"


def brute(kind, m, x):
    return brute_window(m, x) if kind == "window" else brute_neighborhood(m, x)


ALL_CASES = [("window", n) for n in WINDOW_CASES] + [("neighborhood", n) for n in NEIGHBOR_CASES]


def case_of(kind, name):
    return (WINDOW_CASES if kind == "window" else NEIGHBOR_CASES)[name]


_BRUTE: dict = {}


def brute_forward(kind, name):
    """(input, float64 brute-force output) per case, computed once."""
    if (kind, name) not in _BRUTE:
        case = case_of(kind, name)
        gen = torch.Generator().manual_seed(1)
        x64 = torch.randn(2, 6, *case["hw"], dtype=torch.float64, generator=gen)
        with torch.no_grad():
            _BRUTE[(kind, name)] = (x64, brute(kind, make_module(kind, case, dtype=torch.float64), x64))
    return _BRUTE[(kind, name)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,name", ALL_CASES)
def test_forward_matches_brute_force(kind, name, backend, dtype):
    device = skip_unless(op_name(kind), backend, dtype)
    case = case_of(kind, name)
    m = make_module(kind, case, backend, dtype).to(device)
    x64, ref64 = brute_forward(kind, name)
    x = x64.to(dtype).to(device)
    with torch.no_grad():
        out = m(x)
        # the yardstick: the test's own brute force done in the input dtype (not the library's
        # reference module, which for backend="reference" would be the module under test)
        naive = brute(kind, make_module(kind, case, dtype=dtype), x64.to(dtype))
    assert out.dtype == dtype and out.shape == (2, 10, *case["hw"])
    assert_close(out, ref64, naive, factor=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,name", [("window", "shift-odd"), ("neighborhood", "clamp-3"), ("neighborhood", "zero-paper")])
def test_gradients_match_brute_force(kind, name, backend):
    dtype = torch.float32
    device = skip_unless(op_name(kind), backend, dtype)
    case = case_of(kind, name)
    m = make_module(kind, case, backend, dtype).to(device)
    m64 = make_module(kind, case, dtype=torch.float64)
    torch.manual_seed(2)
    x64 = torch.randn(2, 6, *case["hw"], dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 10, *case["hw"], dtype=torch.float64)
    # the brute force differentiates through its own loops (float64 autograd)
    params64 = dict(m64.named_parameters())
    (brute(kind, m64, x64) * g).sum().backward()
    x = x64.detach().to(dtype).to(device).requires_grad_(True)
    (m(x) * g.to(dtype).to(device)).sum().backward()
    assert_close(x.grad, x64.grad, name="grad x")
    for n, p in m.named_parameters():
        assert_close(p.grad, params64[n].grad, name=f"grad {n}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["window", "neighborhood"])
def test_gradcheck_float64(kind, backend):
    skip_unless(op_name(kind), backend, torch.float64)
    if kind == "window":
        case = dict(window_size=(2, 3), shift=(1, 1), pos_bias="per_head", hw=(3, 5))
    else:
        case = dict(kernel_size=3, border="clamp", pos_bias="per_head", hw=(3, 4))
    kw = {k: v for k, v in case.items() if k != "hw"}
    cls = WindowMSA2d if kind == "window" else NeighborhoodMSA2d
    torch.manual_seed(0)
    m = cls(2, 2, heads=2, dim_head=2, backend=backend, **kw).double()
    x = torch.randn(1, 2, *case["hw"], dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


# =============================================================================================
# Layout, memory formats, compile, autocast, errors, empty batches
# =============================================================================================
def test_fused_projection_views_and_memory_format():
    m = WindowMSA2d(6, 10, heads=2, dim_head=4, window_size=4, backend="reference")
    seen = {}
    orig = alterops.window_attention2d

    def spy(q, k, v, *args, **kwargs):
        seen["q"], seen["k"], seen["v"] = q, k, v
        return orig(q, k, v, *args, **kwargs)

    alterops.window_attention2d = spy
    try:
        x = torch.randn(2, 6, 8, 8).to(memory_format=torch.channels_last)
        y = m(x)
    finally:
        alterops.window_attention2d = orig
    q, k, v = seen["q"], seen["k"], seen["v"]
    # q, k, v are views into one (B, H, W, 3, heads, d) projection, no copies
    assert q.shape == (2, 8, 8, 2, 4) and q.stride() == (8 * 8 * 24, 8 * 24, 24, 4, 1)
    assert k.data_ptr() - q.data_ptr() == 8 * q.element_size() and v.data_ptr() - k.data_ptr() == 8 * q.element_size()
    assert y.is_contiguous(memory_format=torch.channels_last)
    y2 = m(x.contiguous())
    assert y2.is_contiguous()
    torch.testing.assert_close(y, y2)
    # a non-contiguous (sliced) input works too
    big = torch.randn(2, 6, 9, 11)
    torch.testing.assert_close(m(big[:, :, 1:, 2:10]), m(big[:, :, 1:, 2:10].contiguous()))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compile_fullgraph(backend):
    device = skip_unless("window_attention2d", backend, torch.float32)
    skip_unless("neighborhood_attention2d", backend, torch.float32)
    skip_unless("tanh_blur2d", backend, torch.float32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        WindowMSA2d(6, 8, heads=2, dim_head=4, window_size=4, shift=2, backend=backend),
        NeighborhoodMSA2d(8, 8, heads=2, dim_head=4, kernel_size=3, backend=backend),
        TanhBlur2d(backend=backend),
    ).to(device)
    x = torch.randn(2, 6, 8, 8, device=device, requires_grad=True)
    g = torch.randn(2, 8, 9, 9, device=device)  # TanhBlur2d pads by one
    params = [x] + list(model.parameters())
    y_eager = model(x)
    eager = torch.autograd.grad(y_eager, params, g)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, y_eager)
    grads = torch.autograd.grad(y, params, g)
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads, eager):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_autocast_bfloat16():
    torch.manual_seed(0)
    m = WindowMSA2d(6, 10, heads=2, dim_head=4, window_size=4)
    x = torch.randn(2, 6, 8, 8)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


def test_empty_batch():
    for m in (WindowMSA2d(6, 10, heads=2, dim_head=4, window_size=4),
              NeighborhoodMSA2d(6, 10, heads=2, dim_head=4, kernel_size=3)):
        x = torch.randn(0, 6, 8, 8, requires_grad=True)
        y = m(x)
        assert y.shape == (0, 10, 8, 8)
        y.sum().backward()
        assert x.grad.shape == x.shape
        for name, p in m.named_parameters():  # no data: every parameter gradient is exactly zero
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_parameters_init_and_repr():
    torch.manual_seed(0)
    m = WindowMSA2d(64, 128, heads=8, dim_head=32, window_size=7, pos_bias="per_head")
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert names == {"to_qkv.weight": (768, 64, 1, 1), "to_out.weight": (128, 256, 1, 1),
                     "to_out.bias": (128,), "rel_pos_bias": (8, 13, 13)}
    assert abs(m.rel_pos_bias.std().item() - 0.02) < 0.004
    with torch.no_grad():
        m.rel_pos_bias.fill_(1.0)
    m.reset_parameters()
    assert abs(m.rel_pos_bias.std().item() - 0.02) < 0.004
    assert m.scale == 32 ** -0.5
    r = repr(m)
    assert "heads=8" in r and "window_size=(7, 7)" in r and "per_head" in r
    n = NeighborhoodMSA2d(8, heads=2, dim_head=4, kernel_size=5, dilation=2, border="zero", pos_bias=None)
    assert n.rel_pos_bias is None and "dilation=(2, 2)" in repr(n) and "'zero'" in repr(n)
    assert "tau=10" in repr(TanhBlur2d())
    # modules deep-copy and pickle
    copy.deepcopy(m)
    pickle.loads(pickle.dumps(m))


def test_bad_arguments():
    with pytest.raises(ValueError, match="shift"):
        WindowMSA2d(8, window_size=4, shift=4)
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodMSA2d(8, kernel_size=0)
    with pytest.raises(ValueError, match="stride must be <= kernel_size"):
        NeighborhoodMSA2d(8, kernel_size=3, stride=4)
    with pytest.raises(ValueError, match="kv_heads"):
        NeighborhoodMSA2d(8, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="pos_bias"):
        WindowMSA2d(8, pos_bias="global")
    with pytest.raises(ValueError, match="border"):
        NeighborhoodMSA2d(8, border="reflect")
    with pytest.raises(TypeError, match="window_size"):
        WindowMSA2d(8, window_size=4.0)
    with pytest.raises(ValueError, match="heads"):
        WindowMSA2d(8, heads=0)
    m = WindowMSA2d(8, heads=2, dim_head=4, window_size=4)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        m(torch.randn(2, 6, 8, 8))
    with pytest.raises(ValueError, match="p must"):
        DropPath(1.0)


# =============================================================================================
# Blurs
# =============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_layers(backend):
    device = skip_unless("tanh_blur2d", backend, torch.float32)
    skip_unless("box_blur2d", backend, torch.float32)
    torch.manual_seed(0)
    x64 = torch.randn(2, 3, 5, 6, dtype=torch.float64) * 20
    x = x64.float().to(device)
    box = BoxBlur2d(backend=backend)(x)
    # the paper's AvgPool2d(2, 1, 1): mean of the 2x2 window with zero padding, (H+1)x(W+1)
    xp = F.pad(x64, (1, 1, 1, 1))
    ref = (xp[..., :-1, :-1] + xp[..., 1:, :-1] + xp[..., :-1, 1:] + xp[..., 1:, 1:]) / 4
    assert_close(box, ref)
    tb = TanhBlur2d(tau=10.0, backend=backend)(x)
    t = (10 * torch.tanh(x64 / 10)).clamp_min(0)
    tp = F.pad(t, (1, 1, 1, 1))
    assert_close(tb, (tp[..., :-1, :-1] + tp[..., 1:, :-1] + tp[..., :-1, 1:] + tp[..., 1:, 1:]) / 4)
    same = BoxBlur2d(3, 1, "same", pad_mode="replicate", backend=backend)(x)
    xr = F.pad(x64, (1, 1, 1, 1), mode="replicate")
    assert_close(same, F.avg_pool2d(xr, 3, 1))


def test_drop_path():
    torch.manual_seed(0)
    d = DropPath(0.5)
    x = torch.ones(1000, 3)
    y = d(x)
    kept = (y[:, 0] != 0)
    assert 400 < kept.sum() < 600 and torch.all(y[kept] == 2.0) and torch.all(y[kept, 0:1] == y[kept])
    d.eval()
    assert d(x) is x


# =============================================================================================
# Loading the paper's LocalAttention / ConvAttention2d weights
# =============================================================================================
def test_load_paper_state_dicts():
    from test_swap import ConvAttention2d, LocalAttention

    torch.manual_seed(0)
    paper = LocalAttention(6, 10, window_size=4, heads=2, dim_head=4).eval()
    with torch.no_grad():
        paper.pos_embedding.normal_(0, 0.5)
    ours = WindowMSA2d(6, 10, heads=2, dim_head=4, window_size=4)
    ours.load_state_dict(paper.state_dict())
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(ours(x), paper(x)[0], rtol=1e-5, atol=1e-5)

    conv = ConvAttention2d(6, 10, heads=2, dim_head=4, kernel_size=3, padding=1).eval()
    nb = NeighborhoodMSA2d(6, 10, heads=2, dim_head=4, kernel_size=3, border="zero", pos_bias=None)
    nb.load_state_dict(conv.state_dict())
    torch.testing.assert_close(nb(x), conv(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_neighborhood_msa_nd_matches_its_math(ndim):
    """NeighborhoodMSA1d/2d/3d with grouped heads, stride, causal axes and even kernels: the
    output and every parameter's gradient equal the float64 computation of the module's math
    (projections, brute-force neighbourhood attention, output projection)."""
    from na_brute_force import brute_force

    import alterops.nn as ann

    spatial = {1: (11,), 2: (6, 7), 3: (4, 5, 6)}[ndim]
    kernel = {1: 4, 2: (3, 4), 3: (2, 3, 3)}[ndim]
    stride = {1: 2, 2: (1, 2), 3: (1, 1, 3)}[ndim]
    causal = {1: True, 2: (True, False), 3: (False, True, False)}[ndim]
    cls = getattr(ann, f"NeighborhoodMSA{ndim}d")
    torch.manual_seed(ndim)
    m = cls(6, 10, heads=4, kv_heads=2, dim_head=3, kernel_size=kernel, stride=stride, is_causal=causal,
            pos_bias="per_head")
    with torch.no_grad():
        m.rel_pos_bias.normal_()
    x = torch.randn(2, 6, *spatial, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 10, *spatial)
    # the module's math in float64, written out
    p = {n: t.detach().double().requires_grad_() for n, t in m.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    xl = x64.movedim(1, -1)
    qkv = xl @ p["to_qkv.weight"].reshape(-1, 6).T
    q = qkv[..., :12].reshape(2, *spatial, 4, 3)
    k, v = qkv[..., 12:].reshape(2, *spatial, 2, 2, 3).unbind(-3)
    per_axis = lambda t: (t,) * ndim if not isinstance(t, tuple) else t  # noqa: E731
    att, _ = brute_force(q, k, v, per_axis(kernel), (1,) * ndim, per_axis(stride), per_axis(causal), "clamp",
                         table=p["rel_pos_bias"])
    ref = (att.reshape(2, *spatial, 12) @ p["to_out.weight"].reshape(10, 12).T + p["to_out.bias"]).movedim(-1, 1)
    assert (out.double() - ref).abs().max() < 1e-5
    gout = torch.randn_like(out)
    names = [n for n, _ in m.named_parameters()]
    grads = torch.autograd.grad(out, [x, *m.parameters()], gout)
    refs = torch.autograd.grad(ref, [x64, *[p[n] for n in names]], gout.double())
    for name, a, b in zip(["x", *names], grads, refs):
        assert (a.double() - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item()), name
    assert "kv_heads=2" in repr(m) and "stride" in repr(m)
