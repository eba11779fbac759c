"""Triton kernels of ``window_attention2d`` (Swin shifted-window MSA), forward and backward.

Windows are packed into tiles of ``TILE`` rows: windows of up to 64 tokens share a 64-row
tile (``WPP = 64 // N`` of them, ``N = wh*ww`` rows each, back to back; 49-token windows are
padded within the tile), larger windows get one tile of N rounded up to a multiple of 64 rows
(up to 256: Swin-B's 144-token windows take 192). A program takes ``BLOCK_Q`` rows of one
tile (a sub-tile of 16 rows) against the tile's rows in chunks of ``BLOCK_M`` = 64, so the
live score tile is ``(BLOCK_Q, 64)`` whatever the window; head_dim is processed in chunks of
``DC`` columns, so only ``(rows, DC)`` operand tiles are live at a time. Grid: (window group,
sub-tile, head).

Row coordinates come from index arithmetic: window -> rolled padded coordinate -> original
coordinate ``((r + sh) mod Hp, (c + sw) mod Wp)``, so q/k/v are read straight from
``(B, H, W, heads, d)`` with their own strides (views into a fused qkv tensor are read in
place) and the output is written to its final place. The window size, the tile size, head_dim
and the chunk counts are runtime arguments (both chunk loops are runtime loops): one compiled
kernel per (kind, dtype, column chunk, bias flags) serves every window and head_dim. The
block-diagonal window mask, the shift-region mask and the padding mask (absent tokens) are
computed from those coordinates. With one 64-key chunk (windows of up to 64 tokens) the
softmax is exact in one pass; with more, the forward runs an online softmax across the chunks
and the outputs that sum over chunks (O, dQ, dK, dV) are accumulated in a float32 scratch
that only the owning program reads and writes (rescaled by the running max in the forward),
the last chunk writing the result. The forward saves the logsumexp for the backward.

The bias enters as a ``(heads|1, TILE, TILE)`` float32 tile expanded once per call from
the ``(2wh-1, 2ww-1)`` table, loaded contiguously per 64-key chunk (row slab in the forward and
the dq kernel, transposed slab in the dk/dv kernel).

The backward runs two kernels. Query-major: recompute P from the logsumexp for a query
sub-tile, delta = rowsum(dO * O) (stored for the second kernel), dP = dO V^T,
dS = P (dP - delta), dq = scale dS K, and the bias gradient. Key-major: for a key sub-tile,
P^T and dP^T against all queries of its tile, dv = P^T dO, dk = scale dS^T Q. The bias
gradient is deterministic, without float atomics: each query-major program owns a partial
slab in global memory where it sums the dS tiles of the window groups assigned to it (a
fixed assignment, fixed order); the partials are then reduced in a fixed order (sum over
programs, the diagonal window blocks, then gathers over the relative offsets).

float32 runs its dots in IEEE float32 (no TF32); float16/bfloat16 use tensor cores with
float32 accumulation.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from alterops import _checks, _config

from ._attention_common import flag_clean, nonfinite_passes, nonfinite_values

# Bound on the bias-gradient partials of the dq kernel (floats): past it, each program sums the
# dS tiles of several window groups (Swin-T stage 1 at batch 8 takes two per program).
DB_PARTIAL_FLOATS = 2 ** 22


@triton.jit
def _small_div(x, d):
    """x // d for 0 <= x < 256 and 1 <= d (exact: float32 has ample precision at this range,
    and it costs a few instructions instead of an integer division sequence per element).
    ``d`` may be a kernel argument that a GPU launch specialises to the constexpr 1: tl.cast."""
    return ((x.to(tl.float32) + 0.5) * (1.0 / tl.cast(d, tl.float32))).to(tl.int32)


@triton.jit
def _carry(x, d):
    """x // d for 0 <= x < d + 64: exact (a compare when d >= 64, else x < 128)."""
    return tl.where(d >= 64, (x >= d).to(tl.int32), _small_div(x, d))


@triton.jit
def _rows(pid_group, t, H, W, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, NP, WPP):
    """For tile rows ``t``: batch, original (y, x), present and group (window slot and shift
    region). The windows of a tile are consecutive, so the
    window -> (batch, wy, wx) decomposition is one scalar division plus small carries."""
    slot = _small_div(t, NP)
    loc = t - slot * NP
    w0 = pid_group * WPP
    b0 = w0 // nWin
    r0 = w0 - b0 * nWin
    wy0 = r0 // nWx
    wx0 = r0 - wy0 * nWx
    valid = (slot < WPP) & (w0 + slot < n_windows)
    wrem = r0 + slot  # < nWin + 64
    cb = _carry(wrem, nWin)
    b = b0 + cb
    first = cb == 0  # still in the image of the tile's first window
    off = wrem - cb * nWin - tl.where(first, r0, 0)  # < 64
    xl = tl.where(first, wx0, 0) + off  # < nWx + 64
    cy = _carry(xl, nWx)
    wy = tl.where(first, wy0, 0) + cy
    wx = xl - cy * nWx
    i = _small_div(loc, WW)
    j = loc - i * WW
    r = wy * WH + i
    c = wx * WW + j
    y = r + sh
    y = tl.where(y >= Hp, y - Hp, y)
    x = c + sw
    x = tl.where(x >= Wp, x - Wp, x)
    present = valid & (y < H) & (x < W)
    ry = (r >= Hp - WH).to(tl.int32) + (r >= Hp - sh).to(tl.int32)
    rx = (c >= Wp - WW).to(tl.int32) + (c >= Wp - sw).to(tl.int32)
    group = slot * 9 + ry * 3 + rx
    return b.to(tl.int64), y.to(tl.int64), x.to(tl.int64), present, group


