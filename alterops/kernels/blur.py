"""Triton kernels of ``box_blur2d`` / ``tanh_blur2d`` (see ``alterops/blur.py`` for the semantics).

Forward: one program per (plane, block of ``BLOCK`` outputs); each output gathers its ``kh x kw``
window, mapping padded coordinates to source coordinates (zeros / replicate / reflect), applies
the pointwise op per tap and accumulates in float32. Kernel size, stride, padding and pad mode
are runtime values (no recompilation per geometry); only the pointwise op (``ACT``) and the
block size are compile-time.

Backward: one program per (plane, block of inputs). Input ``h`` receives the gradient of every
padded row that maps to it: the direct row ``h + top``, plus (replicate / reflect) the border
rows that map to ``h``; each padded row ``r`` is covered by the outputs ``oh`` with
``oh*sh <= r < oh*sh + kh``. The same holds per column. For zero padding the border loops are
skipped by the launcher (``NR = NC = 1``).
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 512  # forward: 4 outputs per thread
BLOCK_BWD = 256  # backward: more live values per element; 512 spills on sm_80
NUM_WARPS = 4


@triton.jit
def _map_index(p, n, MODE):
    # Source index of padded-relative coordinate p; -1 = zero padding.
    inside = (p >= 0) & (p < n)
    rep = tl.where(p < 0, 0, n - 1)
    refl = tl.where(p < 0, -p, 2 * (n - 1) - p)
    border = tl.where(MODE == 1, rep, refl)
    border = tl.where(MODE == 0, -1, border)
    return tl.where(inside, p, border)


@triton.jit
def _tanh(y):
    # 1 - 2 / (exp(2y) + 1): exact limits +-1 for large |y| (exp overflows to inf or 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)


@triton.jit
def _block(PID0, R, C, BLOCK: tl.constexpr):
    """Program ``PID0 + program_id(0)`` (int64) of a one-dimensional grid over planes x blocks of
    ``BLOCK`` consecutive elements of an ``R x C`` plane: its plane, the block's first flat index
    (int64) and the row and column of each element (int32). Only the block start is divided in
    int64; a plane of more than 2**31 elements is addressed in int64 throughout."""
    n = tl.cast(R, tl.int64) * C  # tl.cast: R and C may be the constexpr 1 (a GPU launch with a 1)
    nblk = tl.cdiv(n, BLOCK)
    pid = tl.program_id(0).to(tl.int64) + PID0
    plane = pid // nblk
    start = (pid - plane * nblk) * BLOCK
    r0 = start // C
    # t < C + BLOCK < 2**32: unsigned 32-bit division (as fast as signed, no wrap for any C)
    t = (start - r0 * C).to(tl.uint32) + tl.arange(0, BLOCK).to(tl.uint32)
    cu = tl.cast(C, tl.uint32)
    return plane, start, r0.to(tl.int32) + (t // cu).to(tl.int32), (t % cu).to(tl.int32)


@triton.jit
def _blur2d_fwd_kernel(x_ptr, out_ptr, H, W, Ho, Wo, KH, KW, SH, SW, PT, PL, MODE, PID0,
                       tau, inv_tau, scale, RELU, ACT: tl.constexpr, BLOCK: tl.constexpr):
    plane, start, oh, ow = _block(PID0, Ho, Wo, BLOCK)
    n = tl.cast(Ho, tl.int64) * Wo
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    x_base = x_ptr + plane * H * W
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for a in range(KH):
        r = _map_index(oh * SH + a - PT, H, MODE)
        row_ok = mask & (r >= 0)
        x_row = r.to(tl.int64) * W
        for e in range(KW):
            c = _map_index(ow * SW + e - PL, W, MODE)
            ok = row_ok & (c >= 0)
            v = tl.load(x_base + (x_row + c.to(tl.int64)), mask=ok, other=0.0).to(tl.float32)
            if ACT:
                v = tau * _tanh(v * inv_tau)
                v = tl.where((RELU != 0) & (v < 0.0), 0.0, v)  # relu; NaN stays NaN (as torch.relu)
            acc += v
    tl.store(out_ptr + plane * n + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blur2d_bwd_kernel(gout_ptr, x_ptr, gin_ptr, H, W, Ho, Wo, KH, KW, SH, SW, PT, PB, PL, PR, MODE, NR, NC, PID0,
                       inv_tau, scale, RELU, ACT: tl.constexpr, BLOCK: tl.constexpr):
    plane, start, h, w = _block(PID0, H, W, BLOCK)
    n = tl.cast(H, tl.int64) * W
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    g_base = gout_ptr + plane * Ho * Wo
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # (candidate row, kernel row) pairs flattened into one loop, likewise for columns:
    # two loop levels instead of four keep ptxas from using a stack frame.
    for q in range(NR * KH):
        tr = q // KH
        a = q - tr * KH
        # tr = 0: the direct row; then the PT top border rows; then the PB bottom border rows.
        r = tl.where(tr == 0, h + PT, tl.where(tr <= PT, tr - 1, H + tr - 1))
        num_h = r - a
        oh = num_h // SH
        oh_ok = mask & (_map_index(r - PT, H, MODE) == h) & (num_h >= 0) & (num_h % SH == 0) & (oh < Ho)
        for u in range(NC * KW):
            tc = u // KW
            e = u - tc * KW
            c = tl.where(tc == 0, w + PL, tl.where(tc <= PL, tc - 1, W + tc - 1))
            num_w = c - e
            ow = num_w // SW
            ok = oh_ok & (_map_index(c - PL, W, MODE) == w) & (num_w >= 0) & (num_w % SW == 0) & (ow < Wo)
            acc += tl.load(g_base + (oh.to(tl.int64) * Wo + ow.to(tl.int64)), mask=ok, other=0.0).to(tl.float32)
    acc = acc * scale
    if ACT:
        xv = tl.load(x_ptr + plane * n + offs, mask=mask, other=0.0).to(tl.float32)
        t = _tanh(xv * inv_tau)
        d = 1.0 - t * t
        d = tl.where((RELU != 0) & (t <= 0.0), 0.0, d)
        acc = acc * d
    tl.store(gin_ptr + plane * n + offs, acc.to(gin_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers (called by the custom ops in alterops/blur.py)
# ---------------------------------------------------------------------------------------
MAX_PROGRAMS = 2**31 - 1  # CUDA's grid x limit


def launch_chunks(planes: int, per_plane: int, block: int) -> list[tuple[int, tuple[int]]]:
    """``(PID0, grid)`` of each launch covering ``planes * ceil(per_plane / block)`` programs on
    grid x (one launch unless that exceeds ``MAX_PROGRAMS``): no grid y limit (65535) on the
    number of planes or of blocks per plane."""
    total = planes * triton.cdiv(per_plane, block)
    return [(start, (min(MAX_PROGRAMS, total - start),)) for start in range(0, total, MAX_PROGRAMS)]


def _check_extent(H, W, padding):
    # Row and column indices (padded ones included) are int32 in the kernels; the flat index
    # within a plane is int64, so a plane of any number of elements works.
    if max(H + padding[0] + padding[1], W + padding[2] + padding[3]) > 2**31 - 2**16:
        raise ValueError(f"blur2d (triton): the padded map must have fewer than 2**31 - 2**16 rows and columns, "
                         f"got {H}x{W} with padding {tuple(padding)}")


def launch_forward(x, out, kernel_size, stride, padding, pad_mode, act, tau):
    B, C, H, W = x.shape
    Ho, Wo = out.shape[-2:]
    if out.numel() == 0:
        return
    _check_extent(H, W, padding)
    kh, kw = kernel_size
    for pid0, grid in launch_chunks(B * C, Ho * Wo, BLOCK):
        _blur2d_fwd_kernel[grid](
            x, out, H, W, Ho, Wo, kh, kw, stride[0], stride[1], padding[0], padding[2], pad_mode, pid0,
            float(tau), 1.0 / float(tau), 1.0 / (kh * kw), int(act == 2),
            ACT=int(act != 0), BLOCK=BLOCK, num_warps=NUM_WARPS, num_stages=1,
        )


def launch_backward(grad_out, x, grad_x, kernel_size, stride, padding, pad_mode, act, tau):
    B, C, H, W = grad_x.shape
    Ho, Wo = grad_out.shape[-2:]
    if grad_x.numel() == 0:
        return
    _check_extent(H, W, padding)
    kh, kw = kernel_size
    pt, pb, pl, pr = padding
    nr, nc = (1, 1) if pad_mode == 0 else (1 + pt + pb, 1 + pl + pr)
    for pid0, grid in launch_chunks(B * C, H * W, BLOCK_BWD):
        _blur2d_bwd_kernel[grid](
            grad_out, x if x is not None else grad_out, grad_x, H, W, Ho, Wo, kh, kw, stride[0], stride[1],
            pt, pb, pl, pr, pad_mode, nr, nc, pid0, 1.0 / float(tau), 1.0 / (kh * kw), int(act == 2),
            ACT=int(act != 0), BLOCK=BLOCK_BWD, num_warps=NUM_WARPS, num_stages=1,
        )


# ---------------------------------------------------------------------------------------
# Every configuration the launchers can pick (for tests/aot_compile.py)
# ---------------------------------------------------------------------------------------
def _aot_configs():
    configs = []
    ints_fwd = ["H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "PT", "PL", "MODE", "PID0"]
    ints_bwd = ["H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "PT", "PB", "PL", "PR", "MODE", "NR", "NC", "PID0"]
    for ty, name in (("*fp32", "f32"), ("*fp16", "f16"), ("*bf16", "bf16")):
        for act in (0, 1):
            sig = {"x_ptr": ty, "out_ptr": ty, **{k: "i32" for k in ints_fwd},
                   "tau": "fp32", "inv_tau": "fp32", "scale": "fp32", "RELU": "i32",
                   "ACT": "constexpr", "BLOCK": "constexpr"}
            configs.append({"name": f"fwd_{name}_act{act}", "kernel": _blur2d_fwd_kernel, "signature": sig,
                            "constexprs": {"ACT": act, "BLOCK": BLOCK}, "num_warps": NUM_WARPS,
                            "num_stages": 1, "tensor_cores": False})
            sig = {"gout_ptr": ty, "x_ptr": ty, "gin_ptr": ty, **{k: "i32" for k in ints_bwd},
                   "inv_tau": "fp32", "scale": "fp32", "RELU": "i32", "ACT": "constexpr", "BLOCK": "constexpr"}
            configs.append({"name": f"bwd_{name}_act{act}", "kernel": _blur2d_bwd_kernel, "signature": sig,
                            "constexprs": {"ACT": act, "BLOCK": BLOCK_BWD}, "num_warps": NUM_WARPS,
                            "num_stages": 1, "tensor_cores": False})
    return configs


AOT_CONFIGS = _aot_configs()
