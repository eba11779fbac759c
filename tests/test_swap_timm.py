"""alterops.swap on real timm models (skipped where timm is not installed).

``timm.create_model(name, pretrained=False)`` for Swin (v1), Swin-S3, Swin V2 and SwinV2-CR, at an
80x80 input so that every case of the blocks occurs (grid 20 → stage maps 20, 10, 5, 3: maps padded
to the window 7 or 8 in shifted and unshifted blocks, windows clamped to the map in the late stages).
The swapped model must keep its state-dict keys and parameter objects and compute, in float64, the
original's outputs and the gradients of the input and of every parameter (bias tables, the Swin V2
CPB / meta MLPs and logit scales included) to 1e-10 relative, with the ``cpu`` and the
``reference`` backends. The report must account for every attention-like module.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import alterops
from alterops.swap import unswap
from helpers import skip_unless

timm = pytest.importorskip("timm")

IMG = 80
# name -> (family, blocks swapped, create_model arguments)
MODELS = {
    "swin_tiny_patch4_window7_224": ("timm_swin", 12, {}),
    "swin_s3_tiny_224": ("timm_swin", 12, {}),
    "swinv2_tiny_window8_256": ("timm_swinv2", 12, {}),
    "swinv2_cr_tiny_224": ("timm_swinv2_cr", 12, {}),
}
TOL = 1e-10


def create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=IMG, num_classes=5, **kwargs)
    model = model.double().eval()
    randomise(model)
    return model


def randomise(model: nn.Module) -> None:
    """timm starts the Swin V2 post-norms at zero (the attention branch would add nothing), the
    q / v biases at zero and logit scales at log 10: make every one of them matter."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.1)
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 0.5)
            elif "logit_scale" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith(("q_bias", "v_bias")):
                p.normal_(0.0, 0.1)
            elif ("cpb_mlp" in name or "meta_mlp" in name) and p.dim() == 1:
                p.normal_(0.0, 0.1)


def attention_like(model: nn.Module) -> list:
    """Names of the modules that look like attention (written independently of alterops.swap)."""
    names = []
    for name, m in model.named_modules():
        cls = type(m).__name__.lower()
        if "attention" in cls or "attn" in cls or isinstance(m, nn.MultiheadAttention) or hasattr(m, "qkv"):
            names.append(name)
    return names


def unexplained(model: nn.Module, report) -> list:
    """Attention-like modules neither inside a replaced module nor listed as skipped with a reason."""
    replaced = [name for name, _, _ in report.replaced]
    skipped = {name: why for name, _, why in report.skipped}
    inside = lambda n, outer: n == outer or n.startswith(outer + ".")  # noqa: E731
    return [n for n in attention_like(model)
            if not any(inside(n, r) for r in replaced)
            and not any(inside(n, s) and skipped[s] for s in skipped)]


