"""``alterops bench attention``: local-attention throughput on your shapes, every implementation
side by side, every number checked.

For each case (a point of the grid the options span) every implementation that can run it
(:mod:`alterops.benchmark.peers_attention`: each alterops backend, FlexAttention compiled and
eager, SDPA with a dense mask, the paper's unfold form, the Swin way, Hugging Face / timm Swin
and NATTEN when importable) runs in a fresh worker process:

1. build (compile) and one call whose output -- and, with ``--pass fwd+bwd``, the gradients of
   q, k, v and the bias table -- is compared with a float64 run of the ``reference`` backend on
   the same inputs (the whole case, or batch element 0 when the case is large). An
   implementation that disagrees is reported ``mismatch`` and is not timed.
2. one untimed warm-up call, then timed calls (at least 3, more until ``--min-time`` seconds or
   ``--repeats`` calls): median, quartiles, min and max in ms. Timing runs with the process's
   allocator as users have it.
3. one more call measures the peak memory over what the process held before it (inputs,
   compiled code, caches). CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the
   memory allocated at the reset. CPU: the worker is a fresh process (forked from a server that
   has only imported torch and alterops); before the call its allocator is set to return every
   freed block of 64 KiB or more to the system (glibc ``mallopt(M_MMAP_THRESHOLD)``, which also
   turns off glibc's adaptive threshold), its free heap is trimmed (``malloc_trim``) and its peak
   resident set is reset (``/proc/self/clear_refs``), so the growth of ``VmHWM`` over the
   resident set at the reset is the memory the call touched at its peak -- not what an earlier
   call, the compiler, or another implementation left cached. Without ``clear_refs`` it falls
   back to ``ru_maxrss`` growth (recorded in each record's ``memory_method``).

Failures are results: an out-of-memory error (or the worker killed by SIGKILL, the kernel's
OOM killer) is ``oom``, a worker still running after ``--timeout`` seconds (build and compile
included) is killed and recorded ``timeout``, an implementation that cannot express the case
is ``skipped`` with the reason, anything else is ``error`` with the message. The run goes on.

FLOPs convention (for TFLOP/s): the forward counts the two products of the op's definition,
``4 * B * heads * H*W * K * head_dim`` with ``K`` the keys per query (``kernel**2``, or
``window**2``), whatever the border or shift mask removes; forward + backward counts 3.5 times
that (FlashAttention's convention: the backward's five products, one of them recomputing the
logits). The ceiling is a ``torch.mm`` of the same dtype on the same device, measured once per
run; ``ceiling_fraction`` is TFLOP/s over it.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

from .harness import time_callable
from .peers_attention import AttnCase, Impl, SkipImpl, impls, register_impl, unregister_impl

__all__ = ["AttnCase", "Impl", "SkipImpl", "register_impl", "unregister_impl", "impls", "run_cases",
           "add_parser", "main", "flops"]

STATUSES = ("ok", "mismatch", "oom", "timeout", "skipped", "error")
FWD_BWD_FACTOR = 3.5
# normalised max error (max |x - ref| / max |ref|) allowed per dtype
TOLERANCE = {"float64": 1e-9, "float32": 2e-4, "float16": 5e-3, "bfloat16": 4e-2}
# cases larger than this (B * heads * N * K * head_dim) are checked on batch element 0
_WHOLE_CHECK_LIMIT = 4e8

EXAMPLES = """\
examples:
  # 7x7 neighbourhood attention, forward + backward, every implementation that runs here
  alterops bench attention --op neighborhood --batch 2 --size 24 --heads 2 --head-dim 32 \\
      --kernel 7 --dtype float32 --pass fwd+bwd --out DIR

  # shifted-window attention swept over the map size: log-log chart of time and memory
  alterops bench attention --op window --batch 2 --size 28 --heads 3 --head-dim 32 \\
      --window 7 --shift 3 --sweep size=14,28,56 --out DIR

  # a grid: two kernel sizes x two dtypes, only alterops' CPU kernels and compiled FlexAttention
  alterops bench attention --size 32,64 --kernel 7,13 --dtype float32,bfloat16 \\
      --impl alterops-cpu,flex-compiled

