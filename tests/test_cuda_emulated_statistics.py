"""csrc/statistics/statistics_cuda.cu executed on the CPU executor of tests/cuda_emu, through its
raw-pointer launchers, against float64 references written here: delta_log_amplitude and
feature_variance (partial and finalize kernels) in float32 / float16 / bfloat16 / float64, odd
sizes, several maps per launch (up to kMaxSegments, maps without planes among them), map sizes
up to the launcher's limit and beyond it (refused), and lists that launch several hundred
blocks. Each case runs under the forward, reverse and seeded random thread schedules (sm_90 and
sm_80 limits), with guard pages around every buffer (the workspace included) and the inputs
read-only."""
import ctypes
import math
import os

import pytest
import torch

from cuda_emu import driver
from cuda_emu.testing import one_thread, pytestmark  # noqa: F401 (the module's marks and fixture)


DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
PLANES_PER_BLOCK = 64  # the kernels' kPlanesPerBlock
MAX_SEGMENTS = 32
CUDA_ERROR_INVALID_VALUE = 1


@pytest.fixture(scope="module")
def lib():
    lib = driver.load(os.path.join(driver.CSRC, "statistics", "statistics_cuda.cu"),
                      os.path.join(driver.HERE, "shim_statistics.cpp"))
    pp, ll = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong)
    lib.workspace = lib.fn("emu_statistics_workspace", [ctypes.c_int, ctypes.c_int, pp, pp, ll, ll, ctypes.c_int],
                           ctypes.c_longlong)
    lib.delta = lib.fn("emu_delta_log_amplitude", [ctypes.c_int, pp, pp, ll, ll, ctypes.c_int, ctypes.c_double,
                                                   ctypes.c_void_p])
    lib.variance = lib.fn("emu_feature_variance", [ctypes.c_int, pp, pp, ll, ll, ctypes.c_int, ctypes.c_void_p])
    lib.max_size = lib.fn("emu_delta_max_size", [ctypes.c_int])
    return lib


# ---------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------
def delta_ref(x, eps):
    """mean over planes of log(|F[k,k]| + eps) minus the same at k = 0, F the 2-D DFT; with a
    bound on the float32/float64 kernel's error: per plane |dF| <= (2n + 8) u sum|x|, and the
    log moves by at most |dF| / (|F| + eps)."""
    x = x.double().reshape(-1, x.shape[-2], x.shape[-1])
    n = x.shape[-1]
    K = n - n // 2
    if x.shape[0] == 0:
        return torch.full((K,), math.nan, dtype=torch.float64), None
    f = torch.fft.fft2(x)
    d = torch.diagonal(f, dim1=-2, dim2=-1)[:, :K].abs()  # (planes, K)
    la = torch.log(d + eps).mean(0)
    abs_sum = x.abs().sum(dim=(-2, -1))[:, None]
    return la - la[0], (abs_sum, d)


def delta_tol(aux, eps, u):
    """Per plane and bin: u sum|x| / (|F| + eps), to be scaled by (2n + 8)."""
    abs_sum, d = aux
    return abs_sum * u / (d + eps)


def variance_ref(x):
    x = x.double().reshape(-1, x.shape[-2] * x.shape[-1])
    if x.shape[0] == 0:
        return torch.tensor(math.nan, dtype=torch.float64)
    return x.var(dim=1, unbiased=True).mean()


