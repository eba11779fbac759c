"""libalterops_cuda.so builds, links and loads against a CUDA build of torch, with no GPU needed.

The library is built from this checkout with ``tools/build_libs.py`` (CPU library included:
the CUDA library only adds CUDA kernels to ops whose schemas the CPU library defines) by a
Python whose torch is a CUDA build: ``ALTEROPS_CUDA_TORCH_PYTHON``, else
``/opt/venv214/bin/python`` when it exists; skipped otherwise, or where that Python has no nvcc.
Checked: every shared library it needs is torch's, the CUDA runtime of torch's CUDA major, or the
C/C++ runtime; every symbol it imports is provided by one of them; ``torch.ops.load_library``
loads it (after the CPU library) without initialising CUDA; each op it implements then has its
schema and a CUDA kernel.
"""
import json
import os
import re
import shutil
import subprocess
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "csrc")),
                                reason="no source tree here (testing an installed package)")

# The ops the CUDA library implements (STABLE_TORCH_LIBRARY_IMPL(alterops, CUDA, m) in
# csrc/*/*_cuda_binding.cpp).
CUDA_OPS = ("blur2d_forward", "blur2d_backward", "delta_log_amplitude_fwd", "feature_variance_fwd",
            "window_attention2d_fwd", "window_attention2d_bwd", "neighborhood_attention_nd_fwd",
            "neighborhood_attention_nd_bwd")

# Shared libraries the CUDA library may need (libcudart.so.<major> is checked separately).
ALLOWED_NEEDED = {"libtorch_cpu.so", "libtorch_cuda.so", "libc10.so", "libc10_cuda.so", "libstdc++.so.6",
                  "libgcc_s.so.1", "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
                  "ld-linux-x86-64.so.2"}
# Symbol versions of the C/C++ runtime.
RUNTIME_VERSIONS = ("GLIBC_", "GLIBCXX_", "CXXABI_", "GCC_")


def _cuda_torch_python():
    path = os.environ.get("ALTEROPS_CUDA_TORCH_PYTHON")
    if path:
        return path, True
    default = "/opt/venv214/bin/python"
    return (default, False) if os.path.exists(default) else (None, False)


def _run(python, code, timeout):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    return proc


def _last_json(proc):
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result printed:\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def cuda_python():
    python, explicit = _cuda_torch_python()
    if python is None:
        pytest.skip("no Python with a CUDA build of torch (set ALTEROPS_CUDA_TORCH_PYTHON)")
    proc = _run(python, f"""
        import json, sys
        sys.path.insert(0, {TOOLS!r})
        import torch, build_libs
        print(json.dumps({{"torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": build_libs.nvcc_path()}}))
    """, timeout=300)
    if proc.returncode != 0:
        if explicit:
            pytest.fail(f"{python} (ALTEROPS_CUDA_TORCH_PYTHON) cannot import torch:\n{proc.stderr[-4000:]}")
        pytest.skip(f"{python} cannot import torch")
    info = _last_json(proc)
    if info["cuda"] is None:
        if explicit:
            pytest.fail(f"{python} (ALTEROPS_CUDA_TORCH_PYTHON) has torch {info['torch']}, a CPU build")
        pytest.skip(f"{python} has torch {info['torch']}, a CPU build")
    if info["nvcc"] is None:
        pytest.skip(f"no nvcc for {python} (set CUDA_HOME or put nvcc on PATH)")
    return python, info


