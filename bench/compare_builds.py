"""Times the CPU kernels of two builds against each other, interleaved in one process.

    python bench/compare_builds.py --build native=/path/libalterops_kernels_native.so \
        --build wheel=alterops/_lib/libalterops_kernels_avx2.so [--rounds 5] [--family window]

Every build's kernel object is loaded into the same process (the binding library loads a
kernel table by path), and for each CPU bench case the builds take turns: round after round,
each times the case's own op (``ours``; peers are not timed). Medians over the rounds' medians
are reported with the ratio to the first build, so the comparison does not depend on the host's
drift between separate runs. Writes JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import alterops
from alterops import _ext, benchmark
from alterops.benchmark import harness


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="append", required=True, help="NAME=path to a libalterops_kernels_*.so")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--family", action="append")
    p.add_argument("--case", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    builds = [b.split("=", 1) for b in a.build]
    if not _ext.loaded():
        print(f"compiled kernels not loaded: {_ext.load_error()}", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    cases = [c for c in harness.select_cases(benchmark.cases(), device, families=a.family, name_filter=a.case)
             if c.family != "models"]
    isas = {}
    for name, path in builds:
        isas[name] = torch.ops.alterops._cpu_load_kernels(path)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; builds: "
          + ", ".join(f"{n} ({isas[n]}: {path})" for n, path in builds))
    rows = []
    for case in cases:
        w = case.make(device, False)
        times = {n: [] for n, _ in builds}
        for _ in range(a.rounds):
            for name, path in builds:
                torch.ops.alterops._cpu_load_kernels(path)
                t = harness.time_callable(w.ours, device, warmup=2, min_time=0.3, max_repeats=case.max_repeats)
                times[name].append(statistics.median(t) * 1e3)
        med = {n: statistics.median(v) for n, v in times.items()}
        first = builds[0][0]
        row = {"case": f"{case.family}/{case.name}", "ms": med, "rounds": times,
               "ratio_to_" + first: {n: med[n] / med[first] for n in med}}
        rows.append(row)
        print(f"{row['case']:<48} " + "  ".join(f"{n} {med[n]:8.2f} ms ({med[n] / med[first]:.3f})" for n in med),
              flush=True)
    _ext.set_cpu_isa(None)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "builds": dict(builds),
                       "isas": isas, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
