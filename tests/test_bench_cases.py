"""Every registered benchmark case builds, passes its own correctness check (alterops vs the
peer it is timed against) and runs once, with small shapes. Timing is left to the benchmarks."""
import re

import pytest
import torch

import alterops
from alterops import benchmark
from alterops.benchmark.harness import time_callable

CASES = [c for c in benchmark.cases() if "cpu" in c.devices]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}/{c.name}" for c in CASES])
def test_case_runs_and_agrees_with_peers(case):
    if case.unavailable():
        pytest.skip(f"left out here: {case.unavailable()}")
    w = case.make(torch.device("cpu"), True)
    if w.check is not None:
        w.check()
    w.ours()
    for fn in w.peers.values():
        fn()
    assert w.bytes > 0 or w.flops > 0 or not w.targets.get("ceiling")
    # a name that states shapes (HxW, _b<batch>) is restated at the quick shapes actually built,
    # and every shape it states is one the case's note (written from the tensors) gives
    if re.search(r"\d+x\d+|_b\d+$", case.name):
        assert w.label, f"{case.name} states a shape but reports no name for the quick shapes"
        for h, w_ in re.findall(r"(\d+)x(\d+)", w.label):
            assert f"{h}x{w_}" in w.note
        for b in re.findall(r"_b(\d+)$", w.label):
            assert f"B={b}" in w.note


def test_every_family_contributes_cases():
    families = {c.family for c in benchmark.cases()}
    assert {"smoothing", "neighborhood", "window", "statistics", "models"} <= families


def test_time_in_alterops_counts_only_alterops_ops():
    from alterops.benchmark.harness import time_in_alterops

    cpu = torch.device("cpu")
    a = torch.randn(768, 768)
    x = torch.randn(2, 4, 64, 64, requires_grad=True)

    def torch_only():
        return a @ a @ a

    def blur_only():
        y = alterops.box_blur2d(x, 2)
        y.sum().backward()

    def both():
        torch_only()
        blur_only()

    assert time_in_alterops(torch_only, cpu) == 0.0
    # One thread, and several profiled calls: with other processes on the machine (the test
    # suite runs in parallel) a multi-threaded op can wait for a descheduled thread, and one call
    # can be slowed by any amount; the fastest "both" and the typical blur are stable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blur = sorted(time_in_alterops(blur_only, cpu) for _ in range(5))
        assert blur[0] > 0.0
        t_mm = min(time_callable(torch_only, cpu, warmup=1, min_time=0.0, max_repeats=3))
        inside_both = min(time_in_alterops(both, cpu) for _ in range(5))
    finally:
        torch.set_num_threads(before)
    # the matmuls around the blur are not counted: "both" spends about as long inside alterops
    # as the blur alone, far less than the ~2 GFLOP of matmuls take (counting them would put it
    # above t_mm, over the bound)
    assert 0.0 < inside_both < 0.5 * t_mm + 5 * blur[2]
