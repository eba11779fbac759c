"""Timing, measured ceilings and reporting for ``alterops bench`` and ``bench/``.

Every run measures this machine's ceilings first (copy bandwidth, float32 matmul rate, and on
a GPU the bfloat16 matmul rate), then times each case's alterops call and its peers in the same
process with warm-up and the median of repeats, and reports ms, the achieved rate (GB/s or
GFLOP/s), the fraction of the relevant ceiling, and the speedup over each peer. Targets that
a case declares are reported as met or missed; nothing here asserts.

Quick mode (``--quick``) runs tiny shapes with few repeats: a smoke run that shows every case
builds, agrees with its peers and runs. Its case names state the tiny shapes it ran, its table
and chart say "quick", and it applies no targets: they are set for the full-size shapes, and at
tiny shapes the per-call overhead, not the kernels, decides the speedups ("no target in quick
mode"; a target scaled down to such shapes would measure nothing).

Cases that need a package that is not installed are listed as left out, with the reason and how
to install it, in the table, the chart and the JSON (``left_out``), never dropped silently.

``isa_levels`` (``alterops bench --isa all``) runs the CPU cases once per kernel level that this
CPU can execute and this install holds (``generic``, ``avx2``, ``avx512``), switching the kernel
table in the process (:func:`alterops._ext.set_cpu_isa`): each case is built once, checked against
its peer under every level and timed per level; its peers (which do not call alterops' kernels)
are timed once. Each result carries its ``isa``; the table and the chart put the levels of a case
side by side.
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
QUICK_TARGETS = ("no target in quick mode: the targets are set for the full-size shapes; at these tiny "
                 "shapes the per-call overhead, not the kernels, decides the speedups")


@dataclass
class Result:
    family: str
    name: str  # the name at the shapes run (quick mode: the tiny shapes)
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
    case: str = ""  # the registered name (what --case matches)
    status: str = "ok"  # "ok", "error" or "skipped"
    skipped: str = ""  # why the case was left out (a package that is not installed ...)
    isa: str | None = None  # the CPU kernel level ours ran under (CPU runs)
    peers_left_out: dict = field(default_factory=dict)  # peer -> why it could not be built here
    targets_note: str = ""  # why no targets were applied (quick mode)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _reps(case: Case, quick: bool) -> dict:
    return dict(max_repeats=3 if quick else case.max_repeats, min_time=0.05 if quick else 0.5,
                warmup=1 if quick else 2)


def run_case(case: Case, device: torch.device, ceilings: dict, quick: bool = False) -> Result:
    """Builds, checks and times one case under the CPU kernel level in use; raises on failure."""
    res = run_case_levels(case, device, ceilings, quick, [None])[0]
    if res.error:
        raise RuntimeError(res.error)
    return res


def run_case_levels(case: Case, device: torch.device, ceilings: dict, quick: bool, levels: list,
                    on_level: Callable[[str | None], None] | None = None) -> list[Result]:
    """One result per CPU kernel level in ``levels`` (``[None]``: the level in use).

    The workload is built once and its peers timed once (after the first level's check, before
    anything else is timed); under each level the case's check runs again and ours is timed. A
    failure under one level is that level's result (``error``); a peer that fails fails them all.
    """
    from alterops import _ext

    w: Workload = case.make(device, quick)
    name = w.label or case.name
    reps = _reps(case, quick)
    peers_s = None
    results = []
    for level in levels:
        if on_level is not None:
            on_level(level)
        try:
            if level is not None:
                _ext.set_cpu_isa(level)
            isa = level if level is not None else (_ext.cpu_isa() if device.type == "cpu" else None)
            if w.check is not None:
                w.check()
            if peers_s is None:
                peers_s = {peer: statistics.median(time_callable(fn, device, **reps)) for peer, fn in w.peers.items()}
            res = _time_ours(case, w, name, device, ceilings, quick, reps, peers_s)
            res.isa = isa
        except Exception as exc:  # recorded per level in the report and the exit code; the run goes on
            res = Result(case.family, name, float("nan"), note=w.note, error=f"{type(exc).__name__}: {exc}",
                         case=case.name, status="error", isa=level, peers_left_out=dict(w.peers_left_out))
        results.append(res)
    return results


def _time_ours(case, w, name, device, ceilings, quick, reps, peers_s) -> Result:
    ours = statistics.median(time_callable(w.ours, device, **reps))
    res = Result(case.family, name, ours * 1e3, note=w.note, case=case.name, peers_left_out=dict(w.peers_left_out))
    for peer, t in peers_s.items():
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
    if quick:
        res.targets_note = QUICK_TARGETS if w.targets else ""
        return res
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
                 include_all: bool = False, with_unavailable: bool = False) -> list[Case]:
    """The cases for ``device`` that pass the filters. Cases that cannot run here (a required
    package is missing) are left out unless ``with_unavailable``: :func:`run_suite` reports them."""
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
        if not with_unavailable and c.unavailable():
            continue
        chosen.append(c)
    return chosen


def isa_levels(spec: str) -> list[str]:
    """The CPU kernel levels that ``--isa spec`` names: ``all`` (every level this CPU can execute
    and this install holds, lowest first) or one level. Raises ``ValueError`` naming ``--isa``."""
    from alterops import _ext

    if not _ext.loaded():
        raise ValueError(f"--isa {spec}: the compiled CPU kernels are not loaded ({_ext.load_error()})")
    built = _ext.built_isas()
    if "native" in built:  # a -march=native source build holds that one build only
        if spec not in ("all", "native"):
            raise ValueError(f"--isa {spec}: this install was built with ALTEROPS_CPU_ARCH=native and holds "
                             "only that build (--isa all or native)")
        return ["native"]
    runnable = [lv for lv in _ext.supported_isas() if lv in built]
    if spec == "all":
        if not runnable:
            raise ValueError(f"--isa all: no installed kernel level can run on this CPU (installed: {built})")
        return runnable
    if spec not in _ext.ISAS:
        raise ValueError(f"--isa must be 'all' or one of {', '.join(_ext.ISAS)}, got {spec!r}")
    if spec not in runnable:
        why = "this CPU cannot execute it" if spec in built else "it is not installed"
        raise ValueError(f"--isa {spec}: {why} (levels that run here: {', '.join(runnable) or 'none'})")
    return [spec]


def run_suite(cases: list[Case], device: torch.device, quick: bool = False, progress: bool = True,
              isa: list | None = None) -> dict:
    """Runs ``cases`` (those that cannot run here are reported as left out, with the reason);
    ``isa``: CPU kernel levels to run each case under (see :func:`isa_levels`), default the one in use."""
    from alterops import _config, _ext

    levels = list(isa) if isa else [None]
    if isa and device.type != "cpu":
        raise ValueError("--isa selects CPU kernel levels; it needs --device cpu")
    runnable, left_out = [], {}
    for case in cases:
        why = case.unavailable()
        if why:
            left_out[(case.family, case.name)] = why
        else:
            runnable.append(case)
    ceilings = measure_ceilings(device, quick)
    results = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runnable) * len(levels), desc="alterops bench", unit="case")

    try:
        for case in runnable:
            def on_level(level, case=case):
                if bar is not None:
                    bar.set_postfix_str((f"{case.family}/{case.name}" + (f" [{level}]" if level else ""))[:60])

            try:
                results[(case.family, case.name)] = run_case_levels(case, device, ceilings, quick, levels, on_level)
            except Exception as exc:  # building the workload failed: recorded, the suite goes on
                results[(case.family, case.name)] = [
                    Result(case.family, case.name, float("nan"), error=f"{type(exc).__name__}: {exc}", case=case.name,
                           status="error", isa=level) for level in levels]
            if bar is not None:
                bar.update(len(levels))
    finally:
        if bar is not None:
            bar.close()
        if isa and _ext.loaded():  # back to the level chosen at load time
            _ext.set_cpu_isa(_config.cpu_isa_override())
    ordered = []
    for case in cases:
        key = (case.family, case.name)
        if key in left_out:
            ordered.append(Result(case.family, case.name, float("nan"), case=case.name, status="skipped",
                                  skipped=left_out[key]))
        else:
            ordered.extend(results[key])
    report = {"machine": machine_info(device), "ceilings": ceilings, "quick": quick,
              "isa_levels": levels if isa else None,
              "left_out": [{"case": f"{f}/{n}", "reason": why} for (f, n), why in left_out.items()],
              "results": [r.as_dict() for r in ordered]}
    if quick:
        report["targets"] = QUICK_TARGETS
    return report


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------
def _target_text(r: dict) -> str:
    if r.get("targets_note"):
        return "none (quick mode)"
    return "; ".join(f"{k.replace('speedup:', '')}>={v['target']:g}:{'ok' if v['met'] else 'MISS'}"
                     for k, v in r["targets"].items())


def format_table(report: dict) -> str:
    c = report["ceilings"]
    simd = report["machine"].get("cpu_simd")
    levels = report.get("isa_levels")
    head = [f"machine: {report['machine']['device_name']} | torch {report['machine']['torch']} | "
            f"threads {report['machine']['threads']}" + (
                f" | CPU kernels: {simd} (levels here: {', '.join(report['machine'].get('cpu_isa_available') or [])})"
                if simd else ""),
            "ceilings: " + ", ".join(
                f"{k} {v:.1f} {'GB/s' if k == 'bandwidth' else 'GFLOP/s'}" for k, v in c.items())]
    if report.get("quick"):
        note = report.get("targets", QUICK_TARGETS)
        head.insert(0, "QUICK RUN (--quick): tiny shapes (the case names give the shapes run) and few repeats; "
                       "a smoke run, not a measurement. " + note[:1].upper() + note[1:] + ".")
    if levels:
        head.append(f"CPU kernel levels run side by side: {', '.join(levels)} (peers timed once per case; "
                    f"'vs {levels[0]}': ours under {levels[0]} / ours under that level)")
    rows = [("case",) + (("isa", f"vs {levels[0]}") if levels else ()) +
            ("ours ms", "rate", "of ceiling", "peers (ms, speedup)", "targets")]
    first_ms = {}
    for r in report["results"]:
        label = f"{r['family']}/{r['name']}"
        lv = (r.get("isa") or "", "") if levels else ()
        if r.get("skipped"):
            rows.append((label,) + lv + ("LEFT OUT", "", "", r["skipped"][:100], ""))
            continue
        if r["error"]:
            rows.append((label,) + lv + ("ERROR", "", "", r["error"][:80], ""))
            continue
        if levels:
            key = (r["family"], r.get("case") or r["name"])
            if r.get("isa") == levels[0]:
                first_ms[key] = r["ours_ms"]
            base = first_ms.get(key)
            lv = (r.get("isa") or "", f"{base / r['ours_ms']:.2f}x" if base and r.get("isa") != levels[0] else "")
        rate = f"{r['rate']:.1f} {r['rate_unit']}" if r["rate"] is not None else ""
        frac = f"{100 * r['ceiling_fraction']:.0f}% {r['ceiling']}" if r["ceiling_fraction"] is not None else ""
        bounds = r.get("bounds") or {}
        peers = "; ".join(
            f"{p} {ms:.2f} ({r['speedups'][p]:.2f}x, bound "
            f"{'inf' if bounds[p] in (None, float('inf')) else format(bounds[p], '.2f')}x)" if p in bounds
            else f"{p} {ms:.2f} ({r['speedups'][p]:.1f}x)"
            for p, ms in r["peers_ms"].items())
        rows.append((label,) + lv + (f"{r['ours_ms']:.3f}", rate, frac, peers, _target_text(r)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if any(r.get("bounds") for r in report["results"]):
        lines.append("bound: the speedup over that peer if alterops' own ops (profiled) took no time at all")
    peers_out = {}
    for r in report["results"]:
        for peer, why in (r.get("peers_left_out") or {}).items():
            peers_out.setdefault((peer, why), []).append(f"{r['family']}/{r['name']}")
    for (peer, why), where in peers_out.items():
        lines.append(f"peer left out: {peer} in {', '.join(dict.fromkeys(where))}: {why}")
    for item in report.get("left_out") or []:
        lines.append(f"left out: {item['case']}: {item['reason']}")
    return "\n".join(head + [""] + lines)


def _json_safe(value):
    """NaN and infinities (a case that did not run, an unbounded bound) as null: strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: dict, path: str) -> None:
    """The report as strict JSON (NaN and infinities as null)."""
    with open(path, "w") as f:
        json.dump(_json_safe(report), f, indent=2, default=float, allow_nan=False)