@triton.jit
def _allowed(gq, tq, gk, pk, tk):
    """Query rows x key columns that attend: present keys of the query's window group, and
    each query itself (a padded, absent query keeps itself, so every softmax row is finite).
    (The key's presence is and-ed here rather than folded into its group with a tl.where:
    Triton 3.6's layout pass fails on the latter in some configs.)"""
    return ((gq[:, None] == gk[None, :]) & pk[None, :]) | (tq[:, None] == tk[None, :])


# A GPU launch specialises every integer argument equal to 1 into a constant. For the map and
# window geometry (a map, window or head count of 1) that buys nothing worth a variant of its
# own, and Triton 3.6's layout pass fails on several such variants of the key/value kernel
# (WW = 1, or H = NH = 1 with one window); the strides and n_chunk stay specialised.
_UNSPECIALISED = ["H", "W", "NH", "Hp", "Wp", "nWx", "nWin", "n_windows", "sh", "sw", "WH", "WW", "head_dim"]


def _strides(t):
    """``t``'s strides with 0 for its axes of size 1 (their index is always 0): a GPU launch
    specialises a stride of 1 into a constant, which on such an axis helps nothing and gives
    Triton 3.6's layout pass one more variant to fail on (the key/value kernel with one head of
    head_dim 1, where it still fails on the stride-1 x axis)."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation. IEEE: exact float32 products (float32 inputs, no TF32).
    UPCAST: multiply bfloat16 operands as float32 (the same values: bf16 products are exact in
    float32); used only under Triton's CPU interpreter, whose bfloat16 dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_rows(A, B, arow, brow, sad, sbd, amask, bmask, head_dim, n_chunk,
              RA: tl.constexpr, RB: tl.constexpr, DC: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """(RA, RB) = A[arow] . B[brow]^T over head_dim in chunks of DC columns (a loop, not
    unrolled: the code size and the compiled kernel do not depend on head_dim). B^T is loaded
    as a (DC, RB) tile: a tl.trans of a loaded tile would have its dot-operand layout
    propagated back into the load (warp-replicated loads and index math)."""
    s = tl.zeros((RA, RB), dtype=tl.float32)
    for c in range(0, n_chunk):
        d = c * DC + tl.arange(0, DC)
        ac = tl.load(A + arow[:, None] + d[None, :] * sad, mask=amask[:, None] & (d[None, :] < head_dim), other=0.0)
        bt = tl.load(B + brow[None, :] + d[:, None] * sbd, mask=bmask[None, :] & (d[:, None] < head_dim), other=0.0)
        s += _mm(ac, bt, IEEE, UPCAST)
    return s


@triton.jit
def _acc_store(Dst, Acc, offs, mask, val, kc, n_kc):
    """Accumulate ``val`` over key chunks ``kc = 0 .. n_kc-1`` in a float32 scratch ``Acc``
    (read-modify-write by the same program, no other program touches these rows), and write
    the total to ``Dst`` at the last chunk. With one chunk (windows of up to 64 tokens) the
    scratch is never touched."""
    kc = kc[:, None]  # a row vector of the chunk index (a tensor under the interpreter too)
    prev = tl.load(Acc + offs, mask=mask & (kc > 0), other=0.0)
    tot = prev + val
    tl.store(Acc + offs, tot, mask=mask & (kc < n_kc - 1))
    tl.store(Dst + offs, tot.to(Dst.dtype.element_ty), mask=mask & (kc == n_kc - 1))


@triton.jit
def _pv(p, v, ok, NONFINITE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """p @ v over the allowed keys (``ok``) only. A dot takes every key of the tile (other
    windows and shift regions, with p = 0 there): a NaN or inf value would give 0 * inf = NaN.
    Non-finite values are left out of the dot; when the chunk holds any (rare), indicator dots
    add them back for allowed keys with IEEE products: NaN for a NaN value (or an inf with
    weight 0), +-inf for +-inf with weight > 0."""
    if not NONFINITE:
        return _mm(p.to(v.dtype), v, IEEE, UPCAST)
    bad = (v != v) | (v == float("inf")) | (v == float("-inf"))
    out = _mm(p.to(v.dtype), tl.where(bad, 0.0, v).to(v.dtype), IEEE, UPCAST)
    if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
        out += nonfinite_values(p, v, ok)
    return out


@triton.jit(do_not_specialize=_UNSPECIALISED)
def window_attention2d_fwd_kernel(
    Q, K, V, Bias, Out, Lse, OAcc, FLAG,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    H, W, NH, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, bias_hstride, TILE,
    head_dim, n_chunk, H0,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, DC: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, NONFINITE: tl.constexpr, SPLIT: tl.constexpr,
):
    """BLOCK_Q query rows of a tile against the tile's TILE keys, in chunks of BLOCK_M keys with
    an online softmax across chunks (one chunk for windows of up to 64 tokens). The NONFINITE
    variant is launched after the plain one: it returns at once unless FLAG (the sum of v, on the
    device: no host sync) says v holds a NaN or inf, and then recomputes with IEEE handling of
    those values (a key of another window or shift region must not turn a row NaN)."""
    if NONFINITE:
        if flag_clean(FLAG):
            return
    pid_group = tl.program_id(0)
    sub = tl.program_id(1)
    h = tl.program_id(2)
    if SPLIT:  # more than 65535 heads: this launch's share starts at H0
        h += H0
    NP = WH * WW
    WPP = TILE // NP
    n_kc = TILE // BLOCK_M
    tq = sub * BLOCK_Q + tl.arange(0, BLOCK_Q)
    bq, yq, xq, pq, gq = _rows(pid_group, tq, H, W, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, NP, WPP)
    qrow = bq * sqb + yq * sqy + xq * sqx + h * sqh
    row = ((bq * H + yq) * W + xq) * NH + h
    # Finite start: a chunk may hold no allowed key of a row (exp(-inf - -inf) would be NaN).
    m = tl.full((BLOCK_Q,), -1.0e30, dtype=tl.float32)
    l = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for kc in range(0, n_kc):
        tk = kc * BLOCK_M + tl.arange(0, BLOCK_M)
        bk, yk, xk, pk, gk = _rows(pid_group, tk, H, W, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, NP, WPP)
        krow = bk * skb + yk * sky + xk * skx + h * skh
        s = _dot_rows(Q, K, qrow, krow, sqd, skd, pq, pk, head_dim, n_chunk, BLOCK_Q, BLOCK_M, DC, IEEE, UPCAST)
        s = s * scale
        if HAS_BIAS:
            s += tl.load(Bias + h * bias_hstride + tq[:, None] * TILE + tk[None, :])
        allowed = _allowed(gq, tq, gk, pk, tk)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
        # The last chunk writes the normalised output (l is final there).
        kcv = tl.zeros((BLOCK_Q,), dtype=tl.int32) + kc
        scl = tl.where(kcv == n_kc - 1, 1.0 / l, 1.0)
        vrow = bk * svb + yk * svy + xk * svx + h * svh
        for c in range(0, n_chunk):
            d = c * DC + tl.arange(0, DC)
            vc = tl.load(V + vrow[:, None] + d[None, :] * svd, mask=pk[:, None] & (d[None, :] < head_dim), other=0.0)
            oc = _pv(p, vc, allowed, NONFINITE, IEEE, UPCAST)
            offs = row[:, None] * head_dim + d[None, :]
            om = pq[:, None] & (d[None, :] < head_dim)
            prev = tl.load(OAcc + offs, mask=om & (kcv[:, None] > 0), other=0.0)
            tot = prev * alpha[:, None] + oc
            tl.store(OAcc + offs, tot, mask=om & (kcv[:, None] < n_kc - 1))
            tl.store(Out + offs, (tot * scl[:, None]).to(Out.dtype.element_ty), mask=om & (kcv[:, None] == n_kc - 1))
        tl.debug_barrier()
    tl.store(Lse + row, m + tl.log(l), mask=pq)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def window_attention2d_bwd_dq_kernel(
    Q, K, V, O, DO, Lse, Bias, DQ, Delta, DBiasPartial, DQAcc,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sgb, sgy, sgx, sgh, sgd,
    H, W, NH, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, bias_hstride, TILE,
    head_dim, n_chunk, H0,
    groups_per_prog, n_progs,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, DC: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT: tl.constexpr,
):
    """Query-major: BLOCK_Q query rows of a tile against the tile's TILE keys (in chunks of
    BLOCK_M), for each of this program's window groups (a fixed, contiguous range of groups)."""
    pid = tl.program_id(0)
    sub = tl.program_id(1)
    h = tl.program_id(2)
    if SPLIT:  # more than 65535 heads: this launch's share starts at H0
        h += H0
    NP = WH * WW
    WPP = TILE // NP
    n_kc = TILE // BLOCK_M
    tq = sub * BLOCK_Q + tl.arange(0, BLOCK_Q)
    # This program's own slab of the bias-gradient partial (no other program touches it): the
    # dS tiles of its window groups are summed there in a fixed order (read-modify-write in
    # global memory, which keeps the loop free of a loop-carried register tile).
    part_base = DBiasPartial + (h.to(tl.int64) * n_progs + pid) * TILE * TILE
    if BIAS_GRAD:
        for kc in range(0, n_kc):
            tk = kc * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(part_base + tq[:, None] * TILE + tk[None, :], tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32))
        tl.debug_barrier()  # the slab is re-read below, possibly by other threads of the block
    n_total = groups_per_prog * n_progs
    for it in range(0, groups_per_prog):
        grp = pid * groups_per_prog + it
        # grp beyond the last group gives windows >= n_windows: every row is absent.
        # zero = 0, but not provably so for the compiler: the per-row tiles below are then
        # recomputed in each iteration instead of being hoisted out of the loop and kept live
        # (in registers) across it, which made this loop spill.
        zero = grp // n_total
        tq_it = tq + zero
        bq, yq, xq, pq, gq = _rows(grp, tq_it, H, W, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, NP, WPP)
        qrow = bq * sqb + yq * sqy + xq * sqx + h * sqh
        row = ((bq * H + yq) * W + xq) * NH + h
        grow = bq * sgb + yq * sgy + xq * sgx + h * sgh
        lse = tl.load(Lse + row, mask=pq, other=float("inf"))  # absent rows: P = 0
        # delta = rowsum(dO * O)
        delta = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        for c in range(0, n_chunk):
            d = c * DC + tl.arange(0, DC) + zero
            qm = pq[:, None] & (d[None, :] < head_dim)
            doc = tl.load(DO + grow[:, None] + d[None, :] * sgd, mask=qm, other=0.0)
            oc = tl.load(O + row[:, None] * head_dim + d[None, :], mask=qm, other=0.0)
            delta += tl.sum(doc.to(tl.float32) * oc.to(tl.float32), axis=1)
        tl.store(Delta + row, delta, mask=pq)
        for kc in range(0, n_kc):
            tk_it = kc * BLOCK_M + tl.arange(0, BLOCK_M) + zero
            bk, yk, xk, pk, gk = _rows(grp, tk_it, H, W, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, NP, WPP)
            krow = bk * skb + yk * sky + xk * skx + h * skh
            vrow = bk * svb + yk * svy + xk * svx + h * svh
            s = _dot_rows(Q, K, qrow, krow, sqd, skd, pq, pk, head_dim, n_chunk, BLOCK_Q, BLOCK_M, DC, IEEE, UPCAST)
            s = s * scale
            if HAS_BIAS:
                s += tl.load(Bias + h * bias_hstride + tq_it[:, None] * TILE + tk_it[None, :])
            allowed = _allowed(gq, tq_it, gk, pk, tk_it)
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            # dP = dO V^T
            dp = _dot_rows(DO, V, grow, vrow, sgd, svd, pq, pk, head_dim, n_chunk, BLOCK_Q, BLOCK_M, DC, IEEE, UPCAST)
            ds = p * (dp - delta[:, None])
            if BIAS_GRAD:
                part = part_base + tq_it[:, None] * TILE + tk_it[None, :]
                tl.store(part, tl.load(part) + ds)
                tl.debug_barrier()
            dsq = ds.to(Q.dtype.element_ty)
            kcv = tl.zeros((BLOCK_Q,), dtype=tl.int32) + kc
            for c in range(0, n_chunk):
                d = c * DC + tl.arange(0, DC) + zero
                kc_t = tl.load(K + krow[:, None] + d[None, :] * skd, mask=pk[:, None] & (d[None, :] < head_dim), other=0.0)
                dqc = _mm(dsq, kc_t, IEEE, UPCAST) * scale
                _acc_store(DQ, DQAcc, row[:, None] * head_dim + d[None, :], pq[:, None] & (d[None, :] < head_dim),
                           dqc, kcv, n_kc)
            tl.debug_barrier()


