"""Compile every Triton config listed in ``alterops.kernels.<module>.AOT_CONFIGS`` ahead of
time for sm_80 and sm_90 (no GPU needed) and print one JSON line per (config, arch) with
registers, spills (LOCAL bytes), shared memory and whether the PTX uses tensor-core
instructions. Run in a process without TRITON_INTERPRET (the test does that).

    python tests/aot_compile.py blur neighborhood_attention
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


if __name__ == "__main__":
    main(sys.argv[1:])
