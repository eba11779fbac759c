"""The CPU kernels under threads: bitwise identical results for any size of torch's thread pool,
and many Python threads calling the ops at once give what sequential calls give, with the CPU
output pool's accounting intact."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import alterops as ao
from alterops import memory
from helpers import skip_unless


def _inputs(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# Each task: (name, function of fresh leaf tensors -> output, input shapes). Sizes are large enough
# that every kernel splits its work across tasks (rows, planes, windows) when it has 2+ threads.
def _blur(x):
    return ao.box_blur2d(x, kernel_size=3, stride=1, padding=1, backend="cpu")


def _blur_strided(x):
    return ao.box_blur2d(x, kernel_size=2, stride=2, padding=0, backend="cpu")


def _tanh(x):
    return ao.tanh_blur2d(x, backend="cpu")


def _delta(x):
    return ao.delta_log_amplitude(x, backend="cpu")


def _variance(x):
    return ao.feature_variance(x, backend="cpu").reshape(1)


def _window(q, k, v, bias):
    return ao.window_attention2d(q, k, v, 7, shift=3, rel_pos_bias=bias, backend="cpu")


def _neighborhood(q, k, v, bias):
    return ao.neighborhood_attention2d(q, k, v, 5, 2, rel_pos_bias=bias, backend="cpu")


def _neighborhood_mask(q, k, v, bias):
    return ao.neighborhood_attention2d(q, k, v, 3, border="mask", rel_pos_bias=bias, backend="cpu")


TASKS = {
    "box_blur2d": (_blur, [(3, 5, 33, 41)], "box_blur2d"),
    "box_blur2d_stride2": (_blur_strided, [(2, 7, 30, 26)], "box_blur2d"),
    "tanh_blur2d": (_tanh, [(2, 6, 37, 29)], "tanh_blur2d"),
    "delta_log_amplitude": (_delta, [(3, 11, 24, 24)], "delta_log_amplitude"),
    "feature_variance": (_variance, [(5, 13, 17, 9)], "feature_variance"),
    "window_attention2d": (_window, [(2, 21, 17, 3, 16)] * 3 + [(3, 13, 13)], "window_attention2d"),
    "neighborhood_attention2d": (_neighborhood, [(2, 23, 19, 3, 16)] * 3 + [(3, 9, 9)], "neighborhood_attention2d"),
    "neighborhood_mask": (_neighborhood_mask, [(1, 9, 11, 2, 8)] * 3 + [(2, 5, 5)], "neighborhood_attention2d"),
}


def run_task(name, seed=0, dtype=torch.float32):
    """Output and every input gradient of one task, for a fixed upstream gradient."""
    fn, shapes, _ = TASKS[name]
    leaves = [_inputs(s, seed + i, dtype).requires_grad_(True) for i, s in enumerate(shapes)]
    out = fn(*leaves)
    g = _inputs(out.shape, seed + 100, dtype)
    grads = torch.autograd.grad(out, leaves, g)
    return [out.detach()] + list(grads)


def _equal(a, b, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: tensor {i}"
        # bitwise: NaN payloads compare equal too
        assert torch.equal(x.view(torch.uint8) if x.dtype != torch.bfloat16 else x.view(torch.int16),
                           y.view(torch.uint8) if y.dtype != torch.bfloat16 else y.view(torch.int16)), \
            f"{what}: tensor {i} differs (max diff {(x.double() - y.double()).abs().max().item():.3e})"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(TASKS))
def test_bitwise_identical_for_1_2_3_threads(name, dtype, restore_threads):
    skip_unless(TASKS[name][2], "cpu", dtype)
    runs = {}
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        runs[n] = run_task(name, dtype=dtype)
    _equal(runs[1], runs[2], f"{name} {dtype}: 1 vs 2 threads")
    _equal(runs[1], runs[3], f"{name} {dtype}: 1 vs 3 threads")


def test_concurrent_python_threads_match_sequential_calls():
    """16 Python threads, each running a mix of ops forward and backward (same shapes and
    different shapes at once), give exactly the results of sequential calls."""
    for name in TASKS:
        skip_unless(TASKS[name][2], "cpu", torch.float32)
    jobs = [(name, seed) for seed in range(3) for name in sorted(TASKS)]
    expected = {job: run_task(*job) for job in jobs}
    errors = []
    start = threading.Barrier(16)

    def worker(idx):
        try:
            start.wait()
            mine = jobs[idx::4] + jobs[::-1][idx % 5::5]  # overlapping subsets, different orders
            return [(job, run_task(*job)) for job in mine]
        except Exception as e:  # reported below, with the thread that raised it
            errors.append((idx, repr(e)))
            raise

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(worker, range(16)))
    assert not errors, errors
    checked = 0
    for per_thread in results:
        for job, got in per_thread:
            _equal(got, expected[job], f"{job} from a concurrent thread")
            checked += 1
    assert checked >= 16 * len(jobs) // 5


def test_output_pool_accounting_under_concurrent_load():
    """Outputs of 4 MiB and more come from the CPU output pool. Concurrent callers must see the
    same accounting as sequential ones: every request is a hit or a miss, bytes in use return to
    zero once the outputs are freed, and the cache never exceeds its limit."""
    skip_unless("box_blur2d", "cpu", torch.float32)
    if not memory._available():
        pytest.skip("the compiled extension is not loaded")
    memory.empty_cache()
    start = memory.cpu_pool_stats()
    shapes = [(4, 16, 128, 128), (2, 16, 181, 181), (8, 8, 127, 133)]  # outputs of 4-8 MiB
    xs = [_inputs(s, i) for i, s in enumerate(shapes)]
    expected = [ao.box_blur2d(x, backend="cpu") for x in xs]

    def calls(rounds):
        out = []
        for r in range(rounds):
            for i, x in enumerate(xs):
                y = ao.box_blur2d(x, backend="cpu")
                out.append((i, y))
                if r % 2:  # keep some outputs alive, free others at once
                    out.pop()
        return out

    base = memory.cpu_pool_stats()
    kept_seq = calls(4)
    seq = memory.cpu_pool_stats()
    requests_seq = (seq["hits"] + seq["misses"]) - (base["hits"] + base["misses"])
    assert requests_seq == 4 * len(xs)
    in_use_seq = seq["in_use_bytes"] - base["in_use_bytes"]
    assert in_use_seq >= sum(y.numel() * 4 for _, y in kept_seq)
    del kept_seq

    n_threads = 8
    before = memory.cpu_pool_stats()
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        kept = [item for part in pool.map(lambda _: calls(4), range(n_threads)) for item in part]
    after = memory.cpu_pool_stats()
    assert (after["hits"] + after["misses"]) - (before["hits"] + before["misses"]) == n_threads * 4 * len(xs)
    assert after["in_use_bytes"] - before["in_use_bytes"] == n_threads * in_use_seq
    assert all(torch.equal(y, expected[i]) for i, y in kept)
    assert after["cached_bytes"] <= after["limit_bytes"]
    del kept, expected
    final = memory.cpu_pool_stats()
    assert final["in_use_bytes"] == start["in_use_bytes"]
    assert final["cached_bytes"] <= final["limit_bytes"]
    memory.empty_cache()
    assert memory.cpu_pool_stats()["cached_bytes"] == 0