def _chart_title(report: dict) -> str:
    title = f"alterops bench — {report['machine']['device_name']}"
    if report.get("isa_levels"):
        title += f" — CPU kernel levels {', '.join(report['isa_levels'])}"
    if report.get("quick"):
        title += "\nQUICK RUN: tiny shapes, few repeats, no targets (a smoke run, not a measurement)"
    return title


def write_chart(report: dict, path: str) -> None:
    """Draws :func:`draw_chart` and saves it as a PNG (the bounding box grown to every label)."""
    import matplotlib.pyplot as plt

    fig = draw_chart(report)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def draw_chart(report: dict):
    """The chart of :func:`write_chart` as a matplotlib figure.

    Horizontal bars: the speedup of alterops over each peer per case (log scale, drawn from 1x:
    right of the 1x line alterops is faster), coloured by the case's target (met, missed, none);
    the target and the profiled bound marked; the numbers in a column right of the plot (never
    under a tick); a legend between the title and the plot; the cases left out (or failed) listed
    under it. The levels of ``--isa all`` are adjacent bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter
    from matplotlib.transforms import blended_transform_factory

    levels = report.get("isa_levels")
    bars = []  # (label, speedup, target, met, bound)
    for r in report["results"]:
        if r["error"] or r.get("skipped"):
            continue
        for peer, s in r["speedups"].items():
            t = r["targets"].get(f"speedup:{peer}") or {}
            level = f" [{r['isa']}]" if levels and r.get("isa") else ""
            bars.append((f"{r['family']}/{r['name']} vs {peer}{level}", s, t.get("target"), t.get("met"),
                         (r.get("bounds") or {}).get(peer)))
    colours = {True: "tab:green", False: "tab:red", None: "0.65"}
    fig, ax = plt.subplots(figsize=(11, 0.38 * max(len(bars), 2) + 2.2), layout="constrained")
    if bars:
        y = list(range(len(bars)))
        ax.barh(y, [b[1] - 1.0 for b in bars], left=1.0, height=0.7, color=[colours[b[3]] for b in bars], zorder=2)
        for i, b in enumerate(bars):
            if b[2] is not None:
                ax.plot([b[2], b[2]], [i - 0.45, i + 0.45], color="black", lw=2.5, zorder=3)
            if b[4] is not None and b[4] != float("inf"):
                ax.plot([b[4]], [i], marker="D", color="tab:blue", markeredgecolor="white", markersize=8, zorder=4)
        values = ([b[1] for b in bars] + [b[2] for b in bars if b[2]]
                  + [b[4] for b in bars if b[4] and b[4] != float("inf")])
        ax.set_xscale("log")
        lo, hi = min(min(values), 1.0) / 1.6, max(max(values), 1.0) * 1.6
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        # within about one decade the minor ticks carry the only numbers; beyond, they stay unlabelled
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if hi / lo < 12 else ""))
        ax.set_ylim(len(bars) - 0.5, -0.5)
        ax.axvline(1.0, color="black", lw=0.8, zorder=1)
        ax.grid(axis="x", which="major", color="0.9", zorder=0)
        ax.set_yticks(y)
        ax.set_yticklabels([b[0] for b in bars], fontsize=7)
        # the numbers in their own column right of the plot: never under a tick or a bar
        right = blended_transform_factory(ax.transAxes, ax.transData)
        for i, b in enumerate(bars):
            text = f"{b[1]:.2f}x" if b[1] < 10 else f"{b[1]:.1f}x"
            if b[2] is not None:
                text += f"  target {b[2]:g}x"
            if b[4] is not None and b[4] != float("inf"):
                text += f"  bound {b[4]:.2f}x"
            ax.text(1.01, i, text, transform=right, va="center", ha="left", fontsize=7, clip_on=False)
    else:
        ax.text(0.5, 0.5, "no case produced a speedup", transform=ax.transAxes, ha="center")
    ax.set_xlabel("speedup of alterops over the peer (log scale; right of 1x: alterops is faster)")
    ax.set_title(_chart_title(report), fontsize=10, pad=22)
    met = {b[3] for b in bars}
    handles = [Patch(color=colours[k], label=text) for k, text in (
        (True, "target met"), (False, "target missed"),
        (None, "no target" + (" (quick mode)" if report.get("quick") else ""))) if k in met]
    if any(b[2] is not None for b in bars):
        handles.append(Line2D([], [], color="black", lw=2.5, label="target"))
    if any(b[4] is not None for b in bars):
        handles.append(Line2D([], [], marker="D", color="tab:blue", markeredgecolor="white", markersize=8, ls="",
                              label="bound: speedup if alterops' ops took no time"))
    if handles:
        # between the title and the plot
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(handles), fontsize=8,
                  frameon=False, borderaxespad=0.2)
    notes = [f"left out: {item['case']}: {item['reason']}" for item in report.get("left_out") or []]
    notes += [f"error: {r['family']}/{r['name']}" + (f" [{r['isa']}]" if levels and r.get("isa") else "")
              + f": {r['error'][:100]}" for r in report["results"] if r["error"]]
    if notes:
        from matplotlib.transforms import offset_copy

        below = offset_copy(fig.transFigure, fig=fig, y=-4, units="points")  # under the x label
        fig.text(0.01, 0.0, "\n".join(notes), fontsize=7, va="top", ha="left", color="0.25", transform=below)
    return fig
