"""alterops.swap: swapped models compute the same function with the same parameters and gradients.

Families: Hugging Face Swin and Swin V2 (tiny configs, shifted and unshifted layers, sizes that
are and are not multiples of the window), timm's SwinTransformerBlock (the real one when timm is
installed, and a block with timm 1.0's structure and semantics written here), and the papers'
LocalAttention, ConvAttention2d, TanhBlurBlock and AvgPool2d(2, 1, 1) blurs (minimal modules
written here from the papers' descriptions, PAPERS.md §1.3, §1.5, §3.2). Real timm Swin / Swin V2
/ SwinV2-CR models: tests/test_swap_timm.py. The Hugging Face tests pass with transformers 4.x and
5.x (.ci/run runs them with 5.x and 4.57.6).
"""
from __future__ import annotations

import copy
import importlib
import math
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import alterops
import alterops._dispatch as dispatch

swap_module = importlib.import_module("alterops.swap")
BACKENDS = ("reference", "cpu", "triton", "cuda")


def backend_device(op: str, backend: str) -> torch.device:
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device("cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu")
    reason = dispatch.registry()[op].why_not(backend, dev, torch.float32)
    if reason:
        pytest.skip(reason)
    return dev


# =============================================================================================
# The papers' modules, minimal versions written from PAPERS.md
# =============================================================================================
class Attention2d(nn.Module):
    """Global MSA on NCHW maps: to_q 1x1, to_kv (kernel k), to_out 1x1 + dropout; optional additive mask."""

    def __init__(self, dim_in, dim_out=None, *, heads=8, dim_head=64, dropout=0.0, k=1):
        super().__init__()
        dim_out = dim_in if dim_out is None else dim_out
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Conv2d(dim_in, inner, 1, bias=False)
        self.to_kv = nn.Conv2d(dim_in, 2 * inner, k, stride=k, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, dim_out, 1), nn.Dropout(dropout) if dropout > 0 else nn.Identity())

    def forward(self, x, mask=None):
        b, _, h, w = x.shape
        q = self.to_q(x)
        k, v = self.to_kv(x).chunk(2, dim=1)
        q, k, v = (t.reshape(b, self.heads, -1, t.shape[2] * t.shape[3]).transpose(-1, -2) for t in (q, k, v))
        dots = q @ k.transpose(-1, -2) * self.scale
        if mask is not None:
            dots = dots + mask
        attn = dots.softmax(-1)
        out = (attn @ v).transpose(-1, -2).reshape(b, -1, h, w)
        return self.to_out(out), attn


class LocalAttention(nn.Module):
    """AlterNet's window MSA: non-shifted p x p windows, one (2p-1)^2 bias table shared by heads."""

    def __init__(self, dim_in, dim_out=None, *, window_size=7, k=1, heads=8, dim_head=32, dropout=0.0):
        super().__init__()
        self.attn = Attention2d(dim_in, dim_out, heads=heads, dim_head=dim_head, dropout=dropout, k=k)
        self.window_size = window_size
        p = window_size
        coords = torch.tensor([[i, j] for i in range(p) for j in range(p)])
        self.rel_index = coords[None, :, :] - coords[:, None, :] + p - 1  # key minus query
        self.pos_embedding = nn.Parameter(torch.randn(2 * p - 1, 2 * p - 1) * 0.02)

    def forward(self, x, mask=None):
        b, c, h, w = x.shape
        p = self.window_size
        n1, n2 = h // p, w // p
        bias = self.pos_embedding[self.rel_index[..., 0], self.rel_index[..., 1]]
        mask = bias if mask is None else mask + bias
        x = x.reshape(b, c, n1, p, n2, p).permute(0, 2, 4, 1, 3, 5).reshape(b * n1 * n2, c, p, p)
        x, attn = self.attn(x, mask)
        x = x.reshape(b, n1, n2, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)
        return x, attn


