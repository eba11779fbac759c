"""The ``alterops`` command: ``info``, ``bench`` and ``analyze``."""
from __future__ import annotations

import argparse
import os
import sys

import torch


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
    if _ext.loaded():
        simd, host = _ext.cpu_simd(), _ext.host_cpu_simd()
        print(f"extension alterops._C: loaded ({'with' if _ext.has_cuda_kernels() else 'without'} CUDA kernels; "
              f"CPU kernels compiled for {simd})")
        order = ("generic", "avx2", "avx512")
        if simd in order and host in order and order.index(host) > order.index(simd):
            print(f"  this CPU has {host}: rebuild with ALTEROPS_CPU_ARCH=native (the default) for faster CPU kernels")
    else:
        print(f"extension alterops._C: not loaded — {_ext.load_error()}")
    cuda = torch.cuda.is_available()
    print(f"CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    print(f"backend in force: {_dispatch.get_backend() or 'auto'}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for name, table in sorted(_dispatch.registry().items()):
        print(f"\n{name}")
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

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("alterops bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    chosen = harness.select_cases(benchmark.cases(), device, families=args.family, name_filter=args.case,
                                  include_all=args.all)
    if not chosen:
        print("alterops bench: no case matches", file=sys.stderr)
        return 2
    report = harness.run_suite(chosen, device, quick=args.quick, progress=not args.no_progress)
    print(harness.format_table(report))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench-{device.type}{'-quick' if args.quick else ''}")
    harness.write_json(report, stem + ".json")
    if not args.no_plot:
        harness.write_chart(report, stem + ".png")
    print(f"\nwrote {stem}.json" + ("" if args.no_plot else f" and {stem}.png"))
    errors = [r for r in report["results"] if r["error"]]
    return 1 if errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alterops", description="Fused local attention, smoothing and statistics kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, and which backends each op can use here (and why not)")
    p.add_argument("-v", "--verbose", action="store_true", help="give the reason for every unusable backend/dtype")
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="run the benchmark suite with the peers measured in the same run")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--family", action="append", help="only these families (repeatable): smoothing, neighborhood, window, statistics, models")
    p.add_argument("--case", default=None, help="only cases whose name contains this text")
    p.add_argument("--all", action="store_true", help="also run the cases outside the default suite")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and PNG (default: ./bench_out)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_bench)

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
