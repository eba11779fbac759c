"""Benchmark cases: what each op family contributes to ``alterops bench`` and ``bench/``.

A family module ``alterops/benchmark/cases_<family>.py`` calls :func:`register` at import
time. ``make(device, quick)`` builds the inputs once and returns a :class:`Workload` of
zero-argument callables: ``ours`` (alterops) and each peer, timed in the same run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Workload:
    ours: Callable[[], object]
    peers: dict = field(default_factory=dict)  # name -> zero-arg callable
    bytes: float = 0.0  # useful bytes read + written per call (for GB/s)
    flops: float = 0.0  # useful floating-point operations per call (for GFLOP/s)
    ceiling: str = "bandwidth"  # the measured ceiling the rate is a fraction of: "bandwidth" | "matmul_fp32" | "matmul_bf16"
    # Targets checked and reported (not asserted): {"speedup:<peer>": x, "ceiling": fraction}.
    targets: dict = field(default_factory=dict)
    # Optional check run once before timing: raises if ours disagrees with a peer.
    check: Callable[[], None] | None = None
    note: str = ""
    # Whole-model cases: also profile one call of ``ours`` and report the time it spends inside
    # alterops' ops, and each peer's speedup bound if those ops took no time at all.
    profile_ours: bool = False


@dataclass
class Case:
    family: str  # "smoothing", "neighborhood", "window", "statistics", "models"
    name: str
    make: Callable[[torch.device, bool], Workload]
    devices: tuple = ("cpu", "cuda")
    default: bool = True  # in the default ``alterops bench`` suite
    max_repeats: int = 20  # cap on timed repeats (slow peers)


_CASES: list[Case] = []


def register(case: Case) -> Case:
    if any(c.family == case.family and c.name == case.name for c in _CASES):
        raise ValueError(f"benchmark case {case.family}/{case.name} registered twice")
    _CASES.append(case)
    return case


def cases() -> list[Case]:
    """All registered cases, after importing every ``cases_*`` module of this package."""
    import importlib
    import pkgutil

    from alterops import benchmark

    for info in pkgutil.iter_modules(benchmark.__path__):
        if info.name.startswith("cases_"):
            importlib.import_module(f"alterops.benchmark.{info.name}")
    return list(_CASES)
