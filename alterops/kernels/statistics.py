"""Triton kernels for the feature-map statistics (``alterops.statistics``).

Both kernels give one program a block of ``BLOCK_P`` planes of a contiguous ``(B*C, H*W)`` view
and write one partial result per program; the host sums the partials in a fixed order
(deterministic, no atomics).

* ``_delta_partial_kernel``: the diagonal DFT bins ``F[k, k] = sum_i x_i exp(-2πi k s_i / N)``
  with ``s_i = (y + x) mod N``, as two dot products of the plane tile with a ``(H*W, BLOCK_K)``
  cos / sin table (three-pass TF32 on tensor cores, about float32 accuracy), then
  ``log(|F| + eps)`` summed over the block's planes: ``partial[pid, k]``.
* ``_variance_partial_kernel``: per plane, blocks of ``BLOCK_HW`` elements are reduced two-pass
  in registers (mean, then squared deviations) and merged with Chan's formula; the unbiased
  variances of the block's planes are summed: ``partial[pid]``.

Loads convert to float32 (float16 and bfloat16 inputs are accumulated in float32).
"""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _delta_partial_kernel(x_ptr, cos_ptr, sin_ptr, part_ptr, P, HW, eps,
                          BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < P
    ks = tl.arange(0, BLOCK_K)
    re = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    im = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    row_off = rows.to(tl.int64) * HW
    for start in range(0, HW, BLOCK_HW):
        cols = start + tl.arange(0, BLOCK_HW)
        cmask = cols < HW
        xt = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        xt = xt.to(tl.float32)
        toff = cols[:, None] * BLOCK_K + ks[None, :]
        ct = tl.load(cos_ptr + toff, mask=cmask[:, None], other=0.0)
        st = tl.load(sin_ptr + toff, mask=cmask[:, None], other=0.0)
        re += tl.dot(xt, ct, input_precision="tf32x3")
        im += tl.dot(xt, st, input_precision="tf32x3")
    amp = tl.sqrt(re * re + im * im)
    logs = tl.log(amp + eps)
    logs = tl.where(rmask[:, None], logs, 0.0)
    tl.store(part_ptr + pid * BLOCK_K + ks, tl.sum(logs, axis=0))


@triton.jit
def _variance_partial_kernel(x_ptr, part_ptr, P, HW, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < P
    row_off = rows.to(tl.int64) * HW
    mean = tl.zeros((BLOCK_P,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        cols = start + tl.arange(0, BLOCK_HW)
        cmask = cols < HW
        m = rmask[:, None] & cmask[None, :]
        xt = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        nb = tl.minimum(HW - start, BLOCK_HW).to(tl.float32)
        bmean = tl.sum(xt, axis=1) / nb
        d = tl.where(m, xt - bmean[:, None], 0.0)
        bm2 = tl.sum(d * d, axis=1)
        count = start * 1.0
        total = count + nb
        delta = bmean - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + bm2 + delta * delta * (count * nb / total)
    var = m2 / tl.cast(HW - 1, tl.float32)  # HW may be the constexpr 1
    var = tl.where(rmask, var, 0.0)
    tl.store(part_ptr + pid, tl.sum(var, axis=0))


# -----------------------------------------------------------------------------------------
# Configurations: the launchers pick only these (listed for the AOT compile test).
# -----------------------------------------------------------------------------------------
DELTA_BLOCK_P = 64
DELTA_BLOCK_HW = 32
VAR_BLOCK_P = 16
VAR_BLOCK_HW = 256
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

AOT_CONFIGS = []
for _dt, _ptr in _PTR.items():
    for _bk in (16, 32):
        AOT_CONFIGS.append({
            "name": f"delta_{_ptr[1:]}_k{_bk}",
            "kernel": _delta_partial_kernel,
            "signature": {"x_ptr": _ptr, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "part_ptr": "*fp32",
                          "P": "i32", "HW": "i32", "eps": "fp32",
                          "BLOCK_P": "constexpr", "BLOCK_HW": "constexpr", "BLOCK_K": "constexpr"},
            "constexprs": {"BLOCK_P": DELTA_BLOCK_P, "BLOCK_HW": DELTA_BLOCK_HW, "BLOCK_K": _bk},
            "num_warps": 4,
            "num_stages": 2,
            "tensor_cores": True,
        })
    AOT_CONFIGS.append({
        "name": f"variance_{_ptr[1:]}",
        "kernel": _variance_partial_kernel,
        "signature": {"x_ptr": _ptr, "part_ptr": "*fp32", "P": "i32", "HW": "i32",
                      "BLOCK_P": "constexpr", "BLOCK_HW": "constexpr"},
        "constexprs": {"BLOCK_P": VAR_BLOCK_P, "BLOCK_HW": VAR_BLOCK_HW},
        "num_warps": 4,
        "num_stages": 2,
        "tensor_cores": False,
    })


# -----------------------------------------------------------------------------------------
# Launchers (inputs validated, contiguous, non-empty; N <= 64 for delta)
# -----------------------------------------------------------------------------------------
_TABLES: dict = {}


def _tables(n: int, block_k: int, device):
    key = (n, block_k, str(device))
    hit = _TABLES.get(key)
    if hit is None:
        y = torch.arange(n).repeat_interleave(n)
        x = torch.arange(n).repeat(n)
        s = (y + x) % n
        k = torch.arange(block_k)
        ang = (2.0 * math.pi / n) * ((s[:, None] * k[None, :]) % n).double()
        valid = (k < n - n // 2)[None, :]
        cos = torch.where(valid, ang.cos(), 0.0).float().contiguous().to(device)
        sin = torch.where(valid, -ang.sin(), 0.0).float().contiguous().to(device)
        hit = (cos, sin)
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = hit
    return hit


def delta_log_amplitude(x: torch.Tensor, eps: float, empty) -> torch.Tensor:
    """``(K,)`` Δ log amplitude of a contiguous square map with ``1 <= H <= 64`` and B*C > 0."""
    B, C, n, _ = x.shape
    P, HW, K = B * C, n * n, n - n // 2
    block_k = 16 if K <= 16 else 32
    cos, sin = _tables(n, block_k, x.device)
    grid = (triton.cdiv(P, DELTA_BLOCK_P),)
    part = empty((grid[0], block_k), dtype=torch.float32, device=x.device)
    _delta_partial_kernel[grid](x, cos, sin, part, P, HW, float(eps),
                                BLOCK_P=DELTA_BLOCK_P, BLOCK_HW=DELTA_BLOCK_HW, BLOCK_K=block_k,
                                num_warps=4, num_stages=2)
    sums = part.sum(0)[:K]
    return (sums - sums[0]) / P


def feature_variance(x: torch.Tensor, empty) -> torch.Tensor:
    """0-dim mean unbiased variance of a contiguous map with H*W >= 2 and B*C > 0."""
    B, C, H, W = x.shape
    P, HW = B * C, H * W
    grid = (triton.cdiv(P, VAR_BLOCK_P),)
    part = empty((grid[0],), dtype=torch.float32, device=x.device)
    _variance_partial_kernel[grid](x, part, P, HW, BLOCK_P=VAR_BLOCK_P, BLOCK_HW=VAR_BLOCK_HW,
                                   num_warps=4, num_stages=2)
    return part.sum() / P