Writes DIR/attention-<op>.json (one record per implementation and case: status ok, mismatch,
oom, timeout, skipped or error with the reason; median and spread in ms; peak memory in bytes;
max error against float64; TFLOP/s; fraction of the matmul ceiling; speedup over each peer),
the same as CSV, and with --sweep a PNG chart (needs matplotlib: pip install alterops[plot]).
"""


# ---------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------
def flops(case: AttnCase) -> float:
    """Useful FLOPs of one call (see the module docstring for the convention)."""
    fwd = 4.0 * case.batch * case.heads * case.tokens * case.keys_per_query * case.head_dim
    return fwd * (FWD_BWD_FACTOR if case.backward else 1.0)


def _make_inputs(case: AttnCase, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.height, case.width, case.heads, case.head_dim)
    dev, dt = torch.device(case.device), case.torch_dtype
    q, k, v, gout = (torch.randn(shape, generator=g).to(device=dev, dtype=dt) for _ in range(4))
    table = None
    if case.bias:
        K = case.kernel if case.op == "neighborhood" else case.window
        table = (0.5 * torch.randn(case.heads, 2 * K - 1, 2 * K - 1, generator=g)).to(device=dev, dtype=dt)
    return {"qkv": (q, k, v), "table": table, "gout": gout}


def _reference(case: AttnCase, data: dict) -> dict:
    """float64 output (and gradients) of the ``reference`` backend; on batch element 0 when
    the whole case is large. Raises ``ValueError`` for an invalid case."""
    import alterops as ao

    big = case.batch * case.heads * case.tokens * case.keys_per_query * case.head_dim > _WHOLE_CHECK_LIMIT
    nb = 1 if big else case.batch
    q, k, v = (t[:nb].double().detach().requires_grad_(case.backward) for t in data["qkv"])
    table = data["table"]
    if table is not None:
        table = table.double().detach().requires_grad_(case.backward)
    if case.op == "neighborhood":
        out = ao.neighborhood_attention2d(q, k, v, case.kernel, case.dilation, border=case.border,
                                          rel_pos_bias=table, backend="reference")
    else:
        out = ao.window_attention2d(q, k, v, case.window, shift=case.shift, rel_pos_bias=table,
                                    backend="reference")
    ref = {"out": out.detach()}
    if case.backward:
        leaves = (q, k, v) + ((table,) if table is not None else ())
        grads = torch.autograd.grad(out, leaves, data["gout"][:nb].double())
        ref.update(dq=grads[0], dk=grads[1], dv=grads[2])
        if table is not None and nb == case.batch:  # the table's gradient sums over the batch
            ref["dtable"] = grads[3]
    return {"ref": ref, "nb": nb}


# ---------------------------------------------------------------------------------------
# the worker: one implementation on one case, in a fresh process
# ---------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _setup_allocator() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: no adaptive threshold)
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


class _CpuPeak:
    """Peak resident-set growth of the calls made between ``start`` and ``stop``."""

    def start(self) -> None:
        gc.collect()
        libc = _libc()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current resident set
            self.method = "VmHWM growth after malloc_trim and clear_refs, fresh worker, mmap threshold 64 KiB"
            self.base = _status_kb("VmRSS")
            self.field = "VmHWM"
        except OSError:
            import resource

            self.method = "ru_maxrss growth, fresh worker"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.field = None

    def stop(self) -> int:
        if self.field is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            peak = _status_kb(self.field)
        return max(0, int(peak - self.base))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                   "not enough memory"))


def _is_compile_error(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "inductor" in str(exc).lower()[:400]


def _compare(got: dict, ref: dict, nb: int, dtype: str) -> tuple[float, float]:
    """(max absolute error, max error normalised by the reference's largest magnitude)."""
    abs_err, rel_err = 0.0, 0.0
    for name, r in ref.items():
        c = got[name]
        c = (c[:nb] if name != "dtable" else c).detach().to(torch.float64)
        r = r.to(c.device)
        if c.shape != r.shape:
            return math.inf, math.inf
        diff = (c - r).abs()
        if not torch.isfinite(c).all():
            return math.inf, math.inf
        e = float(diff.max()) if diff.numel() else 0.0
        abs_err = max(abs_err, e)
        rel_err = max(rel_err, e / max(float(r.abs().max()) if r.numel() else 0.0, 1e-12))
    return abs_err, rel_err


def _measure(impl: Impl, case: AttnCase, data_path: str, repeats: int, min_time: float, threads: int) -> dict:
    torch.set_num_threads(threads)
    device = torch.device(case.device)
    data = torch.load(data_path, map_location=device, weights_only=False)
    prepared = impl.build(case)
    to_native = prepared.to_native or (lambda t: t)
    to_ours = prepared.to_ours or (lambda t: t)
    q, k, v = (to_native(t) for t in data["qkv"])
    table = data["table"]
    if case.backward:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        if table is not None:
            table = table.detach().requires_grad_()
        gout = to_native(data["gout"])
        leaves = (q, k, v) + ((table,) if table is not None else ())

        def call():
            out = prepared.fn(q, k, v, table)
            return (out,) + torch.autograd.grad(out, leaves, gout)
    else:
        def call():
            with torch.no_grad():
                return (prepared.fn(q, k, v, table),)

    try:
        results = call()
    except Exception as exc:
        if prepared.compiled and not _is_oom(exc) and _is_compile_error(exc):
            raise SkipImpl(f"torch.compile failed here: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc
        raise
    got = {"out": to_ours(results[0])}
    if case.backward:
        got.update(dq=to_ours(results[1]), dk=to_ours(results[2]), dv=to_ours(results[3]))
        if table is not None:
            got["dtable"] = results[4]
    abs_err, rel_err = _compare(got, data["ref"], data["nb"], case.dtype)
    del results, got
    checked = "whole case" if data["nb"] == case.batch else "batch element 0"
    base = {"max_err": abs_err, "max_err_rel": rel_err, "checked_on": checked}
    tol = TOLERANCE.get(case.dtype, 1e-3)
    if not rel_err <= tol:
        return dict(base, status="mismatch",
                    reason=f"max error {abs_err:.3g} ({rel_err:.3g} of the reference's largest value) "
                           f"over the {case.dtype} tolerance {tol:g}; not timed")

    # one untimed warm-up call, then the fixed suite's timing loop (CUDA events on a GPU)
    times = time_callable(call, device, warmup=1, min_time=min_time, max_repeats=repeats, min_repeats=3)
    cuda = device.type == "cuda"
    # memory: one more call, after the timed ones (timing ran with the allocator as users have it)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - held
        method = "torch.cuda.max_memory_allocated after a reset, minus the memory held at the reset"
    else:
        _setup_allocator()
        meter = _CpuPeak()
        meter.start()
        call()
        peak = meter.stop()
        method = meter.method
    return dict(base, status="ok", times_s=times, peak_memory_bytes=int(peak), memory_method=method)


def _worker(conn, impl: Impl, case: AttnCase, data_path: str, repeats: int, min_time: float, threads: int) -> None:
    conn.send("started")  # the --timeout counts from here, not from the process start
    try:
        result = _measure(impl, case, data_path, repeats, min_time, threads)
    except SkipImpl as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except NotImplementedError as exc:  # the implementation says it cannot do this case
        result = {"status": "skipped", "reason": f"NotImplementedError: {str(exc).strip()[:500]}"}
    except BaseException as exc:  # noqa: BLE001 - every failure is a recorded result
        status = "oom" if _is_oom(exc) else "error"
        result = {"status": status, "reason": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
    try:
        conn.send(result)
    finally:
        conn.close()


_CTX = None
_START_TIMEOUT = 600.0  # the worker's start (the fork server's import of torch the first time)


def _context():
    global _CTX
    if _CTX is None:
        if sys.platform.startswith("linux"):
            # a server process that has imported torch forks each worker: a fresh process per
            # measurement without paying torch's import every time
            _CTX = multiprocessing.get_context("forkserver")
            _CTX.set_forkserver_preload(["torch", "alterops", "alterops.benchmark.peers_attention"])
        else:
            _CTX = multiprocessing.get_context("spawn")
    return _CTX


def _run_worker(impl: Impl, case: AttnCase, data_path: str, *, repeats: int, min_time: float, timeout: float,
                threads: int) -> dict:
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(child, impl, case, data_path, repeats, min_time, threads), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    try:
        if not parent.poll(_START_TIMEOUT):
            raise EOFError
        parent.recv()  # "started"
        if parent.poll(timeout):
            result = parent.recv()
        else:
            proc.kill()
            result = {"status": "timeout", "reason": f"still running after the --timeout of {timeout:g} s "
                                                     "(build and compile included); killed"}
    except EOFError:  # the worker died without a result
        proc.join(10)
        code = proc.exitcode
        if code is not None and code < 0 and -code == 9:
            result = {"status": "oom", "reason": "the worker was killed by SIGKILL (the kernel's out-of-memory killer)"}
        else:
            result = {"status": "error", "reason": f"the worker exited with code {code} without a result"}
    finally:
        parent.close()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    return result


# ---------------------------------------------------------------------------------------
# ceilings, the run, speedups
# ---------------------------------------------------------------------------------------
def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square ``torch.mm`` in ``dtype`` on ``device`` (median of repeats)."""
    size = 8192 if device.type == "cuda" else 1024
    g = torch.Generator().manual_seed(1)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    times = []
    for _ in range(7):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / statistics.median(times)


def _quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    pos = p * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_cases(cases: list[AttnCase], impl_names: list[str] | None = None, *, repeats: int = 20,
              min_time: float = 1.0, timeout: float = 180.0, progress: bool = True,
              threads: int | None = None) -> dict:
    """Run every implementation (or ``impl_names``) on every case; returns the report."""
    registry = impls()
    names = list(registry) if not impl_names else list(impl_names)
    threads = threads or torch.get_num_threads()
    ceilings: dict[str, float] = {}
    records: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases) * len(names), unit="run", file=sys.stderr, dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="alterops-bench-") as tmp:
        for ci, case in enumerate(cases):
            key = f"{case.device}/{case.dtype}"
            if key not in ceilings:
                ceilings[key] = matmul_ceiling(torch.device(case.device), case.torch_dtype)
            data = _make_inputs(case)
            data.update(_reference(case, data))
            path = os.path.join(tmp, f"case{ci}.pt")
            torch.save(data, path)
            del data
            for name in names:
                impl = registry[name]
                if bar is not None:
                    bar.set_description(f"[{ci + 1}/{len(cases)}] {case.label()} | {name}")
                reason = impl.reason(case)
                if reason is None and not impl_names and not impl.default:
                    reason = impl.not_default or "not run by default (name it in --impl)"
                if reason is not None:
                    result = {"status": "skipped", "reason": reason}
                else:
                    result = _run_worker(impl, case, path, repeats=repeats, min_time=min_time, timeout=timeout,
                                         threads=threads)
                records.append(_record(impl, case, result, ceilings[key]))
                if bar is not None:
                    bar.update(1)
            os.remove(path)
    if bar is not None:
        bar.close()
    _add_speedups(records)
    return {"records": records, "ceilings_tflops": {k: v / 1e12 for k, v in ceilings.items()}}


def _record(impl: Impl, case: AttnCase, result: dict, ceiling: float) -> dict:
    rec = {"implementation": impl.name, "kind": impl.kind, "case": case.as_dict(), "case_label": case.label(),
           "tokens": case.tokens, "status": result["status"], "reason": result.get("reason"),
           "median_ms": None, "spread_ms": None, "repeats": 0, "peak_memory_bytes": None,
           "memory_method": result.get("memory_method"), "max_err": result.get("max_err"),
           "max_err_rel": result.get("max_err_rel"), "checked_on": result.get("checked_on"),
           "tflops": None, "ceiling_fraction": None, "speedup_over": {}, "wall_s": result.get("wall_s")}
    times = result.get("times_s")
    if result["status"] == "ok" and times:
        ms = [t * 1e3 for t in times]
        med = statistics.median(ms)
        rec.update(median_ms=med, repeats=len(ms), peak_memory_bytes=result.get("peak_memory_bytes"),
                   spread_ms={"p25": _quantile(ms, 0.25), "p75": _quantile(ms, 0.75), "min": min(ms), "max": max(ms)})
        rate = flops(case) / (med / 1e3)
        rec["tflops"] = rate / 1e12
        rec["ceiling_fraction"] = rate / ceiling if ceiling > 0 else None
    return rec


def _add_speedups(records: list[dict]) -> None:
    by_case: dict[str, list[dict]] = {}
    for r in records:
        by_case.setdefault(json.dumps(r["case"], sort_keys=True), []).append(r)
    for group in by_case.values():
        ok = [r for r in group if r["status"] == "ok"]
        for r in ok:
            r["speedup_over"] = {o["implementation"]: o["median_ms"] / r["median_ms"]
                                 for o in ok if o is not r and r["median_ms"] > 0}


# ---------------------------------------------------------------------------------------
# output: table, JSON, CSV, chart
# ---------------------------------------------------------------------------------------
def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def format_table(report: dict) -> str:
    lines = []
    by_case: dict[str, list[dict]] = {}
    for r in report["records"]:
        by_case.setdefault(r["case_label"], []).append(r)
    for label, group in by_case.items():
        lines.append(f"\n{label}")
        lines.append(f"  {'implementation':<17} {'status':<9} {'median ms':>10} {'p25-p75 ms':>17} {'TFLOP/s':>8} "
                     f"{'ceil':>6} {'peak mem':>10} {'max err':>9}  speedup over")
        ok = sorted((r for r in group if r["status"] == "ok"), key=lambda r: r["median_ms"])
        rest = [r for r in group if r["status"] != "ok"]
        for r in ok + rest:
            if r["status"] == "ok":
                sp = r["spread_ms"]
                others = ", ".join(f"{n} {x:.2f}x" for n, x in sorted(r["speedup_over"].items(), key=lambda kv: -kv[1]))
                lines.append(
                    f"  {r['implementation']:<17} {'ok':<9} {r['median_ms']:>10.3f} "
                    f"{sp['p25']:>8.3f}-{sp['p75']:<8.3f} {r['tflops']:>8.4f} "
                    f"{(r['ceiling_fraction'] or 0) * 100:>5.1f}% {_fmt_bytes(r['peak_memory_bytes']):>10} "
                    f"{r['max_err']:>9.1e}  {others}")
            else:
                err = f"{r['max_err']:.1e}" if r.get("max_err") is not None else "-"
                lines.append(f"  {r['implementation']:<17} {r['status']:<9} {'':>10} {'':>17} {'':>8} {'':>6} "
                             f"{'':>10} {err:>9}  {r['reason']}")
    return "\n".join(lines)


_CSV_FIELDS = ["implementation", "kind", "op", "batch", "height", "width", "heads", "head_dim", "kernel", "window",
               "dilation", "shift", "border", "bias", "dtype", "device", "pass", "tokens", "status", "reason",
               "median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "repeats", "peak_memory_bytes", "max_err",
               "max_err_rel", "tflops", "ceiling_fraction", "speedup_over"]


def write_csv(report: dict, path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in report["records"]:
            row = dict(r["case"], **{k: v for k, v in r.items() if k != "case"})
            sp = r["spread_ms"] or {}
            row.update(p25_ms=sp.get("p25"), p75_ms=sp.get("p75"), min_ms=sp.get("min"), max_ms=sp.get("max"),
                       speedup_over=json.dumps({k: round(v, 4) for k, v in r["speedup_over"].items()}))
            w.writerow(row)


_SWEEP_X = {"size": ("tokens", "tokens per image (H x W)"),
            "kernel": ("keys_per_query", "keys per query (kernel^2)"),
            "window": ("keys_per_query", "keys per query (window^2)"),
            "batch": ("batch_tokens", "tokens in the batch (B x H x W)")}


def _x_value(rec: dict, sweep_key: str) -> float:
    c = rec["case"]
    what = _SWEEP_X[sweep_key][0]
    if what == "tokens":
        return c["height"] * c["width"]
    if what == "keys_per_query":
        return (c["kernel"] if c["op"] == "neighborhood" else c["window"]) ** 2
    return c["batch"] * c["height"] * c["width"]


def growth_exponents(report: dict, sweep_key: str) -> dict:
    """{group label: {implementation: {"time": slope, "memory": slope}}}: least-squares slopes
    of log(time) and log(peak memory) against log(x) over the ok points (``None`` below 2)."""
    out: dict = {}
    for label, group in _sweep_groups(report, sweep_key).items():
        per: dict = {}
        for name, recs in group.items():
            ok = [r for r in recs if r["status"] == "ok"]
            xs = [_x_value(r, sweep_key) for r in ok]
            per[name] = {"time": _slope(xs, [r["median_ms"] for r in ok]),
                         "memory": _slope(xs, [r["peak_memory_bytes"] for r in ok])}
        out[label] = per
    return out


def _slope(xs, ys) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _sweep_groups(report: dict, sweep_key: str) -> dict:
    """{label of the fixed options: {implementation: [records along the sweep]}}."""
    vary = {"size": ("height", "width"), "kernel": ("kernel",), "window": ("window",), "batch": ("batch",)}[sweep_key]
    groups: dict = {}
    for r in report["records"]:
        fixed = {k: v for k, v in r["case"].items() if k not in vary}
        label = " ".join(f"{k}={v}" for k, v in fixed.items())
        groups.setdefault(label, {}).setdefault(r["implementation"], []).append(r)
    return groups


def write_chart(report: dict, sweep_key: str, stem: str) -> list[str]:
    """Log-log time and peak memory against the swept size, one PNG per group of the other
    options; each curve's fitted growth exponent in the legend. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = _sweep_groups(report, sweep_key)
    exps = growth_exponents(report, sweep_key)
    for gi, (label, group) in enumerate(groups.items()):
        fig, axes = plt.subplots(1, 2, figsize=(14, 6.2))
        markers = "osD^v<>pXh*"
        plotted = 0
        all_x: set = set()
        for i, (name, recs) in enumerate(sorted(group.items())):
            ok = sorted((r for r in recs if r["status"] == "ok"), key=lambda r: _x_value(r, sweep_key))
            if not ok:
                continue
            plotted += 1
            xs = [_x_value(r, sweep_key) for r in ok]
            style = dict(marker=markers[i % len(markers)], linewidth=2.2 if name.startswith("alterops") else 1.4,
                         linestyle="-" if name.startswith("alterops") else "--", markersize=6)
            e = exps[label][name]
            ys_t = [r["median_ms"] for r in ok]
            spread = [[r["median_ms"] - r["spread_ms"]["p25"] for r in ok], [r["spread_ms"]["p75"] - r["median_ms"] for r in ok]]
            axes[0].errorbar(xs, ys_t, yerr=spread, capsize=3,
                             label=f"{name}  (slope {e['time']:.2f})" if e["time"] is not None else name, **style)
            all_x.update(xs)
            mem = [(x, r["peak_memory_bytes"] / 2**20) for x, r in zip(xs, ok) if r["peak_memory_bytes"]]
            if mem:
                axes[1].plot([m[0] for m in mem], [m[1] for m in mem],
                             label=f"{name}  (slope {e['memory']:.2f})" if e["memory"] is not None else name, **style)
        xlabel = _SWEEP_X[sweep_key][1]
        for ax, ylabel, title in ((axes[0], "median time per call (ms)", "time"),
                                  (axes[1], "peak memory of the call (MiB)", "peak memory")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title} (legend: fitted log-log slope = growth exponent)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if all_x:
                ticks = sorted(all_x)
                ax.set_xticks(ticks, [_tick_label(x, sweep_key, group) for x in ticks])
                ax.minorticks_off()
            if ax.lines:
                ax.legend(fontsize=8.5, loc="best", framealpha=0.85)
        skipped = sorted({f"{n}: {r['status']}" for n, recs in group.items() for r in recs if r["status"] != "ok"})
        note = ("not drawn (see the JSON for the reasons): " + "; ".join(skipped)) if skipped else ""
        fig.suptitle(f"alterops bench attention, sweep over {sweep_key} (error bars: quartiles of the timed calls)"
                     f"\n{label}", fontsize=10.5)
        if note:
            fig.text(0.01, 0.01, _wrap(note, 190), fontsize=7.5, va="bottom", color="0.3")
        fig.tight_layout(rect=(0, 0.07 if note else 0, 1, 0.95))
        path = f"{stem}.png" if len(groups) == 1 else f"{stem}-{gi + 1}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        if plotted:
            paths.append(path)
    return paths


def _tick_label(x: float, sweep_key: str, group: dict) -> str:
    """The x value, with the swept option's value under it (e.g. ``784`` over ``28x28``)."""
    for recs in group.values():
        for r in recs:
            if _x_value(r, sweep_key) == x:
                c = r["case"]
                extra = {"size": f"{c['height']}x{c['width']}", "batch": f"B={c['batch']}",
                         "kernel": f"k={c.get('kernel')}", "window": f"w={c.get('window')}"}[sweep_key]
                return f"{int(x)}\n{extra}"
    return f"{int(x)}"


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative integers separated by commas, got {text!r}")
    return vals


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            h, w = (int(x) for x in part.split("x")) if "x" in part else (int(part), int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a size is N or HxW (e.g. 56 or 28x40), got {part!r}") from None
        if h < 1 or w < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {part!r}")
        out.append((h, w))
    if not out:
        raise argparse.ArgumentTypeError(f"no size in {text!r}")
    return out


def _choices(allowed):
    def parse(text: str) -> list[str]:
        vals = [x.strip() for x in str(text).split(",") if x.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(allowed)} (comma separated), got {text!r}")
        return vals
    return parse


_DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_parser(bench_parser: argparse.ArgumentParser) -> None:
    """Add ``attention`` as a subcommand of ``alterops bench`` (the suite keeps its flags)."""
    sub = bench_parser.add_subparsers(dest="bench_command", metavar="{attention}",
                                      title="subcommands (alterops bench SUBCOMMAND --help)")
    p = sub.add_parser(
        "attention", help="your attention shapes against every implementation that runs here (checked, timed, charted)",
        description="Benchmark local attention on your shapes: every alterops backend and every peer that can run "
                    "here, each checked against a float64 reference before it is timed. Options taking a list "
                    "(comma separated) span a grid.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", type=_choices(("neighborhood", "window")), default=["neighborhood"],
                   help="neighborhood (k x k neighbourhood attention) or window (Swin windows); default neighborhood")
    p.add_argument("--batch", type=_ints, default=[2], help="batch size(s), default 2")
    p.add_argument("--size", type=_sizes, default=[(32, 32)], help="map size(s): N or HxW, default 32")
    p.add_argument("--heads", type=_ints, default=[4], help="heads, default 4")
    p.add_argument("--head-dim", type=_ints, default=[32], help="head_dim, default 32")
    p.add_argument("--kernel", type=_ints, default=[7], help="neighbourhood kernel size(s), default 7")
    p.add_argument("--window", type=_ints, default=[7], help="window size(s), default 7")
    p.add_argument("--dilation", type=_ints, default=[1], help="neighbourhood dilation(s), default 1")
    p.add_argument("--shift", type=_ints, default=[0], help="window shift(s) (Swin's shifted windows), default 0")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False,
                   help="add a relative position bias table (per head), default off")
    p.add_argument("--border", type=_choices(("clamp", "mask", "zero")), default=["clamp"],
                   help="neighbourhood border rule(s): clamp (NATTEN, default), mask, zero (the paper's unfold)")
    p.add_argument("--dtype", type=_choices(_DTYPES), default=["float32"], help="float32 (default), bfloat16, float16, float64")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--pass", dest="pass_", type=_choices(("fwd", "fwd+bwd")), default=["fwd"],
                   help="fwd (inference, no autograd) or fwd+bwd (gradients of q, k, v and the table); default fwd")
    p.add_argument("--impl", default=None,
                   help="comma-separated implementations to run (default: all); names: " + ", ".join(impls()))
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="sweep one of size, kernel, window, batch (it replaces that option) and draw a log-log "
                        "chart of time and memory with each curve's growth exponent")
    p.add_argument("--repeats", type=int, default=20, help="at most this many timed calls (at least 3), default 20")
    p.add_argument("--min-time", type=float, default=1.0, help="time calls for at least this many seconds, default 1")
    p.add_argument("--timeout", type=float, default=180.0,
                   help="per implementation and case, build and compile included (default 180 s): then `timeout`")
    p.add_argument("--dense-budget-gb", type=float, default=None,
                   help="skip dense-mask peers whose N x N mask and logits would exceed this (default: half the "
                        "free memory, at most 16 GiB on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--out", default="bench_out", help="folder for the JSON, CSV and PNG (default ./bench_out)")
    p.add_argument("--no-plot", action="store_true", help="no chart even with --sweep")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def _build_cases(args, device: str) -> tuple[list[AttnCase], str | None]:
    grid = {"op": args.op, "batch": args.batch, "size": args.size, "heads": args.heads, "head_dim": args.head_dim,
            "kernel": args.kernel, "window": args.window, "dilation": args.dilation, "shift": args.shift,
            "border": args.border, "dtype": args.dtype, "pass_": args.pass_}
    sweep_key = None
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        key = key.strip().replace("-", "_")
        if key not in _SWEEP_X or not values:
            raise ValueError(f"--sweep must be KEY=V1,V2,... with KEY one of {', '.join(_SWEEP_X)}, got {args.sweep!r}")
        grid[key] = _sizes(values) if key == "size" else _ints(values)
        sweep_key = key
    cases = []
    for combo in itertools.product(*grid.values()):
        c = dict(zip(grid, combo))
        (h, w) = c.pop("size")
        if c["op"] == "neighborhood":
            c.update(window=grid["window"][0], shift=0)
        else:
            c.update(kernel=grid["kernel"][0], dilation=1, border="clamp")
        case = AttnCase(height=h, width=w, bias=bool(args.bias), device=device, **c)
        if case not in cases:
            cases.append(case)
    if args.impl:
        names = [n.strip() for n in args.impl.split(",") if n.strip()]
        unknown = [n for n in names if n not in impls()]
        if unknown:
            raise ValueError(f"--impl: unknown implementation(s) {', '.join(unknown)}; known: {', '.join(impls())}")
    return cases, sweep_key


def main(args) -> int:
    from . import peers_attention

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("alterops bench attention: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        cases, sweep_key = _build_cases(args, device)
        for case in cases:  # invalid options fail here, with the op's own message
            _reference(replace(case, batch=1, pass_="fwd"), _make_inputs(replace(case, batch=1)))
    except (ValueError, TypeError) as exc:
        print(f"alterops bench attention: {exc}", file=sys.stderr)
        return 2
    if args.dense_budget_gb is not None:
        peers_attention.DENSE_BUDGET["bytes"] = args.dense_budget_gb * 2**30
    names = [n.strip() for n in args.impl.split(",")] if args.impl else None
    t0 = time.perf_counter()
    report = run_cases(cases, names, repeats=max(3, args.repeats), min_time=args.min_time, timeout=args.timeout,
                       progress=not args.no_progress, threads=args.threads)
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    report["options"] = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench_command")}
    report["machine"] = {"device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else
                         platform.processor() or platform.machine(), "python": platform.python_version(),
                         "torch": torch.__version__, "threads": args.threads or torch.get_num_threads()}
    report["conventions"] = {
        "flops": f"forward 4*B*heads*H*W*K*head_dim (K keys per query); fwd+bwd {FWD_BWD_FACTOR}x forward",
        "ceiling": "torch.mm of the case's dtype on its device, measured once per run",
        "memory": "peak over the timed calls of what the process held before them; see alterops.benchmark.attention",
        "check": f"normalised max error vs float64 reference; tolerances {TOLERANCE}",
    }
    if sweep_key:
        report["sweep"] = {"key": sweep_key, "x": _SWEEP_X[sweep_key][1],
                           "exponents": growth_exponents(report, sweep_key)}
    print(format_table(report))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "attention-" + "+".join(dict.fromkeys(c.op for c in cases)))
    with open(stem + ".json", "w") as fh:
        json.dump(report, fh, indent=1)
    write_csv(report, stem + ".csv")
    written = [stem + ".json", stem + ".csv"]
    if sweep_key and not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("alterops bench attention: matplotlib is not installed, so no chart was drawn; "
                  "`pip install matplotlib` (or alterops[plot]) and run again for it", file=sys.stderr)
        else:
            written += write_chart(report, sweep_key, stem)
    print(f"\nwrote {', '.join(written)} in {report['wall_s']:.0f} s")
    bad = [r for r in report["records"] if r["kind"] == "alterops" and r["status"] in ("mismatch", "error")]
    return 1 if bad else 0
