"""Triton kernels of the unfused neighbourhood-attention primitives (``alterops/_na_unfused.py``
states the math and the neighbour tables; ``alterops/_na_unfused_triton.py`` launches these).

Layouts: x, y, w are ``(B, heads, N, D)`` / ``(B, heads, N, K)`` with any strides (four stride
arguments each); the neighbour tables ``nb``, ``ok`` (as uint8), ``cell`` are contiguous
``(K, N)``; ``rowptr`` ``(N + 1,)`` and ``entries`` ``(E,)`` are int32 or int64 (Triton takes the
index type from the pointer); outputs are contiguous. Data and output share one dtype, float32
or float64, which is also the accumulation dtype.

* ``na_unfused_dot_kernel``: a program owns BLOCK_P queries of one (batch, head); for each slot
  c in order it gathers the slot's key rows of y and stores ``x . y (+ table)``, or ``fill``
  where the slot holds no key (a select: whatever x and y hold there does not reach the output).
* ``na_unfused_sum_kernel``: BLOCK_P queries x BLOCK_D columns of one (batch, head): the slots in
  order, ``acc = ok ? acc + w * y : acc`` (a select: a slot without a key adds nothing even if
  its weight is NaN or its row inf).
* ``na_unfused_scatter_kernel``: BLOCK_P keys x BLOCK_D columns: row j's entries of the inverse
  table in order, each ``w[p, c] * x[p]`` (as many steps as the block's longest row, masked past
  each row's count).
  Every output element is summed by one program in a fixed order: no atomics, deterministic.

head_dim beyond BLOCK_D (at most MAX_BLOCK_D) is covered by a loop over column chunks (dot: the
chunk sums are added in order; ``CHUNKED`` tells whether the query rows fit in one chunk, kept
in registers over the slot loop).

Sizes: grid x holds the blocks of queries (keys), grid y the (batch, head) pairs from ``BH0``
on (the launcher splits them into launches of at most 65535, CUDA's grid-y limit: ``SPLIT``).
The batch and head terms of every address are int64; offsets within one (batch, head) are int32
unless ``WIDE``, which the launcher sets when one of them can reach 2**31. Rows of the (K, N)
tables are reached by advancing pointers by N per slot (no int32 product c * N).
"""
import triton
import triton.language as tl

MAX_BLOCK_D = 64  # columns per chunk; wider heads loop over chunks
NUM_WARPS = 8
TILE_BYTES = 8192


