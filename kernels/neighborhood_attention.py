"""Triton kernels of neighborhood_attention2d: flash-style forward, and a backward split into a
query-side kernel (dq, per-(query, offset) logit gradients for the bias table) and a key-side
kernel (dk, dv).

Tiling: a program owns a 2D patch of TM_H x TM_W queries of one (batch, head); it visits the
key patches (TN_H x TN_W, starting at the first key any of its queries can see) that cover the
union of its queries' neighbourhoods. For each (query, key) pair the kernel decides from
coordinates whether the key is in the query's window (per axis: ``key - start(query)`` in
``{0, d, ..., (k-1) d}``, with NATTEN's clamped start for ``border="clamp"``) and gathers the
bias-table entry ``(key - query) / d + k - 1``. Logits are never written to global memory; the
softmax is the online (running max / sum) one, in base 2 (``exp2``) with the scale folded in.
For ``border="zero"`` the out-of-image neighbours (zero key, zero value, logit = bias) are
merged into the running softmax after the key loop.

The bias gradient is deterministic: the query-side kernel stores each logit gradient at its
(query, neighbour offset) slot of a ``(B, heads, H, W, kh, kw)`` buffer (each slot written by
exactly one program, no atomics); the launcher reduces it to the table with one-hot matmuls.

Sizes: grid x holds the patches of one image, grid y the (batch, head) pairs from ``BH0`` on
(the launcher splits ``B * heads`` into launches of at most 65535, CUDA's grid-y limit). Offsets
within an image are int32 unless ``WIDE`` (the batch term is always int64): the launcher sets it
when any tensor's offsets within an image can reach 2**31, e.g. a 2048x2048 map read through a
fused-qkv view of 180 channels; the int32 variant keeps the common case's registers.
"""
import triton
import triton.language as tl

from ._attention_common import nonfinite_values

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _window_start(pos, L, K, DIL, BORDER: tl.constexpr):
    """First key position of each query's window on one axis, and (start - pos) / DIL."""
    r = (K - 1) // 2
    if BORDER == 0:
        res = pos % DIL
        j = pos // DIL
        ng = (L - res + DIL - 1) // DIL
        s = tl.minimum(tl.maximum(j - r, 0), ng - K)
        return res + DIL * s, s - j
    else:
        return pos - r * DIL, pos * 0 - r


@triton.jit
def _key_range(p0, p1, L, K, DIL, BORDER: tl.constexpr):
    """Keys that queries p0..p1 (one axis) can see: [lo, hi] (a superset, exact per pair later)."""
    r = (K - 1) // 2
    if BORDER == 0:
        lo = tl.maximum(tl.minimum(p0 - r * DIL, L - K * DIL), 0)
        hi = tl.minimum(tl.maximum(p1 + r * DIL, K * DIL - 1), L - 1)
    else:
        lo = tl.maximum(p0 - r * DIL, 0)
        hi = tl.minimum(p1 + r * DIL, L - 1)
    return lo, hi


@triton.jit
def _query_range(k0, k1, L, K, DIL, BORDER: tl.constexpr):
    """Queries that can see keys k0..k1 (one axis): [lo, hi]."""
    r = (K - 1) // 2
    lo = tl.maximum(k0 - r * DIL, 0)
    hi = tl.minimum(k1 + r * DIL, L - 1)
    if BORDER == 0:
        lo = tl.where(k0 > K * DIL - 1, lo, 0)
        hi = tl.where(k1 < L - K * DIL, hi, L - 1)
    return lo, hi


@triton.jit
def _in_window(ky, kx, qy, qx, sy, sx, KH, KW, DH, DW):
    """[M, N] mask: key (ky, kx)[N] in the window starting at (sy, sx)[M] (window positions are
    congruent to the query modulo the dilation). Built from 1D pieces to keep registers low."""
    ok = (ky[None, :] >= sy[:, None]) & (ky[None, :] <= (sy + (KH - 1) * DH)[:, None])
    ok = ok & (kx[None, :] >= sx[:, None]) & (kx[None, :] <= (sx + (KW - 1) * DW)[:, None])
    if DH > 1:
        ok = ok & ((ky % DH)[None, :] == (qy % DH)[:, None])
    if DW > 1:
        ok = ok & ((kx % DW)[None, :] == (qx % DW)[:, None])
    return ok