@triton.jit(do_not_specialize=_UNSPECIALISED)
def window_attention2d_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, Bias, DK, DV, DKAcc, DVAcc,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sgb, sgy, sgx, sgh, sgd,
    H, W, NH, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, bias_hstride, TILE,
    head_dim, n_chunk, H0,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, DC: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
):
    """Key-major: BLOCK_Q key rows of a tile against the tile's TILE queries (in chunks of
    BLOCK_M)."""
    pid_group = tl.program_id(0)
    sub = tl.program_id(1)
    h = tl.program_id(2)
    if SPLIT:  # more than 65535 heads: this launch's share starts at H0
        h += H0
    NP = WH * WW
    WPP = TILE // NP
    n_kc = TILE // BLOCK_M
    tk = sub * BLOCK_Q + tl.arange(0, BLOCK_Q)
    bk, yk, xk, pk, gk = _rows(pid_group, tk, H, W, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, NP, WPP)
    kgk = tl.where(pk, gk, -1)  # absent keys in no group: _allowed's and-ed form costs this kernel registers
    krow = bk * skb + yk * sky + xk * skx + h * skh
    vrow = bk * svb + yk * svy + xk * svx + h * svh
    out = ((bk * H + yk) * W + xk) * NH + h
    for kc in range(0, n_kc):
        tq = kc * BLOCK_M + tl.arange(0, BLOCK_M)
        bq, yq, xq, pq, gq = _rows(pid_group, tq, H, W, Hp, Wp, nWx, nWin, n_windows, sh, sw, WH, WW, NP, WPP)
        qrow = bq * sqb + yq * sqy + xq * sqx + h * sqh
        qout = ((bq * H + yq) * W + xq) * NH + h
        grow = bq * sgb + yq * sgy + xq * sgx + h * sgh
        lse = tl.load(Lse + qout, mask=pq, other=float("inf"))  # absent queries: P = 0
        st = _dot_rows(K, Q, krow, qrow, skd, sqd, pk, pq, head_dim, n_chunk, BLOCK_Q, BLOCK_M, DC, IEEE, UPCAST)
        st = st * scale
        if HAS_BIAS:
            st += tl.load(Bias + h * bias_hstride + tq[None, :] * TILE + tk[:, None])
        allowed = (gq[None, :] == kgk[:, None]) | (tq[None, :] == tk[:, None])  # _allowed, keys x queries
        pt = tl.where(allowed, tl.exp(st - lse[None, :]), 0.0)  # P^T: (keys, queries)
        ptc = pt.to(DO.dtype.element_ty)
        kcv = tl.zeros((BLOCK_Q,), dtype=tl.int32) + kc
        # dV += P^T dO
        for c in range(0, n_chunk):
            d = c * DC + tl.arange(0, DC)
            doc = tl.load(DO + grow[:, None] + d[None, :] * sgd, mask=pq[:, None] & (d[None, :] < head_dim), other=0.0)
            dvc = _mm(ptc, doc, IEEE, UPCAST)
            _acc_store(DV, DVAcc, out[:, None] * head_dim + d[None, :], pk[:, None] & (d[None, :] < head_dim),
                       dvc, kcv, n_kc)
        # dP^T = V dO^T
        dpt = _dot_rows(V, DO, vrow, grow, svd, sgd, pk, pq, head_dim, n_chunk, BLOCK_Q, BLOCK_M, DC, IEEE, UPCAST)
        delta = tl.load(Delta + qout, mask=pq, other=0.0)
        dst = (pt * (dpt - delta[None, :])).to(Q.dtype.element_ty)
        for c in range(0, n_chunk):
            d = c * DC + tl.arange(0, DC)
            qc = tl.load(Q + qrow[:, None] + d[None, :] * sqd, mask=pq[:, None] & (d[None, :] < head_dim), other=0.0)
            dkc = _mm(dst, qc, IEEE, UPCAST) * scale
            _acc_store(DK, DKAcc, out[:, None] * head_dim + d[None, :], pk[:, None] & (d[None, :] < head_dim),
                       dkc, kcv, n_kc)
        tl.debug_barrier()


