"""window_attention2d: every backend against an independent float64 brute force, gradients,
Hugging Face Swin parity, opcheck, torch.compile, bad inputs, empty batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import alterops as ao
from alterops import window_attention as wa
from helpers import assert_close, assert_fused, interpreted, skip_unless

OP = "window_attention2d"


# ---------------------------------------------------------------------------------------
# Independent brute force: for every query, enumerate its window's keys with explicit loops.
# ---------------------------------------------------------------------------------------
def _region(r, length, w, s):
    if r < length - w:
        return 0
    if r < length - s:
        return 1
    return 2


def brute_force(q, k, v, window, shift, bias, scale=None):
    """float64, differentiable. q/k/v (B, H, W, nh, d); bias (nh|1, 2wh-1, 2ww-1) or None."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, W, nh, d = q.shape
    wh, ww = window
    sh, sw = shift
    scale = d ** -0.5 if scale is None else scale
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    # A query's keys depend only on its window and its shift regions: listed once per such pair
    # (the in-window position (i, j) of each, for the bias index), not once per query.
    key_lists = {}

    def window_keys(wy, wx, reg_r, reg_c):
        keys = []
        for i in range(wh):
            for j in range(ww):
                rr, cc = wy * wh + i, wx * ww + j
                yy, xx = (rr + sh) % Hp, (cc + sw) % Wp
                if yy >= H or xx >= W:
                    continue  # absent padding token
                if _region(rr, Hp, wh, sh) != reg_r or _region(cc, Wp, ww, sw) != reg_c:
                    continue
                keys.append((yy, xx, i, j))
        return torch.tensor(keys).T  # (4, K): y, x, i, j

    rows = []
    for y in range(H):
        row = []
        for x in range(W):
            r, c = (y - sh) % Hp, (x - sw) % Wp  # rolled coordinates
            wy, wx = r // wh, c // ww
            iq, jq = r - wy * wh, c - wx * ww
            key = (wy, wx, _region(r, Hp, wh, sh), _region(c, Wp, ww, sw))
            if key not in key_lists:
                key_lists[key] = window_keys(*key)
            ky, kx, ki, kj = key_lists[key]
            kk, vv = k[:, ky, kx], v[:, ky, kx]  # (B, K, nh, d)
            logits = torch.einsum("bhd,bkhd->bhk", q[:, y, x], kk) * scale
            if bias is not None:
                by, bx = ki - iq + wh - 1, kj - jq + ww - 1
                logits = logits + bias.double()[:, by, bx][None]  # (1, nh|1, K)
            p = torch.softmax(logits, dim=-1)
            row.append(torch.einsum("bhk,bkhd->bhd", p, vv))
        rows.append(torch.stack(row, dim=1))
    return torch.stack(rows, dim=1)


def make_inputs(B, H, W, nh, d, window, bias_heads, dtype, device, seed=0, fused=False):
    g = torch.Generator().manual_seed(seed)
    wh, ww = window
    if fused:  # views into one (B, H, W, 3, nh, d) tensor, as a fused qkv projection gives
        qkv = torch.randn(B, H, W, 3, nh, d, generator=g).to(dtype).to(device)
        q, k, v = qkv.unbind(3)
    else:
        q, k, v = (torch.randn(B, H, W, nh, d, generator=g).to(dtype).to(device) for _ in range(3))
    bias = None
    if bias_heads:
        bias = (torch.randn(bias_heads, 2 * wh - 1, 2 * ww - 1, generator=g) * 0.5).to(dtype).to(device)
    return q, k, v, bias


def pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


