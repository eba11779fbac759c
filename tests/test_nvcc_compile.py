"""Every CUDA source (``csrc/<family>/*_cuda.cu``) compiles with nvcc for sm_80 and sm_90 with no
warnings and no spills (so do the tensor-core PTX wrappers of ``csrc/common/cuda_ptx.cuh``, through
``tests/cuda_emu/ptx_selftest.cu``), and every CUDA binding (``csrc/<family>/*_cuda_binding.cpp``)
type-checks against torch's stable-ABI headers.

The .cu files hold only kernels and raw-pointer launchers (no torch headers), and the bindings
use only the stable ABI, so both compile here even where torch is a CPU build. Skipped where
nvcc is absent.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*_cuda.cu")))
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "csrc")),
                                reason="no source tree here (testing an installed package)")
BINDINGS = sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*_cuda_binding.cpp")))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)


def test_cuda_sources_exist():
    assert SOURCES, "no csrc/*/*_cuda.cu found"
    assert BINDINGS, "no csrc/*/*_cuda_binding.cpp found"


def test_cu_files_do_not_include_torch():
    for path in SOURCES:
        text = open(path).read()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f"{path} includes torch headers"


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_nvcc_compiles_clean(source, arch, tmp_path):
    out = tmp_path / "k.cubin"
    cmd = [NVCC, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-Xptxas", "-v", "-Werror", "all-warnings",
           "-I", os.path.join(ROOT, "csrc"), "-o", str(out), source]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    spills = [m for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log) if int(m) > 0]
    assert not spills, f"register spills in {os.path.basename(source)} for sm_{arch}:\n{log[-4000:]}"
    stacks = [m for m in re.findall(r"(\d+) bytes stack frame", log) if int(m) > 0]
    assert not stacks, f"stack frame (local memory) in {os.path.basename(source)} for sm_{arch}:\n{log[-4000:]}"


PTX_SELFTEST = os.path.join(ROOT, "tests", "cuda_emu", "ptx_selftest.cu")
# csrc/common/cuda_ptx.cuh: each wrapper and the instruction it must put in the PTX
PTX_WRAPPERS = {
    "mma_m16n8k16_f16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
    "mma_m16n8k16_bf16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "ldmatrix_x1": "ldmatrix.sync.aligned.m8n8.x1.shared.b16",
    "ldmatrix_x2": "ldmatrix.sync.aligned.m8n8.x2.shared.b16",
    "ldmatrix_x4": "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
    "ldmatrix_x2_trans": "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
    "ldmatrix_x4_trans": "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
    "cp_async_16": "cp.async.cg.shared.global",
    "cp_async_8": "cp.async.ca.shared.global",
    "cp_async_4": "cp.async.ca.shared.global",
    "cp_async_commit": "cp.async.commit_group",
    "cp_async_wait": "cp.async.wait_group",
    "cp_async_wait_all": "cp.async.wait_all",
    "pack_half2": "cvt.rn.f16x2.f32",
    "pack_bf162": "cvt.rn.bf16x2.f32",
}


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvcc_compiles_the_ptx_wrappers(arch, tmp_path):
    """The inline PTX of csrc/common/cuda_ptx.cuh assembles for sm_80 / sm_90, through the kernels of
    tests/cuda_emu/ptx_selftest.cu (those the emulated tests run; every wrapper is used there):
    no warnings, no spills, no local memory, and each instruction is in the PTX."""
    text = open(PTX_SELFTEST).read()
    for name in PTX_WRAPPERS:
        assert re.search(rf"\b{name}\b\s*(<[^>]*>)?\s*\(", text), f"ptx_selftest.cu does not use {name}"
    base = [NVCC, f"-arch=sm_{arch}", "-O3", "-std=c++17", "-I", os.path.join(ROOT, "csrc")]
    proc = subprocess.run(base + ["-cubin", "-Xptxas", "-v", "-Werror", "all-warnings", "-o",
                                  str(tmp_path / "k.cubin"), PTX_SELFTEST], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    spills = [m for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log) if int(m) > 0]
    assert not spills, f"register spills for sm_{arch}:\n{log[-4000:]}"
    stacks = [m for m in re.findall(r"(\d+) bytes stack frame", log) if int(m) > 0]
    assert not stacks, f"stack frame (local memory) for sm_{arch}:\n{log[-4000:]}"
    proc = subprocess.run(base + ["-ptx", "-o", str(tmp_path / "k.ptx"), PTX_SELFTEST], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = (tmp_path / "k.ptx").read_text()
    for name, instr in PTX_WRAPPERS.items():
        assert instr in ptx, f"{instr} ({name}) missing from the PTX for sm_{arch}"


def _nvcc_include_dir() -> str:
    """The CUDA headers nvcc itself uses (nvcc may be a wrapper script elsewhere on PATH)."""
    proc = subprocess.run([NVCC, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True, timeout=120)
    found = re.findall(r'INCLUDES="-I([^"]+)"', proc.stdout + proc.stderr)
    assert found, "could not read nvcc's include directory from `nvcc -dryrun`"
    return os.path.normpath(found[0].strip())


CXX = shutil.which("g++") or shutil.which("c++")

# What a binding may include from torch: the stable ABI, header-only torch and the C shim.
STABLE_INCLUDE = re.compile(r"(torch/csrc/stable/|torch/headeronly/|torch/csrc/inductor/aoti_torch/c/shim\.h)")


@pytest.mark.parametrize("source", BINDINGS, ids=os.path.basename)
def test_cuda_bindings_use_only_the_stable_abi(source):
    text = open(source).read()
    for inc in re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", text):
        if inc.startswith(("torch/", "ATen/", "c10/", "caffe2/", "Python.h", "pybind11/")):
            assert STABLE_INCLUDE.match(inc), f"{os.path.basename(source)} includes {inc} (not the stable ABI)"


@pytest.mark.skipif(CXX is None or NVCC is None, reason="needs g++ and the CUDA headers next to nvcc")
@pytest.mark.parametrize("source", BINDINGS, ids=os.path.basename)
def test_cuda_bindings_typecheck(source):
    """The CUDA bindings type-check against torch's stable-ABI headers with the flags of
    tools/build_libs.py (TORCH_TARGET_VERSION, USE_CUDA), even with a CPU build of torch; they
    are only linked in CUDA builds."""
    from torch.utils.cpp_extension import include_paths

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import build_libs
    finally:
        sys.path.pop(0)
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-DTORCH_TARGET_VERSION={build_libs.TORCH_TARGET_VERSION}",
           "-DUSE_CUDA", "-I", _nvcc_include_dir(), "-I", os.path.join(ROOT, "csrc")]
    for p in include_paths():
        cmd += ["-I", p]
    proc = subprocess.run(cmd + [source], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
