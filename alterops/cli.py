"""The ``alterops`` command: ``info``, ``bench`` and ``analyze``."""
from __future__ import annotations

import argparse
import os
import sys

import torch


def _ext_lines() -> list[str]:
    """What ``alterops info`` and the bench header say about the compiled kernels."""
    from alterops import _ext

    if not _ext.loaded():
        return [f"compiled kernels: not loaded — {_ext.load_error()}"]
    isa = _ext.cpu_isa_info()
    lines = [f"compiled kernels: {_ext.LIB_DIR}",
             f"  CPU kernels: {isa['in_use']} in use ({isa['why']}; compiled with {isa['flags']})",
             f"  CPU levels built: {', '.join(isa['built'])}; this CPU can run: {', '.join(isa['cpu_supports'])}"
             " (ALTEROPS_CPU_ISA=generic|avx2|avx512 forces one)"]
    best = isa["cpu_supports"][-1] if isa["cpu_supports"] else None
    if best and isa["in_use"] != best and best in isa["built"]:
        lines.append(f"  note: this CPU could run {best}; torch's capability ({isa['torch_capability']}) or "
                     "ALTEROPS_CPU_ISA chose a lower level")
    lines.append("  CUDA kernels: " + ("loaded" if _ext.has_cuda_kernels() else f"not loaded — {_ext.cuda_error()}"))
    return lines


def _info(args) -> int:
    import platform

    import alterops
    from alterops import _dispatch, _ext

    print(f"alterops {alterops.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    ok, why = _dispatch.triton_status()
    if ok:
        import triton

        mode = " (interpreter: TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        print(f"triton {triton.__version__}{mode}")
    else:
        print(f"triton: unavailable — {why}")
    for line in _ext_lines():
        print(line)
    cuda = torch.cuda.is_available()
    print(f"CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    print(f"backend in force: {_dispatch.get_backend() or 'auto'}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for name, table in sorted(_dispatch.registry().items()):
        print(f"\n{name}")
        order = f"  auto order: on cpu {' > '.join(table.auto_cpu)}, on cuda {' > '.join(table.auto_cuda)}"
        print(order + (f". Why: {table.auto_why}" if table.auto_why else ""))
        for device in devices:
            auto = {_dispatch._dtype_name(d): table.select("auto", device, d) for d in dtypes}
            print(f"  on {device.type}: auto picks " + ", ".join(f"{d}->{b}" for d, b in auto.items()))
            for backend, per_dtype in table.report(device, dtypes).items():
                usable = [d for d, reason in per_dtype.items() if reason is None]
                reasons = sorted({reason for reason in per_dtype.values() if reason is not None})
                line = f"    {backend:<9} " + (", ".join(usable) if usable else "-")
                if reasons and (args.verbose or not usable):
                    line += "   (" + "; ".join(reasons) + ")"
                print(line)
    return 0


def _bench(args) -> int:
    from alterops import benchmark
    from alterops.benchmark import harness

    isa = getattr(args, "isa", None)
    device = torch.device(args.device or ("cpu" if isa or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("alterops bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    levels = None
    if isa:
        try:
            if device.type != "cpu":
                raise ValueError(f"--isa {isa} selects CPU kernel levels; it needs --device cpu")
            levels = harness.isa_levels(isa)
        except ValueError as exc:
            print(f"alterops bench: {exc}", file=sys.stderr)
            return 2
    chosen = harness.select_cases(benchmark.cases(), device, families=args.family, name_filter=args.case,
                                  include_all=args.all, with_unavailable=True)
    if not chosen:
        print("alterops bench: no case matches", file=sys.stderr)
        return 2
    report = harness.run_suite(chosen, device, quick=args.quick, progress=not args.no_progress, isa=levels)
    print(harness.format_table(report))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench-{device.type}{'-isa-' + isa if isa else ''}{'-quick' if args.quick else ''}")
    harness.write_json(report, stem + ".json")
    plot = not args.no_plot
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plot = False
            print("alterops bench: matplotlib is not installed, so no chart was drawn; "
                  "`pip install matplotlib` (or alterops[plot]) and run again for it", file=sys.stderr)
    if plot:
        harness.write_chart(report, stem + ".png")
    print(f"\nwrote {stem}.json" + (f" and {stem}.png" if plot else ""))
    errors = [r for r in report["results"] if r["error"]]
    return 1 if errors else 0


def build_parser() -> argparse.ArgumentParser:
    from alterops._version import __version__

    parser = argparse.ArgumentParser(prog="alterops", description="Fused local attention, smoothing and statistics kernels.")
    parser.add_argument("--version", action="version", version=f"alterops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, and which backends each op can use here (and why not)")
    p.add_argument("-v", "--verbose", action="store_true", help="give the reason for every unusable backend/dtype")
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="run the benchmark suite with the peers measured in the same run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Measure this machine's ceilings, then time each case of the suite and its\n"
                                   "peers in the same run; print a table, write JSON and a PNG chart.",
                       epilog="examples:\n"
                              "  alterops bench                                  # the default suite on this device\n"
                              "  alterops bench --quick --out /tmp/q             # tiny shapes: a smoke run\n"
                              "  alterops bench --family window --case swin_t    # some cases only\n"
                              "  alterops bench --isa all --family smoothing     # every CPU kernel level, side by side\n"
                              "cases that need a package that is not installed are listed as left out, with the reason")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--family", action="append", help="only these families (repeatable): smoothing, neighborhood, window, statistics, models")
    p.add_argument("--case", default=None, help="only cases whose (registered, full-size) name contains this text")
    p.add_argument("--all", action="store_true", help="also run the cases outside the default suite")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats, a smoke run: the names give the shapes run, no targets applied")
    p.add_argument("--isa", metavar="LEVEL", default=None,
                   help="CPU kernel level(s) to run ours under: 'all' (every level this CPU can run, side by side) "
                        "or one of generic, avx2, avx512 (implies --device cpu)")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and PNG (default: ./bench_out)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_bench)
    from alterops.benchmark import attention as bench_attention  # `alterops bench attention ...`

    bench_attention.add_parser(p)

    try:
        from alterops.analysis import cli as analysis_cli
    except ImportError as exc:  # the analysis extras are optional; say so when asked for
        p = sub.add_parser("analyze", help="Fourier and variance analysis of a model (unavailable here)")
        p.set_defaults(func=lambda a, _e=exc: (print(f"alterops analyze is unavailable: {_e}", file=sys.stderr), 2)[1])
    else:
        analysis_cli.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