# (B, H, W, nh, d, window, shift, bias heads: 0 none, 1 shared, nh per head)
CONFIGS = [
    (2, 8, 8, 2, 8, 4, 0, 2),
    (1, 8, 8, 2, 8, 4, 1, 1),
    (1, 8, 8, 2, 8, 4, 2, 2),
    (1, 8, 8, 2, 8, 4, 3, 0),
    (2, 7, 9, 2, 4, 3, 1, 2),  # H != W, not multiples of the window
    (1, 6, 10, 1, 8, (2, 5), (1, 2), 1),  # rectangular window
    (1, 5, 4, 2, 8, 7, 3, 2),  # map smaller than one window
    (1, 9, 7, 2, 4, (3, 2), (2, 1), 2),
    (1, 12, 13, 1, 4, 6, 5, 1),
    (1, 16, 16, 1, 8, 8, 4, 1),
    (1, 14, 14, 2, 8, 7, 3, 2),
    (1, 10, 10, 2, 4, 5, 0, 0),
]
IDS = [f"B{c[0]}_{c[1]}x{c[2]}_h{c[3]}d{c[4]}_w{c[5]}_s{c[6]}_b{c[7]}" for c in CONFIGS]
# Every shift in (0, window) for a small window (and both axes independently).
SHIFTS_W4 = [(s, t) for s in range(4) for t in range(4) if s or t]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_reference_matches_brute_force(cfg):
    B, H, W, nh, d, window, shift, bh = cfg
    window, shift = pair(window), pair(shift)
    q, k, v, bias = make_inputs(B, H, W, nh, d, window, bh, torch.float64, "cpu")
    out = ao.window_attention2d(q, k, v, window, shift=shift, rel_pos_bias=bias, backend="reference")
    ref = brute_force(q, k, v, window, shift, bias)
    assert_close(out, ref)


@pytest.mark.parametrize("shift", SHIFTS_W4)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_shift_small_window(backend, shift):
    skip_unless(OP, backend, torch.float64)
    q, k, v, bias = make_inputs(1, 8, 11, 1, 4, (4, 4), 1, torch.float64, "cpu", seed=3)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    out = ao.window_attention2d(q, k, v, 4, shift=shift, rel_pos_bias=bias, backend=backend)
    ref = brute_force(q, k, v, (4, 4), shift, bias)
    assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v, bias), g)
    for name, a, b in zip("qkvb", grads, grads_ref):
        assert_close(a, b, name=f"d{name}")


def _check_backend(backend, dtype, cfg, fused=False, seed=0):
    device = skip_unless(OP, backend, dtype)
    B, H, W, nh, d, window, shift, bh = cfg
    window, shift = pair(window), pair(shift)
    q, k, v, bias = make_inputs(B, H, W, nh, d, window, bh, dtype, device, seed=seed, fused=fused)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    b64 = bias.detach().double().cpu().requires_grad_(True) if bias is not None else None
    ref = brute_force(q64, k64, v64, window, shift, b64)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads_ref = torch.autograd.grad(ref, [t for t in (q64, k64, v64, b64) if t is not None], g)

    # naive: the same math done plainly in the input dtype (reference backend)
    qn, kn, vn = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    bn = bias.detach().clone().requires_grad_(True) if bias is not None else None
    naive = wa.window_attention2d_reference(qn, kn, vn, window, shift, bn)
    naive_grads = torch.autograd.grad(naive, [t for t in (qn, kn, vn, bn) if t is not None], g.to(dtype).to(device))

    if fused:
        base = q._base  # the (B, H, W, 3, nh, d) tensor
        base.requires_grad_(True)
        q, k, v = base.unbind(3)
        leaves = [base]
    else:
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
    if bias is not None:
        leaves.append(bias.requires_grad_(True))
    out = ao.window_attention2d(q, k, v, window, shift=shift, rel_pos_bias=bias, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, naive)
    grads = torch.autograd.grad(out, leaves, g.to(dtype).to(device))
    if fused:
        dqkv = grads[0]
        grads = list(dqkv.unbind(3)) + list(grads[1:])
    names = ["dq", "dk", "dv", "dbias"]
    for name, a, r, n in zip(names, grads, grads_ref, naive_grads):
        assert a.dtype == (bias.dtype if name == "dbias" else dtype)
        assert_close(a, r, n, name=name)


CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cpu_forward_backward(cfg, dtype):
    _check_backend("cpu", dtype, cfg)