class ConvAttention2d(nn.Module):
    """k x k neighbourhood MSA through F.unfold: zero-padded keys/values keep softmax mass."""

    def __init__(self, dim_in, dim_out=None, *, heads=8, dim_head=64, dropout=0.0, k=1,
                 kernel_size=1, dilation=1, padding=0, stride=1):
        super().__init__()
        dim_out = dim_in if dim_out is None else dim_out
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.conv_args = {"kernel_size": kernel_size, "dilation": dilation, "padding": padding, "stride": stride}
        self.to_q = nn.Conv2d(dim_in, inner, 1, bias=False)
        self.to_kv = nn.Conv2d(dim_in, 2 * inner, k, stride=k, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, dim_out, 1), nn.Dropout(dropout))

    def forward(self, x, mask=None):
        b, _, h, w = x.shape
        q = self.to_q(x)
        kk = self.conv_args["kernel_size"] ** 2
        d = q.shape[1] // self.heads
        q = q.reshape(b, self.heads, d, h * w).transpose(-1, -2)[:, :, :, None, :]  # b h n 1 d
        k, v = (F.unfold(t, **self.conv_args) for t in self.to_kv(x).chunk(2, dim=1))
        k, v = (t.reshape(b, self.heads, d, kk, -1).permute(0, 1, 4, 3, 2) for t in (k, v))  # b h n w d
        dots = (q * k).sum(-1) * self.scale
        if mask is not None:
            dots = dots + mask
        attn = dots.softmax(-1)
        out = (attn[..., None] * v).sum(-2)  # b h n d
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return self.to_out(out), attn


class Blur(nn.Module):
    """The blur paper's non-box blur: a fixed depthwise filter (outer product of sfilter, normalised)."""

    def __init__(self, in_filters, sfilter=(1, 2, 1)):
        super().__init__()
        f = torch.tensor(sfilter, dtype=torch.float32)
        f = f[:, None] * f[None, :]
        self.register_buffer("filter", (f / f.sum()).expand(in_filters, 1, *f.shape).contiguous())

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.filter, groups=x.shape[1])


class TanhBlurBlock(nn.Module):
    """blur(relu(temp * tanh(x / temp))) with the paper's default AvgPool2d(2, 1, 1) blur."""

    def __init__(self, in_filters, temp=10.0, blur=None, bn=False):
        super().__init__()
        if bn:
            self.bn = nn.BatchNorm2d(in_filters)
        self.temp = temp
        self.relu = nn.ReLU()
        self.tanh = nn.Tanh()
        self.blur = nn.AvgPool2d(kernel_size=2, stride=1, padding=1) if blur is None else blur

    def forward(self, x):
        if hasattr(self, "bn"):
            x = self.bn(x)
        x = self.temp * self.tanh(x / self.temp)
        return self.blur(self.relu(x))


