"""Benchmark cases of neighborhood_attention2d.

Peers:

* ``flex_attention``: ``torch.compile(flex_attention)`` with a NATTEN-style block mask (the
  clamp rule as a ``mask_mod`` on row-major token indices, as attention-gym's ``natten.py``),
  compiled and masked once in ``make``; inputs pre-permuted to its ``(B, heads, L, d)`` layout.
* ``natten``: ``natten.na2d`` (clamp rule), only when ``natten`` is importable (otherwise the
  report lists it as left out, with the reason).
* ``unfold_autograd``: the paper's ``ConvAttention2d`` math (``F.unfold`` with zero padding,
  einsum, softmax, einsum) differentiated by autograd; compared with ``border="zero"``.

Useful FLOPs: ``4 * N * k^2 * head_dim`` per head for the forward (two products), three times
that for forward + backward (the backward has four products, the forward two).

Quick mode: the CPU cases run B=1 at 28x28 (named ``..._28x28_k7``), the GPU cases B=2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import alterops as ao

from .registry import Case, Workload, register


def _inputs(device, dtype, B, H, W, heads, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, heads, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _flex_peer(q, k, v, kernel, *, backward: bool):
    """Compiled FlexAttention with a clamp (NATTEN) block mask; returns a zero-arg callable."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, W, heads, d = q.shape
    r = kernel // 2

    def natten_clamp(b, h, q_idx, kv_idx):
        qy, qx = q_idx // W, q_idx % W
        ky, kx = kv_idx // W, kv_idx % W
        cy = qy.clamp(r, H - 1 - r)
        cx = qx.clamp(r, W - 1 - r)
        return ((cy - ky).abs() <= r) & ((cx - kx).abs() <= r)

    block_mask = create_block_mask(natten_clamp, None, None, H * W, H * W, device=str(q.device))
    flex = torch.compile(flex_attention, dynamic=False)

    def to_flex(t):
        return t.permute(0, 3, 1, 2, 4).reshape(B, heads, H * W, d).contiguous().detach().requires_grad_(backward)

    fq, fk, fv = (to_flex(t) for t in (q, k, v))
    gout = torch.ones_like(fq)

    def run():
        out = flex(fq, fk, fv, block_mask=block_mask)
        if backward:
            out.backward(gout)
        return out

    def to_ours(out):
        return out.view(B, heads, H, W, d).permute(0, 2, 3, 1, 4)

    run()  # compile here, once, not in the timed calls
    return run, to_ours


