"""Benchmark cases: what each op family contributes to ``alterops bench`` and ``bench/``.

A family module ``alterops/benchmark/cases_<family>.py`` calls :func:`register` at import
time. ``make(device, quick)`` builds the inputs once and returns a :class:`Workload` of
zero-argument callables: ``ours`` (alterops) and each peer, timed in the same run.

A case that needs an optional package (``requires``) is registered all the same; when the package
cannot be imported, ``alterops bench`` lists the case as left out with the reason instead of
dropping it silently.

Quick mode (``make(device, True)``) builds tiny shapes. A case whose name states a shape or batch
size returns the name at the shapes it actually built as ``Workload.label`` (e.g.
``na2d_forward_28x28_k7``), so a quick report never shows a full-size name.
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
    # The case's name at the shapes actually built (set by cases whose name states a shape or a
    # batch size, so quick mode reports the tiny shapes it ran); "" means the registered name.
    label: str = ""
    # Peers that could not be built here, with the reason (e.g. a package that is not installed).
    peers_left_out: dict = field(default_factory=dict)


@dataclass
class Case:
    family: str  # "smoothing", "neighborhood", "window", "statistics", "models"
    name: str
    make: Callable[[torch.device, bool], Workload]
    devices: tuple = ("cpu", "cuda")
    default: bool = True  # in the default ``alterops bench`` suite
    max_repeats: int = 20  # cap on timed repeats (slow peers)
    # Optional packages the case needs: {import name: how to install it}. When one cannot be
    # imported the case is reported as left out (see :meth:`unavailable`), never dropped silently.
    requires: dict = field(default_factory=dict)

    def unavailable(self) -> str:
        """Why this case cannot run here ("" when it can): the first required package that does
        not import, and how to install it."""
        import importlib

        for module, hint in self.requires.items():
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name == module:
                    return f"{module} is not installed; {hint}"
                return f"{module} cannot be imported ({exc}); {hint}"
            except Exception as exc:  # a broken install: say what went wrong
                return f"{module} cannot be imported ({type(exc).__name__}: {exc}); {hint}"
        return ""


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
