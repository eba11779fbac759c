"""Benchmark cases of box_blur2d / tanh_blur2d against the PyTorch modules the paper's code uses.

Workload: float32 (bfloat16 on CUDA), B=64, C=256, 28x28 (B=2, C=16 with ``quick``).

* ``box_blur2d_k2_fwd``: the paper's blur, ``AvgPool2d(2, 1, 1)`` (output 29x29); peer
  ``F.avg_pool2d(x, 2, 1, 1)`` (``count_include_pad=True``, the same semantics).
* ``box_blur2d_k3_same_fwd``: 3x3, ``padding="same"``; peer ``F.avg_pool2d(x, 3, 1, 1)``.
* ``tanh_blur2d_fwd``: ``TanhBlurBlock`` (tau=10); peer ``unfused``:
  ``F.avg_pool2d(F.relu(tau * torch.tanh(x / tau)), 2, 1, 1)``.
* ``*_fwd_bwd``: forward AND backward timed together for both sides
  (``torch.autograd.grad`` of the output with a fixed upstream gradient; the peers run through
  autograd of the unfused chain).

``bytes`` counts the useful traffic of one call: input read + output written (forward);
for fwd+bwd also grad_out read + grad_x written (+ x read again by tanh_blur2d's backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import alterops as ao

from .registry import Case, Workload, register

TAU = 10.0


def _unfused_tanh_blur(x):
    return F.avg_pool2d(F.relu(TAU * torch.tanh(x / TAU)), 2, 1, 1)


def _inputs(device, quick):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, C = (2, 16) if quick else (64, 256)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, C, 28, 28, generator=g) * 4).to(device=device, dtype=dtype)
    return x, dtype


def _check(ours, peer, dtype):
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4

    def check():
        a, b = ours(), peer()
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        for u, v in zip(a, b):
            torch.testing.assert_close(u.float(), v.float(), atol=tol, rtol=tol)

    return check


def _note(x, what):
    B, C, H, W = x.shape
    return f"{what}; B={B} C={C} {H}x{W} {str(x.dtype).replace('torch.', '')}"


def _make_box_fwd(device, quick, *, kernel, padding, peer_padding):
    x, dtype = _inputs(device, quick)

    def ours():
        with torch.no_grad():
            return ao.box_blur2d(x, kernel, 1, padding)

    def peer():
        with torch.no_grad():
            return F.avg_pool2d(x, kernel, 1, peer_padding)

    out = ours()
    targets = {"speedup:F.avg_pool2d": 10.0, "ceiling": 0.5} if device.type == "cpu" else {"ceiling": 0.5}
    return Workload(ours=ours, peers={"F.avg_pool2d": peer}, bytes=float(x.nbytes + out.nbytes),
                    ceiling="bandwidth", targets=targets, check=_check(ours, peer, dtype),
                    note=_note(x, f"box blur k={kernel} padding={padding!r}"))


def _make_tanh_fwd(device, quick):
    x, dtype = _inputs(device, quick)

    def ours():
        with torch.no_grad():
            return ao.tanh_blur2d(x, TAU)

    def peer():
        with torch.no_grad():
            return _unfused_tanh_blur(x)

    out = ours()
    targets = {"speedup:unfused": 15.0} if device.type == "cpu" else {"speedup:unfused": 3.0}
    return Workload(ours=ours, peers={"unfused": peer}, bytes=float(x.nbytes + out.nbytes),
                    ceiling="bandwidth", targets=targets, check=_check(ours, peer, dtype),
                    note=_note(x, "relu(tau*tanh(x/tau)) then AvgPool2d(2, 1, 1), tau=10"))


def _make_fwd_bwd(device, quick, *, op):
    x, dtype = _inputs(device, quick)
    x.requires_grad_(True)
    if op == "box":
        def ours_fwd():
            return ao.box_blur2d(x)

        def peer_fwd():
            return F.avg_pool2d(x, 2, 1, 1)

        peer_name, x_reads = "F.avg_pool2d", 1
    else:
        def ours_fwd():
            return ao.tanh_blur2d(x, TAU)

        def peer_fwd():
            return _unfused_tanh_blur(x)

        peer_name, x_reads = "unfused", 2  # the fused backward reads x again
    with torch.no_grad():
        out = ours_fwd()
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    def ours():
        return torch.autograd.grad(ours_fwd(), (x,), gout)

    def peer():
        return torch.autograd.grad(peer_fwd(), (x,), gout)

    def check():
        _check(ours_fwd, peer_fwd, dtype)()
        _check(ours, peer, dtype)()

    # forward: x read + out written; backward: grad_out read + grad_x written (+ x read)
    nbytes = x.nbytes * x_reads + out.nbytes + gout.nbytes + x.nbytes
    targets = {f"speedup:{peer_name}": 5.0} if device.type == "cpu" else {f"speedup:{peer_name}": 2.0}
    return Workload(ours=ours, peers={peer_name: peer}, bytes=float(nbytes), ceiling="bandwidth",
                    targets=targets, check=check,
                    note=_note(x, f"{'box' if op == 'box' else 'tanh'} blur, forward + backward timed together"))


register(Case("smoothing", "box_blur2d_k2_fwd",
              lambda device, quick: _make_box_fwd(device, quick, kernel=2, padding=1, peer_padding=1)))
register(Case("smoothing", "box_blur2d_k3_same_fwd",
              lambda device, quick: _make_box_fwd(device, quick, kernel=3, padding="same", peer_padding=1)))
register(Case("smoothing", "tanh_blur2d_fwd", _make_tanh_fwd, max_repeats=10))
register(Case("smoothing", "box_blur2d_fwd_bwd", lambda device, quick: _make_fwd_bwd(device, quick, op="box"),
              max_repeats=10))
register(Case("smoothing", "tanh_blur2d_fwd_bwd", lambda device, quick: _make_fwd_bwd(device, quick, op="tanh"),
              max_repeats=10))
