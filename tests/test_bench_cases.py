"""Every registered benchmark case builds, passes its own correctness check (alterops vs the
peer it is timed against) and runs once, with small shapes. Timing is left to the benchmarks."""
import pytest
import torch

from alterops import benchmark

CASES = [c for c in benchmark.cases() if "cpu" in c.devices]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}/{c.name}" for c in CASES])
def test_case_runs_and_agrees_with_peers(case):
    w = case.make(torch.device("cpu"), True)
    if w.check is not None:
        w.check()
    w.ours()
    for fn in w.peers.values():
        fn()
    assert w.bytes > 0 or w.flops > 0 or not w.targets.get("ceiling")


def test_every_family_contributes_cases():
    families = {c.family for c in benchmark.cases()}
    assert {"smoothing", "neighborhood", "window", "statistics", "models"} <= families
