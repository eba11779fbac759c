"""Every Triton config compiles ahead of time for sm_80 and sm_90 without spills, within the
shared-memory limit, and (where it has dot products) with tensor-core instructions on sm_90."""
import json
import os
import pkgutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

import alterops.kernels as kernels_pkg  # noqa: E402

MODULES = sorted(m.name for m in pkgutil.iter_modules(kernels_pkg.__path__) if not m.name.startswith("_"))
# Opt-in dynamic shared memory per block.
SHARED_LIMIT = {80: 166912, 90: 232448}


def _run(module: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(__file__), "aot_compile.py")
    proc = subprocess.run([sys.executable, script, module], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("module", MODULES)
def test_configs_compile_without_spills(module):
    rows = _run(module)
    import importlib

    n_cfg = len(importlib.import_module(f"alterops.kernels.{module}").AOT_CONFIGS)
    assert n_cfg > 0, f"alterops.kernels.{module} lists no AOT_CONFIGS"
    assert len(rows) == 2 * n_cfg
    problems = []
    for r in rows:
        tag = f"{r['module']}:{r['name']}@sm_{r['sm']}"
        if "error" in r:
            problems.append(f"{tag}: {r['error']}")
            continue
        if r.get("local", 0) > 0 or r.get("stack", 0) > 0:
            problems.append(f"{tag}: spills (LOCAL={r.get('local')}, STACK={r.get('stack')}, REG={r.get('reg')})")
        if r["shared"] > SHARED_LIMIT[r["sm"]]:
            problems.append(f"{tag}: shared memory {r['shared']} > {SHARED_LIMIT[r['sm']]}")
        if r["tensor_cores_expected"] and r["sm"] == 90 and not r["tensor_core"]:
            problems.append(f"{tag}: dot products did not lower to mma/wgmma")
    assert not problems, "\n".join(problems)