# ---------------------------------------------------------------------------------------
def run(lib, kind, maps, dtype, eps=1e-6, expect_blocks=None):
    """Launches one segment list (the maps, each (planes, n, n) or (planes, h, w))."""
    count = len(maps)
    delta = kind == "delta"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sizes = [(m.shape[-1] if delta else m.shape[-2] * m.shape[-1]) for m in maps]
    planes = [m.shape[0] * m.shape[1] for m in maps]
    inputs = {f"map{i}": m.to(dtype) for i, m in enumerate(maps)}
    outputs = {f"out{i}": ((s - s // 2) if delta else 1, acc) for i, s in enumerate(sizes)}
    arr_planes = (ctypes.c_longlong * max(count, 1))(*planes)
    arr_sizes = (ctypes.c_longlong * max(count, 1))(*sizes)

    def call(ins, outs, alloc):
        xs = (ctypes.c_void_p * max(count, 1))(*[ins[f"map{i}"].ptr for i in range(count)])
        os_ = (ctypes.c_void_p * max(count, 1))(*[outs[f"out{i}"].ptr for i in range(count)])
        nbytes = lib.workspace(int(delta), count, xs, os_, arr_planes, arr_sizes, DTYPES[dtype])
        ws = alloc(nbytes, torch.uint8, "workspace")  # filled with 0xff: NaN partials
        if delta:
            return lib.delta(count, xs, os_, arr_planes, arr_sizes, DTYPES[dtype], eps, ws.ptr)
        return lib.variance(count, xs, os_, arr_planes, arr_sizes, DTYPES[dtype], ws.ptr)

    outs = driver.run_schedules(lib, inputs, outputs, call)
    launches = lib.take_launches()
    blocks = sum(-(-p // PLANES_PER_BLOCK) for p in planes)
    name = "delta" if delta else "variance"
    want = ([f"{name}_partial_kernel<T, Acc> grid=({blocks},1,1)"] if blocks else []) + \
        [f"{name}_finalize_kernel<Acc> grid=({count},1,1) block=(256,1,1) smem=0"]
    assert [ln if "finalize" in ln else ln.split(" block=")[0] for ln in launches] == want, launches
    if expect_blocks is not None:
        assert blocks == expect_blocks
    return [outs[f"out{i}"] for i in range(count)], launches


def check_delta(lib, maps, dtype, eps=1e-6, expect_blocks=None):
    outs, launches = run(lib, "delta", maps, dtype, eps, expect_blocks)
    u = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    for i, (m, got) in enumerate(zip(maps, outs)):
        ref, aux = delta_ref(m.to(dtype), eps)
        if aux is None:
            assert torch.isnan(got).all(), f"map {i} without planes: want NaN, got {got}"
            continue
        n = m.shape[-1]
        rel = delta_tol(aux, eps, u) * (2 * n + 8)
        tol = rel.mean(0) + rel[:, :1].mean(0) + 64 * u
        err = (got.double() - ref).abs()
        assert not torch.isnan(got).any(), f"map {i} (n={n}, {dtype}): NaN in {got}"
        assert (err <= tol).all(), (f"map {i} (n={n}, {m.shape[0] * m.shape[1]} planes, {dtype}): max error "
                                    f"{err.max().item():.3g} at k={int(err.argmax())}, tolerance there "
                                    f"{tol[err.argmax()].item():.3g}")
    return launches


def check_variance(lib, maps, dtype, expect_blocks=None):
    outs, launches = run(lib, "variance", maps, dtype, expect_blocks=expect_blocks)
    u = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    for i, (m, got) in enumerate(zip(maps, outs)):
        ref = variance_ref(m.to(dtype))
        if torch.isnan(ref):
            assert torch.isnan(got).all(), f"map {i} without planes: want NaN, got {got}"
            continue
        hw = m.shape[-2] * m.shape[-1]
        # shifted sums in the accumulation type: a few units of roundoff per element and plane
        tol = (4 * hw + 64) * u * abs(ref.item()) + 1e-30
        assert not torch.isnan(got).any(), f"map {i}: NaN"
        assert abs(got.double().item() - ref.item()) <= tol, (f"map {i} ({tuple(m.shape)}, {dtype}): got "
                                                                f"{got.item()}, want {ref.item()}")
    return launches


def maps_of(shapes, seed, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) + offset for s in shapes]


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_odd_and_mixed_sizes(lib, dtype):
    # one launch: n = 1, 2, 5, 13 (odd), 32, 33, 40 (rows staged in chunks), a map without planes,
    # 70 and 130 planes (partial blocks of 64)
    shapes = [(1, 3, 1, 1), (2, 1, 2, 2), (3, 5, 5, 5), (1, 70, 13, 13), (2, 3, 32, 32), (1, 2, 33, 33),
              (0, 3, 7, 7), (2, 65, 40, 40), (1, 1, 17, 17)]
    check_delta(lib, maps_of(shapes, 1), dtype, expect_blocks=1 + 1 + 1 + 2 + 1 + 1 + 0 + 3 + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_largest_map_and_beyond(lib, dtype):
    n_max = lib.max_size(DTYPES[dtype])
    assert n_max == (256 if dtype == torch.float64 else 512)
    # the largest map next to a small one (the shared-memory layout follows the largest)
    check_delta(lib, maps_of([(1, 1, 5, 5), (1, 2, n_max, n_max)], 2, offset=0.0), dtype)
    # one more is refused by the launcher, with no launch
    lib.configure("forward", 1, 90)
    xs = (ctypes.c_void_p * 1)(None)
    outs = (ctypes.c_void_p * 1)(None)
    planes = (ctypes.c_longlong * 1)(1)
    sizes = (ctypes.c_longlong * 1)(n_max + 1)
    assert lib.delta(1, xs, outs, planes, sizes, DTYPES[dtype], 1e-6, None) == CUDA_ERROR_INVALID_VALUE
    assert lib.take_launches() == [] and lib.take_log() == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_delta_several_hundred_blocks(lib, dtype):
    # 64 * 300 + 9 planes of 3x3 and of 4x4 in two segments: 302 + 2 blocks, the finalize
    # kernel summing 302 partial rows
    maps = maps_of([(300, 64, 3, 3), (1, 9, 3, 3), (2, 40, 4, 4)], 3)
    maps = [torch.cat([maps[0].reshape(-1, 3, 3), maps[1].reshape(-1, 3, 3)]).reshape(1, -1, 3, 3), maps[2]]
    check_delta(lib, maps, dtype, expect_blocks=301 + 2)


def test_delta_eps(lib):
    # a map whose bins are exactly zero: log(eps) is what stands
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    x[..., 0, 0] = 1.0  # |F| = 1 everywhere
    x[:, 1] = 0.0       # second plane all zero: log(eps) at every k
    check_delta(lib, [x, maps_of([(1, 3, 9, 9)], 4)[0]], torch.float32, eps=0.25)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variance_odd_and_mixed_sizes(lib, dtype):
    shapes = [(1, 1, 1, 2), (2, 3, 5, 7), (1, 70, 3, 3), (0, 5, 4, 4), (1, 1, 37, 41), (3, 43, 1, 9),
              (1, 2, 64, 64)]
    check_variance(lib, maps_of(shapes, 5, offset=3.0), dtype, expect_blocks=1 + 1 + 2 + 0 + 1 + 3 + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_variance_several_hundred_blocks(lib, dtype):
    # 300 blocks in one segment: the finalize kernel's threads each sum two partials
    maps = maps_of([(300, 64, 3, 5), (1, 7, 2, 3)], 6, offset=-2.0)
    check_variance(lib, maps, dtype, expect_blocks=300 + 1)


@pytest.mark.parametrize("kind", ["delta", "variance"])
def test_thirty_two_maps_per_launch(lib, kind):
    g = torch.Generator().manual_seed(7)
    shapes = [(1, 1 + (i * 7) % 67, 2 + i % 9, 2 + i % 9) for i in range(MAX_SEGMENTS)]
    maps = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    if kind == "delta":
        check_delta(lib, maps, torch.float32)
    else:
        check_variance(lib, maps, torch.float32)


@pytest.mark.parametrize("kind", ["delta", "variance"])
def test_segment_count_limits(lib, kind):
    lib.configure("forward", 1, 90)
    n = MAX_SEGMENTS + 1
    xs = (ctypes.c_void_p * n)()
    outs = (ctypes.c_void_p * n)()
    planes = (ctypes.c_longlong * n)(*([1] * n))
    sizes = (ctypes.c_longlong * n)(*([4] * n))
    f = (lambda c: lib.delta(c, xs, outs, planes, sizes, 0, 1e-6, None)) if kind == "delta" else \
        (lambda c: lib.variance(c, xs, outs, planes, sizes, 0, None))
    assert f(n) == CUDA_ERROR_INVALID_VALUE
    assert f(0) == 0  # nothing to do, nothing launched
    assert lib.take_launches() == [] and lib.take_log() == ""
