"""Seeded random sweeps of every op against float64 brute force, on every backend CI runs.

Each configuration is drawn from ``random.Random(f"{op}-{backend}-{index}")``: shapes with
H != W and primes, kernel sizes, dilations, borders, windows and shifts, strides, paddings,
dtypes, and the input layout (contiguous, views into one fused tensor, permuted/channels-last,
every other element of a bigger buffer, zero strides from ``expand``). The forward and the
gradients of every differentiable input are compared with brute force written here (explicit
window enumeration per query, vectorized over batch, heads and channels), in float64 where the
backend supports it and with dtype tolerances otherwise. A failure prints the configuration;
``pytest tests/test_sweep.py -k "<op>-<backend>-<index>"`` reruns it. ``--sweep-long`` runs
10x more configurations.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import alterops as ao
from helpers import device_for, skip_unless
from test_neighborhood_attention import axis_keys  # NATTEN's window-start rule, written out
from test_statistics import brute_force_delta  # diagonal DFT bins with explicit exponentials
from test_window_attention import brute_force as window_brute_force  # per-query window loops

# configurations per (op, backend) in CI; --sweep-long multiplies by 10
COUNTS = {"neighborhood_attention2d": 50, "window_attention2d": 40, "blur2d": 80, "statistics": 60}
TRITON_COUNT = 4
BACKENDS = ("reference", "cpu")
# max error allowed, relative to max(1, max |float64 result|)
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def pytest_generate_tests(metafunc):
    if "index" not in metafunc.fixturenames:
        return
    family = metafunc.function.__name__.removeprefix("test_sweep_").removesuffix("_triton")
    scale = 10 if metafunc.config.getoption("--sweep-long") else 1
    n = (TRITON_COUNT if metafunc.function.__name__.endswith("_triton") else COUNTS[family]) * scale
    metafunc.parametrize("index", range(n), ids=[f"{family}-{i}" for i in range(n)])


def dtypes_for(op, backend):
    return [d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
            if ao._dispatch.registry()[op].why_not(backend, device_for(backend), d) is None]


def compare(cfg, name, out, ref, dtype, tol=TOL):
    assert out.shape == ref.shape, f"config {cfg!r}: {name} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double()
    if not o.numel():
        return
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(o), finite):
        pytest.fail(f"config {cfg!r}: {name} is non-finite where the float64 brute force is not (or vice versa)")
    err = (o - r)[finite].abs().max().item() if finite.any() else 0.0
    bound = tol[dtype] * max(1.0, r[finite].abs().max().item() if finite.any() else 0.0)
    if not err <= bound:
        pytest.fail(f"config {cfg!r}: {name} max error {err:.3e} > {bound:.3e} ({dtype})")


def check_grads(cfg, out, ref, leaves, leaves64, names, dtype, seed):
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, g.to(out.dtype).to(out.device), allow_unused=True)
    want = torch.autograd.grad(ref, leaves64, g, allow_unused=True)
    for name, a, b, leaf in zip(names, got, want, leaves):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf, dtype=torch.float64) if b is None else b
        assert a.dtype == leaf.dtype, f"config {cfg!r}: d{name} has dtype {a.dtype}"
        compare(cfg, f"d{name}", a, b, dtype, GRAD_TOL)


def leaf(shape, gen, dtype, scale=1.0, device="cpu"):
    """A leaf in ``dtype`` on ``device`` (where the backend runs) and its float64 CPU twin."""
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return t.to(device).requires_grad_(), t.detach().double().requires_grad_()


# ---------------------------------------------------------------------------------------
# Attention inputs in several layouts, built the same way from low-precision and float64 leaves
# ---------------------------------------------------------------------------------------
def attention_inputs(layout, B, H, W, heads, d, dtype, gen, device):
    if layout == "qkv":  # views into a fused (B, H, W, 3, heads, d) projection
        pairs = [leaf((B, H, W, 3, heads, d), gen, dtype, device=device)]
        build = lambda ls: ls[0].unbind(3)  # noqa: E731
    elif layout == "permuted":  # (B, heads, H, W, d) memory viewed heads-last
        pairs = [leaf((B, heads, H, W, d), gen, dtype, device=device) for _ in range(3)]
        build = lambda ls: [t.permute(0, 2, 3, 1, 4) for t in ls]  # noqa: E731
    elif layout == "expand":  # zero strides over the batch and the heads
        pairs = [leaf((1, H, W, 1, d), gen, dtype, device=device) for _ in range(3)]
        build = lambda ls: [t.expand(B, H, W, heads, d) for t in ls]  # noqa: E731
    else:
        pairs = [leaf((B, H, W, heads, d), gen, dtype, device=device) for _ in range(3)]
        build = lambda ls: list(ls)  # noqa: E731
    leaves, leaves64 = [p[0] for p in pairs], [p[1] for p in pairs]
    return leaves, leaves64, build


# ---------------------------------------------------------------------------------------
# neighborhood_attention2d
# ---------------------------------------------------------------------------------------
def na_brute_force(q, k, v, kernel, dilation, border, table, scale):
    """float64: per query, its keys enumerated per the border rule; gathered and softmaxed."""
    (kh, kw), (dh, dw) = kernel, dilation
    B, H, W, heads, d = q.shape
    ky = torch.tensor([axis_keys(y, H, kh, dh, border) for y in range(H)])  # (H, kh)
    kx = torch.tensor([axis_keys(x, W, kw, dw, border) for x in range(W)])  # (W, kw)
    KY = ky[:, None, :, None].expand(H, W, kh, kw)
    KX = kx[None, :, None, :].expand(H, W, kh, kw)
    inside = (KY >= 0) & (KY < H) & (KX >= 0) & (KX < W)  # (H, W, kh, kw)
    assert border != "clamp" or inside.all()
    gy, gx = KY.clamp(0, H - 1).reshape(H, W, -1), KX.clamp(0, W - 1).reshape(H, W, -1)
    inside = inside.reshape(H, W, -1)
    keys = k[:, gy, gx] * inside[None, :, :, :, None, None]  # (B, H, W, K, heads, d); outside: zero
    vals = v[:, gy, gx] * inside[None, :, :, :, None, None]
    logits = torch.einsum("byxhd,byxkhd->byxhk", q, keys) * scale
    if table is not None:
        ys, xs = torch.arange(H)[:, None, None, None], torch.arange(W)[None, :, None, None]
        by = torch.div(KY - ys, dh, rounding_mode="floor") + kh - 1
        bx = torch.div(KX - xs, dw, rounding_mode="floor") + kw - 1
        bias = table.expand(heads, -1, -1)[:, by.reshape(H, W, -1), bx.reshape(H, W, -1)]  # (heads, H, W, K)
        logits = logits + bias.permute(1, 2, 0, 3)[None]
    if border == "mask":
        logits = logits.masked_fill(~inside[None, :, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("byxhk,byxkhd->byxhd", p, vals)


def na_config(rng, backend, small=False):
    primes = [1, 2, 3, 5, 7] if small else [1, 2, 3, 5, 7, 9, 11]
    H, W = rng.choice(primes + [4, 6]), rng.choice(primes + [4, 6])
    border = rng.choice(["clamp", "mask", "zero"])

    def axis(n):
        d = rng.choice([1, 1, 2, 3])
        ks = [k for k in (1, 3, 5, 7) if border != "clamp" or k * d <= n]
        if not ks:
            d, ks = 1, [k for k in (1, 3, 5, 7) if k <= n]
        return rng.choice(ks), d

    (kh, dh), (kw, dw) = axis(H), axis(W)
    heads = rng.randint(1, 3)
    return dict(B=rng.randint(1, 2), H=H, W=W, heads=heads, d=rng.choice([1, 2, 3, 5, 8, 16]),
                kernel=(kh, kw), dilation=(dh, dw), border=border,
                bias=rng.choice([None, 1, heads]), scale=rng.choice([None, None, 0.7, -0.4]),
                dtype=rng.choice(dtypes_for("neighborhood_attention2d", backend)),
                layout=rng.choice(["contiguous", "qkv", "permuted", "expand"]))


def run_na(cfg, backend, seed):
    device = skip_unless("neighborhood_attention2d", backend, cfg["dtype"])
    gen = torch.Generator().manual_seed(seed)
    dtype = cfg["dtype"]
    leaves, leaves64, build = attention_inputs(cfg["layout"], cfg["B"], cfg["H"], cfg["W"], cfg["heads"],
                                               cfg["d"], dtype, gen, device)
    kh, kw = cfg["kernel"]
    if cfg["bias"]:
        t, t64 = leaf((cfg["bias"], 2 * kh - 1, 2 * kw - 1), gen, torch.float32 if dtype != torch.float64 else dtype,
                      device=device)
        leaves, leaves64 = leaves + [t], leaves64 + [t64]
    table, table64 = (leaves[-1], leaves64[-1]) if cfg["bias"] else (None, None)
    n = len(leaves) - (1 if cfg["bias"] else 0)
    q, k, v = build(leaves[:n])
    out = ao.neighborhood_attention2d(q, k, v, cfg["kernel"], cfg["dilation"], border=cfg["border"],
                                      rel_pos_bias=table, scale=cfg["scale"], backend=backend)
    scale = cfg["scale"] if cfg["scale"] is not None else cfg["d"] ** -0.5
    ref = na_brute_force(*build(leaves64[:n]), cfg["kernel"], cfg["dilation"], cfg["border"], table64, scale)
    assert out.dtype == dtype and out.is_contiguous(), f"config {cfg!r}: output dtype/layout"
    compare(cfg, "output", out, ref, dtype)
    check_grads(cfg, out, ref, leaves, leaves64, ["q", "k", "v", "table"][:len(leaves)] if cfg["layout"] != "qkv"
                else ["qkv", "table"][:len(leaves)], dtype, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sweep_neighborhood_attention2d(backend, index):
    rng = random.Random(f"neighborhood_attention2d-{backend}-{index}")
    run_na(na_config(rng, backend), backend, index)


def test_sweep_neighborhood_attention2d_triton(index):
    rng = random.Random(f"neighborhood_attention2d-triton-{index}")
    cfg = na_config(rng, "triton", small=True)
    cfg.update(B=1, d=min(cfg["d"], 8))
    run_na(cfg, "triton", index)


# ---------------------------------------------------------------------------------------
# window_attention2d
# ---------------------------------------------------------------------------------------
def wa_config(rng, backend, small=False):
    wh, ww = rng.randint(1, 5), rng.randint(1, 5)
    heads = rng.randint(1, 3)
    sizes = [1, 2, 3, 5, 7] if small else [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13]
    return dict(B=rng.randint(1, 2), H=rng.choice(sizes), W=rng.choice(sizes), heads=heads,
                d=rng.choice([1, 2, 3, 5, 8, 16]), window=(wh, ww),
                shift=(rng.randint(0, wh - 1), rng.randint(0, ww - 1)), bias=rng.choice([None, 1, heads]),
                scale=rng.choice([None, None, 0.6, -0.3]),
                dtype=rng.choice(dtypes_for("window_attention2d", backend)),
                layout=rng.choice(["contiguous", "qkv", "permuted", "expand"]))


def run_wa(cfg, backend, seed):
    device = skip_unless("window_attention2d", backend, cfg["dtype"])
    gen = torch.Generator().manual_seed(seed)
    dtype = cfg["dtype"]
    leaves, leaves64, build = attention_inputs(cfg["layout"], cfg["B"], cfg["H"], cfg["W"], cfg["heads"],
                                               cfg["d"], dtype, gen, device)
    n = len(leaves)
    wh, ww = cfg["window"]
    table = table64 = None
    if cfg["bias"]:
        table, table64 = leaf((cfg["bias"], 2 * wh - 1, 2 * ww - 1), gen, dtype, 0.5, device)
        leaves, leaves64 = leaves + [table], leaves64 + [table64]
    q, k, v = build(leaves[:n])
    out = ao.window_attention2d(q, k, v, cfg["window"], shift=cfg["shift"], rel_pos_bias=table,
                                scale=cfg["scale"], backend=backend)
    ref = window_brute_force(*build(leaves64[:n]), cfg["window"], cfg["shift"], table64, scale=cfg["scale"])
    assert out.dtype == dtype and out.is_contiguous(), f"config {cfg!r}: output dtype/layout"
    compare(cfg, "output", out, ref, dtype)
    names = (["qkv"] if cfg["layout"] == "qkv" else ["q", "k", "v"]) + ["table"]
    check_grads(cfg, out, ref, leaves, leaves64, names[:len(leaves)], dtype, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sweep_window_attention2d(backend, index):
    rng = random.Random(f"window_attention2d-{backend}-{index}")
    run_wa(wa_config(rng, backend), backend, index)


def test_sweep_window_attention2d_triton(index):
    rng = random.Random(f"window_attention2d-triton-{index}")
    cfg = wa_config(rng, "triton", small=True)
    cfg.update(B=1, d=min(cfg["d"], 8))
    run_wa(cfg, "triton", index)


# ---------------------------------------------------------------------------------------
# box_blur2d / tanh_blur2d
# ---------------------------------------------------------------------------------------
def padded_index(n, before, after, mode):
    """Source row of every padded row (``-1``: a zero row)."""
    out = []
    for p in range(n + before + after):
        s = p - before
        if 0 <= s < n:
            out.append(s)
        elif mode == "zeros":
            out.append(-1)
        elif mode == "replicate":
            out.append(min(max(s, 0), n - 1))
        else:  # reflect, without repeating the edge
            out.append(-s if s < 0 else 2 * (n - 1) - s)
    return out


def blur_brute_force(x, op, tau, kernel, stride, pads, mode):
    """float64: activation, then every window of the padded map summed term by term."""
    if op != "box":
        x = tau * torch.tanh(x / tau)
        if op == "tanh":
            x = torch.relu(x)
    B, C, H, W = x.shape
    rows = torch.tensor(padded_index(H, pads[0], pads[1], mode))
    cols = torch.tensor(padded_index(W, pads[2], pads[3], mode))
    padded = x[:, :, rows.clamp(min=0)][:, :, :, cols.clamp(min=0)]
    padded = padded * ((rows >= 0)[:, None] & (cols >= 0)[None, :])
    (kh, kw), (sh, sw) = kernel, stride
    Ho, Wo = (len(rows) - kh) // sh + 1, (len(cols) - kw) // sw + 1
    out = 0
    for a in range(kh):
        for e in range(kw):
            out = out + padded[:, :, a:a + sh * (Ho - 1) + 1:sh, e:e + sw * (Wo - 1) + 1:sw]
    return out / (kh * kw)


def map_input(layout, shape, dtype, gen, scale=1.0, device="cpu"):
    B, C, H, W = shape
    if layout == "channels_last":
        t, t64 = leaf((B, H, W, C), gen, dtype, scale, device)
        return t, t64, lambda u: u.permute(0, 3, 1, 2)
    if layout == "strided":
        t, t64 = leaf((B, C, H, 2 * W), gen, dtype, scale, device)
        return t, t64, lambda u: u[..., ::2]
    if layout == "expand":
        t, t64 = leaf((1, C, H, W), gen, dtype, scale, device)
        return t, t64, lambda u: u.expand(B, C, H, W)
    t, t64 = leaf(shape, gen, dtype, scale, device)
    return t, t64, lambda u: u


def blur_config(rng, backend, small=False):
    op = rng.choice(["box", "tanh", "tanh_norelu"])
    sizes = [1, 2, 3, 5, 7] if small else [1, 2, 3, 4, 5, 6, 7, 9, 11, 13]
    H, W = rng.choice(sizes), rng.choice(sizes)
    kh, kw = rng.randint(1, 5), rng.randint(1, 5)
    padding = rng.choice(["same", rng.randint(0, 3), (rng.randint(0, 3), rng.randint(0, 3))])
    mode = rng.choice(["zeros", "replicate", "reflect"])
    pads = padding_of(padding, (kh, kw))
    if mode == "reflect" and (max(pads[:2]) >= H or max(pads[2:]) >= W):
        mode = rng.choice(["zeros", "replicate"])
    kh, kw = min(kh, H + pads[0] + pads[1]), min(kw, W + pads[2] + pads[3])
    if padding == "same":
        pads = padding_of(padding, (kh, kw))
        if mode == "reflect" and (max(pads[:2]) >= H or max(pads[2:]) >= W):
            mode = "zeros"
    table = "tanh_blur2d" if op != "box" else "box_blur2d"
    return dict(op=op, B=rng.randint(1, 2), C=rng.randint(1, 4), H=H, W=W, kernel=(kh, kw),
                stride=(rng.randint(1, 3), rng.randint(1, 3)), padding=padding, pad_mode=mode,
                tau=rng.choice([10.0, 2.0, 0.5]), dtype=rng.choice(dtypes_for(table, backend)),
                layout=rng.choice(["contiguous", "channels_last", "strided", "expand"]))


def padding_of(padding, kernel):
    if padding == "same":
        return ((kernel[0] - 1) // 2, kernel[0] // 2, (kernel[1] - 1) // 2, kernel[1] // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph, pw, pw)


def run_blur(cfg, backend, seed):
    name = "box_blur2d" if cfg["op"] == "box" else "tanh_blur2d"
    device = skip_unless(name, backend, cfg["dtype"])
    gen = torch.Generator().manual_seed(seed)
    dtype = cfg["dtype"]
    t, t64, build = map_input(cfg["layout"], (cfg["B"], cfg["C"], cfg["H"], cfg["W"]), dtype, gen, 3.0, device)
    args = (cfg["kernel"], cfg["stride"], cfg["padding"])
    if cfg["op"] == "box":
        out = ao.box_blur2d(build(t), *args, pad_mode=cfg["pad_mode"], backend=backend)
    else:
        out = ao.tanh_blur2d(build(t), cfg["tau"], *args, relu=cfg["op"] == "tanh", pad_mode=cfg["pad_mode"],
                             backend=backend)
    ref = blur_brute_force(build(t64), cfg["op"], cfg["tau"], cfg["kernel"], cfg["stride"],
                           padding_of(cfg["padding"], cfg["kernel"]), cfg["pad_mode"])
    assert out.dtype == dtype, f"config {cfg!r}: output dtype {out.dtype}"
    compare(cfg, "output", out, ref, dtype)
    check_grads(cfg, out, ref, [t], [t64], ["x"], dtype, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sweep_blur2d(backend, index):
    rng = random.Random(f"blur2d-{backend}-{index}")
    run_blur(blur_config(rng, backend), backend, index)


def test_sweep_blur2d_triton(index):
    rng = random.Random(f"blur2d-triton-{index}")
    cfg = blur_config(rng, "triton", small=True)
    cfg.update(B=1, C=min(cfg["C"], 2))
    run_blur(cfg, "triton", index)


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------
def dft(n):
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * i[:, None] * i[None, :] / n)


def mean_log_amplitude(x, eps):
    """(H, W): mean over b, c of log(|DFT|+eps), the 2-D DFT as two explicit DFT matrices."""
    H, W = x.shape[2:]
    f = dft(H) @ x.to(torch.complex128) @ dft(W).T
    return torch.log(f.abs() + eps).mean(dim=(0, 1))


def spectrum_brute_force(x, eps):
    H, W = x.shape[2:]
    return torch.roll(mean_log_amplitude(x, eps), shifts=(H // 2, W // 2), dims=(0, 1))


def radial_brute_force(x, bins, eps):
    H, W = x.shape[2:]
    a = mean_log_amplitude(x, eps)
    members = [[] for _ in range(bins)]
    for u in range(H):
        for v in range(W):
            wy = 2 * min(u, H - u) / H  # |angular frequency| / π
            wx = 2 * min(v, W - v) / W
            r = math.sqrt(wy * wy + wx * wx)
            ring = (0 if r <= 0.5 else -1) if bins == 1 else round(r * (bins - 1))
            if 0 <= ring < bins:
                members[ring].append(a[u, v])
    return torch.stack([torch.stack(m).mean() if m else a.new_tensor(math.nan) for m in members]) - a[0, 0]


def variance_brute_force(x):
    B, C, H, W = x.shape
    mean = x.sum(dim=(2, 3), keepdim=True) / (H * W)
    return (((x - mean) ** 2).sum(dim=(2, 3)) / (H * W - 1)).mean()


STAT_OPS = ("delta_log_amplitude", "feature_variance", "log_amplitude_spectrum", "radial_log_amplitude")


def stat_config(rng, backend, small=False):
    ops = [o for o in STAT_OPS if backend == "reference" or o in ("delta_log_amplitude", "feature_variance")]
    op = rng.choice(ops)
    sizes = [1, 2, 3, 4, 5, 7] if small else [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 16, 17]
    H = rng.choice(sizes)
    W = H if op == "delta_log_amplitude" else rng.choice(sizes)
    if op == "feature_variance" and H * W < 2:
        W = 2
    return dict(op=op, B=rng.randint(1, 3), C=rng.randint(1, 4), H=H, W=W, eps=rng.choice([1e-6, 1e-3, 0.5]),
                bins=rng.choice([None, 1, 2, 3, 6]), offset=rng.choice([0.0, 0.0, 3.0]),
                dtype=rng.choice(dtypes_for(op, backend)),
                layout=rng.choice(["contiguous", "channels_last", "strided", "expand"]))


def run_stat(cfg, backend, seed):
    op = cfg["op"]
    device = skip_unless(op, backend, cfg["dtype"])
    gen = torch.Generator().manual_seed(seed)
    dtype = cfg["dtype"]
    B, C, H, W = cfg["B"], cfg["C"], cfg["H"], cfg["W"]
    t, t64, build = map_input(cfg["layout"], (B, C, H, W), dtype, gen, device=device)
    with torch.no_grad():  # a mean offset, applied to the leaves in both precisions alike
        t += cfg["offset"]
        t64.copy_(t.double())
    x, x64 = build(t), build(t64)
    if op == "delta_log_amplitude":
        out, ref = ao.delta_log_amplitude(x, cfg["eps"], backend=backend), brute_force_delta(x64, cfg["eps"])
    elif op == "feature_variance":
        out, ref = ao.feature_variance(x, backend=backend), variance_brute_force(x64)
    elif op == "log_amplitude_spectrum":
        out, ref = ao.log_amplitude_spectrum(x, cfg["eps"], backend=backend), spectrum_brute_force(x64, cfg["eps"])
    else:
        bins = cfg["bins"] if cfg["bins"] is not None else min(H, W) // 2 + 1
        out = ao.radial_log_amplitude(x, cfg["bins"], cfg["eps"], backend=backend)
        ref = radial_brute_force(x64, bins, cfg["eps"])
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want, f"config {cfg!r}: result dtype {out.dtype}, expected {want}"
    compare(cfg, "output", out, ref, dtype)
    if cfg["eps"] >= 1e-3:  # gradients of log amplitudes blow up near empty bins for tiny eps
        check_grads(cfg, out.nan_to_num(), ref.nan_to_num(), [t], [t64], ["x"], dtype, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sweep_statistics(backend, index):
    rng = random.Random(f"statistics-{backend}-{index}")
    run_stat(stat_config(rng, backend), backend, index)


def test_sweep_statistics_triton(index):
    rng = random.Random(f"statistics-triton-{index}")
    cfg = stat_config(rng, "triton", small=True)
    run_stat(cfg, "triton", index)


def test_sweep_brute_forces_agree_with_torch():
    """The brute forces above against torch's own ops where those exist (checks the test math)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(variance_brute_force(x), x.var(dim=(2, 3)).mean())
    a = torch.log(torch.fft.fft2(x).abs() + 1e-3).mean(dim=(0, 1))
    torch.testing.assert_close(spectrum_brute_force(x, 1e-3), torch.fft.fftshift(a))
    for k, s, p, mode in [((3, 2), (2, 1), (1, 0, 2, 1), "zeros"), ((2, 3), (1, 2), (1, 1, 2, 2), "reflect"),
                          ((4, 1), (3, 1), (2, 1, 0, 0), "replicate")]:
        fmode = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}[mode]
        want = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (p[2], p[3], p[0], p[1]), mode=fmode), k, s)
        torch.testing.assert_close(blur_brute_force(x, "box", 1.0, k, s, p, mode), want)