@triton.jit
def _bias_index(ky, kx, qy, qx, KH, KW, DH, DW):
    """[M, N] flat bias-table index by * (2KW-1) + bx, by = (ky - qy) / DH + KH - 1, of in-window
    pairs (key and query are congruent modulo the dilation and >= 0, so floor divisions split)."""
    TW = 2 * KW - 1
    key_part = (ky // DH) * TW + kx // DW
    query_part = (KH - 1 - qy // DH) * TW + (KW - 1 - qx // DW)
    return key_part[None, :] + query_part[:, None]


@triton.jit
def _offset_index(ky, kx, qy, qx, wy, wx, KW, DH, DW):
    """[M, N] neighbour offset i * KW + j of in-window pairs, i = (ky - qy) / DH - wy."""
    return ((ky // DH) * KW + kx // DW)[None, :] - ((qy // DH + wy) * KW + qx // DW + wx)[:, None]



@triton.jit
def _ptrs(P, b, sb, h, sh, y, sy, x, sx, d, sd, WIDE: tl.constexpr):
    """Pointers to rows (y, x) and columns d of head h of image b (b is int64). The offsets
    within an image are int32 unless WIDE, which the launcher sets when one can reach 2**31
    (a large map, or a view into a larger tensor such as a fused qkv projection)."""
    if WIDE:
        h = h.to(tl.int64)
        y = y.to(tl.int64)
        x = x.to(tl.int64)
        d = d.to(tl.int64)
    return P + b * sb + h * sh + y[:, None] * sy + x[:, None] * sx + d[None, :] * sd

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
    left out of the dot, and indicator dots add them back for in-window keys with IEEE products:
    NaN for a NaN value (or an inf with weight 0), +-inf for +-inf with weight > 0."""
    if not NONFINITE:
        return _mm(p.to(v.dtype), v, FP32_DOT, UPCAST_DOT)
    bad = (v != v) | (v == float("inf")) | (v == float("-inf"))
    out = _mm(p.to(v.dtype), tl.where(bad, 0.0, v).to(v.dtype), FP32_DOT, UPCAST_DOT)
    if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
        out += nonfinite_values(p, v, ok)
    return out


@triton.jit
def na2d_fwd_kernel(
    Q, K, V, O, LSE, BIAS, FLAG,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sob, soy, sox, soh, sod,
    H, W, NH, HD, KH, KW, DH, DW, bias_hs, BH0,
    qk_scale,
    BORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
    TM_H: tl.constexpr, TM_W: tl.constexpr, TN_H: tl.constexpr, TN_W: tl.constexpr,
    BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
    NONFINITE: tl.constexpr,
):
    """One patch of queries. The NONFINITE variant is launched after the plain one with FLAG
    set on the device when v holds a NaN or inf (no host sync): it returns at once otherwise,
    and recomputes the output with IEEE handling of those values when set."""
    if NONFINITE:
        if tl.load(FLAG) == 0:
            return
    BLOCK_M: tl.constexpr = TM_H * TM_W
    BLOCK_N: tl.constexpr = TN_H * TN_W
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    if SPLIT:  # more than 65535 (batch, head) pairs: this launch's share starts at BH0
        bh += BH0
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    n_tx = tl.cdiv(W, TM_W)
    y0 = (pid // n_tx) * TM_H
    x0 = (pid % n_tx) * TM_W
    offs_m = tl.arange(0, BLOCK_M)
    qy = y0 + offs_m // TM_W
    qx = x0 + offs_m % TM_W
    m_ok = (qy < H) & (qx < W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    q = tl.load(_ptrs(Q, b, sqb, h, sqh, qy, sqy, qx, sqx, offs_d, sqd, WIDE),
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    sy, wy = _window_start(qy, H, KH, DH, BORDER)
    sx, wx = _window_start(qx, W, KW, DW, BORDER)
    ky_lo, ky_hi = _key_range(y0, tl.minimum(y0 + TM_H, H) - 1, H, KH, DH, BORDER)
    kx_lo, kx_hi = _key_range(x0, tl.minimum(x0 + TM_W, W) - 1, W, KW, DW, BORDER)
    TW = 2 * KW - 1
    bias_base = BIAS + h * bias_hs

    m_i = tl.where(m_ok, float("-inf"), 0.0)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for ty in range(ky_lo, ky_hi + 1, TN_H):
        for tx in range(kx_lo, kx_hi + 1, TN_W):
            ky = ty + offs_n // TN_W
            kx = tx + offs_n % TN_W
            n_ok = (ky <= ky_hi) & (kx <= kx_hi)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(_ptrs(K, b, skb, h, skh, ky, sky, kx, skx, offs_d, skd, WIDE),
                        mask=kv_mask, other=0.0)
            s = _mm(q, tl.trans(k), FP32_DOT, UPCAST_DOT)
            s = s * qk_scale
            ok = _in_window(ky, kx, qy, qx, sy, sx, KH, KW, DH, DW)
            ok = ok & n_ok[None, :] & m_ok[:, None]
            if HAS_BIAS:
                bias = tl.load(bias_base + _bias_index(ky, kx, qy, qx, KH, KW, DH, DW), mask=ok, other=0.0)
                s = s + bias * 1.4426950408889634
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a query with no key in this tile (yet) keeps m = -inf: shift by 0 instead
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(_ptrs(V, b, svb, h, svh, ky, svy, kx, svx, offs_d, svd, WIDE),
                        mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _pv(p, v, ok, NONFINITE, FP32_DOT, UPCAST_DOT)
            m_i = m_new

    if BORDER == 2:
        # out-of-image neighbours: zero key and value, logit = bias (0 without a table)
        ry = (KH - 1) // 2
        rx = (KW - 1) // 2
        m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for i in range(KH):
            py = qy + (i - ry) * DH
            out_y = (py < 0) | (py >= H)
            for j in range(KW):
                px = qx + (j - rx) * DW
                pad = (out_y | (px < 0) | (px >= W)) & m_ok
                t = tl.zeros([BLOCK_M], dtype=tl.float32)
                if HAS_BIAS:
                    t = tl.load(bias_base + (i - ry + KH - 1) * TW + (j - rx + KW - 1) + qy * 0) * 1.4426950408889634
                m_p = tl.where(pad, tl.maximum(m_p, t), m_p)
        m_new = tl.maximum(m_i, m_p)
        l_p = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i in range(KH):
            py = qy + (i - ry) * DH
            out_y = (py < 0) | (py >= H)
            for j in range(KW):
                px = qx + (j - rx) * DW
                pad = (out_y | (px < 0) | (px >= W)) & m_ok
                t = tl.zeros([BLOCK_M], dtype=tl.float32)
                if HAS_BIAS:
                    t = tl.load(bias_base + (i - ry + KH - 1) * TW + (j - rx + KW - 1) + qy * 0) * 1.4426950408889634
                l_p += tl.where(pad, tl.exp2(t - m_new), 0.0)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + l_p
        acc = acc * alpha[:, None]
        m_i = m_new

    # only rows outside the map (l = 0) are made safe: a NaN sum must stay NaN
    l_safe = tl.where(m_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(_ptrs(O, b, sob, h, soh, qy, soy, qx, sox, offs_d, sod, WIDE),
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = m_i + tl.log2(l_safe)
    tl.store(LSE + (bh.to(tl.int64) * H + qy) * W + qx, lse, mask=m_ok)


@triton.jit
def na2d_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, BIAS, DS,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sdob, sdoy, sdox, sdoh, sdod,
    sdqb, sdqy, sdqx, sdqh, sdqd,
    H, W, NH, HD, KH, KW, DH, DW, bias_hs, BH0,
    qk_scale, scale,
    BORDER: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_DS: tl.constexpr,
    TM_H: tl.constexpr, TM_W: tl.constexpr, TN_H: tl.constexpr, TN_W: tl.constexpr,
    BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TM_H * TM_W
    BLOCK_N: tl.constexpr = TN_H * TN_W
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    if SPLIT:  # more than 65535 (batch, head) pairs: this launch's share starts at BH0
        bh += BH0
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    n_tx = tl.cdiv(W, TM_W)
    y0 = (pid // n_tx) * TM_H
    x0 = (pid % n_tx) * TM_W
    offs_m = tl.arange(0, BLOCK_M)
    qy = y0 + offs_m // TM_W
    qx = x0 + offs_m % TM_W
    m_ok = (qy < H) & (qx < W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(_ptrs(Q, b, sqb, h, sqh, qy, sqy, qx, sqx, offs_d, sqd, WIDE), mask=md, other=0.0)
    do = tl.load(_ptrs(DO, b, sdob, h, sdoh, qy, sdoy, qx, sdox, offs_d, sdod, WIDE),
                 mask=md, other=0.0)
    row = (bh.to(tl.int64) * H + qy) * W + qx
    lse = tl.load(LSE + row, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    sy, wy = _window_start(qy, H, KH, DH, BORDER)
    sx, wx = _window_start(qx, W, KW, DW, BORDER)
    ky_lo, ky_hi = _key_range(y0, tl.minimum(y0 + TM_H, H) - 1, H, KH, DH, BORDER)
    kx_lo, kx_hi = _key_range(x0, tl.minimum(x0 + TM_W, W) - 1, W, KW, DW, BORDER)
    TW = 2 * KW - 1
    bias_base = BIAS + h * bias_hs
    K2 = KH * KW
    ds_row = DS + row * K2

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for ty in range(ky_lo, ky_hi + 1, TN_H):
        for tx in range(kx_lo, kx_hi + 1, TN_W):
            ky = ty + offs_n // TN_W
            kx = tx + offs_n % TN_W
            n_ok = (ky <= ky_hi) & (kx <= kx_hi)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(_ptrs(K, b, skb, h, skh, ky, sky, kx, skx, offs_d, skd, WIDE),
                        mask=kv_mask, other=0.0)
            v = tl.load(_ptrs(V, b, svb, h, svh, ky, svy, kx, svx, offs_d, svd, WIDE),
                        mask=kv_mask, other=0.0)
            s = _mm(q, tl.trans(k), FP32_DOT, UPCAST_DOT)
            dp = _mm(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
            s = s * qk_scale
            ok = _in_window(ky, kx, qy, qx, sy, sx, KH, KW, DH, DW)
            ok = ok & n_ok[None, :] & m_ok[:, None]
            if HAS_BIAS:
                bias = tl.load(bias_base + _bias_index(ky, kx, qy, qx, KH, KW, DH, DW), mask=ok, other=0.0)
                s = s + bias * 1.4426950408889634
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, FP32_DOT, UPCAST_DOT)
            if STORE_DS:
                tl.store(ds_row[:, None] + _offset_index(ky, kx, qy, qx, wy, wx, KW, DH, DW), ds, mask=ok)

    if BORDER == 2:
        if STORE_DS:
            ry = (KH - 1) // 2
            rx = (KW - 1) // 2
            for i in range(KH):
                py = qy + (i - ry) * DH
                out_y = (py < 0) | (py >= H)
                for j in range(KW):
                    px = qx + (j - rx) * DW
                    pad = (out_y | (px < 0) | (px >= W)) & m_ok
                    t = tl.zeros([BLOCK_M], dtype=tl.float32)
                    if HAS_BIAS:
                        t = tl.load(bias_base + (i - ry + KH - 1) * TW + (j - rx + KW - 1) + qy * 0) * 1.4426950408889634
                    p_pad = tl.exp2(t - lse)
                    tl.store(ds_row + i * KW + j, -p_pad * delta, mask=pad)

    tl.store(_ptrs(DQ, b, sdqb, h, sdqh, qy, sdqy, qx, sdqx, offs_d, sdqd, WIDE),
             (dq * scale).to(DQ.dtype.element_ty), mask=md)


@triton.jit
def na2d_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sdob, sdoy, sdox, sdoh, sdod,
    sdkb, sdky, sdkx, sdkh, sdkd,
    sdvb, sdvy, sdvx, sdvh, sdvd,
    H, W, NH, HD, KH, KW, DH, DW, bias_hs, BH0,
    qk_scale, scale,
    BORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
    TM_H: tl.constexpr, TM_W: tl.constexpr, TN_H: tl.constexpr, TN_W: tl.constexpr,
    BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TM_H * TM_W
    BLOCK_N: tl.constexpr = TN_H * TN_W
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    if SPLIT:  # more than 65535 (batch, head) pairs: this launch's share starts at BH0
        bh += BH0
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    n_tx = tl.cdiv(W, TN_W)
    y0 = (pid // n_tx) * TN_H
    x0 = (pid % n_tx) * TN_W
    offs_n = tl.arange(0, BLOCK_N)
    ky = y0 + offs_n // TN_W
    kx = x0 + offs_n % TN_W
    n_ok = (ky < H) & (kx < W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HD
    nd = n_ok[:, None] & d_ok[None, :]
    k = tl.load(_ptrs(K, b, skb, h, skh, ky, sky, kx, skx, offs_d, skd, WIDE), mask=nd, other=0.0)
    v = tl.load(_ptrs(V, b, svb, h, svh, ky, svy, kx, svx, offs_d, svd, WIDE), mask=nd, other=0.0)
    qy_lo, qy_hi = _query_range(y0, tl.minimum(y0 + TN_H, H) - 1, H, KH, DH, BORDER)
    qx_lo, qx_hi = _query_range(x0, tl.minimum(x0 + TN_W, W) - 1, W, KW, DW, BORDER)
    TW = 2 * KW - 1
    bias_base = BIAS + h * bias_hs

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for ty in range(qy_lo, qy_hi + 1, TM_H):
        for tx in range(qx_lo, qx_hi + 1, TM_W):
            qy = ty + offs_m // TM_W
            qx = tx + offs_m % TM_W
            m_ok = (qy <= qy_hi) & (qx <= qx_hi)
            md = m_ok[:, None] & d_ok[None, :]
            q = tl.load(_ptrs(Q, b, sqb, h, sqh, qy, sqy, qx, sqx, offs_d, sqd, WIDE),
                        mask=md, other=0.0)
            do = tl.load(_ptrs(DO, b, sdob, h, sdoh, qy, sdoy, qx, sdox, offs_d, sdod, WIDE),
                         mask=md, other=0.0)
            row = (bh.to(tl.int64) * H + qy) * W + qx
            lse = tl.load(LSE + row, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
            sy, wy = _window_start(qy, H, KH, DH, BORDER)
            sx, wx = _window_start(qx, W, KW, DW, BORDER)
            s = _mm(q, tl.trans(k), FP32_DOT, UPCAST_DOT)
            dp = _mm(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
            s = s * qk_scale
            ok = _in_window(ky, kx, qy, qx, sy, sx, KH, KW, DH, DW)
            ok = ok & n_ok[None, :] & m_ok[:, None]
            if HAS_BIAS:
                bias = tl.load(bias_base + _bias_index(ky, kx, qy, qx, KH, KW, DH, DW), mask=ok, other=0.0)
                s = s + bias * 1.4426950408889634
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            dv += _mm(tl.trans(p.to(do.dtype)), do, FP32_DOT, UPCAST_DOT)
            dk += _mm(tl.trans(ds.to(q.dtype)), q, FP32_DOT, UPCAST_DOT)

    tl.store(_ptrs(DK, b, sdkb, h, sdkh, ky, sdky, kx, sdkx, offs_d, sdkd, WIDE),
             (dk * scale).to(DK.dtype.element_ty), mask=nd)
    tl.store(_ptrs(DV, b, sdvb, h, sdvh, ky, sdvy, kx, sdvx, offs_d, sdvd, WIDE),
             dv.to(DV.dtype.element_ty), mask=nd)


# ---------------------------------------------------------------------------------------
# Configurations: what the launchers pick, and the AOT list that checks them
# ---------------------------------------------------------------------------------------
GRID_Y_MAX = 65535  # CUDA's limit on grid y (and z)


def launches(B: int, heads: int, tiles: int):
    """(BH0, grid, split) per launch: every (batch, head) pair once, at most GRID_Y_MAX per
    launch; ``split`` (the kernels' SPLIT) is False when one launch holds them all, so the
    common case compiles without the offset."""
    total = B * heads
    for bh0 in range(0, total, GRID_Y_MAX):
        yield bh0, (tiles, min(GRID_Y_MAX, total - bh0)), total > GRID_Y_MAX


def needs_wide(*tensors) -> bool:
    """True when an offset within one image (all dims but the batch) of any tensor can reach
    2**31 - 1: the kernels then compute those offsets in int64."""
    for t in tensors:
        if sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]) if n > 0) >= 2**31 - 1:
            return True
    return False


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def pick_config(head_dim: int, dtype) -> dict:
    """Tile shapes per padded head dim (and dtype: float32 tiles hold twice the bytes)."""
    import torch

    bd = _block_d(head_dim)
    fp32 = dtype == torch.float32
    # Chosen so that every kernel compiles without spills on sm_80 and sm_90 (AOT_CONFIGS).
    if bd <= 64:
        cfg = dict(TM_H=4, TM_W=8, TN_H=4, TN_W=8, num_warps=8) if fp32 else \
            dict(TM_H=8, TM_W=8, TN_H=4, TN_W=8, num_warps=8)
    elif bd <= 128:
        cfg = dict(TM_H=4, TM_W=4, TN_H=4, TN_W=4, num_warps=4) if fp32 else \
            dict(TM_H=4, TM_W=8, TN_H=4, TN_W=8, num_warps=8)
    else:
        cfg = dict(TM_H=4, TM_W=4, TN_H=4, TN_W=4, num_warps=8) if fp32 else \
            dict(TM_H=4, TM_W=4, TN_H=4, TN_W=8, num_warps=8)
    cfg["num_stages"] = 1
    cfg["BLOCK_D"] = bd
    return cfg


def _aot_configs():
    configs = []
    dt_names = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
    import torch

    torch_dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    kernels = (
        ("fwd", na2d_fwd_kernel, ("Q", "K", "V", "O"), ("LSE", "BIAS")),
        ("bwd_dq", na2d_bwd_dq_kernel, ("Q", "K", "V", "DO", "DQ"), ("LSE", "DELTA", "BIAS", "DS")),
        ("bwd_dkdv", na2d_bwd_dkdv_kernel, ("Q", "K", "V", "DO", "DK", "DV"), ("LSE", "DELTA", "BIAS")),
    )
    for dname in ("fp32", "bf16", "fp16"):
        for hd in ((64, 128, 256) if dname != "fp16" else (64,)):  # fp16 tiles = bf16 tiles
            cfg = pick_config(hd, torch_dt[dname])
            for kname, kern, data_ptrs, f32_ptrs in kernels:
                constexprs = {"BORDER": 0, "HAS_BIAS": True, "TM_H": cfg["TM_H"], "TM_W": cfg["TM_W"],
                              "TN_H": cfg["TN_H"], "TN_W": cfg["TN_W"], "BLOCK_D": cfg["BLOCK_D"],
                              "FP32_DOT": dname == "fp32", "UPCAST_DOT": False, "WIDE": False, "SPLIT": False}
                if kname == "fwd":
                    constexprs["NONFINITE"] = False
                if kname == "bwd_dq":
                    constexprs["STORE_DS"] = True
                sig = {}
                for n in kern.arg_names:
                    if n in constexprs:
                        sig[n] = "constexpr"
                    elif n in data_ptrs:
                        sig[n] = dt_names[dname]
                    elif n in f32_ptrs:
                        sig[n] = "*fp32"
                    elif n == "FLAG":
                        sig[n] = "*i32"
                    elif n in ("qk_scale", "scale"):
                        sig[n] = "fp32"
                    else:
                        sig[n] = "i32"
                configs.append({
                    "name": f"{kname}_{dname}_d{hd}", "kernel": kern, "signature": sig, "constexprs": constexprs,
                    "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                    "tensor_cores": dname != "fp32",
                })
    return configs


AOT_CONFIGS = _aot_configs()