class PaperNet(nn.Module):
    """A small net holding every paper module (and a stride-2 pool that must be left alone)."""

    def __init__(self, window=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.local = LocalAttention(8, 8, window_size=window, heads=2, dim_head=4)
        self.conv_attn = ConvAttention2d(8, 8, heads=2, dim_head=4, kernel_size=3, padding=1)
        self.smooth = TanhBlurBlock(8)
        self.smooth_bn = TanhBlurBlock(8, bn=True)
        self.blur = nn.AvgPool2d(2, 1, 1)
        self.pool = nn.AvgPool2d(2, 2)
        self.binomial = TanhBlurBlock(8, blur=Blur(8))
        self.conv_bad = ConvAttention2d(8, 8, heads=2, dim_head=4, kernel_size=3, padding=0)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.local(x)[0]
        x = x + self.conv_attn(x)[0]
        x = self.smooth(x * 4)  # 8x8 -> 9x9
        x = self.smooth_bn(x)  # -> 10x10
        x = self.blur(x)  # -> 11x11
        x = self.binomial(x)  # -> 11x11
        return self.pool(x)


# =============================================================================================
# Helpers: compare a model and its swapped copy
# =============================================================================================
def randomise(model: nn.Module, std: float = 0.5) -> None:
    """Tables and logit scales start at zero / constants in HF; make them matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias_table" in name or "pos_embedding" in name or "logit_scale" in name:
                p.normal_(0, std)


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_same(original, swapped, run, *, rtol=1e-4):
    """Same outputs, same state-dict keys, same gradients (relative to each tensor's size)."""
    assert list(original.state_dict()) == list(swapped.state_dict())
    out_a, out_b = run(original), run(swapped)
    scale = out_a.abs().max().item()
    assert (out_a - out_b).abs().max().item() <= rtol * scale + 1e-6
    g = torch.randn_like(out_a)
    ga = grads_of(original, (out_a * g).sum())
    gb = grads_of(swapped, (out_b * g).sum())
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        s = ga[name].abs().max().item()
        err = (ga[name] - gb[name]).abs().max().item()
        assert err <= 20 * rtol * s + 1e-6, f"gradient of {name} differs by {err:.3e} (max {s:.3e})"


# =============================================================================================
# Hugging Face Swin / Swin V2
# =============================================================================================
transformers = pytest.importorskip("transformers")

HF_CASES = {  # image, window: grid 16 or 14 (patch 2); stage 2 at 8 or 7
    "div-w4": (32, 4),  # 16/8: multiples of 4, shifted layers
    "pad-w4": (28, 4),  # 14/7: padded to 16/8, shifted
    "pad-w7": (32, 7),  # 16 -> 21 (shifted); stage 2 8 -> 14 (shifted)
    "div-w7": (28, 7),  # 14 (shifted); stage 2 7 = window: shift dropped by HF
}


def hf_model(version: int, image: int, window: int, **cfg):
    cfg = {"depths": (2, 2), "num_heads": (2, 4), **cfg}
    if version == 1:
        config = transformers.SwinConfig(image_size=image, patch_size=2, embed_dim=24, window_size=window, **cfg)
        model = transformers.SwinModel(config)
    else:
        config = transformers.Swinv2Config(image_size=image, patch_size=2, embed_dim=24, window_size=window, **cfg)
        model = transformers.Swinv2Model(config)
    torch.manual_seed(0)
    randomise(model)
    return model.eval()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_swin_reference_backend(version, case):
    image, window = HF_CASES[case]
    model = hf_model(version, image, window)
    swapped = copy.deepcopy(model)
    params_before = [id(p) for p in swapped.parameters()]
    report = alterops.swap(swapped, backend="reference")
    kind = "hf_swin" if version == 1 else "hf_swinv2"
    assert report.count(kind) == 4 and not report.skipped, str(report)
    assert [id(p) for p in swapped.parameters()] == params_before
    shifts = [getattr(swapped.encoder.layers[0].blocks[1], "shift_size")]
    assert shifts[0] > 0  # a shifted layer is exercised
    torch.manual_seed(1)
    x = torch.randn(2, 3, image, image)
    check_same(model, swapped, lambda m: m(x).last_hidden_state)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("version", [1, 2])
def test_hf_swin_fused_backends(version, backend):
    dev = backend_device("window_attention2d", backend)
    interpreter = backend == "triton" and dev.type == "cpu"
    image, window = (20, 4) if interpreter else HF_CASES["pad-w7"]  # interpreter: grid 10 -> padded to 12
    stages = dict(depths=(2,), num_heads=(2,)) if interpreter else {}  # one stage: unshifted + shifted layer
    model = hf_model(version, image, window, **stages).to(dev)
    swapped = copy.deepcopy(model)
    alterops.swap(swapped, backend=backend)
    torch.manual_seed(1)
    x = torch.randn(1 if interpreter else 2, 3, image, image, device=dev)
    check_same(model, swapped, lambda m: m(x).last_hidden_state)


def test_hf_swin_for_classification_compile_and_fallbacks():
    model = hf_model(1, 28, 4)
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"  # attention weights exist only on the eager path
    clf = transformers.SwinForImageClassification(config).eval()
    torch.manual_seed(0)
    randomise(clf)
    swapped = copy.deepcopy(clf)
    report = alterops.swap(swapped)
    assert report.count("hf_swin") == 4
    x = torch.randn(2, 3, 28, 28)
    check_same(clf, swapped, lambda m: m(x).logits)
    # torch.compile of the swapped model (full graph) gives the same logits and gradients
    compiled = torch.compile(swapped, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(pixel_values=x).logits, clf(x).logits, rtol=1e-4, atol=1e-5)
    # gradients of the compiled swapped model equal the eager original's, parameter by parameter
    compiled(pixel_values=x).logits.square().sum().backward()
    clf(x).logits.square().sum().backward()
    ours, theirs = dict(swapped.named_parameters()), dict(clf.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in theirs.items():
        if p.requires_grad:
            assert ours[name].grad is not None, name
            torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"gradient of {name}: {m}")
    # attention weights requested: the original forward runs, so they come back
    out = swapped(x, output_attentions=True)
    ref = clf(x, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions) == 2
    torch.testing.assert_close(out.attentions[-1], ref.attentions[-1])


def test_hf_swin_copies_in_other_models():
    # DonutSwin keeps SwinLayer's forward (4.x layout, no head_mask): swapped; MaskFormer's Swin
    # differs (no window clamping in its forward): reported skipped.
    cfg = dict(image_size=28, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4)
    torch.manual_seed(0)
    donut = transformers.DonutSwinModel(transformers.DonutSwinConfig(**cfg)).eval()
    randomise(donut)
    swapped = copy.deepcopy(donut)
    assert alterops.swap(swapped).count("hf_swin") == 4
    x = torch.randn(2, 3, 28, 28)
    check_same(donut, swapped, lambda m: m(x).last_hidden_state)
    # (from their modules: transformers 4.40 does not export them at the top level)
    from transformers.models.maskformer.configuration_maskformer_swin import MaskFormerSwinConfig
    from transformers.models.maskformer.modeling_maskformer_swin import MaskFormerSwinModel

    mask_former = MaskFormerSwinModel(MaskFormerSwinConfig(**cfg))
    report = alterops.swap(mask_former)
    assert report.count() == 0 and len(report.skipped) == 4
    assert all("MaskFormerSwinLayer" in why for _, _, why in report.skipped)


def test_hf_swin_training_with_dropout_falls_back():
    model = hf_model(1, 32, 4, attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1).train()
    swapped = copy.deepcopy(model)
    alterops.swap(swapped)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    a = model(x).last_hidden_state
    torch.manual_seed(5)
    b = swapped(x).last_hidden_state
    torch.testing.assert_close(a, b)


def test_hf_swin_autocast_bfloat16():
    model = hf_model(1, 32, 4)
    swapped = copy.deepcopy(model)
    alterops.swap(swapped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x).last_hidden_state, swapped(x).last_hidden_state
    assert b.dtype == a.dtype
    assert (a.float() - b.float()).abs().max() < 0.1 * a.float().abs().max()


# transformers 4.x laid SwinLayer out differently (attention.self.query/key/value, attention.output,
# intermediate/output); a layer with that structure and forward, written from the 4.x source,
# checks that path of the swap without installing an old transformers.
class _V4SelfAttention(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, dim // heads
        self.window_size = (window, window)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.5)
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        index = (ys[:, None] - ys[None, :] + window - 1) * (2 * window - 1) + (xs[:, None] - xs[None, :] + window - 1)
        self.register_buffer("relative_position_index", index)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x, mask=None, head_mask=None, output_attentions=False):
        b, n, c = x.shape
        q, k, v = (l(x).view(b, n, self.num_attention_heads, -1).transpose(1, 2) for l in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        scores = scores + bias.permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            scores = (scores.view(b // nw, nw, -1, n, n) + mask[None, :, None]).view(-1, self.num_attention_heads, n, n)
        probs = self.dropout(scores.softmax(-1))
        if head_mask is not None:
            probs = probs * head_mask
        ctx = (probs @ v).transpose(1, 2).reshape(b, n, c)
        return (ctx, probs) if output_attentions else (ctx,)


class _V4Dense(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.dense, self.dropout = nn.Linear(dim_in, dim_out), nn.Dropout(0.0)

    def forward(self, x, *unused):
        return self.dropout(self.dense(x))


class _V4Attention(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.self, self.output = _V4SelfAttention(dim, heads, window), _V4Dense(dim, dim)

    def forward(self, x, mask=None, head_mask=None, output_attentions=False):
        out = self.self(x, mask, head_mask, output_attentions)
        return (self.output(out[0], x),) + out[1:]


class SwinLayer(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.shift_size, self.window_size = shift, window
        self.layernorm_before = nn.LayerNorm(dim)
        self.attention = _V4Attention(dim, heads, window)
        self.drop_path = nn.Identity()
        self.layernorm_after = nn.LayerNorm(dim)
        self.intermediate = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU())
        self.output = _V4Dense(2 * dim, dim)

    def set_shift_and_window_size(self, resolution):
        if min(resolution) <= self.window_size:
            self.shift_size, self.window_size = 0, min(resolution)

    def maybe_pad(self, x, height, width):
        pad_r = (self.window_size - width % self.window_size) % self.window_size
        pad_b = (self.window_size - height % self.window_size) % self.window_size
        return F.pad(x, (0, 0, 0, pad_r, 0, pad_b)), (0, 0, 0, pad_r, 0, pad_b)

    def forward(self, hidden_states, input_dimensions, head_mask=None, output_attentions=False, always_partition=False):
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        H, W = input_dimensions
        B, _, C = hidden_states.shape
        w, s = self.window_size, self.shift_size
        shortcut = hidden_states
        x, _ = self.maybe_pad(self.layernorm_before(hidden_states).view(B, H, W, C), H, W)
        Hp, Wp = x.shape[1:3]
        x = torch.roll(x, (-s, -s), (1, 2)) if s else x
        win = x.view(B, Hp // w, w, Wp // w, w, C).transpose(2, 3).reshape(-1, w * w, C)
        mask = SwinTransformerBlock.attn_mask(SimpleNamespace(window_size=(w, w), shift_size=(s, s)), Hp, Wp)
        outs = self.attention(win, mask, head_mask, output_attentions=output_attentions)
        x = outs[0].view(B, Hp // w, Wp // w, w, w, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        x = torch.roll(x, (s, s), (1, 2)) if s else x
        x = x[:, :H, :W].reshape(B, H * W, C)
        hidden_states = shortcut + self.drop_path(x)
        out = hidden_states + self.output(self.intermediate(self.layernorm_after(hidden_states)))
        return (out, outs[1]) if output_attentions else (out,)


SwinLayer.__module__ = "transformers.models.swin.modeling_swin"  # matched like the library's class


@pytest.mark.parametrize("hw", [(8, 8), (6, 7)], ids=["divisible", "padded"])
def test_transformers_v4_layout(hw):
    torch.manual_seed(0)
    layers = nn.ModuleList([SwinLayer(16, 2, 4, 0), SwinLayer(16, 2, 4, 2)]).eval()
    swapped = copy.deepcopy(layers)
    report = alterops.swap(swapped)
    assert report.count("hf_swin") == 2, str(report)
    x = torch.randn(2, hw[0] * hw[1], 16)

    def run(m):
        h = x
        for layer in m:
            h = layer(h, hw)[0]
        return h

    check_same(layers, swapped, run)
    # head_mask / output_attentions take the original path
    hm = torch.rand(2)[None, :, None, None]
    torch.testing.assert_close(swapped[1](x, hw, hm, True)[1], layers[1](x, hw, hm, True)[1])


# =============================================================================================
# timm's SwinTransformerBlock
# =============================================================================================
class TimmWindowAttention(nn.Module):
    """timm 1.0 WindowAttention's structure (qkv Linear, proj, per-head table indexed query - key)."""

    def __init__(self, dim, num_heads, window_size, qkv_bias=True, attn_drop=0.0):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * wh - 1) * (2 * ww - 1), num_heads) * 0.5)
        ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        index = (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, self.num_heads, N, N) + mask[None, :, None]).view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B_, N, -1)))


class SwinTransformerBlock(nn.Module):
    """timm >= 0.9 block semantics: roll the map, then zero-pad it, mask on the padded size."""

    def __init__(self, dim, num_heads, window_size=(4, 4), shift_size=(0, 0), qkv_bias=True):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmWindowAttention(dim, num_heads, window_size, qkv_bias)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop_path2 = nn.Identity()

    def attn_mask(self, Hp, Wp):  # also called with a namespace (the 4.x-layout layer above)
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        if not (sh or sw):
            return None
        img = torch.zeros(Hp, Wp)
        cnt = 0
        for hs in ((0, Hp - wh), (Hp - wh, Hp - sh), (Hp - sh, Hp)):
            for ws in ((0, Wp - ww), (Wp - ww, Wp - sw), (Wp - sw, Wp)):
                img[hs[0]:hs[1], ws[0]:ws[1]] = cnt
                cnt += 1
        win = img.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        diff = win[:, None, :] - win[:, :, None]
        return diff.masked_fill(diff != 0, -100.0)

    def _attn(self, x):
        B, H, W, C = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        x = torch.roll(x, (-sh, -sw), (1, 2)) if (sh or sw) else x
        Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        win = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)
        out = self.attn(win, mask=self.attn_mask(Hp, Wp))
        out = out.view(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        out = out[:, :H, :W]
        return torch.roll(out, (sh, sw), (1, 2)) if (sh or sw) else out

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


@pytest.mark.parametrize("hw", [(8, 8), (7, 10)], ids=["divisible", "padded"])
@pytest.mark.parametrize("shift", [(0, 0), (2, 1)], ids=["unshifted", "shifted"])
def test_timm_shaped_block(shift, hw):
    torch.manual_seed(0)
    blocks = nn.Sequential(SwinTransformerBlock(16, 2, (4, 3), (0, 0)),
                           SwinTransformerBlock(16, 2, (4, 3), shift)).eval()
    swapped = copy.deepcopy(blocks)
    report = alterops.swap(swapped)
    assert report.count("timm_swin") == 2
    x = torch.randn(2, *hw, 16)
    check_same(blocks, swapped, lambda m: m(x))


def test_real_timm_swin():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(56, 56), window_size=(4, 4),
                              embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=5).eval()
    randomise(model)
    swapped = copy.deepcopy(model)
    report = alterops.swap(swapped)
    assert report.count("timm_swin") == 4, str(report)
    x = torch.randn(2, 3, 56, 56)
    check_same(model, swapped, lambda m: m(x))


