"""Model-level benchmark cases: whole training steps and forwards with the fused ops swapped in.

* ``alternet50_cifar_train_step_b{B}``: one forward + backward (cross-entropy, gradients of every
  parameter; no optimizer step) of the CIFAR Alter-ResNet-50 (``alternet50(100)``, train mode,
  stochastic depth off so that every call does the same work), B×3×32×32. Ours: the fused
  backend chosen automatically (``cpu`` on the CPU, ``triton`` on CUDA); peer ``reference ops``:
  the same model and weights with every op on the ``reference`` backend (plain PyTorch, as the
  paper's code). Throughput in images/s is ``B / median time``.
* ``alternet50_cifar_msa_blocks_train_step_b{B}``: the same, restricted to the model's four MSA
  blocks at their CIFAR input shapes (16×16×512, 8×8×1024, 4×4×2048 twice): the part of the step the
  fused op changes (the 13 bottlenecks are identical on both sides).
* ``hf_swin_t_fwd_b{B}`` / ``hf_swin_t_train_step_b{B}``: Hugging Face ``SwinModel(SwinConfig())``
  (Swin-T: 224², window 7, embed 96, depths 2-2-6-2; random weights, eval mode) before
  (peer ``HF Swin-T``, its default attention implementation) and after ``alterops.swap`` (ours).
  The train step backpropagates ``mean(last_hidden_state²)``.
* ``timm_swin_t_train_step_b{B}`` (when timm is importable): the same for timm's
  ``swin_tiny_patch4_window7_224`` (``forward_features``; timm's attention uses PyTorch SDPA).
* Quick mode (``--quick``): B=2 for the AlterNet cases and B=1 for Swin-T, and the names say so
  (``..._b2``, ``..._b1``).
* The Swin-T cases need transformers (in ``alterops[bench]``) or timm (not in it: timm pulls in
  torchvision, which has to match the installed torch build); without them the cases are reported
  as left out, with the reason.
* Each model case also profiles one call of ours and reports the time spent inside alterops'
  ops, and the speedup over the peer if those ops took no time (``bounds``; Amdahl's law).

``flops`` and ``bytes`` are 0 (these are throughput cases; the op-level cases report rates).
CPU: float32; CUDA: float32 for the train steps, bfloat16 autocast off (same dtype both sides).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import alterops
from alterops.models import MSABlock, alternet50

from .registry import Case, Workload, register

TARGET = 1.3


def _set_backend(model, backend):
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def _close_check(ours, peer, rtol=2e-3):
    def check():
        a, b = ours(), peer()
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        if err > rtol * scale + 1e-5:
            raise AssertionError(f"outputs differ by {err:.3e} (max {scale:.3e})")

    return check


# ---------------------------------------------------------------------------------------------
# AlterNet
# ---------------------------------------------------------------------------------------------
def _alternet_pair(device):
    torch.manual_seed(0)
    fused = alternet50(100, "cifar", drop_path=0.0).to(device)
    reference = _set_backend(copy.deepcopy(fused), "reference")
    return fused, reference


def _make_alternet_step(batch):
    def make(device, quick):
        B = 2 if quick else batch
        fused, reference = _alternet_pair(device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 100, (B,), generator=g).to(device)

        def step(model):
            def run():
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            return run

        def forward(model):
            def run():
                with torch.no_grad():
                    return model.eval()(x)

            return run

        def check():
            # the timed steps update the BatchNorm running statistics of each model by its own
            # number of calls: compare the two with the same statistics
            reference.load_state_dict(fused.state_dict())
            _close_check(forward(fused), forward(reference))()
            fused.train(), reference.train()

        return Workload(ours=step(fused), peers={"reference ops": step(reference)},
                        targets={"speedup:reference ops": TARGET}, check=check, profile_ours=True,
                        note=f"CIFAR Alter-ResNet-50 fwd+bwd, B={B} 32x32; images/s = {B} / median s",
                        label=f"alternet50_cifar_train_step_b{B}")

    return make


def _make_msa_blocks(batch):
    def make(device, quick):
        B = 2 if quick else batch
        fused, reference = _alternet_pair(device)
        blocks_f = [m for m in fused.modules() if isinstance(m, MSABlock)]
        blocks_r = [m for m in reference.modules() if isinstance(m, MSABlock)]
        g = torch.Generator().manual_seed(1)
        shapes = [(512, 16), (1024, 8), (2048, 4), (2048, 4)]
        xs = [torch.randn(B, c, s, s, generator=g).to(device) for c, s in shapes]

        def step(blocks):
            def run():
                total = 0.0
                for blk, x in zip(blocks, xs):
                    blk.zero_grad(set_to_none=True)
                    y = blk(x)
                    y.square().mean().backward()
                    total += float(y.detach().abs().mean())
                return torch.tensor(total)

            return run

        return Workload(ours=step(blocks_f), peers={"reference ops": step(blocks_r)},
                        targets={"speedup:reference ops": TARGET}, check=_close_check(step(blocks_f), step(blocks_r)),
                        profile_ours=True,
                        note=f"the 4 MSA blocks of CIFAR AlterNet-50, fwd+bwd, B={B}",
                        label=f"alternet50_cifar_msa_blocks_train_step_b{B}")

    return make


# ---------------------------------------------------------------------------------------------
# Swin-T: Hugging Face transformers and timm
# ---------------------------------------------------------------------------------------------
def _randomise_tables(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.02)


def _swin_pair(device, family):
    torch.manual_seed(0)
    if family == "hf":
        from transformers import SwinConfig, SwinModel

        peer = SwinModel(SwinConfig())
    else:
        import timm

        peer = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)
    peer = peer.to(device).eval()
    _randomise_tables(peer)
    ours = copy.deepcopy(peer)
    report = alterops.swap(ours)
    if report.count() == 0:
        raise RuntimeError(f"alterops.swap replaced nothing in Swin-T:\n{report}")
    return ours, peer


def _make_swin(batch, train, family="hf"):
    peer_name = "HF Swin-T" if family == "hf" else "timm Swin-T"

    def make(device, quick):
        B = 1 if quick else batch
        size = 224
        ours_m, peer_m = _swin_pair(device, family)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, 3, size, size, generator=g).to(device)

        def features(model):
            if family == "hf":
                return model(pixel_values=x).last_hidden_state
            return model.forward_features(x)

        def run(model):
            if train:
                def f():
                    model.zero_grad(set_to_none=True)
                    out = features(model)
                    out.square().mean().backward()
                    return out.detach()
            else:
                def f():
                    with torch.no_grad():
                        return features(model)
            return f

        what = "fwd+bwd" if train else "forward"
        model_name = "HF SwinModel(SwinConfig())" if family == "hf" else "timm swin_tiny_patch4_window7_224"
        return Workload(ours=run(ours_m), peers={peer_name: run(peer_m)}, targets={f"speedup:{peer_name}": TARGET},
                        check=_close_check(run(ours_m), run(peer_m)), profile_ours=True,
                        note=f"{model_name} {what}, B={B} {size}x{size}, swapped vs original",
                        label=f"{family}_swin_t_{'train_step' if train else 'fwd'}_b{B}")

    return make


TRANSFORMERS = {"transformers": "pip install 'alterops[bench]' (or pip install transformers)"}
TIMM = {"timm": "pip install timm (not in alterops[bench]: it pulls in torchvision, which has to match "
                "the installed torch build)"}

register(Case("models", "alternet50_cifar_train_step_b8", _make_alternet_step(8), default=True, max_repeats=5))
register(Case("models", "alternet50_cifar_msa_blocks_train_step_b16", _make_msa_blocks(16), default=True,
              max_repeats=10))
register(Case("models", "hf_swin_t_fwd_b8", _make_swin(8, train=False), default=True, max_repeats=5,
              requires=TRANSFORMERS))
register(Case("models", "hf_swin_t_train_step_b8", _make_swin(8, train=True), default=True, max_repeats=5,
              requires=TRANSFORMERS))
register(Case("models", "timm_swin_t_train_step_b8", _make_swin(8, train=True, family="timm"), default=True,
              max_repeats=5, requires=TIMM))