# =========================================================================================
# Launch configuration
# =========================================================================================
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_config(N: int, head_dim: int, dtype: torch.dtype, kind: str, has_bias: bool = True) -> dict:
    """Tile of one program of ``kind`` ("fwd", "dq" or "dkdv") for N-token windows.

    ``TILE`` rows (keys and queries) per tile: 64 for windows of up to 64 tokens (``64 // N``
    windows packed per tile), else N rounded up to a multiple of 64 (one window per tile).
    A program takes ``BLOCK_Q`` rows of the tile (queries in fwd/dq, keys in dkdv) against the
    tile's rows in chunks of ``BLOCK_M`` = 64, and head_dim in chunks of ``DC`` columns (both
    runtime loops). ``TILE``, head_dim and the chunk counts are runtime arguments, so the
    compiled kernel depends only on (kind, dtype, DC, num_warps) and the bias flags: every
    window size and head_dim runs one of the 31 ``AOT_CONFIGS`` kernels.

    16 rows per program is one mma row block (more would replicate the B operand per warp
    row, fewer warps would put many rows of the loaded tiles on each thread); 32-column
    chunks for the 16-bit forward and dq kernels (16 for head_dim <= 16), 16 otherwise
    (float32 and the dk/dv kernel); 8 warps (the 16-bit forward with 32-column chunks needs
    255 registers with 4 warps on sm_80, 206 with 8), except 4 for the float32 dk/dv kernel
    without a bias (with 8, ptxas caps it at 128 registers on sm_90 and spills one value).
    With these every ``AOT_CONFIGS`` entry compiles for sm_80 and sm_90 without spills,
    within 240 registers."""
    block_d = max(16, _next_pow2(head_dim))
    tile = 64 if N <= 64 else -(-N // 64) * 64
    half = dtype != torch.float32
    dc = min(block_d, 32 if (half and kind != "dkdv") else 16)
    return {"TILE": tile, "BLOCK_M": 64, "BLOCK_Q": 16, "DC": dc, "NCHUNK": -(-head_dim // dc),
            "num_warps": 4 if (kind == "dkdv" and not half and not has_bias) else 8, "num_stages": 1}


@functools.lru_cache(maxsize=64)
def _tile_index(wh: int, ww: int, block_m: int, device: torch.device) -> torch.Tensor:
    """(BLOCK_M, BLOCK_M) flat index into the table plus one trailing zero entry: the
    key-minus-query offsets on the diagonal window blocks, the zero entry elsewhere."""
    N = wh * ww
    T = (2 * wh - 1) * (2 * ww - 1)
    ys = torch.arange(wh).repeat_interleave(ww)
    xs = torch.arange(ww).repeat(wh)
    rel = (ys[None, :] - ys[:, None] + wh - 1) * (2 * ww - 1) + (xs[None, :] - xs[:, None] + ww - 1)
    idx = torch.full((block_m, block_m), T, dtype=torch.long)
    for s in range(block_m // N):
        idx[s * N:(s + 1) * N, s * N:(s + 1) * N] = rel
    return idx.to(device)


def _bias_tile(bias: torch.Tensor, wh: int, ww: int, block_m: int) -> torch.Tensor:
    flat = bias.reshape(bias.shape[0], -1)
    flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], dim=1)
    return flat[:, _tile_index(wh, ww, block_m, bias.device)].contiguous()


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _config.triton_interpret()


def _geometry(q, window_size):
    B, H, W, NH, D = q.shape
    wh, ww = window_size
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    nWx = Wp // ww
    nWin = (Hp // wh) * nWx
    return B, H, W, NH, D, Hp, Wp, nWx, nWin


GRID_Z_MAX = 65535  # CUDA's limit on grid z (heads)


def _head_chunks(NH: int):
    """(H0, heads) per launch: heads sit on grid z, at most GRID_Z_MAX per launch (the kernels'
    SPLIT, set only when there is more than one launch, adds H0)."""
    for h0 in range(0, NH, GRID_Z_MAX):
        yield h0, min(GRID_Z_MAX, NH - h0)


def _narrow_offsets(*tensors):
    """The kernels add ``head * stride`` and ``channel * stride`` to int64 row offsets in int32:
    a tensor whose head or channel offsets can reach 2**31 (a view with huge strides on those
    dimensions; never a contiguous tensor or a fused-qkv view of a real model) is copied to a
    contiguous one first, where they stay below heads * head_dim. Rows, columns and batch are
    int64 in the kernels."""
    out = []
    for t in tensors:
        nh, d = t.shape[3], t.shape[4]
        if (nh - 1) * t.stride(3) >= 2**31 - 1 or (d - 1) * t.stride(4) >= 2**31 - 1:
            t = t.contiguous()
        out.append(t)
    return out


def _scratch(like: torch.Tensor, cfg: dict, shape, dummy: torch.Tensor) -> torch.Tensor:
    """float32 accumulator across key chunks, only for tiles of more than one chunk."""
    if cfg["TILE"] > cfg["BLOCK_M"]:
        return torch.empty(shape, device=like.device, dtype=torch.float32)
    return dummy


def forward(q, k, v, bias, window_size, shift, scale):
    B, H, W, NH, D, Hp, Wp, nWx, nWin = _geometry(q, window_size)
    wh, ww = window_size
    sh, sw = shift
    out = _checks.empty((B, H, W, NH, D), like=q)
    lse = _checks.empty((B, H, W, NH), like=q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    N = wh * ww
    cfg = tile_config(N, D, q.dtype, "fwd", bias is not None)
    T = cfg["TILE"]
    n_windows = B * nWin
    n_groups = triton.cdiv(n_windows, T // N)
    n_sub = triton.cdiv((T // N) * N, cfg["BLOCK_Q"])
    has_bias = bias is not None
    bias_arg = _bias_tile(bias, wh, ww, T) if has_bias else lse
    bias_hstride = (0 if bias.shape[0] == 1 else T * T) if has_bias else 0
    oacc = _scratch(q, cfg, out.shape, lse)
    q, k, v = _narrow_offsets(q, k, v)
    flag, variants = nonfinite_passes(v)
    for nonfinite, (h0, nh) in itertools.product(variants, list(_head_chunks(NH))):
        window_attention2d_fwd_kernel[(n_groups, n_sub, nh)](
            q, k, v, bias_arg, out, lse, oacc, flag,
            *_strides(q), *_strides(k), *_strides(v),
            H, W, NH, Hp, Wp, nWx, nWin, n_windows, sh, sw, wh, ww, bias_hstride, T, D, cfg["NCHUNK"], h0,
            float(scale),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_Q=cfg["BLOCK_Q"], DC=cfg["DC"],
            HAS_BIAS=has_bias, IEEE=q.dtype == torch.float32, UPCAST=_upcast(q.dtype), NONFINITE=nonfinite, SPLIT=NH > GRID_Z_MAX,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out, lse


def _bias_grad_from_blocks(ds_sum: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(NH, N, N) summed dS (query rows, key columns) -> (NH, 2wh-1, 2ww-1) table gradient,
    ``table[dy + wh-1, dx + ww-1] = sum over queries of dS[q, q + (dy, dx)]``; gathers and
    sums only (deterministic)."""
    NH = ds_sum.shape[0]
    dev = ds_sum.device
    g = ds_sum.reshape(NH, wh, ww, wh, ww)  # (h, iq, jq, ik, jk)

    def offsets(w):
        a = torch.arange(2 * w - 1, device=dev)
        iq = torch.arange(w, device=dev)
        ik = iq[:, None] + a[None, :] - (w - 1)  # (iq, a)
        valid = (ik >= 0) & (ik < w)
        return ik.clamp(0, w - 1), valid

    iky, vy = offsets(wh)
    ikx, vx = offsets(ww)
    # y: (h, jq, jk, iq, ik) gather ik -> (h, jq, jk, iq, a)
    gy = g.permute(0, 2, 4, 1, 3)
    gy = torch.gather(gy, 4, iky.expand(NH, ww, ww, wh, 2 * wh - 1))
    gy = (gy * vy).sum(3)  # (h, jq, jk, ay)
    gx = gy.permute(0, 3, 1, 2)  # (h, ay, jq, jk)
    gx = torch.gather(gx, 3, ikx.expand(NH, 2 * wh - 1, ww, 2 * ww - 1))
    return (gx * vx).sum(2)  # (h, ay, ax)


def backward(grad_out, q, k, v, out, lse, bias, window_size, shift, scale, bias_grad):
    B, H, W, NH, D, Hp, Wp, nWx, nWin = _geometry(q, window_size)
    wh, ww = window_size
    sh, sw = shift
    dq = _checks.empty(q.shape, like=q)
    dk = _checks.empty(q.shape, like=q)
    dv = _checks.empty(q.shape, like=q)
    want_db = bias is not None and bias_grad
    if q.numel() == 0:
        db = torch.zeros_like(bias) if want_db else q.new_empty((0,), dtype=torch.float32)
        return dq, dk, dv, db
    out = out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    N = wh * ww
    cfg = tile_config(N, D, q.dtype, "dq", bias is not None)
    T = cfg["TILE"]
    wpp = T // N
    n_windows = B * nWin
    n_groups = triton.cdiv(n_windows, wpp)
    if want_db:  # partials: at most DB_PARTIAL_FLOATS floats, so a program may take several groups
        n_progs = max(1, min(n_groups, (DB_PARTIAL_FLOATS // (T * T)) // NH))
    else:
        n_progs = n_groups
    groups_per_prog = triton.cdiv(n_groups, n_progs)
    n_progs = triton.cdiv(n_groups, groups_per_prog)
    partial = torch.empty((NH, n_progs, T, T) if want_db else (1,), device=q.device, dtype=torch.float32)
    has_bias = bias is not None
    bias_arg = _bias_tile(bias, wh, ww, T) if has_bias else lse
    bias_hstride = (0 if bias.shape[0] == 1 else T * T) if has_bias else 0
    geo = (H, W, NH, Hp, Wp, nWx, nWin, n_windows, sh, sw, wh, ww, bias_hstride, T, D)
    q, k, v, grad_out = _narrow_offsets(q, k, v, grad_out)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    common = dict(BLOCK_M=cfg["BLOCK_M"], HAS_BIAS=has_bias, IEEE=q.dtype == torch.float32,
                  UPCAST=_upcast(q.dtype), SPLIT=NH > GRID_Z_MAX)
    n_sub = triton.cdiv(wpp * N, cfg["BLOCK_Q"])
    dq_acc = _scratch(q, cfg, q.shape, lse)
    for h0, nh in _head_chunks(NH):
        window_attention2d_bwd_dq_kernel[(n_progs, n_sub, nh)](
            q, k, v, out, grad_out, lse, bias_arg, dq, delta, partial, dq_acc,
            *strides, *geo, cfg["NCHUNK"], h0, groups_per_prog, n_progs, float(scale),
            BLOCK_Q=cfg["BLOCK_Q"], DC=cfg["DC"], BIAS_GRAD=want_db, **common,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    cfg = tile_config(N, D, q.dtype, "dkdv", bias is not None)
    n_sub = triton.cdiv(wpp * N, cfg["BLOCK_Q"])
    dk_acc, dv_acc = _scratch(q, cfg, q.shape, lse), _scratch(q, cfg, q.shape, lse)
    for h0, nh in _head_chunks(NH):
        window_attention2d_bwd_dkdv_kernel[(n_groups, n_sub, nh)](
            q, k, v, grad_out, lse, delta, bias_arg, dk, dv, dk_acc, dv_acc,
            *strides, *geo, cfg["NCHUNK"], h0, float(scale),
            BLOCK_Q=cfg["BLOCK_Q"], DC=cfg["DC"], **common,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    if not want_db:
        return dq, dk, dv, q.new_empty((0,), dtype=torch.float32)
    tiles = partial.sum(1)  # (NH, T, T), fixed-order reduction
    blocks = torch.stack([tiles[:, s * N:(s + 1) * N, s * N:(s + 1) * N] for s in range(wpp)]).sum(0)
    db = _bias_grad_from_blocks(blocks, wh, ww)  # (NH, 2wh-1, 2ww-1)
    if bias.shape[0] == 1:
        db = db.sum(0, keepdim=True)
    return dq, dk, dv, db.to(bias.dtype)


# =========================================================================================
# Ahead-of-time compile list: every compiled kernel the launchers can pick. The window size,
# tile size (64, 128, 192 or 256 rows), head_dim and chunk counts are runtime arguments, so a
# kernel is fixed by (kind, dtype, DC, num_warps, bias flags): AOT_CONFIGS is generated by enumerating every
# tile size and head_dim bucket the launchers accept (windows of 1..256 tokens, head_dim
# 1..256) through ``tile_config`` and keeping the distinct kernels.
# =========================================================================================
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_KERNELS = {"fwd": window_attention2d_fwd_kernel, "dq": window_attention2d_bwd_dq_kernel,
            "dkdv": window_attention2d_bwd_dkdv_kernel}
_AOT_TOKENS = (16, 49, 64, 144, 256)  # tiles of 64, 64, 64, 192, 256 rows
_AOT_HEAD_DIMS = (16, 32, 64, 128, 256)  # one per DC bucket; others share these kernels


def _aot_entry(kind: str, dtype: torch.dtype, N: int, head_dim: int, has_bias: bool = True,
               bias_grad: bool = True) -> dict:
    cfg = tile_config(N, head_dim, dtype, kind, has_bias)
    p = _PTR[dtype]
    strides = {f"s{a}{b}": "i32" for a in ("q", "k", "v") for b in ("b", "y", "x", "h", "d")}
    geo = {n: "i32" for n in ("H", "W", "NH", "Hp", "Wp", "nWx", "nWin", "n_windows", "sh", "sw", "WH", "WW",
                              "bias_hstride", "TILE", "head_dim", "n_chunk", "H0")}
    consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_Q": cfg["BLOCK_Q"], "DC": cfg["DC"],
              "HAS_BIAS": has_bias, "IEEE": dtype == torch.float32, "UPCAST": False, "SPLIT": False}
    if kind == "fwd":
        sig = {"Q": p, "K": p, "V": p, "Bias": "*fp32", "Out": p, "Lse": "*fp32", "OAcc": "*fp32", "FLAG": "*fp32",
               **strides, **geo, "scale": "fp32"}
        consts["NONFINITE"] = False
    else:
        strides.update({f"sg{b}": "i32" for b in ("b", "y", "x", "h", "d")})
        if kind == "dq":
            sig = {"Q": p, "K": p, "V": p, "O": p, "DO": p, "Lse": "*fp32", "Bias": "*fp32", "DQ": p,
                   "Delta": "*fp32", "DBiasPartial": "*fp32", "DQAcc": "*fp32", **strides, **geo,
                   "groups_per_prog": "i32", "n_progs": "i32", "scale": "fp32"}
            consts["BIAS_GRAD"] = has_bias and bias_grad
        else:
            sig = {"Q": p, "K": p, "V": p, "DO": p, "Lse": "*fp32", "Delta": "*fp32", "Bias": "*fp32",
                   "DK": p, "DV": p, "DKAcc": "*fp32", "DVAcc": "*fp32", **strides, **geo, "scale": "fp32"}
    # Triton specialises integer arguments equal to 1 at launch: the unit head_dim stride of
    # the usual layouts (contiguous, or views into a fused qkv) is compiled as a constant.
    for name in [n for n in sig if n.startswith("s") and n.endswith("d") and len(n) == 3]:
        consts[name] = 1
    sig.update({c: "constexpr" for c in consts})
    variant = "" if has_bias else "_nobias"
    if kind == "dq" and has_bias and not bias_grad:
        variant = "_nobiasgrad"
    name = f"{kind}_{str(dtype).replace('torch.', '')}_dc{cfg['DC']}_w{cfg['num_warps']}{variant}"
    return {"name": name, "kernel": _KERNELS[kind], "signature": sig, "constexprs": consts,
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "tensor_cores": dtype != torch.float32}


def _aot_configs() -> list:
    seen = {}
    for kind in ("fwd", "dq", "dkdv"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for N in _AOT_TOKENS:
                for d in _AOT_HEAD_DIMS:
                    # with a bias table (learned or not: dq sums its gradient only if
                    # asked) and without one
                    for has_bias, bias_grad in ((True, True), (True, False), (False, False)):
                        entry = _aot_entry(kind, dtype, N, d, has_bias, bias_grad)
                        seen.setdefault(entry["name"], entry)
    return list(seen.values())


AOT_CONFIGS = _aot_configs()
