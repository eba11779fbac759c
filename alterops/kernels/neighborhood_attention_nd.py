"""Triton kernels of the N-d neighbourhood attention family (1-D, 2-D and 3-D maps, all given
as three spatial axes (T, H, W)): a flash-style forward, and a backward split into a query-side
kernel (dq, and per-(query, neighbour slot) logit gradients for the bias table) and a key-side
kernel (dk, dv).

Tiling: a program owns a TM_T x TM_H x TM_W block of queries of one (batch, head); it visits
the TN_T x TN_H x TN_W key blocks covering the bounding box of its queries' windows. Whether a
key is in a query's window is decided per pair from coordinates, axis by axis (the window of a
query is the product of its per-axis windows): keys are numbered dilation sub-grid by sub-grid
(``_key_code``), which makes each query's per-axis window one interval of numbers.
Per axis the window follows the rule of the N-d ops: kernel size (odd or even), dilation,
stride, causal, and the border rule ``clamp`` (NATTEN's windows that slide inward at a border),
``mask`` or ``zero`` (centred windows; stride 1, not causal). The bias-table entry of a pair is
``(key - query) / dilation + kernel - 1`` per axis. Logits never reach global memory; the
softmax is the online one in base 2 (``exp2``, scale and bias folded in). For ``zero`` the
out-of-image neighbours (zero key and value, logit = bias) join the softmax after the key loop.

Grouped-query heads: query head ``h`` reads k/v head ``h // GROUP``. The forward and dq programs
run per (batch, query head); the dk/dv program runs per (batch, k/v head) and sums its group's
query heads in a loop, so k and v are never expanded and no atomics are used.

The bias gradient is deterministic: the dq kernel stores each logit gradient at its (query,
neighbour slot) entry of a ``(B, heads, T, H, W, KT, KH, KW)`` buffer (slot = key minus the
window's first key, per axis, in dilation steps; each entry written by one program); the
launcher reduces the buffer to the table with one one-hot contraction per axis.

Sizes: grid x holds the query (key) blocks of one image, grid y the (batch, head) pairs from
``BH0`` on (the launcher splits them into launches of at most 65535, CUDA's grid-y limit:
``SPLIT``). Offsets within an image are int32 unless ``WIDE`` (the batch term is always int64),
which the launcher sets when any tensor's offsets within an image can reach 2**31.
"""
import triton
import triton.language as tl