# float16 takes bfloat16's route (float32 copies, rounded back): a few of the configurations.
@pytest.mark.parametrize("cfg", [CONFIGS[i] for i in (1, 4, 6, 10)], ids=[IDS[i] for i in (1, 4, 6, 10)])
def test_cpu_forward_backward_float16(cfg):
    _check_backend("cpu", torch.float16, cfg)


# Head dims covering every register-block width (1..8 vectors of 16, with and without a tail)
# of the float32 CPU kernels, with windows of 16, 25, 36, 49 (lone last key), 64 and 81 tokens.
HEAD_DIM_CONFIGS = [
    (1, 14, 14, 2, 32, 7, 3, 2),
    (1, 8, 8, 1, 20, 4, 2, 1),
    (1, 12, 12, 1, 40, 6, 3, 1),
    (2, 8, 8, 2, 64, 4, 0, 1),
    (1, 10, 10, 1, 72, 5, 2, 1),
    (1, 8, 8, 1, 96, 4, 1, 0),
    (1, 7, 7, 1, 100, 7, 0, 1),
    (1, 8, 8, 1, 128, 8, 4, 1),
    (1, 9, 9, 1, 48, 9, 4, 1),
    (1, 13, 12, 2, 24, 12, 5, 2),  # 144-token windows, padded map
    (1, 32, 32, 1, 8, 32, 7, 1),  # 1024 tokens: the largest window of the fast paths
    (1, 33, 33, 1, 12, 33, 0, 1),  # 1089 tokens: past them (generic kernel)
]


