"""The CPU executor of CUDA C++ (tests/cuda_emu): collective and barrier semantics, and every
check it makes, each shown to fire on a kernel with that bug (tests/cuda_emu/selftest.cu)."""
import ctypes
import os

import pytest
import torch

from cuda_emu import driver

pytestmark = [pytest.mark.cuda_emulated,
              pytest.mark.skipif(driver.unavailable_reason() is not None,
                                 reason=str(driver.unavailable_reason()))]

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def lib():
    lib = driver.load(os.path.join(HERE, "cuda_emu", "selftest.cu"))
    lib.selftest = lib.fn("emu_selftest", [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int])
    return lib


def run(lib, which, p0=None, p1=None, a0=0, a1=0, schedule="forward", arch=90):
    lib.configure(schedule, 7, arch)
    err = lib.selftest(which, p0.ptr if p0 else None, p1.ptr if p1 else None, a0, a1)
    return err, lib.take_log()


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_collectives_match_cuda_semantics(lib, schedule):
    out = lib.guarded((2 * 256 * 12, torch.int32), "out")
    err, log = run(lib, 0, out, schedule=schedule)
    assert err == 0 and log == "", log
    got = out.read().view(2, 256, 12)
    out.free()
    for b in range(2):
        t = torch.arange(256)
        lane = t % 32
        warp_base = t - lane
        exp = torch.empty(256, 12, dtype=torch.int64)
        exp[:, 0] = t ^ 5
        base16 = lane & ~15
        exp[:, 1] = torch.where((lane - base16) + 3 < 16, t + 3, t)
        base8 = lane & ~7
        exp[:, 2] = torch.where((lane - base8) >= 2, t - 2, t)
        exp[:, 3] = (warp_base + (lane + 7) % 32) * 10
        ballot = torch.zeros(256, dtype=torch.int64)
        for w in range(8):
            bits = sum(1 << l for l in range(32) if (w * 32 + l) % 3 == 0)
            ballot[w * 32:(w + 1) * 32] = bits - (1 << 32) if bits >= 1 << 31 else bits
        exp[:, 4] = ballot
        exp[:, 5] = ((t // 32) == 1).long()
        exp[:, 6] = ((t // 32) != 1).long()
        exp[:, 7] = sum(1 for i in range(256) if i % 5 == 0)
        exp[:, 8] = 1
        exp[:, 9] = 1
        exp[:, 10] = torch.tensor([sum(range(w * 32, w * 32 + 32)) for w in range(8)]).repeat_interleave(32)
        exp[:, 11] = torch.where(lane < 16, t ^ 1, torch.full_like(t, -1))
        assert torch.equal(got[b].long(), exp), (got[b].long() != exp).nonzero()[:10]


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_grid_and_block_coordinates(lib, schedule):
    out = lib.guarded((12 * 3, torch.int32), "out")
    err, log = run(lib, 21, out, schedule=schedule)
    got = out.read().view(12, 3).tolist()
    out.free()
    assert err == 0 and log == "", log
    assert got == [[x, y, z] for z in range(2) for y in range(2) for x in range(3)]


def test_barriers_order_shared_memory_and_a_missing_one_shows(lib):
    x = torch.randn(3 * 64)
    ref = x.view(3, 64).flip(1).reshape(-1)
    for with_barrier in (1, 0):
        wrong = 0
        for schedule in ("forward", "reverse", "random"):
            xb = lib.guarded(x, "x", readonly=True)
            ob = lib.guarded((3 * 64, torch.float32), "out")
            err, log = run(lib, 1, xb, ob, a0=with_barrier, schedule=schedule)
            got = ob.read()
            xb.free(), ob.free()
            assert err == 0 and log == "", log
            wrong += not torch.equal(got, ref)
        # with the barrier every schedule is right; without it, forward and reverse read poison
        assert (wrong == 0) if with_barrier else (wrong >= 2)


def test_a_missing_syncwarp_shows(lib):
    x = torch.randn(32)
    for with_sync in (1, 0):
        wrong = 0
        for schedule in ("forward", "reverse", "random"):
            xb = lib.guarded(x, "x", readonly=True)
            ob = lib.guarded((32, torch.float32), "out")
            err, log = run(lib, 2, xb, ob, a0=with_sync, schedule=schedule)
            got = ob.read()
            xb.free(), ob.free()
            assert err == 0 and log == "", log
            wrong += not torch.equal(got, x.flip(0))
        assert (wrong == 0) if with_sync else (wrong >= 2)


CHECKS = [
    # (case, a0, a1, words of the message)
    (3, 0, 0, "divergent __syncthreads"),
    (4, 0, 0, "divergent barrier"),
    (5, 0, 0, "does not include the calling lane"),
    (6, 0, 0, "not in the mask"),
    (7, 0, 0, "exited"),
    (8, 0, 0, "deadlock"),
    (13, 0, 0, "exceed"),
]


@pytest.mark.parametrize("case,a0,a1,words", CHECKS, ids=[c[3].split()[0] for c in CHECKS])
def test_checks_fire(lib, case, a0, a1, words):
    out = lib.guarded((64, torch.float32), "out")
    for schedule in ("forward", "reverse", "random"):
        err, log = run(lib, case, out, schedule=schedule)
        assert err != 0 and words in log, (schedule, err, log)
    out.free()


@pytest.mark.parametrize("offset,at_start,words", [(1, False, "offset 128 of buffer 'x' (128 bytes): past its end"),
                                                    (-1, True, "offset -4 of buffer 'x' (128 bytes): before its start")])
def test_out_of_bounds_global_read(lib, offset, at_start, words):
    xb = lib.guarded(torch.randn(32), "x", at_start=at_start, readonly=True)
    ob = lib.guarded((32, torch.float32), "out")
    err, log = run(lib, 9, xb, ob, a0=offset)
    assert err != 0 and words in log, log
    err, log = run(lib, 9, xb, ob, a0=0)  # the same kernel in bounds
    assert err == 0 and log == "", log
    assert torch.equal(ob.read(), xb.read())
    xb.free(), ob.free()


def test_write_into_a_read_only_input(lib):
    xb = lib.guarded(torch.randn(32), "x", readonly=True)
    err, log = run(lib, 10, xb)
    assert err != 0 and "of buffer 'x' (128 bytes): inside it" in log, log
    xb.free()


@pytest.mark.parametrize("index,smem,words", [
    (64, 256, "offset 256 of the dynamic shared memory (256 bytes requested at launch): past its end"),
    (63, 250, "write at offset 252 of the dynamic shared memory (250 bytes requested at launch): past its end"),
    (0, 0, "offset 0 of the dynamic shared memory (0 bytes requested at launch): past its end")])
def test_dynamic_shared_memory_is_sized_exactly(lib, index, smem, words):
    err, log = run(lib, 11, a0=index, a1=smem)
    assert err != 0 and words in log, log
    err, log = run(lib, 11, a0=smem // 4 - 1, a1=smem) if smem else (0, "")
    assert err == 0 and log == "", log


def test_dynamic_shared_memory_starts_as_nan(lib):
    ob = lib.guarded((1, torch.float32), "out")
    for schedule in ("forward", "reverse", "random"):
        err, log = run(lib, 12, ob, a0=5, a1=64, schedule=schedule)
        assert err == 0 and log == ""
        assert torch.isnan(ob.read()).all()
    ob.free()


@pytest.mark.parametrize("case,a0,a1,arch,ok", [
    (14, 1024, 0, 90, True), (14, 1025, 0, 90, False),
    (15, 65535, 0, 90, True), (15, 65536, 0, 90, False), (16, 65536, 0, 80, False),
    (17, 48 * 1024, 0, 90, True), (17, 48 * 1024 + 4, 0, 90, False),
    (18, 160 * 1024, 160 * 1024, 80, True), (18, 163 * 1024 + 4, 163 * 1024 + 4, 80, False),
    (18, 227 * 1024, 227 * 1024, 90, True), (18, 227 * 1024 + 4, 227 * 1024 + 4, 90, False),
    (18, 100 * 1024, 64 * 1024, 90, False),  # above what it opted in to
    (19, 0, 0, 90, False),  # 512 threads, __launch_bounds__(256)
])
def test_launch_limits(lib, case, a0, a1, arch, ok):
    out = lib.guarded((1 << 16, torch.float32), "out")
    err, log = run(lib, case, out, a0=a0, a1=a1, arch=arch)
    out.free()
    if ok:
        assert err == 0 and log == "", log
    else:
        assert err != 0 and log != "", (err, log)


def test_atomics(lib):
    cnt = lib.guarded(torch.zeros(2, dtype=torch.int32), "counter")
    fs = lib.guarded(torch.zeros(1), "sum")
    err, log = run(lib, 20, cnt, fs, a0=5, schedule="random")
    assert err == 0 and log == "", log
    assert cnt.read().tolist() == [640, 639] and fs.read().item() == 320.0
    cnt.free(), fs.free()


def test_rewrite_keeps_lines_and_finds_launches():
    src = ("template <typename T>\n__global__ void __launch_bounds__(128) k(T* p) {\n"
           "  extern __shared__ __align__(16) unsigned char raw[];\n  __shared__ float s[4][8];\n}\n"
           "void f(float* p) {\n  k<float><<<dim3(2, 1),\n      128, 0, nullptr>>>(\n   p);\n  ns::g<<<1, 1>>>();\n}\n")
    out = driver.rewrite(src, "x.cu")
    assert out.count("\n") == src.count("\n") + 1
    assert ('::emu::Launch(dim3(2, 1),\n      128, 0, nullptr).bounds(128).at(__FILE__, __LINE__).run("k<float>", '
            'k<float>, ') in out.replace("\n\n", "\n")
    assert 'run("ns::g", ns::g)' in out
    assert "unsigned char* const raw = static_cast<unsigned char*>(::emu::dynamic_smem());" in out
    assert "static float s[4][8]; ::emu::static_smem(&s, sizeof(s)" in out


def test_watchdog_stops_an_endless_kernel(lib):
    lib.set_time_limit(0.3)
    try:
        err, log = run(lib, 22, a0=1)
        assert err != 0 and "still running after" in log, log
        err, log = run(lib, 22, a0=0)
        assert err == 0 and log == "", log
    finally:
        lib.set_time_limit(120.0)


def test_stack_overflow_is_caught(lib):
    out = lib.guarded((32, torch.int32), "out")
    err, log = run(lib, 23, out, a0=10)
    assert err == 0 and log == "", log
    assert out.read().tolist() == [sum(range(11))] * 32
    err, log = run(lib, 23, out, a0=1000)  # 4 MB of frames on a 256 KiB stack
    assert err != 0 and "stack overflow" in log, log
    out.free()
