"""Benchmark cases of the statistics ops against the paper's procedures in plain PyTorch.

Peers: ``torch_fft`` is the notebook's Δ log amplitude (``fft2`` → ``log(|.| + 1e-6)`` →
mean over (b, c) → ``fftshift`` → half diagonal minus DC); ``torch_var`` is
``x.var(dim=(2, 3)).mean()``. Workload: a (256, 512, 14, 14) float32 feature map (ImageNet
ResNet-50 stage 3 at batch 256); bytes = the input read once. The batched case runs the
statistics of every block of a CIFAR Alter-ResNet-50-like stack of maps in one call. Quick mode:
(2, 32, 14, 14) (maps of 2 x 8 channels for the batched case).
"""
from __future__ import annotations

import torch

import alterops as ao

from .registry import Case, Workload, register


def torch_fft_delta(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    h = x.shape[-2]
    a = torch.log(torch.fft.fft2(x).abs() + eps).mean(dim=(0, 1))
    a = torch.fft.fftshift(a, dim=(0, 1))
    d = a.diagonal()[h // 2:]
    return d - d[0]


def torch_var(x: torch.Tensor) -> torch.Tensor:
    return x.var(dim=(2, 3)).mean()


def _input(device, quick, shape=None):
    if shape is None and device.type == "cuda":
        # On a GPU the 103 MB map takes ~30 µs, the same order as the per-call host overhead
        # (validation, dispatch, two launches) that the event timing includes: the default GPU
        # case uses batch 1024 (411 MB); ``*_gpu_b256`` keeps the CPU shape.
        shape = (1024, 512, 14, 14)
    elif shape is None:
        shape = (256, 512, 14, 14)
    if quick:
        shape = (2, 32) + tuple(shape[2:])
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(device)


def _check(ours, peer, rtol, atol):
    def check():
        torch.testing.assert_close(ours().float(), peer().float(), rtol=rtol, atol=atol)

    return check


def _label(name, x, shape):
    """Cases named with their batch (``*_b256``) report the batch they ran."""
    return f"{name}_b{x.shape[0]}" if shape is not None else ""


def _delta_case(ceiling_target, shape=None):
    def make(device, quick):
        x = _input(device, quick, shape)

        def ours():
            return ao.delta_log_amplitude(x)

        def peer():
            return torch_fft_delta(x)

        return Workload(
            ours=ours,
            peers={"torch_fft": peer},
            bytes=x.numel() * x.element_size(),
            ceiling="bandwidth",
            targets={"speedup:torch_fft": 30.0, "ceiling": ceiling_target} if device.type == "cpu"
            else {"ceiling": ceiling_target},
            check=_check(ours, peer, 1e-4, 1e-4),
            note=f"float32 {tuple(x.shape)}; diagonal DFT bins from anti-diagonal sums, one read",
            label=_label("delta_log_amplitude_fwd_gpu", x, shape),
        )

    return make


def _variance_case(ceiling_target, shape=None):
    def make(device, quick):
        x = _input(device, quick, shape)

        def ours():
            return ao.feature_variance(x)

        def peer():
            return torch_var(x)

        return Workload(
            ours=ours,
            peers={"torch_var": peer},
            bytes=x.numel() * x.element_size(),
            ceiling="bandwidth",
            targets={"speedup:torch_var": 10.0} if device.type == "cpu" else {"ceiling": ceiling_target},
            check=_check(ours, peer, 1e-5, 1e-6),
            note=f"float32 {tuple(x.shape)}; unbiased variance per plane, mean over planes",
            label=_label("feature_variance_fwd_gpu", x, shape),
        )

    return make


# Every block output of a CIFAR Alter-ResNet-50 at batch 64: stem + 3 blocks at 32x32 (256 ch.),
# 4 at 16x16 (512), 6 at 8x8 (1024), 4 at 4x4 (2048) — 18 maps of four shapes.
_ALTERNET_MAPS = [(64, 64, 32)] + [(64, 256, 32)] * 3 + [(64, 512, 16)] * 4 + [(64, 1024, 8)] * 6 + [(64, 2048, 4)] * 4


def _batched_make(device, quick):
    g = torch.Generator().manual_seed(0)
    shapes = [(2 if quick else b, 8 if quick else c, n, n) for b, c, n in _ALTERNET_MAPS]
    maps = [torch.randn(s, generator=g).to(device) for s in shapes]

    def peer():
        return [(torch_fft_delta(m), torch_var(m)) for m in maps]

    def ours():
        return ao.feature_statistics(maps)

    def check():
        for r, (d, v) in zip(ours(), peer()):
            torch.testing.assert_close(r["delta_log_amplitude"], d, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(r["feature_variance"], v, rtol=1e-5, atol=1e-6)

    return Workload(ours=ours, peers={"torch_fft+var": peer}, bytes=sum(m.numel() * m.element_size() for m in maps),
                    ceiling="bandwidth", targets={}, check=check,
                    note="18 block outputs of a CIFAR Alter-ResNet-50 (batch 64), both statistics, one call per op")


register(Case("statistics", "delta_log_amplitude_fwd", _delta_case(0.5), devices=("cpu",), max_repeats=20))
register(Case("statistics", "feature_variance_fwd", _variance_case(0.5), devices=("cpu",), max_repeats=20))
register(Case("statistics", "delta_log_amplitude_fwd_gpu", _delta_case(0.7), devices=("cuda",)))
register(Case("statistics", "feature_variance_fwd_gpu", _variance_case(0.7), devices=("cuda",)))
register(Case("statistics", "delta_log_amplitude_fwd_gpu_b256", _delta_case(0.7, (256, 512, 14, 14)),
              devices=("cuda",), default=False))
register(Case("statistics", "feature_variance_fwd_gpu_b256", _variance_case(0.7, (256, 512, 14, 14)),
              devices=("cuda",), default=False))
register(Case("statistics", "feature_statistics_alternet_blocks", _batched_make, devices=("cpu", "cuda"),
              default=False, max_repeats=10))
