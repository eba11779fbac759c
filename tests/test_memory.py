"""The pool behind the cpu backend's large outputs (alterops.memory)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import alterops
from alterops import memory

pytestmark = pytest.mark.skipif(not alterops._ext.has_op("cpu_pool_stats"), reason="alterops._C not built")

# (B, C, 64, 64) float32 blurred with AvgPool2d(2, 1, 1): a 65x65 output of B*C*16.5 KiB.
BIG = (4, 64, 64, 64)  # output 4.1 MiB: pooled
SMALL = (2, 8, 64, 64)  # output 0.26 MiB: plain allocation


@pytest.fixture(autouse=True)
def _fresh_pool():
    before = memory.cpu_pool_stats()["limit_bytes"]
    memory.set_cpu_pool_limit(64)
    memory.empty_cache()
    yield
    memory.set_cpu_pool_limit(before >> 20)
    memory.empty_cache()


def blur(x):
    return alterops.box_blur2d(x, 2, stride=1, padding=1, backend="cpu")


def expected(x):
    return F.avg_pool2d(x.double(), 2, 1, 1).float()


def test_released_output_is_reused_and_results_stay_right():
    x1, x2 = torch.randn(BIG), torch.randn(BIG)
    out = blur(x1)
    torch.testing.assert_close(out, expected(x1))
    ptr = out.data_ptr()
    s = memory.cpu_pool_stats()
    assert s["in_use_bytes"] >= out.nbytes and s["cached_bytes"] == 0
    del out
    s = memory.cpu_pool_stats()
    assert s["in_use_bytes"] == 0 and s["cached_bytes"] >= BIG[0] * BIG[1] * 65 * 65 * 4
    out2 = blur(x2)  # the block holds x1's blur (or NaN poison): every element must be rewritten
    assert out2.data_ptr() == ptr
    torch.testing.assert_close(out2, expected(x2))
    s2 = memory.cpu_pool_stats()
    assert s2["hits"] == s["hits"] + 1 and s2["misses"] == s["misses"]


def test_small_outputs_bypass_the_pool():
    s = memory.cpu_pool_stats()
    x = torch.randn(SMALL)
    torch.testing.assert_close(blur(x), expected(x))
    assert memory.cpu_pool_stats() == s


def test_a_live_output_is_never_handed_out_twice():
    x = torch.randn(BIG)
    outs = [blur(x * i) for i in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3
    for i, o in enumerate(outs):
        torch.testing.assert_close(o, expected(x * i))


def test_limit_zero_turns_the_pool_off():
    memory.set_cpu_pool_limit(0)
    s = memory.cpu_pool_stats()
    x = torch.randn(BIG)
    out = blur(x)
    torch.testing.assert_close(out, expected(x))
    del out
    assert memory.cpu_pool_stats() == s


def test_empty_cache_and_lower_limit_release_blocks():
    x = torch.randn(BIG)
    del_out = blur(x)
    del del_out
    assert memory.cpu_pool_stats()["cached_bytes"] > 0
    memory.empty_cache()
    assert memory.cpu_pool_stats()["cached_bytes"] == 0
    out = blur(x)
    del out
    assert memory.cpu_pool_stats()["cached_bytes"] > 0
    memory.set_cpu_pool_limit(1)  # below one block
    assert memory.cpu_pool_stats()["cached_bytes"] == 0
    out = blur(x)
    del out
    assert memory.cpu_pool_stats()["cached_bytes"] == 0  # did not fit: returned to the system


def test_pooled_output_is_an_ordinary_tensor():
    x = torch.randn(BIG)
    out = blur(x)
    ref = expected(x)
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf), ref)
    out.add_(1.0)
    torch.testing.assert_close(out, ref + 1.0)
    torch.testing.assert_close(torch.from_numpy(out.numpy().copy()), ref + 1.0)
    # Its storage wraps the pool's block (like a tensor from torch.from_numpy): shrinking in place
    # works, growing in place is refused by torch instead of writing past the block.
    half = ref.numel() // 2
    out.resize_(half)
    torch.testing.assert_close(out, (ref + 1.0).flatten()[:half])
    shared = out.clone().share_memory_()
    assert shared.is_shared()
    with pytest.raises(RuntimeError, match="not resizable"):
        out.resize_(ref.numel() * 2)
    del out


def test_outputs_freed_on_another_thread_and_concurrent_calls():
    xs = [torch.randn(BIG) for _ in range(3)]
    refs = [expected(x) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(4):
                torch.testing.assert_close(blur(xs[i]), refs[i])
        except Exception as exc:  # reported below, never swallowed
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert memory.cpu_pool_stats()["in_use_bytes"] == 0


def test_backward_outputs_come_from_the_pool_too():
    x = torch.randn(BIG, requires_grad=True)
    blur(x).sum().backward()
    g1 = x.grad
    s = memory.cpu_pool_stats()
    assert s["misses"] + s["hits"] >= 2  # forward output and grad_input
    x.grad = None
    xr = x.detach().double().requires_grad_()
    F.avg_pool2d(xr, 2, 1, 1).sum().backward()
    torch.testing.assert_close(g1, xr.grad.float())


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="mib must be a non-negative int"):
        memory.set_cpu_pool_limit(-1)
    with pytest.raises(ValueError, match="mib must be a non-negative int"):
        memory.set_cpu_pool_limit(1.5)
    env = dict(os.environ, ALTEROPS_CPU_POOL_MB="lots")
    r = subprocess.run([sys.executable, "-c", "import alterops"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "ALTEROPS_CPU_POOL_MB must be a non-negative integer" in r.stderr


def test_env_limit_is_applied_at_load():
    env = dict(os.environ, ALTEROPS_CPU_POOL_MB="7")
    code = "import alterops; print(alterops.memory.cpu_pool_stats()['limit_bytes'])"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(r.stdout.strip()) == 7 << 20


def _wait_child(pid: int, timeout: float = 120.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_children_use_the_pool_while_another_thread_allocates():
    # A DataLoader-style fork while another thread is inside the pool: the child must not
    # inherit a held lock, and blocks it inherits must give right results.
    x = torch.randn(BIG)
    ref = expected(x)
    del_out = blur(x)
    del del_out  # the pool now holds a block
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            blur(x)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(4):
            pid = os.fork()
            if pid == 0:  # child: one thread, as DataLoader workers
                code = 1
                try:
                    torch.set_num_threads(1)
                    outs = [blur(x) for _ in range(2)]
                    code = 0 if all(torch.allclose(o, ref, rtol=1.3e-6, atol=1e-5) for o in outs) else 3
                finally:
                    os._exit(code)
            assert _wait_child(pid) == 0
    finally:
        stop.set()
        t.join()


def test_empty_cache_drops_the_neighbourhood_plans():
    # The window plans kept for repeated calls (float32 and float64 kernels): held after a call,
    # dropped by empty_cache, rebuilt by the next call of the same shapes with the same bits.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 16, generator=g) for _ in range(3))
    bias = torch.randn(4, 129, generator=g)

    def run(dtype):
        return alterops.neighborhood_attention1d(q.to(dtype), k.to(dtype), v.to(dtype), 65,
                                                 rel_pos_bias=bias.to(dtype), backend="cpu")

    memory.empty_cache()
    assert memory.cpu_plan_cache_bytes() == 0
    first = run(torch.float32)
    held = memory.cpu_plan_cache_bytes()
    assert held > 300 * 65 * 4  # at least the window index table
    first64 = run(torch.float64)
    assert memory.cpu_plan_cache_bytes() > held  # a float64 plan beside it
    assert memory.cpu_plan_cache_bytes() == memory.cpu_plan_cache_bytes()
    memory.empty_cache()
    assert memory.cpu_plan_cache_bytes() == 0
    assert torch.equal(run(torch.float32), first) and torch.equal(run(torch.float64), first64)
    assert memory.cpu_plan_cache_bytes() > held