# =============================================================================================
# The papers' modules
# =============================================================================================
def test_paper_modules_report():
    net = PaperNet()
    report = alterops.swap(net)
    replaced = {name: kind for name, kind, _ in report.replaced}
    assert replaced == {"local": "local_attention", "conv_attn": "conv_attention", "smooth": "tanh_blur",
                        "smooth_bn": "tanh_blur", "blur": "box_blur"}
    skipped = {name: reason for name, _, reason in report.skipped}
    assert "stride" in skipped["pool"]
    assert "box filter" in skipped["binomial"]
    assert "padding 0" in skipped["conv_bad"]
    assert "replaced" in str(report) and "skipped" in str(report)
    # only the blur group
    net2 = PaperNet()
    r2 = alterops.swap(net2, ops="blur")
    assert {k for _, k, _ in r2.replaced} == {"tanh_blur", "box_blur"}
    assert type(net2.local) is LocalAttention


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_modules_same_function(backend):
    for op in ("window_attention2d", "neighborhood_attention2d", "tanh_blur2d", "box_blur2d"):
        dev = backend_device(op, backend)
    torch.manual_seed(0)
    net = PaperNet().to(dev).train()  # BN in training mode: batch statistics
    randomise(net)
    del net.conv_bad  # the original fails on its own (unfold without padding)
    swapped = copy.deepcopy(net)
    alterops.swap(swapped, backend=backend)
    assert type(swapped.local).__name__ == "FusedLocalAttention" and isinstance(swapped.local, LocalAttention)
    x = torch.randn(2, 3, 8, 8, device=dev)
    check_same(net, swapped, lambda m: m(x))


