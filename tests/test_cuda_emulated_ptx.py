"""The tensor-core PTX wrappers (csrc/common/cuda_ptx.cuh: mma.sync m16n8k16, ldmatrix, cp.async)
on the CPU executor of tests/cuda_emu, through the kernels of tests/cuda_emu/ptx_selftest.cu.

The fragment layouts are written here once more, from the PTX ISA text ("Matrix Fragments for
mma.m16n8k16 with floating point type", "Warp-level matrix load instruction: ldmatrix"), and
compared with the kernels' coordinate helpers, with what the emulated mma computes from fragments
packed here, and with what ldmatrix delivers. A tensor-core GEMM (cp.async double buffering,
ldmatrix x4 / x2 / x1 / x2.trans / x4.trans, float16 and bfloat16) is compared with a float64
matmul of the same rounded inputs under every schedule, and each deliberate bug of the GEMM and of
the misuse kernel is shown to be caught: as poison (NaN) in the output, as wrong numbers, or as
a launch error with its message."""
import ctypes
import os

import pytest
import torch

from cuda_emu import driver
from cuda_emu.testing import one_thread, pytestmark  # noqa: F401 (the module's marks and fixture)

PTR = ctypes.c_void_p
INT = ctypes.c_int


@pytest.fixture(scope="module")
def lib():
    lib = driver.load(os.path.join(driver.HERE, "ptx_selftest.cu"))
    lib.frag_coords = lib.fn("ptx_frag_coords", [PTR])
    lib.pack = lib.fn("ptx_pack", [PTR, PTR, INT])
    lib.mma_raw = lib.fn("ptx_mma_raw", [INT, PTR, PTR, PTR, INT])
    lib.ldmatrix = lib.fn("ptx_ldmatrix", [PTR, PTR, PTR, INT])
    lib.cp_async_groups = lib.fn("ptx_cp_async_groups", [PTR, PTR])
    lib.gemm = lib.fn("ptx_gemm", [INT, INT, PTR, PTR, PTR, INT, INT, INT, INT, INT])
    lib.check = lib.fn("ptx_check", [INT, PTR])
    return lib


class Bufs:
    """Guarded buffers of one launch, freed together."""

    def __init__(self, lib):
        self.lib, self.all = lib, []

    def __call__(self, src, name, **kw):
        b = self.lib.guarded(src, name, **kw)
        self.all.append(b)
        return b

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for b in self.all:
            b.free()