@pytest.fixture(scope="module")
def built(cuda_python, tmp_path_factory):
    """Builds the CPU binding library (without the CPU kernel levels: the ops are loaded, not run)
    and the CUDA library (for sm_90 only: what is checked here, the linkage and the registration,
    does not depend on the architecture, and tests/test_nvcc_compile.py compiles every .cu file for
    sm_80 and sm_90)."""
    python, info = cuda_python
    tmp = tmp_path_factory.mktemp("cuda_library")
    out, build_dir = str(tmp / "lib"), str(tmp / "build")
    proc = _run(python, f"""
        import json, os, sys, time
        sys.path.insert(0, {TOOLS!r})
        import torch, build_libs
        t0 = time.time()
        products = build_libs.build({out!r}, build_dir={build_dir!r}, cuda=True, kernels=False,
                                    cuda_arch_list="9.0", jobs=os.cpu_count() or 1)
        print(json.dumps({{"products": products, "seconds": time.time() - t0,
                          "torch_lib": os.path.join(os.path.dirname(torch.__file__), "lib")}}))
    """, timeout=3600)
    assert proc.returncode == 0, f"build failed:\n{proc.stderr[-8000:]}"
    result = _last_json(proc)
    names = {os.path.basename(p): p for p in result["products"]}
    assert "libalterops_cpu.so" in names and "libalterops_cuda.so" in names, result["products"]
    print(f"\nbuilt {sorted(names)} in {result['seconds']:.0f} s against torch {info['torch']} (CUDA {info['cuda']})")
    return {"python": python, "info": info, "cpu": names["libalterops_cpu.so"], "cuda": names["libalterops_cuda.so"],
            "torch_lib": result["torch_lib"]}


def _needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _nm(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, path], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("readelf") is None or shutil.which("nm") is None, reason="needs binutils")
def test_cuda_library_links_against_torch_and_cudart_only(built):
    needed = _needed(built["cuda"])
    cuda_major = built["info"]["cuda"].split(".")[0]
    cudart = [n for n in needed if n.startswith("libcudart.so")]
    assert cudart == [f"libcudart.so.{cuda_major}"], \
        f"the CUDA runtime needed ({cudart}) is not torch's (CUDA {built['info']['cuda']})"
    unexpected = [n for n in needed if n not in ALLOWED_NEEDED and n not in cudart]
    assert not unexpected, f"libalterops_cuda.so needs {unexpected} (all: {needed})"
    assert not any(n.startswith("libpython") for n in needed), needed

    # every undefined symbol: the C/C++ runtime or cudart (versioned), else defined by torch
    torch_defined = set()
    for lib in ("libtorch_cpu.so", "libtorch_cuda.so", "libc10.so"):
        path = os.path.join(built["torch_lib"], lib)
        if os.path.exists(path):
            torch_defined |= {ln.split()[-1].split("@")[0] for ln in _nm(path, "--defined-only") if ln.strip()}
    missing = []
    for line in _nm(built["cuda"], "--undefined-only"):
        parts = line.split()
        if len(parts) != 2 or parts[0] != "U":
            continue  # weak references
        name, _, version = parts[1].partition("@")
        version = version.lstrip("@")
        if version.startswith(RUNTIME_VERSIONS) or version.startswith("libcudart.so."):
            continue
        if name not in torch_defined:
            missing.append(parts[1])
    assert not missing, f"symbols that neither torch nor the runtimes provide: {missing}"
    assert not any(s.startswith("Py") for s in missing), missing


@pytest.mark.slow
def test_cuda_library_loads_and_registers_cuda_kernels(built):
    proc = _run(built["python"], f"""
        import json
        import torch
        torch.ops.load_library({built['cpu']!r})
        torch.ops.load_library({built['cuda']!r})
        ops = {{}}
        for op in {list(CUDA_OPS)!r}:
            name = "alterops::" + op
            ops[op] = {{"schema": str(getattr(torch.ops.alterops, op).default._schema),
                        "cuda": torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"),
                        "cpu": torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")}}
        print(json.dumps({{"ops": ops, "cuda_initialized": torch.cuda.is_initialized()}}))
    """, timeout=600)
    assert proc.returncode == 0, f"loading failed:\n{proc.stderr[-8000:]}"
    result = _last_json(proc)
    assert not result["cuda_initialized"], "loading the CUDA library initialised CUDA"
    for op, r in result["ops"].items():
        assert r["schema"].startswith(f"alterops::{op}("), (op, r)
        assert r["cuda"], f"alterops::{op} has no CUDA kernel after loading libalterops_cuda.so"
        assert r["cpu"], f"alterops::{op} has no CPU kernel (libalterops_cpu.so)"