def config(head_dim: int, itemsize: int) -> dict:
    """BLOCK_P and BLOCK_D for a head_dim and element size (4 or 8 bytes): a [BLOCK_P, BLOCK_D]
    tile of TILE_BYTES (its 64-bit gather addresses take as many registers as the float64 data)."""
    bd = max(4, min(triton.next_power_of_2(max(head_dim, 1)), MAX_BLOCK_D))
    bp = max(16, min(128, (TILE_BYTES // itemsize) // bd))
    return dict(BLOCK_P=bp, BLOCK_D=bd)


@triton.jit
def _pair(NH, BH0, SPLIT: tl.constexpr):
    """(bh, b, h) of this program: bh as int32, b and h as int64."""
    bh = tl.program_id(1)
    if SPLIT:  # more than 65535 (batch, head) pairs: this launch's share starts at BH0
        bh += BH0
    return bh, (bh // NH).to(tl.int64), (bh % NH).to(tl.int64)


@triton.jit
def na_unfused_dot_kernel(
    X, Y, NB, OK, TABLE, CELL, FILL, OUT,
    sxb, sxh, sxn, sxd,
    syb, syh, syn, syd,
    stab_h, stab_c,
    NH, N, K, D, BH0,
    HAS_OK: tl.constexpr, HAS_TABLE: tl.constexpr, CHUNKED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
):
    """out[b, h, p, c] = x[b, h, p] . y[b, h, nb[c, p]] (+ table[h, cell[c, p]]), fill where
    ok[c, p] is 0."""
    bh, b, h = _pair(NH, BH0, SPLIT)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < N
    tab_ptrs = NB + p  # advanced by N per slot: row c of the (K, N) tables
    ok_ptrs = OK + p
    cell_ptrs = CELL + p
    if WIDE:
        p = p.to(tl.int64)
    x_base = X + b * sxb + h * sxh
    y_base = Y + b * syb + h * syh
    out_ptrs = OUT + bh.to(tl.int64) * N * K + p * K
    fill = tl.load(FILL)
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE:
        offs_d = offs_d.to(tl.int64)
    d_ok = offs_d < D
    if not CHUNKED:  # the query rows stay in registers over the slot loop
        xv = tl.load(x_base + p[:, None] * sxn + offs_d[None, :] * sxd, mask=p_ok[:, None] & d_ok[None, :],
                     other=0.0)
    for c in range(K):
        j = tl.load(tab_ptrs, mask=p_ok, other=0)
        if WIDE:
            j = j.to(tl.int64)
        if HAS_OK:
            okv = tl.load(ok_ptrs, mask=p_ok, other=0) != 0
            m = p_ok & okv
        else:
            m = p_ok
        if CHUNKED:
            acc = tl.zeros([BLOCK_P], dtype=OUT.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                dc_ok = d < D
                xc = tl.load(x_base + p[:, None] * sxn + d[None, :] * sxd, mask=p_ok[:, None] & dc_ok[None, :],
                             other=0.0)
                yc = tl.load(y_base + j[:, None] * syn + d[None, :] * syd, mask=m[:, None] & dc_ok[None, :],
                             other=0.0)
                acc += tl.sum(xc * yc, 1)
        else:
            yv = tl.load(y_base + j[:, None] * syn + offs_d[None, :] * syd, mask=m[:, None] & d_ok[None, :],
                         other=0.0)
            acc = tl.sum(xv * yv, 1)
        if HAS_TABLE:
            cell = tl.load(cell_ptrs, mask=m, other=0)
            acc += tl.load(TABLE + h * stab_h + cell * stab_c, mask=m, other=0.0)
        if HAS_OK:
            acc = tl.where(okv, acc, fill)
        tl.store(out_ptrs, acc, mask=p_ok)
        out_ptrs += 1
        tab_ptrs += N
        ok_ptrs += N
        cell_ptrs += N


@triton.jit
def na_unfused_sum_kernel(
    W, Y, NB, OK, OUT,
    swb, swh, swn, swk,
    syb, syh, syn, syd,
    NH, N, K, D, BH0,
    HAS_OK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """out[b, h, p] = sum over the slots c with ok[c, p] of w[b, h, p, c] * y[b, h, nb[c, p]]."""
    bh, b, h = _pair(NH, BH0, SPLIT)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < N
    p_tab = p
    if WIDE:
        p = p.to(tl.int64)
    w_row = W + b * swb + h * swh + p * swn
    y_base = Y + b * syb + h * syh
    out_base = OUT + bh.to(tl.int64) * N * D
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE:
        offs_d = offs_d.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=OUT.dtype.element_ty)
        tab_ptrs = NB + p_tab
        ok_ptrs = OK + p_tab
        w_ptrs = w_row
        for c in range(K):
            j = tl.load(tab_ptrs, mask=p_ok, other=0)
            if WIDE:
                j = j.to(tl.int64)
            if HAS_OK:
                okv = tl.load(ok_ptrs, mask=p_ok, other=0) != 0
                m = p_ok & okv
            else:
                m = p_ok
            wv = tl.load(w_ptrs, mask=m, other=0.0)
            yv = tl.load(y_base + j[:, None] * syn + d[None, :] * syd, mask=m[:, None] & d_ok[None, :], other=0.0)
            if HAS_OK:
                acc = tl.where(okv[:, None], acc + wv[:, None] * yv, acc)
            else:
                acc += wv[:, None] * yv
            tab_ptrs += N
            ok_ptrs += N
            w_ptrs += swk
        tl.store(out_base + p[:, None] * D + d[None, :], acc, mask=p_ok[:, None] & d_ok[None, :])


@triton.jit
def na_unfused_scatter_kernel(
    W, X, ROWPTR, ENTRIES, OUT,
    swb, swh, swn, swk,
    sxb, sxh, sxn, sxd,
    NH, N, K, D, BH0,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
):
    """out[b, h, j] = sum over e in [rowptr[j], rowptr[j + 1]), in order, of
    w[b, h, p_e, c_e] * x[b, h, p_e] with entries[e] = p_e * K + c_e."""
    bh, b, h = _pair(NH, BH0, SPLIT)
    j = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    j_ok = j < N
    start = tl.load(ROWPTR + j, mask=j_ok, other=0)
    count = tl.load(ROWPTR + j + 1, mask=j_ok, other=0) - start  # 0 past the map
    steps = tl.max(count, 0)  # the block's longest row
    if WIDE:
        j = j.to(tl.int64)
    w_base = W + b * swb + h * swh
    x_base = X + b * sxb + h * sxh
    out_base = OUT + bh.to(tl.int64) * N * D
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE:
        offs_d = offs_d.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=OUT.dtype.element_ty)
        for e in range(0, steps):
            m = e < count
            ent = tl.load(ENTRIES + start + e, mask=m, other=0)
            if WIDE:
                ent = ent.to(tl.int64)
            q = ent // K
            c = ent % K
            wv = tl.load(w_base + q * swn + c * swk, mask=m, other=0.0)
            xv = tl.load(x_base + q[:, None] * sxn + d[None, :] * sxd, mask=m[:, None] & d_ok[None, :], other=0.0)
            acc = tl.where(m[:, None], acc + wv[:, None] * xv, acc)
        tl.store(out_base + j[:, None] * D + d[None, :], acc, mask=j_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------
# Configurations compiled ahead of time by tests/test_aot_compile.py (the launchers pick
# BLOCK_P / BLOCK_D from config(); these are the tiles of a narrow and a wide head, plus the
# variants of huge tensors: int64 offsets, split launches, int64 inverse tables)
# ---------------------------------------------------------------------------------------
def _aot_configs():
    configs = []
    variants = [(d, hd, False) for d in ("fp32", "fp64") for hd in (32, 128)] + [("fp32", 128, True)]
    for dname, hd, huge in variants:
        ptr = "*" + dname
        cfg = config(hd, 4 if dname == "fp32" else 8)
        chunked = hd > cfg["BLOCK_D"]
        common = dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], WIDE=huge, SPLIT=huge)
        index = "*i64" if huge else "*i32"
        kernels = (
            ("dot", na_unfused_dot_kernel, dict(common, HAS_OK=True, HAS_TABLE=True, CHUNKED=chunked),
             {"X": ptr, "Y": ptr, "TABLE": ptr, "FILL": ptr, "OUT": ptr, "NB": "*i32", "OK": "*u8", "CELL": "*i32"}),
            ("sum", na_unfused_sum_kernel, dict(common, HAS_OK=True),
             {"W": ptr, "Y": ptr, "OUT": ptr, "NB": "*i32", "OK": "*u8"}),
            ("scatter", na_unfused_scatter_kernel, common,
             {"W": ptr, "X": ptr, "OUT": ptr, "ROWPTR": index, "ENTRIES": index}),
        )
        for kname, kern, constexprs, ptrs in kernels:
            sig = {name: "constexpr" if name in constexprs else ptrs.get(name, "i32") for name in kern.arg_names}
            configs.append({
                "name": f"{kname}_{dname}_d{hd}{'_huge' if huge else ''}", "kernel": kern, "signature": sig,
                "constexprs": constexprs, "num_warps": NUM_WARPS, "num_stages": 1, "tensor_cores": False,
            })
    return configs


AOT_CONFIGS = _aot_configs()