from ._attention_common import flag_clean, nonfinite_passes, nonfinite_values  # noqa: F401 (the launcher's)

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------
# Windows, one axis at a time
# ---------------------------------------------------------------------------------------
@triton.jit
def _axis_window(p, L, K, DIL, S, CAUSAL, BORDER: tl.constexpr):
    """Window of query positions ``p`` (>= 0) on one axis, in p's dilation sub-grid (the
    positions ``res + DIL * g``): ``(res, start, last)``, the window holding sub-grid indices
    start..last. ``clamp``: NATTEN's stride-group leader and inward shift; causal windows end at
    the query and may hold fewer than K keys. ``mask``/``zero`` (stride 1, not causal): centred,
    possibly reaching past the map (those indices are no keys of the map)."""
    left = K // 2
    right = K // 2 + K % 2 - 1
    res = p % DIL
    ig = p // DIL
    if BORDER == 0:
        lg = (L - res + DIL - 1) // DIL  # length of p's dilation sub-grid
        if CAUSAL != 0:
            leader = tl.minimum((ig // S) * S + S - 1, lg - 1)
            start = tl.maximum(leader - left - right, 0)
            last = ig
        else:
            leader = tl.minimum((ig // S) * S + S // 2, lg - 1)
            start = tl.maximum(leader - left, 0)
            start = tl.where(leader + right >= lg, start + lg - right - leader - 1, start)
            last = start + K - 1
    else:
        start = ig - left
        last = ig + right
    return res, start, last


@triton.jit
def _codes(res, start, last, L, DIL):
    """The window as an interval of key codes (see ``_key_code``): [lo, hi]."""
    n = (L + DIL - 1) // DIL
    return res * n + tl.maximum(start, 0), res * n + tl.minimum(last, n - 1)


@triton.jit
def _key_code(kp, L, DIL):
    """Key positions numbered sub-grid by sub-grid: (kp % DIL) * ceil(L / DIL) + kp // DIL, so
    that a query's window (congruent keys with indices start..last) is one interval of codes
    (below DIL * ceil(L / DIL) < L + DIL: no overflow)."""
    return (kp % DIL) * ((L + DIL - 1) // DIL) + kp // DIL


@triton.jit
def _key_range(res, start, last, ok, L, DIL):
    """[lo, hi]: the key positions of one axis that the queries ``ok`` can see (the hull of their
    windows)."""
    lo = tl.min(tl.where(ok, res + DIL * start, L), 0)
    hi = tl.max(tl.where(ok, res + DIL * last, -1), 0)
    return tl.maximum(lo, 0), tl.minimum(hi, L - 1)


@triton.jit
def _query_range(k0, k1, L, K, DIL, S, CAUSAL, BORDER: tl.constexpr):
    """[lo, hi]: a superset of the query positions (one axis) whose windows can hold a key in
    [k0, k1]. Window starts are nondecreasing along a sub-grid; bounds per rule:
    clamp: start(i) <= max(i + S//2 - left, 0) and start(i) >= min(i - S + 1 + S//2 - left, Lg - K);
    clamp causal: start(i) <= i and the window ends at i; centred: i - left .. i + right."""
    left = K // 2
    right = K // 2 + K % 2 - 1
    g0 = k0 // DIL
    g1 = k1 // DIL
    if BORDER == 0:
        if CAUSAL != 0:
            lo_g = g0
            hi_g = g1 + K - 1
        else:
            lo_g = tl.where(g0 <= K - 1, 0, g0 - K + 1 + left - S // 2)
            # L // DIL is the shortest sub-grid: past its last full window every query may see it
            hi_g = tl.where(g1 >= L // DIL - K, L, g1 + left + S - 1 - S // 2)
    else:
        lo_g = g0 - right
        hi_g = g1 + left
    return tl.maximum(lo_g * DIL, 0), tl.minimum(hi_g * DIL + DIL - 1, L - 1)


@triton.jit
def _window_codes(qt, qy, qx, T, H, W, KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW, BORDER: tl.constexpr):
    """Each query's window on every axis as an interval of key codes (see _codes), plus the
    per-axis (residue, start, last) triples the key-range bounds are taken from."""
    rt, st, et = _axis_window(qt, T, KT, DT, ST, CT, BORDER)
    ry, sy, ey = _axis_window(qy, H, KH, DH, SH, CH, BORDER)
    rx, sx, ex = _axis_window(qx, W, KW, DW, SW, CW, BORDER)
    lo_t, hi_t = _codes(rt, st, et, T, DT)
    lo_y, hi_y = _codes(ry, sy, ey, H, DH)
    lo_x, hi_x = _codes(rx, sx, ex, W, DW)
    return rt, st, et, ry, sy, ey, rx, sx, ex, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x


@triton.jit
def _query_windows(qt, qy, qx, m_ok, T, H, W, KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW,
                   BORDER: tl.constexpr):
    """A query block's key-range bounds per axis (the keys any of its queries can see), each
    query's window codes, and its window starts (sub-grid indices) per axis."""
    rt, st, et, ry, sy, ey, rx, sx, ex, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x = _window_codes(
        qt, qy, qx, T, H, W, KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW, BORDER)
    kt_lo, kt_hi = _key_range(rt, st, et, m_ok, T, DT)
    ky_lo, ky_hi = _key_range(ry, sy, ey, m_ok, H, DH)
    kx_lo, kx_hi = _key_range(rx, sx, ex, m_ok, W, DW)
    return kt_lo, kt_hi, ky_lo, ky_hi, kx_lo, kx_hi, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x, st, sy, sx


@triton.jit
def _axis_ok(ok, code, lo, hi, L):
    """``ok`` [M, N] and: key codes[N] within the windows [lo, hi][M] on one axis of length L. An
    axis of length 1 adds nothing: its only key is every query's own position."""
    if L > 1:
        ok = ok & (code[None, :] >= lo[:, None]) & (code[None, :] <= hi[:, None])
    return ok


@triton.jit
def _pair_ok(n_ok, m_ok, ct, cy, cx, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x, T, H, W):
    """[M, N]: in-map key with codes (ct, cy, cx)[N] in the window of in-map query [M]."""
    ok = n_ok[None, :] & m_ok[:, None]
    ok = _axis_ok(ok, cx, lo_x, hi_x, W)
    ok = _axis_ok(ok, cy, lo_y, hi_y, H)
    return _axis_ok(ok, ct, lo_t, hi_t, T)


@triton.jit
def _bias_key_part(t, y, x, KH, KW, DT, DH, DW):
    """Key part of the flat bias-table index: the cell of an in-window pair is
    ``_bias_key_part(key) + _bias_query_part(query)`` (key and query congruent modulo the
    dilation, both >= 0: the divisions split)."""
    return ((t // DT) * (2 * KH - 1) + y // DH) * (2 * KW - 1) + x // DW


@triton.jit
def _bias_query_part(t, y, x, KT, KH, KW, DT, DH, DW):
    """Query part of the flat bias-table index: the centre cell minus the key part."""
    return ((KT - 1) * (2 * KH - 1) + KH - 1) * (2 * KW - 1) + KW - 1 - _bias_key_part(t, y, x, KH, KW, DT, DH, DW)


@triton.jit
def _slot_key_part(t, y, x, KH, KW, DT, DH, DW):
    """Key part of the flat neighbour slot (jt * KH + jy) * KW + jx, j = key's sub-grid index
    minus the window start per axis; the query part is the same with the window starts."""
    return ((t // DT) * KH + y // DH) * KW + x // DW


@triton.jit
def _ptrs(P, b, sb, h, sh, t, st, y, sy, x, sx, d, sd, WIDE: tl.constexpr):
    """Pointers to rows (t, y, x) and columns d of head h of image b (b is int64). The offsets
    within an image are int32 unless WIDE."""
    if WIDE:
        h = h.to(tl.int64)
        t = t.to(tl.int64)
        y = y.to(tl.int64)
        x = x.to(tl.int64)
        d = d.to(tl.int64)
    return P + b * sb + h * sh + (t * st + y * sy + x * sx)[:, None] + d[None, :] * sd


@triton.jit
def _mm(a, b, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b with float32 accumulation: exact float32 products for float32 inputs (no TF32);
    UPCAST_DOT (set only under the CPU interpreter, whose bfloat16 dot is unreliable) computes
    half inputs in float32."""
    if FP32_DOT:
        return tl.dot(a, b, input_precision="ieee")
    elif UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _pv(p, v, ok, NONFINITE: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """p @ v over the in-window keys (``ok``) only. A dot takes every key of the tile, and a key
    outside a query's window has p = 0 there: a NaN or inf value would give 0 * inf = NaN.
    In the NONFINITE variant (run only when v holds a non-finite value) non-finite values are
    left out of the dot and added back for in-window keys with IEEE products."""
    if not NONFINITE:
        return _mm(p.to(v.dtype), v, FP32_DOT, UPCAST_DOT)
    bad = (v != v) | (v == float("inf")) | (v == float("-inf"))
    out = _mm(p.to(v.dtype), tl.where(bad, 0.0, v).to(v.dtype), FP32_DOT, UPCAST_DOT)
    if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
        out += nonfinite_values(p, v, ok)
    return out


@triton.jit
def _coords(t0, y0, x0, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Coordinates (t, y, x) of the BT x BH x BW block at (t0, y0, x0), row-major (an axis of
    block size 1 is a splat of its start: one register)."""
    offs = tl.arange(0, BT * BH * BW)
    if BT == 1:
        t = t0 + offs * 0
    else:
        t = t0 + offs // (BH * BW)
    if BH == 1:
        y = y0 + offs * 0
    else:
        y = y0 + (offs // BW) % BH
    return t, y, x0 + offs % BW


@triton.jit
def _block(pid, T, H, W, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Coordinates (t, y, x) of block ``pid`` (row-major over the map), and whether each lies
    in the map."""
    n_w = tl.cdiv(W, BW)
    n_h = tl.cdiv(H, BH)
    t, y, x = _coords((pid // (n_w * n_h)) * BT, ((pid // n_w) % n_h) * BH, (pid % n_w) * BW, BT, BH, BW)
    return t, y, x, (t < T) & (y < H) & (x < W)


@triton.jit
def _zero_border_slot(qt, qy, qx, i, j, l, T, H, W, KT, KH, KW, DT, DH, DW, bias_base, HAS_BIAS: tl.constexpr):
    """Whether centred-window slot (i, j, l) of queries (qt, qy, qx) lies outside the map, and
    its logit there in log2 units (the zero key's: the bias table's entry at offset i - KT//2
    etc., or 0 without a table)."""
    pt = qt + (i - KT // 2) * DT
    py = qy + (j - KH // 2) * DH
    px = qx + (l - KW // 2) * DW
    out = (pt < 0) | (pt >= T) | (py < 0) | (py >= H) | (px < 0) | (px >= W)
    z = 0.0
    if HAS_BIAS:
        cell = ((i - KT // 2 + KT - 1) * (2 * KH - 1) + (j - KH // 2 + KH - 1)) * (2 * KW - 1) + (l - KW // 2 + KW - 1)
        z = tl.load(bias_base + cell) * 1.4426950408889634
    return out, z


@triton.jit
def _pair_of(pid, BH0, NHEADS, SPLIT: tl.constexpr):
    """The (batch, head) pair of program ``pid`` on grid axis 1 (from BH0 on when the pairs were
    split over launches of at most 65535), its batch (int64) and head, NHEADS heads per batch."""
    pair = pid
    if SPLIT:
        pair += BH0
    return pair, (pair // NHEADS).to(tl.int64), pair % NHEADS


@triton.jit
def _range_block(t0, y0, x0, t_hi, y_hi, x_hi, d_ok, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """A block of the positions that a loop over a key (or query) range visits: coordinates, which
    lie within the range (<= its last position per axis), and the [positions, channels] load mask."""
    t, y, x = _coords(t0, y0, x0, BT, BH, BW)
    ok = (t <= t_hi) & (y <= y_hi) & (x <= x_hi)
    return t, y, x, ok, ok[:, None] & d_ok[None, :]


@triton.jit
def _add_bias(s, ok, bias_base, bias_q, bias_k, HAS_BIAS: tl.constexpr):
    """Logits s (log2 units) plus the bias table's entries of the in-window pairs ``ok``: cell
    bias_q[query] + bias_k[key]."""
    if HAS_BIAS:
        bias = tl.load(bias_base + (bias_k[None, :] + bias_q[:, None]), mask=ok, other=0.0)
        s = s + bias * 1.4426950408889634
    return s


@triton.jit
def _row_stats(LSE, DELTA, row, m_ok):
    """The saved logsumexp (in log2 units) and DELTA of the queries at flat rows ``row``."""
    lse = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
    return lse, tl.load(DELTA + row, mask=m_ok, other=0.0)


@triton.jit
def _probs_and_grads(s, ok, lse, dp, delta):
    """P = exp2(s - lse) of the in-window pairs (0 elsewhere) and dS = P (dP - DELTA)."""
    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
    return p, p * (dp - delta[:, None])


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
@triton.jit
def nand_fwd_kernel(
    Q, K, V, O, LSE, BIAS, FLAG,
    sqb, sqt, sqy, sqx, sqh, sqd,
    skb, skt, sky, skx, skh, skd,
    svb, svt, svy, svx, svh, svd,
    sob, sot, soy, sox, soh, sod,
    T, H, W, NH, GROUP, HD,
    KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW,
    bias_hs, BH0, qk_scale,
    BORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
    TM_T: tl.constexpr, TM_H: tl.constexpr, TM_W: tl.constexpr,
    TN_T: tl.constexpr, TN_H: tl.constexpr, TN_W: tl.constexpr,
    BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, WIDE: tl.constexpr,
    SPLIT: tl.constexpr, NONFINITE: tl.constexpr,
):
    """One block of queries of one (batch, head): out and the natural-log lse. The NONFINITE
    variant is launched after the plain one: it returns at once unless FLAG (the sum of v, on the
    device: no host sync) says v holds a NaN or inf, and then recomputes with IEEE handling."""
    if NONFINITE:
        if flag_clean(FLAG):
            return
    BLOCK_M: tl.constexpr = TM_T * TM_H * TM_W
    bh, b, h = _pair_of(tl.program_id(1), BH0, NH, SPLIT)
    hk = h // GROUP
    qt, qy, qx, m_ok = _block(tl.program_id(0), T, H, W, TM_T, TM_H, TM_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    q = tl.load(_ptrs(Q, b, sqb, h, sqh, qt, sqt, qy, sqy, qx, sqx, offs_d, sqd, WIDE),
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    kt_lo, kt_hi, ky_lo, ky_hi, kx_lo, kx_hi, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x, _, _, _ = _query_windows(
        qt, qy, qx, m_ok, T, H, W, KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW, BORDER)
    bias_q = _bias_query_part(qt, qy, qx, KT, KH, KW, DT, DH, DW)
    bias_base = BIAS + h * bias_hs

    m_i = tl.where(m_ok, float("-inf"), 0.0)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for tt in range(kt_lo, kt_hi + 1, TN_T):
        for ty in range(ky_lo, ky_hi + 1, TN_H):
            for tx in range(kx_lo, kx_hi + 1, TN_W):
                kt, ky, kx, n_ok, kv_mask = _range_block(tt, ty, tx, kt_hi, ky_hi, kx_hi, d_ok, TN_T, TN_H, TN_W)
                k = tl.load(_ptrs(K, b, skb, hk, skh, kt, skt, ky, sky, kx, skx, offs_d, skd, WIDE),
                            mask=kv_mask, other=0.0)
                s = _mm(q, tl.trans(k), FP32_DOT, UPCAST_DOT) * qk_scale
                ok = _pair_ok(n_ok, m_ok, _key_code(kt, T, DT), _key_code(ky, H, DH), _key_code(kx, W, DW),
                              lo_t, hi_t, lo_y, hi_y, lo_x, hi_x, T, H, W)
                s = _add_bias(s, ok, bias_base, bias_q, _bias_key_part(kt, ky, kx, KH, KW, DT, DH, DW), HAS_BIAS)
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a query with no key in this tile (yet) keeps m = -inf: shift by 0 instead
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                p = tl.exp2(s - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(_ptrs(V, b, svb, hk, svh, kt, svt, ky, svy, kx, svx, offs_d, svd, WIDE),
                            mask=kv_mask, other=0.0)
                acc = acc * alpha[:, None] + _pv(p, v, ok, NONFINITE, FP32_DOT, UPCAST_DOT)
                m_i = m_new

    if BORDER == 2:
        # out-of-image neighbours: zero key and value, logit = bias (0 without a table);
        # first their maximum, then their sum
        m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for i in range(KT):
            for j in range(KH):
                for l in range(KW):
                    pad, z = _zero_border_slot(qt, qy, qx, i, j, l, T, H, W, KT, KH, KW, DT, DH, DW, bias_base,
                                               HAS_BIAS)
                    m_p = tl.where(pad & m_ok, tl.maximum(m_p, z), m_p)
        m_new = tl.maximum(m_i, m_p)
        l_p = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i in range(KT):
            for j in range(KH):
                for l in range(KW):
                    pad, z = _zero_border_slot(qt, qy, qx, i, j, l, T, H, W, KT, KH, KW, DT, DH, DW, bias_base,
                                               HAS_BIAS)
                    l_p += tl.where(pad & m_ok, tl.exp2(z - m_new), 0.0)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + l_p
        acc = acc * alpha[:, None]
        m_i = m_new

    # only rows outside the map (l = 0) are made safe: a NaN sum must stay NaN
    l_safe = tl.where(m_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(_ptrs(O, b, sob, h, soh, qt, sot, qy, soy, qx, sox, offs_d, sod, WIDE),
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + ((bh.to(tl.int64) * T + qt) * H + qy) * W + qx, lse, mask=m_ok)


@triton.jit
def nand_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DLSE, DELTA, DQ, BIAS, DS,
    sqb, sqt, sqy, sqx, sqh, sqd,
    skb, skt, sky, skx, skh, skd,
    svb, svt, svy, svx, svh, svd,
    sob, sot, soy, sox, soh, sod,
    sdob, sdot, sdoy, sdox, sdoh, sdod,
    sdqb, sdqt, sdqy, sdqx, sdqh, sdqd,
    T, H, W, NH, GROUP, HD,
    KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW,
    bias_hs, BH0, qk_scale, scale,
    BORDER: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED_DELTA: tl.constexpr, HAS_DLSE: tl.constexpr,
    STORE_DS: tl.constexpr,
    TM_T: tl.constexpr, TM_H: tl.constexpr, TM_W: tl.constexpr,
    TN_T: tl.constexpr, TN_H: tl.constexpr, TN_W: tl.constexpr,
    BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, WIDE: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """One block of queries of one (batch, head): dq, and (STORE_DS) each logit gradient at its
    (query, neighbour slot) entry of DS; dS = P * (dP - DELTA), DELTA = rowsum(dO * O) - dlse.
    FUSED_DELTA (16-bit inputs): it computes the DELTA of its queries (the dlse term when
    HAS_DLSE) and stores it for the dk/dv kernel launched after it, in place of four tensor
    ops on the host; float32 reads the host's DELTA (O's tile next to q and dO made the float32
    configurations spill)."""
    BLOCK_M: tl.constexpr = TM_T * TM_H * TM_W
    bh, b, h = _pair_of(tl.program_id(1), BH0, NH, SPLIT)
    hk = h // GROUP
    qt, qy, qx, m_ok = _block(tl.program_id(0), T, H, W, TM_T, TM_H, TM_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(_ptrs(Q, b, sqb, h, sqh, qt, sqt, qy, sqy, qx, sqx, offs_d, sqd, WIDE), mask=md, other=0.0)
    do = tl.load(_ptrs(DO, b, sdob, h, sdoh, qt, sdot, qy, sdoy, qx, sdox, offs_d, sdod, WIDE),
                 mask=md, other=0.0)
    row = ((bh.to(tl.int64) * T + qt) * H + qy) * W + qx
    if FUSED_DELTA:
        o = tl.load(_ptrs(O, b, sob, h, soh, qt, sot, qy, soy, qx, sox, offs_d, sod, WIDE), mask=md, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + row, mask=m_ok, other=0.0)
        tl.store(DELTA + row, delta, mask=m_ok)
    else:
        delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    lse = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
    kt_lo, kt_hi, ky_lo, ky_hi, kx_lo, kx_hi, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x, st, sy, sx = _query_windows(
        qt, qy, qx, m_ok, T, H, W, KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW, BORDER)
    bias_q = _bias_query_part(qt, qy, qx, KT, KH, KW, DT, DH, DW)
    bias_base = BIAS + h * bias_hs
    # the slot of a pair is slot_key_part(key) - slot_q (window starts in place of the key)
    slot_q = (st * KH + sy) * KW + sx
    ds_row = DS + row * (KT * KH * KW)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for tt in range(kt_lo, kt_hi + 1, TN_T):
        for ty in range(ky_lo, ky_hi + 1, TN_H):
            for tx in range(kx_lo, kx_hi + 1, TN_W):
                kt, ky, kx, n_ok, kv_mask = _range_block(tt, ty, tx, kt_hi, ky_hi, kx_hi, d_ok, TN_T, TN_H, TN_W)
                k = tl.load(_ptrs(K, b, skb, hk, skh, kt, skt, ky, sky, kx, skx, offs_d, skd, WIDE),
                            mask=kv_mask, other=0.0)
                v = tl.load(_ptrs(V, b, svb, hk, svh, kt, svt, ky, svy, kx, svx, offs_d, svd, WIDE),
                            mask=kv_mask, other=0.0)
                s = _mm(q, tl.trans(k), FP32_DOT, UPCAST_DOT) * qk_scale
                dp = _mm(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
                ok = _pair_ok(n_ok, m_ok, _key_code(kt, T, DT), _key_code(ky, H, DH), _key_code(kx, W, DW),
                              lo_t, hi_t, lo_y, hi_y, lo_x, hi_x, T, H, W)
                s = _add_bias(s, ok, bias_base, bias_q, _bias_key_part(kt, ky, kx, KH, KW, DT, DH, DW), HAS_BIAS)
                p, ds = _probs_and_grads(s, ok, lse, dp, delta)
                dq += _mm(ds.to(k.dtype), k, FP32_DOT, UPCAST_DOT)
                if STORE_DS:
                    slot = _slot_key_part(kt, ky, kx, KH, KW, DT, DH, DW)[None, :] - slot_q[:, None]
                    tl.store(ds_row[:, None] + slot, ds, mask=ok)

    if BORDER == 2:
        if STORE_DS:
            # out-of-image neighbours: dP = 0 (zero value), so dS = -P * DELTA
            for i in range(KT):
                for j in range(KH):
                    for l in range(KW):
                        pad, z = _zero_border_slot(qt, qy, qx, i, j, l, T, H, W, KT, KH, KW, DT, DH, DW,
                                                   bias_base, HAS_BIAS)
                        p_pad = tl.exp2(z - lse)
                        tl.store(ds_row + (i * KH + j) * KW + l, -p_pad * delta, mask=pad & m_ok)

    tl.store(_ptrs(DQ, b, sdqb, h, sdqh, qt, sdqt, qy, sdqy, qx, sdqx, offs_d, sdqd, WIDE),
             (dq * scale).to(DQ.dtype.element_ty), mask=md)


@triton.jit
def nand_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS,
    sqb, sqt, sqy, sqx, sqh, sqd,
    skb, skt, sky, skx, skh, skd,
    svb, svt, svy, svx, svh, svd,
    sdob, sdot, sdoy, sdox, sdoh, sdod,
    sdkb, sdkt, sdky, sdkx, sdkh, sdkd,
    sdvb, sdvt, sdvy, sdvx, sdvh, sdvd,
    T, H, W, NH, GROUP, HD,
    KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW,
    bias_hs, BH0, qk_scale, scale,
    BORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
    TM_T: tl.constexpr, TM_H: tl.constexpr, TM_W: tl.constexpr,
    TN_T: tl.constexpr, TN_H: tl.constexpr, TN_W: tl.constexpr,
    BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, WIDE: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """One block of keys of one (batch, k/v head): dk and dv, summed over the GROUP query heads
    that read this k/v head and over the query blocks whose windows can hold these keys."""
    BLOCK_N: tl.constexpr = TN_T * TN_H * TN_W
    bhk, b, hk = _pair_of(tl.program_id(1), BH0, NH // GROUP, SPLIT)
    kt, ky, kx, n_ok = _block(tl.program_id(0), T, H, W, TN_T, TN_H, TN_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    nd = n_ok[:, None] & d_ok[None, :]
    k = tl.load(_ptrs(K, b, skb, hk, skh, kt, skt, ky, sky, kx, skx, offs_d, skd, WIDE), mask=nd, other=0.0)
    v = tl.load(_ptrs(V, b, svb, hk, svh, kt, svt, ky, svy, kx, svx, offs_d, svd, WIDE), mask=nd, other=0.0)
    # the block's first key is its smallest coordinate on each axis; its last one is clipped
    qt_lo, qt_hi = _query_range(tl.min(kt, 0), tl.max(tl.where(n_ok, kt, 0), 0), T, KT, DT, ST, CT, BORDER)
    qy_lo, qy_hi = _query_range(tl.min(ky, 0), tl.max(tl.where(n_ok, ky, 0), 0), H, KH, DH, SH, CH, BORDER)
    qx_lo, qx_hi = _query_range(tl.min(kx, 0), tl.max(tl.where(n_ok, kx, 0), 0), W, KW, DW, SW, CW, BORDER)
    ct = _key_code(kt, T, DT)
    cy = _key_code(ky, H, DH)
    cx = _key_code(kx, W, DW)
    bias_k = _bias_key_part(kt, ky, kx, KH, KW, DT, DH, DW)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * NH + h
        bias_base = BIAS + h * bias_hs
        for tt in range(qt_lo, qt_hi + 1, TM_T):
            for ty in range(qy_lo, qy_hi + 1, TM_H):
                for tx in range(qx_lo, qx_hi + 1, TM_W):
                    qt, qy, qx, m_ok, md = _range_block(tt, ty, tx, qt_hi, qy_hi, qx_hi, d_ok, TM_T, TM_H, TM_W)
                    q = tl.load(_ptrs(Q, b, sqb, h, sqh, qt, sqt, qy, sqy, qx, sqx, offs_d, sqd, WIDE),
                                mask=md, other=0.0)
                    do = tl.load(_ptrs(DO, b, sdob, h, sdoh, qt, sdot, qy, sdoy, qx, sdox, offs_d, sdod, WIDE),
                                 mask=md, other=0.0)
                    lse, delta = _row_stats(LSE, DELTA, ((bh * T + qt) * H + qy) * W + qx, m_ok)
                    _, _, _, _, _, _, _, _, _, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x = _window_codes(
                        qt, qy, qx, T, H, W, KT, KH, KW, DT, DH, DW, ST, SH, SW, CT, CH, CW, BORDER)
                    s = _mm(q, tl.trans(k), FP32_DOT, UPCAST_DOT) * qk_scale
                    dp = _mm(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
                    ok = _pair_ok(n_ok, m_ok, ct, cy, cx, lo_t, hi_t, lo_y, hi_y, lo_x, hi_x, T, H, W)
                    s = _add_bias(s, ok, bias_base, _bias_query_part(qt, qy, qx, KT, KH, KW, DT, DH, DW), bias_k,
                                  HAS_BIAS)
                    p, ds = _probs_and_grads(s, ok, lse, dp, delta)
                    dv += _mm(tl.trans(p.to(do.dtype)), do, FP32_DOT, UPCAST_DOT)
                    dk += _mm(tl.trans(ds.to(q.dtype)), q, FP32_DOT, UPCAST_DOT)

    tl.store(_ptrs(DK, b, sdkb, hk, sdkh, kt, sdkt, ky, sdky, kx, sdkx, offs_d, sdkd, WIDE),
             (dk * scale).to(DK.dtype.element_ty), mask=nd)
    tl.store(_ptrs(DV, b, sdvb, hk, sdvh, kt, sdvt, ky, sdvy, kx, sdvx, offs_d, sdvd, WIDE),
             dv.to(DV.dtype.element_ty), mask=nd)


# ---------------------------------------------------------------------------------------
# Configurations: what the launchers pick, and the AOT list that checks them
# ---------------------------------------------------------------------------------------
GRID_Y_MAX = 65535  # CUDA's limit on grid y (and z)


def launches(pairs: int, tiles: int):
    """(BH0, grid, split) per launch: every (batch, head) pair once, at most GRID_Y_MAX per
    launch; ``split`` (the kernels' SPLIT) is False when one launch holds them all, so the
    common case compiles without the offset."""
    for bh0 in range(0, pairs, GRID_Y_MAX):
        yield bh0, (tiles, min(GRID_Y_MAX, pairs - bh0)), pairs > GRID_Y_MAX


def needs_wide(*tensors) -> bool:
    """True when an offset within one image (all dims but the batch) of any tensor can reach
    2**31 - 1: the kernels then compute those offsets in int64."""
    for t in tensors:
        if t.is_contiguous() and t.numel() < 2**31:  # every offset is below numel
            continue
        if sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]) if n > 0) >= 2**31 - 1:
            return True
    return False


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def map_rank(T: int, H: int, W: int) -> int:
    """1, 2 or 3: how many leading axes of (T, H, W) the tiles must span (1-D maps arrive
    as (1, 1, L), 2-D ones as (1, H, W))."""
    if T > 1:
        return 3
    return 2 if H > 1 else 1


def _tile(rank: int, n: int) -> tuple:
    """A (T, H, W) block of n (a power of two >= 16) positions for a map of that rank."""
    if rank == 1:
        return (1, 1, n)
    if rank == 2:
        w = 8 if n >= 32 else 4
        return (1, n // w, w)
    w = 8 if n >= 64 else 4
    return (2, n // (2 * w), w)


# (map rank, float32, padded head dim, kernel) -> (queries, keys, warps) where the per-dtype
# default below spills on sm_80 or sm_90
_SPILL_FREE = {
    (1, True, 64, "dkdv"): (16, 16, 8),
    (1, True, 128, "dkdv"): (16, 32, 8),
    (2, True, 64, "dkdv"): (32, 16, 4),
    (3, False, 64, "dkdv"): (64, 16, 8),
    (3, False, 256, "dkdv"): (16, 16, 8),
    (1, True, 128, "dq"): (16, 16, 8),
    (2, True, 128, "dq"): (16, 16, 8),
    (3, True, 128, "dq"): (16, 16, 8),
    (3, True, 64, "dq"): (32, 32, 4),
    (2, True, 256, "dq"): (16, 32, 8),
    (3, True, 256, "dq"): (16, 32, 8),
    (3, True, 128, "fwd"): (16, 16, 8),
}
KERNELS = ("fwd", "dq", "dkdv")


def pick_config(kernel: str, head_dim: int, dtype, rank: int) -> dict:
    """Block shapes of ``kernel`` ("fwd", "dq" or "dkdv") per padded head dim, dtype (float32
    blocks hold twice the bytes) and map rank; the number of queries (keys) per block is what
    sets the registers. Every config compiles without spills on sm_80 and sm_90 (AOT_CONFIGS)."""
    import torch

    bd = block_d(head_dim)
    fp32 = dtype == torch.float32
    if bd <= 64:
        m, n, warps = (32, 32, 8) if fp32 else (64, 32, 8)
    elif bd <= 128:
        m, n, warps = (16, 16, 4) if fp32 else (32, 32, 8)
    else:
        m, n, warps = (16, 16, 8) if fp32 else (16, 32, 8)
    m, n, warps = _SPILL_FREE.get((rank, fp32, bd, kernel), (m, n, warps))
    tm, tn = _tile(rank, m), _tile(rank, n)
    return dict(TM_T=tm[0], TM_H=tm[1], TM_W=tm[2], TN_T=tn[0], TN_H=tn[1], TN_W=tn[2],
                BLOCK_D=bd, num_warps=warps, num_stages=1)


TILE_KEYS = ("TM_T", "TM_H", "TM_W", "TN_T", "TN_H", "TN_W", "BLOCK_D")


def _aot_configs():
    import torch

    configs = []
    dt_names = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
    torch_dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    kernels = (
        ("fwd", nand_fwd_kernel, ("Q", "K", "V", "O"), ("LSE", "BIAS", "FLAG")),
        ("bwd_dq", nand_bwd_dq_kernel, ("Q", "K", "V", "O", "DO", "DQ"), ("LSE", "DLSE", "DELTA", "BIAS", "DS")),
        ("bwd_dkdv", nand_bwd_dkdv_kernel, ("Q", "K", "V", "DO", "DK", "DV"), ("LSE", "DELTA", "BIAS")),
    )
    for rank in (1, 2, 3):
        for dname in ("fp32", "bf16", "fp16"):
            for hd in ((64, 128, 256) if dname != "fp16" else (64,)):  # fp16 blocks = bf16 blocks
                for kname, kern, data_ptrs, f32_ptrs in kernels:
                    cfg = pick_config(kname.replace("bwd_", ""), hd, torch_dt[dname], rank)
                    constexprs = {k: cfg[k] for k in TILE_KEYS}
                    constexprs.update(BORDER=0, HAS_BIAS=True, FP32_DOT=dname == "fp32", UPCAST_DOT=False,
                                      WIDE=False, SPLIT=False)
                    # the axes a map of this rank adds have length, kernel, dilation and stride 1,
                    # arguments the launch specializes to constants
                    for axis in "TH"[:3 - rank]:
                        constexprs.update({axis: 1, "K" + axis: 1, "D" + axis: 1, "S" + axis: 1})
                    if kname == "fwd":
                        constexprs["NONFINITE"] = False
                    if kname == "bwd_dq":
                        constexprs.update(STORE_DS=True, FUSED_DELTA=dname != "fp32", HAS_DLSE=False)
                    sig = {}
                    for name in kern.arg_names:
                        if name in constexprs:
                            sig[name] = "constexpr"
                        elif name in data_ptrs:
                            sig[name] = dt_names[dname]
                        elif name in f32_ptrs:
                            sig[name] = "*fp32"
                        elif name in ("qk_scale", "scale"):
                            sig[name] = "fp32"
                        else:
                            sig[name] = "i32"
                    configs.append({
                        "name": f"{kname}_{rank}d_{dname}_d{hd}", "kernel": kern, "signature": sig,
                        "constexprs": constexprs, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                        "tensor_cores": dname != "fp32",
                    })
    return configs


AOT_CONFIGS = _aot_configs()