def test_paper_local_attention_external_mask_and_compile():
    torch.manual_seed(0)
    m = LocalAttention(8, 12, window_size=4, heads=3, dim_head=4).eval()
    randomise(m)
    s = copy.deepcopy(m)
    alterops.swap(s)
    x = torch.randn(2, 8, 8, 12)
    mask = torch.randn(16, 16)
    torch.testing.assert_close(s(x, mask)[0], m(x, mask)[0])  # original path, attention returned
    out, attn = s(x)
    assert attn is None
    compiled = torch.compile(s, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x)[0], m(x)[0], rtol=1e-5, atol=1e-5)


# =============================================================================================
# Mechanics: deepcopy, pickle, unswap, swapping twice, errors
# =============================================================================================
def test_pickle_deepcopy_unswap():
    torch.manual_seed(0)
    net = PaperNet().eval()
    del net.conv_bad
    ref = copy.deepcopy(net)
    alterops.swap(net, backend="reference")
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    clone = pickle.loads(pickle.dumps(net))
    assert type(clone.local) is type(net.local)
    torch.testing.assert_close(clone(x), y)
    torch.testing.assert_close(copy.deepcopy(net)(x), y)
    again = alterops.swap(net, backend="cpu" if dispatch.registry()["window_attention2d"].why_not(
        "cpu", torch.device("cpu"), torch.float32) is None else None)
    assert all("already swapped" in d for _, _, d in again.replaced) and len(again.replaced) == 5
    assert swap_module.unswap(net) == 5
    assert type(net.local) is LocalAttention and type(net.blur) is nn.AvgPool2d
    torch.testing.assert_close(net(x), ref(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="ops"):
        alterops.swap(nn.Linear(2, 2), ops=("attention", "norm"))
    with pytest.raises(TypeError, match="nn.Module"):
        alterops.swap(lambda x: x)
    with pytest.raises(ValueError, match="backend"):
        alterops.swap(nn.Linear(2, 2), backend="fpga")
    assert alterops.swap(nn.Linear(2, 2)).count() == 0


# ---------------------------------------------------------------------------------------
# NATTEN's NeighborhoodAttention1D/2D/3D (0.20+), matched by structure
# ---------------------------------------------------------------------------------------
class NattenLikeNA(torch.nn.Module):
    """The layout of natten.NeighborhoodAttention{1,2,3}D (0.21): na_dim, qkv, proj, per-axis
    tuples; its forward written here as NATTEN's module computes it (with the brute force of the
    op), so the test needs no natten."""

    def __init__(self, na_dim, embed_dim, num_heads, kernel_size, stride, dilation, is_causal):
        super().__init__()
        self.na_dim, self.embed_dim, self.num_heads = na_dim, embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size, self.stride, self.dilation, self.is_causal = kernel_size, stride, dilation, is_causal
        self.qkv = torch.nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = torch.nn.Linear(embed_dim, embed_dim)
        self.proj_drop = torch.nn.Dropout(0.0)

    def forward(self, x):
        from na_brute_force import brute_force

        B, *spatial, C = x.shape
        q, k, v = self.qkv(x).reshape(B, *spatial, 3, self.num_heads, self.head_dim).unbind(-3)
        out, _ = brute_force(q, k, v, self.kernel_size, self.dilation, self.stride, self.is_causal, "clamp",
                             scale=self.scale)
        return self.proj_drop(self.proj(out.to(x.dtype).reshape(B, *spatial, C)))


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_swap_natten_modules_matches_their_math(na_dim):
    cfg = {1: ((13,), (4,), (2,), (1,), (True,)),
           2: ((7, 9), (3, 4), (1, 2), (2, 1), (False, True)),
           3: ((4, 5, 6), (3, 2, 3), (1, 1, 3), (1, 2, 1), (True, False, False))}[na_dim]
    spatial, kernel, stride, dilation, causal = cfg
    torch.manual_seed(na_dim)
    m = NattenLikeNA(na_dim, 12, 3, kernel, stride, dilation, causal).double()
    x = torch.randn(2, *spatial, 12, dtype=torch.float64, requires_grad=True)
    ref = m(x)
    ref_grads = torch.autograd.grad(ref.sum(), [x, *m.parameters()])
    keys = list(m.state_dict())
    report = alterops.swap(m)
    assert [kind for _, kind, _ in report.replaced] == ["natten_na"], str(report)
    assert list(m.state_dict()) == keys and isinstance(m, NattenLikeNA)
    out = m(x)
    assert (out - ref).abs().max() < 1e-10
    for a, b in zip(torch.autograd.grad(out.sum(), [x, *m.parameters()]), ref_grads):
        assert (a - b).abs().max() < 1e-10
    assert m.float()(x.float()).dtype == torch.float32  # float32 runs the fused kernels (cpu)


def test_swap_real_natten_module():
    natten = pytest.importorskip("natten")
    import warnings

    torch.manual_seed(0)
    m = natten.NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=(3, 4), stride=(1, 2),
                                       dilation=(2, 1), is_causal=(False, True))
    x = torch.randn(2, 9, 10, 32)
    with warnings.catch_warnings(), torch.no_grad():  # NATTEN's CPU (Flex, eager) path has no backward
        warnings.simplefilter("ignore")
        ref = m(x)
    report = alterops.swap(m)
    assert [kind for _, kind, _ in report.replaced] == ["natten_na"], str(report)
    out = m(x)
    assert (out - ref).abs().max() < 1e-5
    out.sum().backward()  # the swapped module trains on the CPU
    assert m.qkv.weight.grad is not None and torch.isfinite(m.qkv.weight.grad).all()