def unfold_attention(q, k, v, kernel):
    """The paper's ConvAttention2d (zero padding) on heads-last tensors, via F.unfold."""
    B, H, W, heads, d = q.shape
    L = H * W

    def unfold(t):  # (B, H, W, heads, d) -> (B, heads, L, k*k, d)
        t = t.permute(0, 3, 4, 1, 2).reshape(B, heads * d, H, W)
        u = F.unfold(t, kernel, padding=kernel // 2)  # (B, heads*d*k*k, L), channel-major
        return u.view(B, heads, d, kernel * kernel, L).permute(0, 1, 4, 3, 2)

    qf = q.permute(0, 3, 1, 2, 4).reshape(B, heads, L, d)
    dots = torch.einsum("bhnd,bhnwd->bhnw", qf, unfold(k)) * d ** -0.5
    attn = dots.softmax(-1)
    out = torch.einsum("bhnw,bhnwd->bhnd", attn, unfold(v))
    return out.view(B, heads, H, W, d).permute(0, 2, 3, 1, 4)


def _make_cpu_forward(device, quick):
    B, H, W, heads, d, kernel = (1, 28, 28, 4, 32, 7) if quick else (4, 56, 56, 4, 32, 7)
    q, k, v = _inputs(device, torch.float32, B, H, W, heads, d)
    flex, flex_to_ours = _flex_peer(q, k, v, kernel, backward=False)
    peers = {"flex_attention": flex}
    targets = {"speedup:flex_attention": 20.0, "ceiling": 0.25}
    left_out = {}
    try:
        import natten  # noqa: F401

        peers["natten"] = lambda: natten.na2d(q, k, v, kernel_size=kernel)
        targets["speedup:natten"] = 100.0
    except ImportError as exc:
        left_out["natten"] = f"natten cannot be imported ({exc}); pip install natten"

    def ours():
        return ao.neighborhood_attention2d(q, k, v, kernel)

    def check():
        ref = flex_to_ours(flex())
        torch.testing.assert_close(ours(), ref, atol=2e-4, rtol=2e-4)

    N = B * H * W
    return Workload(ours=ours, peers=peers, bytes=4 * q.numel() * q.element_size(),
                    flops=4.0 * N * kernel * kernel * d * heads, ceiling="matmul_fp32", targets=targets,
                    check=check, note=f"B={B} {H}x{W} heads={heads} d={d} k={kernel} float32, clamp",
                    label=f"na2d_forward_{H}x{W}_k{kernel}", peers_left_out=left_out)


def _make_cpu_fwd_bwd(device, quick):
    B, H, W, heads, d, kernel = (1, 28, 28, 4, 32, 7) if quick else (4, 56, 56, 4, 32, 7)
    q, k, v = (t.requires_grad_() for t in _inputs(device, torch.float32, B, H, W, heads, d))
    gout = torch.ones_like(q)
    pq, pk, pv = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def ours():
        out = ao.neighborhood_attention2d(q, k, v, kernel, border="zero")
        out.backward(gout)
        return out

    def unfold_peer():
        out = unfold_attention(pq, pk, pv, kernel)
        out.backward(gout)
        return out

    def check():
        with torch.no_grad():
            a = ao.neighborhood_attention2d(q, k, v, kernel, border="zero")
            b = unfold_attention(q, k, v, kernel)
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)

    N = B * H * W
    return Workload(ours=ours, peers={"unfold_autograd": unfold_peer}, bytes=8 * q.numel() * q.element_size(),
                    flops=12.0 * N * kernel * kernel * d * heads, ceiling="matmul_fp32",
                    targets={"speedup:unfold_autograd": 20.0}, check=check,
                    note=f"forward+backward, B={B} {H}x{W} heads={heads} d={d} k={kernel} float32, zero border",
                    label=f"na2d_fwd_bwd_zero_{H}x{W}_k{kernel}")


def _make_gpu(device, quick, *, B, HW, heads, d, kernel, backward):
    if quick:
        B = 2
    q, k, v = _inputs(device, torch.bfloat16, B, HW, HW, heads, d)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    gout = torch.ones_like(q)
    flex, flex_to_ours = _flex_peer(q, k, v, kernel, backward=backward)

    def ours():
        out = ao.neighborhood_attention2d(q, k, v, kernel)
        if backward:
            out.backward(gout)
        return out

    def check():
        with torch.no_grad():
            a = ao.neighborhood_attention2d(q, k, v, kernel).float()
        b = flex_to_ours(flex()).float()
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)

    N = B * HW * HW
    mult = 12.0 if backward else 4.0
    targets = {"speedup:flex_attention": 1.5} if backward else {"ceiling": 0.4}
    return Workload(ours=ours, peers={"flex_attention": flex}, bytes=(8 if backward else 4) * q.numel() * 2,
                    flops=mult * N * kernel * kernel * d * heads, ceiling="matmul_bf16", targets=targets,
                    check=check, note=f"{'forward+backward' if backward else 'forward'}, B={B} {HW}x{HW} "
                                      f"heads={heads} d={d} k={kernel} bfloat16, clamp")


register(Case("neighborhood", "na2d_forward_56x56_k7", _make_cpu_forward, devices=("cpu",), max_repeats=10))
register(Case("neighborhood", "na2d_fwd_bwd_zero_56x56_k7", _make_cpu_fwd_bwd, devices=("cpu",), max_repeats=5))
for _name, _kw in (
    ("na2d_gpu_56x56_h2_d32", dict(B=64, HW=56, heads=2, d=32, kernel=7)),
    ("na2d_gpu_14x14_h12_d64", dict(B=64, HW=14, heads=12, d=64, kernel=7)),
):
    register(Case("neighborhood", f"{_name}_forward",
                  lambda device, quick, _kw=_kw: _make_gpu(device, quick, backward=False, **_kw), devices=("cuda",)))
    register(Case("neighborhood", f"{_name}_fwd_bwd",
                  lambda device, quick, _kw=_kw: _make_gpu(device, quick, backward=True, **_kw), devices=("cuda",)))
