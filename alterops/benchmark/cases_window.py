"""Benchmark cases of window_attention2d against the same math done the Swin way in PyTorch.

Peer ``swin_sdpa``: what timm / Hugging Face Swin do per call: ``torch.roll`` by ``-shift``,
window partition of q, k, v, the bias gathered from the table (query-minus-key index, as Swin)
plus the precomputed shift mask as a float ``attn_mask`` of
``F.scaled_dot_product_attention``, window reverse, roll back. Shapes: Swin-T stage 1 (56x56,
3 heads of 32, window 7, shift 3, per-head bias) and AlterNet's CIFAR MSA block (16x16, 6 heads
of 64, window 4 -> 16-token windows, shared bias, no shift). Quick mode: the same shapes at B=1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import alterops as ao

from .registry import Case, Workload, register


def swin_relative_index(window: int, device) -> torch.Tensor:
    """Swin's relative_position_index: query minus key, flat into a ``(2w-1)^2`` table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).to(device)


def swin_shift_mask(H: int, W: int, window: int, shift: int, device) -> torch.Tensor | None:
    """Swin's precomputed (nW, N, N) mask (-100 across regions), as timm/HF build it."""
    if shift == 0:
        return None
    img = torch.zeros(H, W, device=device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    mw = img.view(H // window, window, W // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    mask = mw[:, None, :] - mw[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def swin_sdpa(q, k, v, swin_table, window, shift, index, mask):
    """The Swin way: roll, partition, SDPA with bias (+ shift mask) as attn_mask, reverse, roll.

    ``swin_table`` is Swin's ((2w-1)^2, heads|1) table; H, W are multiples of the window.
    """
    B, H, W, nh, d = q.shape
    N, nWy, nWx = window * window, H // window, W // window

    def partition(t):
        if shift:
            t = torch.roll(t, shifts=(-shift, -shift), dims=(1, 2))
        t = t.view(B, nWy, window, nWx, window, nh, d).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(B * nWy * nWx, nh, N, d)

    bias = swin_table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # (nh|1, N, N)
    attn_mask = bias.unsqueeze(0).to(q.dtype)
    if mask is not None:
        attn_mask = (attn_mask.unsqueeze(0) + mask.to(q.dtype)[None, :, None]).expand(B, -1, nh, -1, -1)
        attn_mask = attn_mask.reshape(B * nWy * nWx, nh, N, N)
    out = F.scaled_dot_product_attention(partition(q), partition(k), partition(v), attn_mask=attn_mask)
    out = out.view(B, nWy, nWx, nh, window, window, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, nh, d)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out


def _make(device, quick, *, B, HW, heads, d, window, shift, shared_bias, backward, gpu_B):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        B = gpu_B
    if quick:
        B = 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, HW, HW, heads, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    tbl_heads = 1 if shared_bias else heads
    swin_table = (torch.randn((2 * window - 1) ** 2, tbl_heads, generator=g) * 0.1).to(device)
    ours_table = swin_table.view(2 * window - 1, 2 * window - 1, -1).flip(0, 1).permute(2, 0, 1).contiguous()
    index = swin_relative_index(window, device)
    mask = swin_shift_mask(HW, HW, window, shift, device)
    gout = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)
    if backward:
        for t in (q, k, v, swin_table, ours_table):
            t.requires_grad_(True)

    def ours_fwd():
        return ao.window_attention2d(q, k, v, window, shift=shift, rel_pos_bias=ours_table)

    def peer_fwd():
        return swin_sdpa(q, k, v, swin_table, window, shift, index, mask)

    if backward:
        def ours():
            return torch.autograd.grad(ours_fwd(), (q, k, v, ours_table), gout)

        def peer():
            return torch.autograd.grad(peer_fwd(), (q, k, v, swin_table), gout)
    else:
        def ours():
            with torch.no_grad():
                return ours_fwd()

        def peer():
            with torch.no_grad():
                return peer_fwd()

    def check():
        a, b = ours_fwd().float(), peer_fwd().float()
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)

    n_win = B * (HW // window) ** 2
    N = window * window
    fwd_flops = 4.0 * n_win * heads * N * N * d
    elem = q.element_size()
    io = 4 * q.numel() * elem
    targets = {}
    if device.type == "cpu":
        targets["speedup:swin_sdpa"] = 2.0 if backward else 3.0
    elif backward:
        targets["speedup:swin_sdpa"] = 2.0
    return Workload(
        ours=ours, peers={"swin_sdpa": peer},
        bytes=float(io * (2 if backward else 1)),
        flops=fwd_flops * (3 if backward else 1),
        ceiling="matmul_bf16" if dtype == torch.bfloat16 else "matmul_fp32",
        targets=targets, check=check,
        note=f"B={B} {HW}x{HW} heads={heads} d={d} window={window} shift={shift} "
             f"{'shared' if shared_bias else 'per-head'} bias {str(dtype).replace('torch.', '')}",
    )


_SHAPES = {
    "swin_t_stage1": dict(B=8, HW=56, heads=3, d=32, window=7, shift=3, shared_bias=False, gpu_B=64),
    "alternet_cifar": dict(B=96, HW=16, heads=6, d=64, window=4, shift=0, shared_bias=True, gpu_B=96),
}

for _name, _shape in _SHAPES.items():
    for _bwd in (False, True):
        register(Case(
            family="window",
            name=f"{_name}_{'fwd_bwd' if _bwd else 'fwd'}",
            make=(lambda device, quick, s=_shape, b=_bwd: _make(device, quick, backward=b, **s)),
            devices=("cpu", "cuda"),
            max_repeats=10,
        ))