def run(model, x):
    """Output and the gradients of the input and of every parameter, for a fixed output weighting."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    g = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_rel(a, b, what, floor=0.0):
    """``a`` equals ``b`` to ``TOL`` relative to ``b``'s largest element (and to ``floor``: a
    gradient that is zero in exact arithmetic holds rounding noise only)."""
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= TOL * max(scale, floor, 1e-300), f"{what}: differs by {err:.3e} (max {scale:.3e})"


@pytest.mark.parametrize("name", list(MODELS))
def test_real_timm_model(name):
    family, blocks, kwargs = MODELS[name]
    skip_unless("window_attention2d", "cpu", torch.float64)
    model = create(name, **kwargs)
    torch.manual_seed(1)
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    out0, dx0, grads0 = run(model, x)
    top = max(g.abs().max().item() for g in grads0.values())

    # the attention branches matter: every parameter of every block's attention gets a gradient
    # (SwinV2-CR's last meta-MLP bias adds one constant per head to all logits of a query, which
    # softmax ignores: its gradient is zero in exact arithmetic)
    attn_params = [n for n, _ in model.named_parameters() if ".attn." in n and not n.endswith("meta_mlp.fc2.bias")]
    assert attn_params
    for n in attn_params:
        assert n in grads0 and grads0[n].abs().max() > 1e-9 * top, f"{n}: no gradient in the original model"
    classes = {n: type(m) for n, m in model.named_modules()}
    state = list(model.state_dict())
    params = [id(p) for p in model.parameters()]

    for backend in ("reference", "cpu"):  # swapped in place, compared, switched back
        report = alterops.swap(model, backend=backend)
        assert report.count(family) == blocks and report.count() == blocks, str(report)
        assert not report.skipped, str(report)
        assert unexplained(model, report) == []
        assert [id(p) for p in model.parameters()] == params
        assert list(model.state_dict()) == state
        shifts = [m.shift_size for m in model.modules() if hasattr(m, "shift_size") and hasattr(m, "attn")]
        assert any(any(s) for s in shifts) and any(not any(s) for s in shifts)

        out, dx, grads = run(model, x)
        assert_rel(out, out0, f"{backend}: output")
        assert_rel(dx, dx0, f"{backend}: input gradient")
        assert grads.keys() == grads0.keys()
        for n in grads0:
            assert_rel(grads[n], grads0[n], f"{backend}: gradient of {n}", floor=1e-4 * top)

        assert unswap(model) == blocks
        assert {n: type(m) for n, m in model.named_modules()} == classes


def test_swinv2_dynamic_mask_always_partition_other_size():
    """strict_img_size=False: masks built per call from the padded map; always_partition keeps the
    7x7 windows (and shift) on maps smaller than the window; a non-square input of another size."""
    skip_unless("window_attention2d", "cpu", torch.float64)
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64, window_size=7,
                              strict_img_size=False, always_partition=True, num_classes=3,
                              depths=(2, 2), num_heads=(3, 6)).double().eval()
    randomise(model)
    swapped = copy.deepcopy(model)
    report = alterops.swap(swapped, backend="cpu")
    assert report.count("timm_swinv2") == 4 and not report.skipped, str(report)
    assert all(m.window_size == (7, 7) and m.shift_size == (3, 3) for m in swapped.modules()
               if type(m).__name__ == "FusedSwinTransformerV2Block" and m.shift_size != (0, 0))
    x = torch.randn(1, 3, 52, 36, dtype=torch.float64)  # maps 13x9 then 7x5 (smaller than the window)
    out0, dx0, grads0 = run(model, x)
    out, dx, grads = run(swapped, x)
    assert_rel(out, out0, "output")
    assert_rel(dx, dx0, "input gradient")
    for n in grads0:
        assert_rel(grads[n], grads0[n], f"gradient of {n}")


def test_static_mask_size_mismatch_runs_the_original():
    """A block with a static mask (built for its input_resolution) called on a map of another
    padded size: the original's behaviour (here an error) is kept, not a silently different result;
    on a map that pads to the same size the fused path runs and agrees."""
    skip_unless("window_attention2d", "cpu", torch.float64)
    model = create("swin_tiny_patch4_window7_224")
    block = model.layers[0].blocks[1]  # 20x20 map, window 7, shift 3: mask for the padded 21x21
    assert block.shift_size == (3, 3) and not block.dynamic_mask
    fused = copy.deepcopy(block)
    assert alterops.swap(fused, backend="cpu").count("timm_swin") == 1
    calls = []
    original_op = alterops.window_attention2d

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original_op(*args, **kwargs)

    x = torch.randn(2, 16, 19, block.dim, dtype=torch.float64)  # pads to 21x21 as well
    alterops.window_attention2d = counting
    try:
        assert_rel(fused(x), block(x), "output on a 16x19 map")
        assert len(calls) == 1
        y = torch.randn(2, 22, 23, block.dim, dtype=torch.float64)  # pads to 28x28: 16 windows, not 9
        with pytest.raises(RuntimeError) as original_error:
            block(y)
        with pytest.raises(RuntimeError) as fused_error:
            fused(y)
        assert str(fused_error.value) == str(original_error.value)
        assert len(calls) == 1
    finally:
        alterops.window_attention2d = original_op


def test_training_with_dropout_runs_the_original():
    """Attention dropout (and SwinV2-CR's meta-MLP dropout, which makes its bias per pair rather than
    per offset) active in training: the original forward runs, same random stream, same result."""
    for name, kwargs in (("swin_tiny_patch4_window7_224", {"attn_drop_rate": 0.2}),
                         ("swinv2_tiny_window8_256", {"attn_drop_rate": 0.2}),
                         ("swinv2_cr_tiny_224", {})):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=64, window_size=4, depths=(2,),
                                  num_heads=(2,), embed_dim=16, num_classes=3, **kwargs).train()
        swapped = copy.deepcopy(model)
        assert alterops.swap(swapped).count() == 2
        x = torch.randn(2, 3, 64, 64)
        torch.manual_seed(5)
        a = model(x)
        torch.manual_seed(5)
        b = swapped(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        swapped.eval()
        model.eval()
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-4, atol=1e-5)


def test_report_lists_attention_it_leaves_alone():
    """Attention that no family fuses (a ViT's global attention, nn.MultiheadAttention, a module with
    q/k/v projections) is listed as skipped with a reason, once per outermost module."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    report = alterops.swap(vit)
    assert report.count() == 0
    skipped = {name: (fam, why) for name, fam, why in report.skipped}
    assert set(skipped) == {"blocks.0.attn", "blocks.1.attn"}, str(report)
    assert all(fam == "unrecognised" and "Attention" in why and "left as is" in why for fam, why in skipped.values())
    assert unexplained(vit, report) == []

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    net = nn.Sequential(nn.MultiheadAttention(8, 2), QKV(), nn.Linear(4, 4))
    report = alterops.swap(net)
    skipped = {name: why for name, _, why in report.skipped}
    assert set(skipped) == {"0", "1"}, str(report)
    assert "nn.MultiheadAttention" in skipped["0"] and "query/key/value" in skipped["1"]
    assert alterops.swap(net, ops="blur").skipped == []  # attention not asked for: not reported
