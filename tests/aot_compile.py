"""Compile every Triton config listed in ``alterops.kernels.<module>.AOT_CONFIGS`` ahead of
time for sm_80 and sm_90 (no GPU needed) and print one JSON line per (config, arch) with
registers, spills (LOCAL bytes), shared memory and whether the PTX uses tensor-core
instructions. Run in a process without TRITON_INTERPRET (the test does that).

    python tests/aot_compile.py blur neighborhood_attention
    python tests/aot_compile.py --ones blur          # integer arguments of 1 (see ``ones``)
    python tests/aot_compile.py --ttgir blur         # up to TTGIR only, plus the sweep (``lower_all``)
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ARCHS = (80, 90)


def resources(cubin: bytes, kernel_name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_config(cfg: dict, cc: int) -> dict:
    src = ASTSource(fn=cfg["kernel"], signature=cfg["signature"], constexprs=cfg.get("constexprs", {}))
    options = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    res = resources(compiled.asm["cubin"], cfg["kernel"].__name__)
    ptx = compiled.asm["ptx"]
    res["shared"] = max(res.get("shared", 0), int(compiled.metadata.shared))
    res["tensor_core"] = bool(re.search(r"\b(wgmma|mma)\.", ptx))
    return res


def main(modules):
    for mod_name in modules:
        module = importlib.import_module(f"alterops.kernels.{mod_name}")
        for cfg in module.AOT_CONFIGS:
            for cc in ARCHS:
                row = {"module": mod_name, "name": cfg["name"], "sm": cc,
                       "tensor_cores_expected": bool(cfg.get("tensor_cores", False))}
                try:
                    row.update(compile_config(cfg, cc))
                except Exception as exc:  # reported as a failure by the test, not hidden
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(json.dumps(row), flush=True)


def _lower(cfg: dict, ones: list, stage: str = "ttir", cc: int = 90) -> None:
    """Lower ``cfg`` for sm_``cc`` to Triton IR (``stage="ttir"``: where the Python-level kernel
    code is traced) or on through the GPU-specific passes (``"ttgir"``: layouts, pipelining;
    no PTX), with the integer arguments ``ones`` turned into the constant 1, as a GPU launch
    specialises every integer argument equal to 1."""
    from triton._C.libtriton import ir
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", cc, 32))
    options = backend.parse_options({"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)})
    signature, constexprs = dict(cfg["signature"]), dict(cfg.get("constexprs", {}))
    for name in ones:
        signature[name], constexprs[name] = "constexpr", 1
    src = ASTSource(fn=cfg["kernel"], signature=signature, constexprs=constexprs)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(backend.target, options, backend.get_codegen_implementation(options),
                         backend.get_module_map(), context)
    if stage == "ttgir":
        stages, metadata = {}, {}
        backend.add_stages(stages, options, src.language)
        stages["ttgir"](stages["ttir"](module, metadata), metadata)


def ones(modules, stage="ttir"):
    """One JSON line per trace: every kernel of the modules with each integer argument alone
    equal to 1 (on the kernel's first config), and every config with all of them equal to 1
    (configs that differ only in block sizes once). Under the interpreter nothing is
    specialised, so a kernel calling ``.to()`` on an argument passes there and fails on a GPU."""
    for mod_name in modules:
        module = importlib.import_module(f"alterops.kernels.{mod_name}")
        swept, seen = set(), set()
        for cfg in module.AOT_CONFIGS:
            kernel = cfg["kernel"].__name__
            ints = [a for a, t in cfg["signature"].items() if t in ("i32", "i64")]
            # arguments the kernel leaves unspecialised (listed by name or by position)
            unspecialised = set(getattr(cfg["kernel"], "do_not_specialize", ()))
            ints = [a for a in ints if not {a, cfg["kernel"].arg_names.index(a)} & unspecialised]
            key = (kernel, tuple(sorted((k, v) for k, v in cfg.get("constexprs", {}).items()
                                        if not k.startswith(("BLOCK", "TM_", "TN_")))))
            runs = [] if key in seen else [ints]
            seen.add(key)
            if kernel not in swept:
                swept.add(kernel)
                runs += [[a] for a in ints]
            for run in runs:
                row = {"module": mod_name, "name": cfg["name"], "kernel": kernel,
                       "ones": "all" if len(run) > 1 else run[0]}
                try:
                    _lower(cfg, run, stage)
                except Exception as exc:
                    cause = exc.__cause__ or exc
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]} <- {type(cause).__name__}: {cause}"[:1500]
                print(json.dumps(row), flush=True)


def lower_all(modules):
    """Every config through the GPU-specific passes (TTGIR, no PTX) for sm_80 and sm_90, then
    the integer-argument sweep of :func:`ones` through them too: with an older Triton on the
    path, its compiler bugs in those passes show without a GPU or a full compile."""
    print(json.dumps({"triton": triton.__version__, "at": os.path.dirname(triton.__file__)}), flush=True)
    for mod_name in modules:
        module = importlib.import_module(f"alterops.kernels.{mod_name}")
        for cfg in module.AOT_CONFIGS:
            for cc in ARCHS:
                row = {"module": mod_name, "name": cfg["name"], "kernel": cfg["kernel"].__name__, "sm": cc,
                       "ones": "none"}
                try:
                    _lower(cfg, [], "ttgir", cc)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:1500]
                print(json.dumps(row), flush=True)
        ones([mod_name], "ttgir")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ones"]:
        ones(sys.argv[2:])
    elif sys.argv[1:2] == ["--ttgir"]:
        lower_all(sys.argv[2:])
    else:
        main(sys.argv[1:])
