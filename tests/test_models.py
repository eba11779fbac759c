"""AlterNet and the pre-activation ResNet-50 baseline: layout, parameter counts, training steps per backend."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import alterops
import alterops._dispatch as dispatch
from alterops.models import AlterNet, MSABlock, alternet50, preresnet50
from alterops.models.preresnet import Bottleneck
from alterops.nn import NeighborhoodMSA2d, TanhBlur2d, WindowMSA2d
from helpers import device_for

FUSED = ("cpu", "triton", "cuda")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def block_kinds(stage: nn.Sequential) -> str:
    return "".join("M" if isinstance(b, MSABlock) else "C" for b in stage)


def runnable(op: str, backend: str) -> bool:
    if backend == "cuda" and not torch.cuda.is_available():
        return False
    return dispatch.registry()[op].why_not(backend, device_for(backend), torch.float32) is None


# ---------------------------------------------------------------------------------------------
# Parameter counts (PAPERS.md §2.3 table) and layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, millions",
    [
        (lambda: alternet50(100, "cifar"), 33.01),
        (lambda: alternet50(1000, "imagenet"), 35.92),
        (lambda: preresnet50(100, "cifar"), 23.70),
        (lambda: preresnet50(1000, "imagenet"), 25.55),
    ],
    ids=["alternet50-cifar100", "alternet50-imagenet", "preresnet50-cifar100", "preresnet50-imagenet"],
)
def test_parameter_counts(build, millions):
    assert round(n_params(build()) / 1e6, 2) == millions


def test_parameter_count_exact_cifar():
    # Analytic count: pre-act ResNet-50 body with a 4-block stage 4, plus per MSA block
    # BN(C) + 1x1 conv C->C/4 + BN(C/4) + qkv (C/4 -> 3*inner) + out (inner -> C, bias) + (2p-1)^2 table.
    model = alternet50(100, "cifar")
    msa = [m for m in model.modules() if isinstance(m, MSABlock)]
    assert len(msa) == 4
    expected_msa = 0
    for C, heads in ((512, 6), (1024, 12), (2048, 24), (2048, 24)):
        inner, w = heads * 64, C // 4
        expected_msa += 2 * C + C * w + 2 * w + w * 3 * inner + inner * C + C + 7 * 7
    assert sum(n_params(m) for m in msa) == expected_msa
    # smoothing adds no parameters; the neighbourhood variant's table is 5x5 instead of 7x7
    assert n_params(alternet50(100, smoothing=True)) == n_params(model)
    assert n_params(alternet50(100, attention="neighborhood")) == n_params(model) - 4 * (49 - 25)


@pytest.mark.parametrize("variant", ["cifar", "imagenet"])
def test_alternet_layout(variant):
    model = alternet50(100 if variant == "cifar" else 1000, variant)
    imagenet = variant == "imagenet"
    kinds = [block_kinds(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert kinds == (["CCC", "CCCM", "CMCMCM", "CMCM"] if imagenet else ["CCC", "CCCM", "CCCCCM", "CMCM"])
    stem = model.layer0.layer0
    if imagenet:
        assert stem[0].kernel_size == (7, 7) and stem[0].stride == (2, 2) and isinstance(stem[1], nn.MaxPool2d)
    else:
        assert len(stem) == 1 and stem[0].kernel_size == (3, 3) and stem[0].stride == (1, 1)
    assert stem[0].bias is None
    window = 7 if imagenet else 4
    for i, (heads, C) in enumerate(zip((3, 6, 12, 24), (256, 512, 1024, 2048)), start=1):
        stage = getattr(model, f"layer{i}")
        first = stage[0]
        assert isinstance(first, Bottleneck)
        assert first.conv2.stride == ((2, 2) if i > 1 else (1, 1))
        for block in stage:
            if isinstance(block, MSABlock):
                assert isinstance(block.relu, nn.GELU) and len(block.shortcut) == 0
                assert block.conv.in_channels == C and block.conv.out_channels == C // 4 and block.conv.bias is None
                assert isinstance(block.norm1, nn.BatchNorm2d) and isinstance(block.norm2, nn.BatchNorm2d)
                attn = block.attn
                assert isinstance(attn, WindowMSA2d)
                assert (attn.heads, attn.dim_head, attn.dim_in, attn.dim_out) == (heads, 64, C // 4, C)
                assert attn.window_size == (window, window) and attn.shift == (0, 0)
                assert attn.to_qkv.bias is None and attn.to_out.bias is not None
                assert attn.rel_pos_bias.shape == (1, 2 * window - 1, 2 * window - 1)
    head = model.classifier[0]
    assert isinstance(head.bn, nn.BatchNorm2d) and head.dense.in_features == 2048
    # stochastic depth grows linearly to drop_path over the 17 blocks
    rates = [b.sd.p if hasattr(b.sd, "p") else 0.0 for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    assert len(rates) == 17
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates[8] == pytest.approx(0.05)


def test_neighborhood_variant_and_smoothing_layout():
    model = alternet50(100, attention="neighborhood", smoothing=True)
    attns = [m for m in model.modules() if isinstance(m, NeighborhoodMSA2d)]
    assert len(attns) == 4 and all(a.kernel_size == (3, 3) and a.border == "clamp" for a in attns)
    big = alternet50(1000, "imagenet", attention="neighborhood")
    assert all(m.kernel_size == (7, 7) for m in big.modules() if isinstance(m, NeighborhoodMSA2d))
    # blur after stages 1-3, none before the classifier (PreResNet placement of the blur paper)
    for i in (1, 2, 3):
        smooth = getattr(model, f"smooth{i}")
        assert len(smooth) == 1 and isinstance(smooth[0], TanhBlur2d) and smooth[0].tau == 10.0
    assert not hasattr(model, "smooth4")
    assert len(alternet50(100).smooth1) == 0
    pre = preresnet50(100, "cifar", smoothing=True)
    assert [len(getattr(pre, f"smooth{i}")) for i in (1, 2, 3)] == [1, 1, 1]
    assert [len(getattr(pre, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert not any(isinstance(m, MSABlock) for m in pre.modules())


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        alternet50(10, "mnist")
    with pytest.raises(ValueError, match="attention"):
        alternet50(10, attention="global")
    with pytest.raises(ValueError, match="variant"):
        preresnet50(10, "tiny")
    with pytest.raises(ValueError, match="pairs"):
        AlterNet((3, 4, 6, 4), (0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Forward shapes, including maps that are not multiples of the window (smoothing grows them)
# ---------------------------------------------------------------------------------------------
def test_forward_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for model in (alternet50(100, smoothing=True).eval(), preresnet50(100, "cifar", smoothing=True).eval()):
            y = model(x)
            assert y.shape == (2, 100) and torch.isfinite(y).all()
        y = alternet50(1000, "imagenet").eval()(torch.randn(1, 3, 96, 96))  # maps 24/12/6/3: padded windows
        assert y.shape == (1, 1000) and torch.isfinite(y).all()
        assert alternet50(100).eval()(torch.randn(0, 3, 32, 32)).shape == (0, 100)


# ---------------------------------------------------------------------------------------------
# Training steps on synthetic data: loss falls; fused and reference give the same losses and grads
# ---------------------------------------------------------------------------------------------
VARIANTS = {
    "window": dict(),
    "neighborhood": dict(attention="neighborhood"),
    "window+smoothing": dict(smoothing=True),
}
OPS_USED = {
    "window": ("window_attention2d",),
    "neighborhood": ("neighborhood_attention2d",),
    "window+smoothing": ("window_attention2d", "tanh_blur2d"),
}


def train_steps(variant: str, backend: str, steps: int, *, full: bool, size: int = 32, device=None):
    """``steps`` SGD steps of a net whose fused ops run on ``backend``, on ``device`` (default:
    where that backend runs): (losses, first step's gradients on the CPU)."""
    torch.manual_seed(0)
    if full:
        model = alternet50(10, "cifar", drop_path=0.0, backend=backend, **VARIANTS[variant])
        x = torch.randn(2, 3, 32, 32)
    else:  # a small net of the same design (the Triton interpreter is slow)
        model = AlterNet((1, 2, 2, 2), (0, 1, 1, 1), (1, 2, 2, 2), widths=(8, 16, 16, 16), dim_head=16,
                         num_classes=10, window_size=4, backend=backend, **VARIANTS[variant])
        x = torch.randn(2, 3, size, size)  # 32: stage maps 32/16/8/4, the 3x3 clamped neighbourhood fits
    y = torch.tensor([3, 7])
    dev = device if device is not None else device_for(backend)
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    losses, grads = [], None
    for i in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if i == 0:
            grads = {n: p.grad.cpu().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_loss_falls_reference(variant):
    losses, grads = train_steps(variant, "reference", 5, full=False)
    assert losses[-1] < losses[0], losses
    assert all(torch.isfinite(g).all() for g in grads.values())
    attn_grads = [g for n, g in grads.items() if "rel_pos_bias" in n]
    assert attn_grads and all(g.abs().sum() > 0 for g in attn_grads)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_fused_matches_reference(variant, backend):
    missing = [op for op in OPS_USED[variant] if not runnable(op, backend)]
    if missing:
        pytest.skip(f"{backend!r} cannot run {missing} here")
    steps, size = 3, 32
    if backend == "triton" and not torch.cuda.is_available():  # the interpreter is slow: one step
        steps, size = 1, (32 if variant == "neighborhood" else 16)
    # the reference on the same device: the rest of the net (convolutions, norms) then runs the
    # same kernels in both, and only the fused ops differ
    ref_losses, ref_grads = train_steps(variant, "reference", steps, full=False, size=size,
                                        device=device_for(backend))
    losses, grads = train_steps(variant, backend, steps, full=False, size=size)
    assert steps == 1 or losses[-1] < losses[0]
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    assert_grads_match(grads, ref_grads)


@pytest.mark.parametrize("backend", FUSED)
def test_full_size_step_matches_reference(backend):
    # One step of the real CIFAR Alter-ResNet-50 (heads up to 24, dim_head 64, 4x4 windows).
    if not runnable("window_attention2d", backend):
        pytest.skip(f"{backend!r} cannot run window_attention2d here")
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter is too slow for the full-size net (the small net covers it)")
    ref_losses, ref_grads = train_steps("window", "reference", 1, full=True, device=device_for(backend))
    losses, grads = train_steps("window", backend, 1, full=True)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert_grads_match(grads, ref_grads)


def assert_grads_match(grads, ref_grads):
    for name, g in ref_grads.items():
        scale = g.abs().max().item() + 1e-12
        err = (grads[name] - g).abs().max().item()
        assert err <= 2e-3 * scale + 1e-7, f"{name}: gradient differs by {err:.3e} (max {scale:.3e})"


def test_autocast_bfloat16_forward():
    torch.manual_seed(0)
    model = AlterNet((1, 2, 2, 2), (0, 1, 1, 1), (1, 2, 2, 2), widths=(8, 16, 16, 16), dim_head=16,
                     num_classes=10, smoothing=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max() + 0.05