@pytest.mark.parametrize("cfg", HEAD_DIM_CONFIGS, ids=[f"d{c[4]}_w{c[5]}" for c in HEAD_DIM_CONFIGS])
def test_cpu_float32_head_dims(cfg):
    _check_backend("cpu", torch.float32, cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_fused_qkv_view(dtype):
    _check_backend("cpu", dtype, (2, 7, 9, 2, 8, 3, 1, 2), fused=True)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_strided_inputs_match_contiguous(backend):
    """Inputs with a non-unit head_dim stride and a channels-first-like layout are read in place
    and give the same result and gradients as their contiguous copies."""
    device = skip_unless(OP, backend, torch.float32)
    g = torch.Generator().manual_seed(9)
    # (B, nh, d, H, W) storage viewed as (B, H, W, nh, d): every stride is non-unit but W's.
    raw = [torch.randn(2, 2, 8, 6, 7, generator=g).to(device) for _ in range(3)]
    strided = [t.permute(0, 3, 4, 1, 2).requires_grad_(True) for t in raw]
    contig = [t.detach().contiguous().requires_grad_(True) for t in strided]
    bias = torch.randn(2, 5, 5, generator=g).to(device)
    outs, grads = [], []
    for qkv in (strided, contig):
        out = ao.window_attention2d(*qkv, 3, shift=1, rel_pos_bias=bias, backend=backend)
        outs.append(out)
        grads.append(torch.autograd.grad(out, qkv, torch.ones_like(out)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


TRITON_CONFIGS = [CONFIGS[i] for i in (0, 2, 4, 5, 6, 10)]
TRITON_IDS = [IDS[i] for i in (0, 2, 4, 5, 6, 10)]


@pytest.mark.parametrize("cfg", TRITON_CONFIGS, ids=TRITON_IDS)
def test_triton_forward_backward_fp32(cfg):
    _check_backend("triton", torch.float32, cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half(dtype):
    _check_backend("triton", dtype, CONFIGS[2])


def test_triton_fused_qkv_view():
    _check_backend("triton", torch.float32, (1, 7, 9, 2, 8, 3, 1, 2), fused=True)


def test_triton_large_head_dim():
    _check_backend("triton", torch.float32, (1, 4, 4, 1, 256, 2, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_large_window_odd_head_dim(dtype):
    # 108-token windows (a 128-key tile), head_dim 24 (a partial head_dim chunk).
    _check_backend("triton", dtype, (1, 10, 13, 1, 24, (9, 12), (4, 5), 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_swin_b_window_144_tokens(dtype):
    # Swin-B's 12x12 windows (144 tokens: a 192-row tile, three 64-key chunks with the online
    # softmax across them), shift 6, head_dim 32; W = 14 pads the second window with absent tokens.
    _check_backend("triton", dtype, (1, 12, 14, 1, 32, 12, 6, 1))


@pytest.mark.parametrize("budget", [None, "small"])
def test_triton_dq_several_window_groups_per_program(monkeypatch, budget):
    """The dq kernel's bias-gradient partials are bounded; past the bound each program sums the
    dS tiles of several window groups, as Swin-T stage 1 (56x56, window 7, 3 heads) does at
    batch 8. Under the interpreter the bound is lowered so a small map takes that path; on a GPU
    the real stage-1 shape runs too."""
    from alterops.kernels import window_attention as kern

    if budget == "small":
        monkeypatch.setattr(kern, "DB_PARTIAL_FLOATS", 3 * 64 * 64 * 2)  # 2 programs per head
        _check_backend("triton", torch.float32, (3, 14, 7, 3, 8, 7, 3, 3))  # 6 windows: 3 per program
    else:
        if interpreted("triton"):
            pytest.skip("Swin-T stage-1 size: GPU only (the bound is lowered in the 'small' case)")
        _check_backend("triton", torch.float32, (8, 56, 56, 3, 32, 7, 3, 3))


def test_triton_tile_spans_images():
    # 1 window per image, 4 windows per 64-row tile: a tile holds windows of 3 images.
    _check_backend("triton", torch.float32, (3, 4, 3, 2, 8, 4, 1, 2))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    skip_unless(OP, backend, torch.float64)
    q, k, v, bias = make_inputs(1, 4, 5, 2, 2, (3, 4), 2, torch.float64, "cpu", seed=5)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v, bias))
    fn = lambda q, k, v, b: ao.window_attention2d(q, k, v, (3, 4), shift=(1, 2), rel_pos_bias=b, backend=backend)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_bias_gradient_is_deterministic(backend):
    device = skip_unless(OP, backend, torch.float32)
    q, k, v, bias = make_inputs(2, 8, 8, 2, 8, (4, 4), 1, torch.float32, device, seed=7)
    bias.requires_grad_(True)
    runs = []
    for _ in range(2):
        out = ao.window_attention2d(q, k, v, 4, shift=2, rel_pos_bias=bias, backend=backend)
        runs.append(torch.autograd.grad(out.square().sum(), bias)[0])
    assert torch.equal(runs[0], runs[1])


def test_cpu_gradients_do_not_depend_on_thread_count():
    """Bias-table gradients are reduced in a fixed order of fixed task chunks, so 1 and 2 threads
    give bit-identical gradients (as do all the other outputs, which have no cross-task sums)."""
    skip_unless(OP, "cpu", torch.float32)
    q, k, v, bias = make_inputs(3, 28, 21, 3, 24, (7, 7), 3, torch.float32, "cpu", seed=11)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
            out = ao.window_attention2d(*leaves[:3], 7, shift=3, rel_pos_bias=leaves[3], backend="cpu")
            runs.append([out.detach()] + list(torch.autograd.grad(out.square().sum(), leaves)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bias_without_grad_and_inputs_untouched():
    skip_unless(OP, "cpu", torch.float32)
    q, k, v, bias = make_inputs(1, 8, 8, 2, 8, (4, 4), 2, torch.float32, "cpu")
    copies = [t.clone() for t in (q, k, v, bias)]
    q.requires_grad_(True)
    out = ao.window_attention2d(q, k, v, 4, shift=1, rel_pos_bias=bias, backend="cpu")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    out.backward(g)
    assert bias.grad is None and k.grad is None and v.grad is None
    q64 = q.detach().double().requires_grad_(True)
    (dq64,) = torch.autograd.grad(brute_force(q64, k, v, (4, 4), (1, 1), bias), q64, g.double())
    assert_close(q.grad, dq64, name="dq")
    for a, b in zip((q, k, v, bias), copies):
        assert torch.equal(a.detach(), b)


# ---------------------------------------------------------------------------------------
# Parity with Hugging Face transformers' Swin (SwinLayer: pad, roll, partition, its mask,
# its attention with the query-minus-key bias table, reverse, roll back).
# ---------------------------------------------------------------------------------------
class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _selector(rows: int, cols: int, block: int, out_first: bool) -> nn.Linear:
    lin = nn.Linear(cols, rows, bias=not out_first)
    with torch.no_grad():
        lin.weight.zero_()
        if out_first:  # rows = C, cols = 3C: pick block `block`
            lin.weight[:, block * rows:(block + 1) * rows] = torch.eye(rows)
        else:  # rows = 3C, cols = C: write into the first block
            lin.weight[:cols, :] = torch.eye(cols)
            lin.bias.zero_()
    return lin.double()


def hf_swin_layer(config, dim, resolution, heads, shift):
    """transformers' own SwinLayer, and which of its two layouts the installed version has:
    ``"5.x"`` (attention.q_proj/k_proj/v_proj/o_proj, attention.relative_position_bias, mlp) or
    ``"4.x"`` (attention.self.query/key/value with the table, attention.output.dense,
    intermediate/output)."""
    from transformers.models.swin.modeling_swin import SwinLayer

    layer = SwinLayer(config, dim=dim, input_resolution=resolution, num_heads=heads, shift_size=shift)
    return layer, "5.x" if hasattr(layer.attention, "q_proj") else "4.x"


def test_transformers_swin_layout_is_the_installed_versions():
    """The layout the parity helper (and alterops.swap) detects is the one the installed
    transformers has: 4.x up to 4.57, 5.x from 5.0 (CI runs this file under both)."""
    transformers = pytest.importorskip("transformers")
    major = int(transformers.__version__.split(".")[0])
    layer, layout = hf_swin_layer(transformers.SwinConfig(window_size=4, embed_dim=8, depths=[1], num_heads=[2]),
                                  8, (8, 8), 2, 0)
    assert layout == ("5.x" if major >= 5 else "4.x"), transformers.__version__
    a = layer.attention
    if layout == "5.x":
        assert all(isinstance(getattr(a, n), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert a.relative_position_bias.relative_position_bias_table.shape == (49, 2)
    else:
        assert all(isinstance(getattr(a.self, n), nn.Linear) for n in ("query", "key", "value"))
        assert a.self.relative_position_bias_table.shape == (49, 2) and isinstance(a.output.dense, nn.Linear)


def hf_swin_attention(q, k, v, window, shift, hf_table):
    """Swin attention of q/k/v through transformers' SwinLayer (identity projections, no
    norms, no MLP), float64, in either layout of transformers' SwinLayer (4.x or 5.x).
    ``hf_table`` is HF's ((2w-1)^2, heads) query-minus-key table."""
    from transformers import SwinConfig

    B, H, W, nh, d = q.shape
    C = nh * d
    config = SwinConfig(window_size=window, embed_dim=3 * C, depths=[1], num_heads=[nh], qkv_bias=False,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    config._attn_implementation = "sdpa"  # 5.x: the eager path runs its softmax in float32
    layer, layout = hf_swin_layer(config, 3 * C, (H, W), nh, shift)
    layer = layer.double().eval()
    attn = layer.attention
    if layout == "5.x":
        attn.head_dim, attn.scaling = d, d ** -0.5
        attn.q_proj, attn.k_proj, attn.v_proj = (_selector(C, 3 * C, i, True) for i in range(3))
        attn.o_proj = _selector(3 * C, C, 0, False)
        layer.mlp = _Zero()
        attn.relative_position_bias.relative_position_bias_table = hf_table
    else:  # 4.x: scores / sqrt(attention_head_size), context viewed as all_head_size channels
        s = attn.self
        s.attention_head_size, s.all_head_size = d, C
        s.query, s.key, s.value = (_selector(C, 3 * C, i, True) for i in range(3))
        attn.output.dense = _selector(3 * C, C, 0, False)
        layer.intermediate = nn.Identity()
        layer.output = _Zero()
        s.relative_position_bias_table = hf_table
    layer.layernorm_before = nn.Identity()
    layer.layernorm_after = nn.Identity()
    x = torch.cat([t.reshape(B, H * W, C) for t in (q, k, v)], dim=-1)
    y = layer(x, (H, W))[0]
    return (y - x)[..., :C].reshape(B, H, W, nh, d)


def hf_table_to_ours(hf_table, window):
    """HF ((2w-1)^2, heads) query-minus-key -> ours (heads, 2w-1, 2w-1) key-minus-query."""
    n = 2 * window - 1
    return hf_table.reshape(n, n, -1).flip(0, 1).permute(2, 0, 1)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("H,W,nh,d,window,shift", [(8, 8, 2, 4, 4, 0), (8, 12, 2, 4, 4, 2), (14, 14, 1, 8, 7, 3)])
def test_parity_with_transformers_swin(backend, H, W, nh, d, window, shift):
    pytest.importorskip("transformers")
    if interpreted(backend) and window == 7:
        pytest.skip("kept short under the Triton interpreter")
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    device = skip_unless(OP, backend, dtype)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, H, W, nh, d, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    hf_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, nh, generator=g, dtype=torch.float64))
    out_hf = hf_swin_attention(q, k, v, window, shift, hf_table)
    gout = torch.randn(out_hf.shape, generator=g, dtype=torch.float64)
    grads_hf = torch.autograd.grad(out_hf, (q, k, v, hf_table), gout)

    ours_table = hf_table_to_ours(hf_table.detach(), window).to(dtype).to(device).requires_grad_(True)
    qo, ko, vo = (t.detach().to(dtype).to(device).requires_grad_(True) for t in (q, k, v))
    out = ao.window_attention2d(qo, ko, vo, window, shift=shift, rel_pos_bias=ours_table, backend=backend)
    grads = torch.autograd.grad(out, (qo, ko, vo, ours_table), gout.to(dtype).to(device))
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    # HF adds -100 to cross-region logits (weight e^-100 ~ 4e-44), we exclude them exactly.
    torch.testing.assert_close(out.double().cpu(), out_hf.detach(), **tol)
    for name, a, b in zip(("q", "k", "v"), grads[:3], grads_hf[:3]):
        torch.testing.assert_close(a.double().cpu(), b, **tol, msg=lambda m: f"d{name}: {m}")
    db = grads[3].double().cpu()
    torch.testing.assert_close(db, hf_table_to_ours(grads_hf[3], window), **tol)


# ---------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------
def _op_args(device, dtype, with_bias=True):
    q, k, v, bias = make_inputs(1, 5, 7, 2, 8, (4, 4), 2 if with_bias else 0, dtype, device, seed=2)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    table = bias.to(ct) if bias is not None else None
    return q, k, v, table


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(backend, with_bias):
    dtype = torch.float32
    device = skip_unless(OP, backend, dtype)
    suffix = "_triton" if backend == "triton" else ""  # cpu and cuda: one op, per-device kernels
    fwd = getattr(torch.ops.alterops, f"window_attention2d_fwd{suffix}")
    bwd = getattr(torch.ops.alterops, f"window_attention2d_bwd{suffix}")
    q, k, v, table = _op_args(device, dtype, with_bias)
    args = (q, k, v, table, [4, 4], [1, 2], 0.3)
    torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = fwd(*args)
    gout = torch.randn_like(out)
    bargs = (gout, q, k, v, out, lse, table, [4, 4], [1, 2], 0.3, with_bias)
    torch.library.opcheck(bwd, bargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_torch_compile_fullgraph(backend):
    device = skip_unless(OP, backend, torch.float32)
    q, k, v, bias = make_inputs(1, 6, 7, 2, 8, (4, 4), 2, torch.float32, device, seed=4)
    for t in (q, k, v, bias):
        t.requires_grad_(True)

    def f(q, k, v, b):
        return ao.window_attention2d(q, k, v, 4, shift=2, rel_pos_bias=b, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager" if backend == "triton" else "inductor")
    out_c = compiled(q, k, v, bias)
    out_e = f(q, k, v, bias)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    g_c = torch.autograd.grad(out_c.sum(), (q, k, v, bias))
    g_e = torch.autograd.grad(out_e.sum(), (q, k, v, bias))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Bad inputs, empty batch, backend selection
# ---------------------------------------------------------------------------------------
def test_bad_inputs():
    q = torch.randn(1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match=r"shift must be in \[0, window_size\)"):
        ao.window_attention2d(q, q, q, 4, shift=4)
    with pytest.raises(ValueError, match=r"shift must be in \[0, window_size\)"):
        ao.window_attention2d(q, q, q, (4, 2), shift=(1, 2))
    with pytest.raises(ValueError, match="shift must be >= 0"):
        ao.window_attention2d(q, q, q, 4, shift=-1)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        ao.window_attention2d(q, q, q, 0)
    with pytest.raises(TypeError, match="window_size must be an int or a pair"):
        ao.window_attention2d(q, q, q, 2.5)
    with pytest.raises(ValueError, match=r"rel_pos_bias must have shape \(2 or 1, 7, 7\)"):
        ao.window_attention2d(q, q, q, 4, rel_pos_bias=torch.zeros(3, 7, 7))
    with pytest.raises(ValueError, match=r"rel_pos_bias must have shape \(2 or 1, 7, 7\)"):
        ao.window_attention2d(q, q, q, 4, rel_pos_bias=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="rel_pos_bias must have 3 dimensions"):
        ao.window_attention2d(q, q, q, 4, rel_pos_bias=torch.zeros(49, 2))
    with pytest.raises(ValueError, match="k has shape"):
        ao.window_attention2d(q, torch.randn(1, 8, 7, 2, 4), q, 4)
    with pytest.raises(TypeError, match="v has dtype"):
        ao.window_attention2d(q, q, q.double(), 4)
    with pytest.raises(ValueError, match="q must have 5 dimensions"):
        ao.window_attention2d(q[0], q[0], q[0], 4)
    with pytest.raises(TypeError, match="q must have a floating-point dtype"):
        qi = torch.zeros(1, 8, 8, 2, 4, dtype=torch.int32)
        ao.window_attention2d(qi, qi, qi, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ao.window_attention2d(q, q, q, 4, backend="nope")
    with pytest.raises(ao.BackendUnavailableError, match="supports.*not float8_e4m3fn"):
        qf8 = q.to(torch.float8_e4m3fn)
        ao.window_attention2d(qf8, qf8, qf8, 4, backend="cpu")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_empty_batch(backend):
    device = skip_unless(OP, backend, torch.float32)
    q, k, v, bias = make_inputs(0, 6, 7, 2, 8, (4, 4), 2, torch.float32, device)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    out = ao.window_attention2d(q, k, v, 4, shift=1, rel_pos_bias=bias, backend=backend)
    assert out.shape == (0, 6, 7, 2, 8)
    assert_fused(out, backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    for t, gr in zip((q, k, v, bias), grads):  # every gradient exists, with the input's shape
        assert gr is not None and gr.shape == t.shape
    assert torch.equal(grads[3], torch.zeros_like(bias))  # no queries: the bias gradient is zero


def test_auto_backend_on_cpu_is_cpu_kernel():
    skip_unless(OP, "cpu", torch.float32)
    assert wa._TABLE.select(None, torch.device("cpu"), torch.float32) == "cpu"
    assert wa._TABLE.select(None, torch.device("cpu"), torch.float16) == "cpu"
    assert wa._TABLE.select(None, torch.device("cpu"), torch.float8_e4m3fn) == "reference"