# ---------------------------------------------------------------------------------------
# The layouts, from the PTX ISA text (g = groupID = lane >> 2, t = threadID_in_group = lane % 4)
# ---------------------------------------------------------------------------------------
def a_coord(lane, i):
    """Element a_i (i = 0..7) of the A fragment (16 x 16, row-major)."""
    g, t = lane >> 2, lane % 4
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_coord(lane, i):
    """Element b_i (i = 0..3) of the B fragment (16 x 8, column-major)."""
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def c_coord(lane, i):
    """Element c_i (i = 0..3) of the C / D fragment (16 x 8, float32)."""
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def bits16(x):
    """The 16-bit patterns of a float16 / bfloat16 tensor, as int64."""
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def pack_fragments(A, B):
    """Per lane of one warp: registers a[0..3], b[0..1] (two 16-bit elements each, the lower one in
    the low half), as 6 int64."""
    a16, b16 = bits16(A), bits16(B)
    regs = torch.zeros(32, 6, dtype=torch.int64)
    for lane in range(32):
        for i in range(8):
            regs[lane, i // 2] |= a16[a_coord(lane, i)] << (16 * (i % 2))
        for i in range(4):
            regs[lane, 4 + i // 2] |= b16[b_coord(lane, i)] << (16 * (i % 2))
    return regs


def to_c_fragments(C):
    return torch.stack([torch.stack([C[c_coord(lane, i)] for i in range(4)]) for lane in range(32)])


def from_c_fragments(d):
    D = torch.empty(16, 8, dtype=d.dtype)
    for lane in range(32):
        for i in range(4):
            D[c_coord(lane, i)] = d[lane, i]
    return D


def u32(x):
    """int64 tensor of 32-bit patterns -> int32 tensor with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


# ---------------------------------------------------------------------------------------
def test_fragment_coordinate_helpers(lib):
    with Bufs(lib) as buf:
        out = buf((32 * 32, torch.int32), "out")
        lib.configure("forward")
        assert lib.frag_coords(out.ptr) == 0 and lib.take_log() == ""
        got = out.read().view(32, 16, 2).tolist()
    for lane in range(32):
        want = [a_coord(lane, i) for i in range(8)] + [b_coord(lane, i) for i in range(4)] + \
               [c_coord(lane, i) for i in range(4)]
        assert [tuple(x) for x in got[lane]] == want, lane
    # every element of each matrix is held by exactly one (lane, element)
    for coord, n, shape in ((a_coord, 8, (16, 16)), (b_coord, 4, (16, 8)), (c_coord, 4, (16, 8))):
        seen = sorted(coord(lane, i) for lane in range(32) for i in range(n))
        assert seen == [(r, c) for r in range(shape[0]) for c in range(shape[1])]


def test_pack_rounds_to_nearest_even(lib):
    x = torch.cat([torch.randn(200, generator=torch.Generator().manual_seed(3)) * 10,
                   torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8,  # ties
                                 70000.0, -1e39, 2.0**-25, -2.0**-26, 1e-40, 0.0, -0.0, 65519.0])])
    x = torch.cat([x, torch.zeros(len(x) % 2)])
    n = len(x) // 2
    with Bufs(lib) as buf:
        xb = buf(x, "x", readonly=True)
        out = buf((2 * n, torch.int32), "out")
        lib.configure("forward")
        assert lib.pack(xb.ptr, out.ptr, n) == 0 and lib.take_log() == ""
        got = out.read().to(torch.int64) & 0xFFFFFFFF
    for i, dtype in enumerate((torch.float16, torch.bfloat16)):
        h = bits16(x.to(dtype)).view(n, 2)
        assert torch.equal(got[i * n:(i + 1) * n], h[:, 0] | (h[:, 1] << 16)), dtype


def run_mma(lib, dtype, As, Bs, Cs, schedule="forward"):
    """One warp per (A, B, C) triple: fragments packed here, D unpacked here."""
    warps = len(As)
    regs = torch.cat([pack_fragments(A, B) for A, B in zip(As, Bs)])
    cfr = torch.cat([to_c_fragments(C) for C in Cs])
    with Bufs(lib) as buf:
        rb = buf(u32(regs).reshape(-1), "regs", readonly=True)
        cb = buf(cfr.reshape(-1).float(), "c", readonly=True)
        db = buf((warps * 32 * 4, torch.float32), "d")
        lib.configure(schedule)
        err = lib.mma_raw(int(dtype == torch.bfloat16), rb.ptr, cb.ptr, db.ptr, warps)
        log = lib.take_log()
        assert err == 0 and log == "", log
        d = db.read().view(warps, 32, 4)
    return [from_c_fragments(d[w]) for w in range(warps)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_layout_exact_on_small_integers(lib, dtype):
    """Small integers: every sum is exact in float32 (on hardware too), so D = A B + C bitwise."""
    g = torch.Generator().manual_seed(1)
    As = [torch.randint(-8, 9, (16, 16), generator=g).to(dtype) for _ in range(4)]
    Bs = [torch.randint(-8, 9, (16, 8), generator=g).to(dtype) for _ in range(4)]
    Cs = [torch.randint(-100, 101, (16, 8), generator=g).float() for _ in range(4)]
    for schedule in ("forward", "random"):
        for A, B, C, D in zip(As, Bs, Cs, run_mma(lib, dtype, As, Bs, Cs, schedule)):
            assert torch.equal(D, (A.double() @ B.double() + C.double()).float())


def mma_tolerance(A, B, C):
    """C + 16 products in float32: |error| <= 17 u (|C| + |A| |B|), u = 2^-24 (hardware orders and
    rounds its sums differently; the bound covers any order)."""
    return 17 * 2.0**-24 * (C.double().abs() + A.double().abs() @ B.double().abs()) + 1e-45


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_matches_float64(lib, dtype):
    g = torch.Generator().manual_seed(2)
    As = [torch.randn(16, 16, generator=g).to(dtype) for _ in range(3)]
    Bs = [torch.randn(16, 8, generator=g).to(dtype) for _ in range(3)]
    Cs = [torch.randn(16, 8, generator=g) for _ in range(3)]
    # extremes: float16 subnormals and signed zeros, bfloat16 beyond float16's range
    if dtype == torch.float16:
        As.append(torch.tensor([2.0**-24, -2.0**-20, 0.0, -0.0, 6e-5, 65504.0] * 43)[:256].view(16, 16).to(dtype))
    else:
        As.append(torch.tensor([1e30, -3e-30, 0.0, -0.0, 2.0**-130, 7.5] * 43)[:256].view(16, 16).to(dtype))
    Bs.append(torch.randn(16, 8, generator=g).to(dtype))
    Cs.append(torch.zeros(16, 8))
    for A, B, C, D in zip(As, Bs, Cs, run_mma(lib, dtype, As, Bs, Cs)):
        ref = A.double() @ B.double() + C.double()
        assert ((D.double() - ref).abs() <= mma_tolerance(A, B, C)).all(), (D.double() - ref).abs().max()


# ---------------------------------------------------------------------------------------
# ldmatrix
# ---------------------------------------------------------------------------------------
LDMATRIX_MODES = {0: (1, False), 1: (2, False), 2: (4, False), 3: (2, True), 4: (4, True)}


@pytest.mark.parametrize("mode", sorted(LDMATRIX_MODES), ids=["x1", "x2", "x4", "x2.trans", "x4.trans"])
def test_ldmatrix_layout(lib, mode):
    num, trans = LDMATRIX_MODES[mode]
    tile = torch.tensor([[0x100 * r + c + 1 for c in range(8)] for r in range(32)], dtype=torch.int32)
    # rows in a shuffled order; lanes the instruction ignores get a misaligned address
    rows = torch.randperm(32, generator=torch.Generator().manual_seed(mode))
    rows[8 * num:] = -1
    with Bufs(lib) as buf:
        src = buf(tile.to(torch.int16).reshape(-1), "tile", readonly=True)
        rb = buf(rows.to(torch.int32), "rows", readonly=True)
        out = buf((32 * 4, torch.int32), "out")
        for schedule in ("forward", "reverse"):
            lib.configure(schedule)
            err = lib.ldmatrix(src.ptr, rb.ptr, out.ptr, mode)
            log = lib.take_log()
            assert err == 0 and log == "", log
            got = (out.read().to(torch.int64) & 0xFFFFFFFF).view(32, 4)
            for lane in range(32):
                q, p = lane // 4, 2 * (lane % 4)
                for m in range(4):
                    if m >= num:
                        want = 0
                    else:
                        addr = rows[8 * m:8 * m + 8].tolist()  # the rows of matrix m, in order
                        lo, hi = (tile[addr[p], q], tile[addr[p + 1], q]) if trans else \
                            (tile[addr[q], p], tile[addr[q], p + 1])
                        want = int(lo) | int(hi) << 16
                    assert int(got[lane, m]) == want, (schedule, lane, m, hex(int(got[lane, m])), hex(want))


# ---------------------------------------------------------------------------------------
# cp.async
# ---------------------------------------------------------------------------------------
def test_cp_async_groups(lib):
    """wait_group N completes all but the N most recent committed groups, wait_all everything
    (the uncommitted zero-filling copy too); until then the destination keeps its poison. Under
    the random schedule the copies land when issued (also allowed: they may land any time before
    the wait)."""
    src = torch.randn(32 * 16)
    full = src.view(32, 4, 4).clone()
    full[:, 3] = 0.0  # the zero-filled group
    with Bufs(lib) as buf:
        sb = buf(src, "src", readonly=True)
        out = buf((4 * 32 * 16, torch.float32), "out")
        for schedule in ("forward", "reverse", "random"):
            lib.configure(schedule)
            err = lib.cp_async_groups(sb.ptr, out.ptr)
            log = lib.take_log()
            assert err == 0 and log == "", log
            got = out.read().view(4, 32, 4, 4)
            for snap in range(4):
                done = 4 if schedule == "random" else snap + 1
                assert torch.equal(got[snap, :, :done], full[:, :done]), (schedule, snap)
                assert torch.isnan(got[snap, :, done:]).all(), (schedule, snap)


# ---------------------------------------------------------------------------------------
# The GEMM
# ---------------------------------------------------------------------------------------
DT = {torch.float16: 0, torch.bfloat16: 1}
BUGS = dict(no_wait=1, wait_depth=2, no_trailing_sync=3, half_warp=4, misaligned=5, fragment=6, ldmatrix_global=7,
            copy_misaligned=8, copy_unguarded=9)


def gemm_inputs(M, N, K, dtype, bmode, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(M, K, generator=g).to(dtype)
    B = torch.randn(K, N, generator=g).to(dtype)
    Bin = B.t().contiguous() if bmode == 2 else B
    ref = A.double() @ B.double()
    tol = (K + 2) * 2.0**-24 * (A.double().abs() @ B.double().abs()) + 1e-30
    return A, Bin, ref, tol


def gemm_call(lib, dtype, copy, M, N, K, bmode, bug=0):
    def call(ins, outs, extra):
        return lib.gemm(DT[dtype], copy, ins["A"].ptr, ins["B"].ptr, outs["C"].ptr, M, N, K, bmode, bug)
    return call


GEMM_CASES = [
    # dtype, copy bytes, bmode, (M, N, K)
    (torch.float16, 16, 0, (32, 32, 32)),
    (torch.bfloat16, 16, 1, (64, 64, 96)),
    (torch.float16, 8, 2, (40, 24, 72)),
    (torch.bfloat16, 4, 0, (17, 56, 8)),
    (torch.float16, 4, 1, (33, 40, 40)),
    (torch.bfloat16, 8, 2, (24, 9, 48)),
]


@pytest.mark.parametrize("dtype,copy,bmode,shape", GEMM_CASES,
                         ids=[f"{str(c[0])[6:]}-cp{c[1]}-b{c[2]}-{'x'.join(map(str, c[3]))}" for c in GEMM_CASES])
def test_gemm_matches_float64(lib, dtype, copy, bmode, shape):
    M, N, K = shape
    A, B, ref, tol = gemm_inputs(M, N, K, dtype, bmode)
    out = driver.run_schedules(lib, {"A": A, "B": B}, {"C": (M * N, torch.float32)},
                               gemm_call(lib, dtype, copy, M, N, K, bmode))
    C = out["C"].view(M, N).double()
    assert ((C - ref).abs() <= tol).all(), (C - ref).abs().max()


def run_gemm_once(lib, schedule, dtype, copy, M, N, K, bmode, bug, seed=0):
    A, B, ref, tol = gemm_inputs(M, N, K, dtype, bmode, seed)
    with Bufs(lib) as buf:
        ab = buf(A, "A", readonly=True)
        bb = buf(B, "B", readonly=True)
        cb = buf((M * N, torch.float32), "C")
        lib.configure(schedule, 20240611)
        err = lib.gemm(DT[dtype], copy, ab.ptr, bb.ptr, cb.ptr, M, N, K, bmode, bug)
        log = lib.take_log()
        C = cb.read().view(M, N).double()
    return err, log, C, ref, tol


@pytest.mark.parametrize("bug", ["no_wait", "wait_depth"])
def test_gemm_missing_wait_reads_poison(lib, bug):
    for schedule in ("forward", "reverse"):
        err, log, C, ref, tol = run_gemm_once(lib, schedule, torch.float16, 16, 64, 32, 64, 0, BUGS[bug])
        assert err == 0 and log == "", log
        assert torch.isnan(C).any(), schedule
    err, log, C, ref, tol = run_gemm_once(lib, schedule, torch.float16, 16, 64, 32, 64, 0, 0)  # the same, correct
    assert err == 0 and log == "" and ((C - ref).abs() <= tol).all()


def test_gemm_missing_trailing_barrier_shows(lib):
    """Without the barrier after the compute, the next stage's copies refill a buffer that other
    warps still read: copies landing when issued (random schedule) corrupt the result."""
    err, log, C, ref, tol = run_gemm_once(lib, "random", torch.bfloat16, 16, 64, 64, 128, 1,
                                          BUGS["no_trailing_sync"])
    assert err == 0 and log == "", log
    assert not ((C - ref).abs() <= tol).all()
    with pytest.raises(AssertionError, match="differs between schedules"):
        driver.run_schedules(lib, {"A": gemm_inputs(64, 64, 128, torch.bfloat16, 1)[0],
                                   "B": gemm_inputs(64, 64, 128, torch.bfloat16, 1)[1]},
                             {"C": (64 * 64, torch.float32)},
                             gemm_call(lib, torch.bfloat16, 16, 64, 64, 128, 1, BUGS["no_trailing_sync"]))


def test_gemm_wrong_fragment_index_gives_wrong_numbers(lib):
    err, log, C, ref, tol = run_gemm_once(lib, "forward", torch.float16, 16, 32, 32, 32, 0, BUGS["fragment"])
    assert err == 0 and log == "", log
    assert not torch.isnan(C).any() and (C - ref).abs().max() > 100 * tol.max()


GEMM_ERRORS = [
    # bug, dtype, copy, bmode, (M, N, K), words of the message
    ("half_warp", torch.float16, 16, 0, (32, 32, 32), "lanes disagree"),
    ("misaligned", torch.bfloat16, 16, 1, (32, 32, 32), "not 16-byte aligned"),
    ("ldmatrix_global", torch.float16, 16, 2, (32, 32, 32), "not 16 bytes of shared memory (global memory: offset 0 of "
                                                            "buffer 'A'"),
    ("copy_misaligned", torch.float16, 16, 0, (32, 32, 32), "the global (source) address"),
    ("copy_unguarded", torch.float16, 16, 0, (40, 32, 48), "past its end, by"),
]


@pytest.mark.parametrize("bug,dtype,copy,bmode,shape,words", GEMM_ERRORS, ids=[c[0] for c in GEMM_ERRORS])
def test_gemm_bugs_are_reported(lib, bug, dtype, copy, bmode, shape, words):
    for schedule in ("forward", "reverse", "random"):
        err, log, *_ = run_gemm_once(lib, schedule, dtype, copy, *shape, bmode, BUGS[bug])
        if bug == "copy_unguarded" and schedule == "reverse":
            continue  # (buffers there lie against their lower guard page: reads past the end stay in the page)
        assert err != 0 and words in log, (schedule, log)
        if bug == "copy_unguarded":
            assert "of buffer 'A'" in log and "source of the cp.async issued at" in log and "ptx_selftest.cu:" in log


# ---------------------------------------------------------------------------------------
# Misuse
# ---------------------------------------------------------------------------------------
CHECKS = [
    (0, "lanes disagree on a warp operation"),
    (1, "lanes disagree on a warp operation"),
    (2, "lanes at different ldmatrix.sync.aligned.m8n8.x1.shared.b16 instructions"),
    (3, "exited"),  # "exited without taking part", or "has exited" when they exit first
    (4, "not 16 bytes of shared memory (a thread's stack (local memory))"),
    (5, "offset 128 of the dynamic shared memory (128 bytes requested at launch): past its end"),
    (6, "is not in shared memory (global memory: offset "),
    (7, "is in shared memory (cp.async copies from global memory)"),
    (8, "needs the whole warp (.sync.aligned), but this warp has only 16 threads"),
]


@pytest.mark.parametrize("which,words", CHECKS, ids=[str(c[0]) for c in CHECKS])
def test_misuse_is_reported(lib, which, words):
    with Bufs(lib) as buf:
        b = buf(torch.zeros(256), "buf")
        for schedule in ("forward", "reverse", "random"):
            lib.configure(schedule)
            err = lib.check(which, b.ptr)
            log = lib.take_log()
            assert err != 0 and words in log, (schedule, log)
