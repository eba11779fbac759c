"""Timing, measured ceilings and reporting for ``alterops bench`` and ``bench/``.

Every run measures this machine's ceilings first (copy bandwidth, float32 matmul rate, and on
a GPU the bfloat16 matmul rate), then times each case's alterops call and its peers in the same
process with warm-up and the median of repeats, and reports ms, the achieved rate (GB/s or
GFLOP/s), the fraction of the relevant ceiling, and the speedup over each peer. Targets that
a case declares are reported as met or missed; nothing here asserts.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .registry import Case, Workload


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, min_time: float = 0.5,
                  max_repeats: int = 20, min_repeats: int = 3) -> list[float]:
    """Seconds per call: ``warmup`` untimed calls, then repeats until ``min_time`` has passed
    (at least ``min_repeats``, at most ``max_repeats``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start_all < min_time):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _alterops_event_names() -> set:
    """Profiler event names of alterops' autograd Functions (forward and backward nodes)."""
    names, todo = set(), [torch.autograd.Function]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("alterops."):
            names.update((cls.__name__, cls.__name__ + "Backward"))
    return names


def time_in_alterops(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that one call of ``fn`` spends inside alterops' ops.

    Profiles one call (after one untimed call) and adds the outermost events that are alterops'
    (registered ``alterops::`` ops and alterops' autograd Functions, forward and backward):
    their inclusive CPU time on the CPU, the device time of the kernels they launch on CUDA.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    ours = _alterops_event_names()

    def is_ours(ev) -> bool:
        return ev.name.startswith("alterops::") or ev.name in ours

    total_us = 0.0
    for ev in prof.events():
        if not is_ours(ev):
            continue
        parent = ev.cpu_parent
        while parent is not None and not is_ours(parent):
            parent = parent.cpu_parent
        if parent is None:
            total_us += ev.device_time_total if device.type == "cuda" else ev.cpu_time_total
    return total_us / 1e6


# ---------------------------------------------------------------------------------------
# ceilings
# ---------------------------------------------------------------------------------------
def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, read + write counted) and matmul rates (GFLOP/s) on ``device``."""
    out = {}
    # 256 MiB buffers (16 MiB quick): larger than any last-level cache, so this is memory
    # bandwidth, not cache bandwidth.
    n = (16 if quick else 256) * 2**20 // 4 * 4
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    t = statistics.median(time_callable(lambda: dst.copy_(src), device, max_repeats=30))
    out["bandwidth"] = 2 * src.numel() * 4 / t / 1e9
    size = 512 if quick else (1024 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    t = statistics.median(time_callable(lambda: torch.mm(a, b), device))
    out["matmul_fp32"] = 2 * size**3 / t / 1e9
    if device.type == "cuda":
        a16, b16 = a.bfloat16(), b.bfloat16()
        t = statistics.median(time_callable(lambda: torch.mm(a16, b16), device))
        out["matmul_bf16"] = 2 * size**3 / t / 1e9
    return out


def machine_info(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # reported, not fatal: the harness runs without Triton
        info["triton"] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["device_name"] = f"{name} ({os.cpu_count()} logical CPUs)"
        from alterops import _ext

        info["cpu_simd"] = _ext.cpu_isa() or "not loaded"  # the CPU kernels' instruction-set level
        info["cpu_isa_available"] = [lv for lv in _ext.supported_isas() if lv in _ext.built_isas()]
    return info


# ---------------------------------------------------------------------------------------
# running cases
# ---------------------------------------------------------------------------------------
@dataclass
class Result:
    family: str
    name: str
    ours_ms: float
    peers_ms: dict = field(default_factory=dict)
    rate: float | None = None  # GB/s or GFLOP/s
    rate_unit: str = ""
    ceiling: str = ""
    ceiling_fraction: float | None = None
    speedups: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)  # key -> {"target", "value", "met"}
    # profiled cases: ms of ``ours`` inside alterops' ops, and per peer the speedup if they took 0 ms
    alterops_ms: float | None = None
    bounds: dict = field(default_factory=dict)
    note: str = ""
    error: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def run_case(case: Case, device: torch.device, ceilings: dict, quick: bool = False) -> Result:
    w: Workload = case.make(device, quick)
    if w.check is not None:
        w.check()
    reps = dict(max_repeats=3 if quick else case.max_repeats, min_time=0.05 if quick else 0.5,
                warmup=1 if quick else 2)
    ours = statistics.median(time_callable(w.ours, device, **reps))
    res = Result(case.family, case.name, ours * 1e3, note=w.note)
    for peer, fn in w.peers.items():
        t = statistics.median(time_callable(fn, device, **reps))
        res.peers_ms[peer] = t * 1e3
        res.speedups[peer] = t / ours
    if w.profile_ours:
        inside = min(time_in_alterops(w.ours, device), ours)
        res.alterops_ms = inside * 1e3
        for peer, ms in res.peers_ms.items():
            res.bounds[peer] = ms / 1e3 / (ours - inside) if ours > inside else float("inf")
    if w.flops:
        res.rate, res.rate_unit = w.flops / ours / 1e9, "GFLOP/s"
    elif w.bytes:
        res.rate, res.rate_unit = w.bytes / ours / 1e9, "GB/s"
    ceiling_key = w.ceiling if (w.flops or w.bytes) else ""
    if ceiling_key and ceiling_key in ceilings and res.rate is not None:
        res.ceiling = ceiling_key
        res.ceiling_fraction = res.rate / ceilings[ceiling_key]
    for key, target in w.targets.items():
        if key == "ceiling":
            value = res.ceiling_fraction
        elif key.startswith("speedup:"):
            value = res.speedups.get(key.split(":", 1)[1])
        else:
            raise ValueError(f"{case.family}/{case.name}: unknown target {key!r}")
        res.targets[key] = {"target": target, "value": value, "met": value is not None and value >= target}
    return res


def select_cases(all_cases: Iterable[Case], device: torch.device, families=None, name_filter=None,
                 include_all: bool = False) -> list[Case]:
    chosen = []
    for c in all_cases:
        if device.type not in c.devices:
            continue
        if families and c.family not in families:
            continue
        if name_filter and name_filter.lower() not in c.name.lower():
            continue
        if not (include_all or c.default or name_filter):
            continue
        chosen.append(c)
    return chosen


def run_suite(cases: list[Case], device: torch.device, quick: bool = False, progress: bool = True) -> dict:
    ceilings = measure_ceilings(device, quick)
    results = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), desc="alterops bench", unit="case")
    for case in cases:
        if bar is not None:
            bar.set_postfix_str(f"{case.family}/{case.name}"[:60])
        try:
            results.append(run_case(case, device, ceilings, quick))
        except Exception as exc:  # recorded in the report and the exit code; the suite goes on
            results.append(Result(case.family, case.name, float("nan"), error=f"{type(exc).__name__}: {exc}"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"machine": machine_info(device), "ceilings": ceilings, "quick": quick,
            "results": [r.as_dict() for r in results]}


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    c = report["ceilings"]
    simd = report["machine"].get("cpu_simd")
    head = [f"machine: {report['machine']['device_name']} | torch {report['machine']['torch']} | "
            f"threads {report['machine']['threads']}" + (
                f" | CPU kernels: {simd} (levels here: {', '.join(report['machine'].get('cpu_isa_available') or [])})"
                if simd else ""),
            "ceilings: " + ", ".join(
                f"{k} {v:.1f} {'GB/s' if k == 'bandwidth' else 'GFLOP/s'}" for k, v in c.items())]
    rows = [("case", "ours ms", "rate", "of ceiling", "peers (ms, speedup)", "targets")]
    for r in report["results"]:
        if r["error"]:
            rows.append((f"{r['family']}/{r['name']}", "ERROR", "", "", r["error"][:80], ""))
            continue
        rate = f"{r['rate']:.1f} {r['rate_unit']}" if r["rate"] is not None else ""
        frac = f"{100 * r['ceiling_fraction']:.0f}% {r['ceiling']}" if r["ceiling_fraction"] is not None else ""
        bounds = r.get("bounds") or {}
        peers = "; ".join(
            f"{p} {ms:.2f} ({r['speedups'][p]:.2f}x, bound {bounds[p]:.2f}x)" if p in bounds
            else f"{p} {ms:.2f} ({r['speedups'][p]:.1f}x)"
            for p, ms in r["peers_ms"].items())
        tg = "; ".join(
            f"{k.replace('speedup:', '')}>={v['target']:g}:{'ok' if v['met'] else 'MISS'}" for k, v in r["targets"].items())
        rows.append((f"{r['family']}/{r['name']}", f"{r['ours_ms']:.3f}", rate, frac, peers, tg))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if any(r.get("bounds") for r in report["results"]):
        lines.append("bound: the speedup over that peer if alterops' own ops (profiled) took no time at all")
    return "\n".join(head + [""] + lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)


def write_chart(report: dict, path: str) -> None:
    """Bar chart: speedup of alterops over each peer per case (log scale), targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for r in report["results"]:
        if r["error"]:
            continue
        for peer, s in r["speedups"].items():
            target = r["targets"].get(f"speedup:{peer}", {}).get("target")
            bars.append((f"{r['family']}/{r['name']}\nvs {peer}", s, target, (r.get("bounds") or {}).get(peer)))
    fig, ax = plt.subplots(figsize=(10, 0.45 * max(len(bars), 2) + 1.5))
    if bars:
        labels = [b[0].replace("\n", " ") for b in bars]
        values = [b[1] for b in bars]
        colors = ["tab:green" if (b[2] is None or b[1] >= b[2]) else "tab:red" for b in bars]
        y = range(len(bars))
        ax.barh(list(y), values, color=colors)
        for i, b in enumerate(bars):
            if b[2] is not None:
                ax.plot([b[2], b[2]], [i - 0.4, i + 0.4], color="black", lw=2)
            if b[3] is not None and b[3] != float("inf"):
                ax.plot([b[3]], [i], marker="|", color="tab:blue", markersize=10)
            ax.text(b[1], i, f" {b[1]:.1f}x", va="center", fontsize=7)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.invert_yaxis()
    ax.set_xlabel("speedup of alterops over the peer (log scale; black tick = target; "
                  "blue tick = bound if alterops' ops took no time)")
    ax.set_title(f"alterops bench — {report['machine']['device_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
