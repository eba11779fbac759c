"""pytest-benchmark wrappers around the same cases ``alterops bench`` runs.

    pytest bench --benchmark-group-by=group            # default cases, this machine's device
    ALTEROPS_BENCH_ALL=1 pytest bench                   # every case
    ALTEROPS_BENCH_QUICK=1 pytest bench                 # small shapes

Each case contributes one benchmark for alterops and one per peer, in the same group.
"""
import os

import pytest
import torch

from alterops import benchmark
from alterops.benchmark import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("ALTEROPS_BENCH_QUICK") == "1"
CASES = harness.select_cases(benchmark.cases(), DEVICE, include_all=os.environ.get("ALTEROPS_BENCH_ALL") == "1")
_workloads = {}


def _workload(case):
    key = (case.family, case.name)
    if key not in _workloads:
        w = case.make(DEVICE, QUICK)
        if w.check is not None:
            w.check()
        _workloads[key] = w
    return _workloads[key]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}/{c.name}" for c in CASES])
def test_ours(benchmark, case):
    w = _workload(case)
    benchmark.group = f"{case.family}/{case.name}"
    if w.profile_ours:  # time of one call spent inside alterops' ops (the rest is the model's)
        benchmark.extra_info["alterops_ms"] = harness.time_in_alterops(w.ours, DEVICE) * 1e3
    benchmark.pedantic(lambda: (w.ours(), _sync()), rounds=case.max_repeats, warmup_rounds=2)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["peer0", "peer1", "peer2"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}/{c.name}" for c in CASES])
def test_peers(benchmark, case, index):
    w = _workload(case)
    if index >= len(w.peers):
        pytest.skip(f"this case has {len(w.peers)} peer(s)")
    benchmark.group = f"{case.family}/{case.name}"
    name, fn = list(w.peers.items())[index]
    benchmark.extra_info["peer"] = name
    benchmark.pedantic(lambda: (fn(), _sync()), rounds=case.max_repeats, warmup_rounds=2)
