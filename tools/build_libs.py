"""Builds alterops' shared objects (no Python C API in any of them; Python loads them with
``torch.ops.load_library``):

``libalterops_kernels_<level>.so``
    The CPU kernels (``csrc/<family>/<family>_cpu.cpp``), once per instruction-set level:
    ``generic`` (x86-64), ``avx2`` (x86-64-v3: AVX2, FMA, BMI, F16C) and ``avx512`` (AVX-512
    F/BW/VL/DQ, torch's AVX512 set). No torch headers, hidden visibility; each exports only
    ``alterops_cpu_kernel_table``. ``ALTEROPS_CPU_ARCH=native`` builds one object with
    ``-march=native`` instead (a source build for this machine only).
``libalterops_cpu.so``
    The bindings (``csrc/<family>/<family>_binding.cpp``, ``csrc/common``): LibTorch stable ABI
    with ``TORCH_TARGET_VERSION`` = the oldest supported torch, compiled for baseline x86-64.
``libalterops_cuda.so``
    The CUDA kernels and their stable-ABI bindings, when torch is a CUDA build and nvcc is found.

A small parallel builder rather than ninja: it prints one line per compiled file, rebuilds
only what changed (compiler dependency files plus the command line), and needs nothing but a
C++ compiler. Used by ``setup.py``; ``python tools/build_libs.py [--out DIR]`` runs it directly.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSRC = os.path.join(ROOT, "csrc")

# The oldest torch whose stable ABI the bindings target: 2.11 is the first with
# torch::stable::from_blob taking a deleter, which the CPU output pool needs.
MIN_TORCH = (2, 11)
TORCH_TARGET_VERSION = "0x%02x%02x000000000000" % MIN_TORCH

# Compiler flags of each CPU kernel level. avx512 is torch's AVX512 capability set.
LEVEL_FLAGS = {
    "generic": ["-march=x86-64", "-mtune=generic"],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "avx512": ["-march=x86-64-v3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mtune=generic"],
}
LEVELS = tuple(LEVEL_FLAGS)
BASELINE_FLAGS = ["-march=x86-64", "-mtune=generic"]

COMMON_FLAGS = ["-std=c++17", "-fPIC", "-O3", "-fno-math-errno", "-fopenmp-simd", "-Wall",
                "-fvisibility=hidden", "-fvisibility-inlines-hidden", f"-I{CSRC}"]


def families():
    """The op-family folders under csrc/ (everything but common)."""
    return sorted(d for d in os.listdir(CSRC) if os.path.isdir(os.path.join(CSRC, d)) and d != "common")


def kernel_sources():
    """CPU kernel sources: compiled once per level, never include torch."""
    out = [os.path.join(CSRC, "common", "kernel_table.cpp")]
    for fam in families():
        out += sorted(glob.glob(os.path.join(CSRC, fam, "*_cpu.cpp")))
    return out


def binding_sources():
    out = sorted(glob.glob(os.path.join(CSRC, "common", "binding.cpp"))) + \
        sorted(glob.glob(os.path.join(CSRC, "common", "registration.cpp")))
    for fam in families():
        out += sorted(p for p in glob.glob(os.path.join(CSRC, fam, "*_binding.cpp"))
                      if not p.endswith("_cuda_binding.cpp"))
    return out


def cuda_sources():
    cu, cpp = [], []
    for fam in families():
        cu += sorted(glob.glob(os.path.join(CSRC, fam, "*_cuda.cu")))
        cpp += sorted(glob.glob(os.path.join(CSRC, fam, "*_cuda_binding.cpp")))
    return cu, cpp


def level_flags(level: str) -> list[str]:
    """Compile flags of a kernel level (``native``: -march=native)."""
    if level == "native":
        return ["-march=native"]
    return LEVEL_FLAGS[level]


def torch_paths():
    import torch
    from torch.utils.cpp_extension import include_paths

    return include_paths(), os.path.join(os.path.dirname(torch.__file__), "lib")


def _cxx():
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


class Builder:
    """Compiles and links with per-file progress; skips objects whose inputs did not change."""

    def __init__(self, build_dir: str, jobs: int, verbose: bool = False):
        self.build_dir = build_dir
        self.jobs = max(1, jobs)
        self.verbose = verbose
        os.makedirs(build_dir, exist_ok=True)
        self.steps = []  # (kind, output, inputs, command)

    def compile(self, src: str, obj: str, cmd: list[str], depfile: bool = True):
        self.steps.append(("compile", obj, [src], cmd + (["-MMD", "-MF", obj + ".d"] if depfile else [])))

    def link(self, out: str, objs: list[str], cmd: list[str]):
        self.steps.append(("link", out, objs, cmd))

    def _stamp(self, out: str) -> str:
        # the command line an output was made with, kept in the build folder (never next to the
        # installed objects)
        if out.startswith(self.build_dir + os.sep):
            return out + ".cmd"
        key = hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:16]
        os.makedirs(os.path.join(self.build_dir, "stamps"), exist_ok=True)
        return os.path.join(self.build_dir, "stamps", f"{os.path.basename(out)}.{key}.cmd")

    def _up_to_date(self, out: str, inputs: list[str], cmd: list[str]) -> bool:
        if not os.path.exists(out):
            return False
        try:
            with open(self._stamp(out)) as f:
                if f.read() != shlex.join(cmd):
                    return False
        except OSError:
            return False
        deps = list(inputs)
        dfile = out + ".d"
        if os.path.exists(dfile):
            with open(dfile) as f:
                text = f.read().replace("\\\n", " ")
            deps += text.split(":", 1)[1].split() if ":" in text else []
        t = os.path.getmtime(out)
        return all(os.path.exists(d) and os.path.getmtime(d) <= t for d in deps)

    def _run(self, step, index, total):
        kind, out, inputs, cmd = step
        rel = os.path.relpath(inputs[0] if kind == "compile" else out, ROOT)
        print(f"[{index}/{total}] {'compiling' if kind == 'compile' else 'linking'} {rel}"
              f"{' (' + os.path.basename(os.path.dirname(out)) + ')' if kind == 'compile' else ''}",
              file=sys.stderr, flush=True)
        if self.verbose:
            print(shlex.join(cmd), file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"alterops build: {rel} failed:\n{shlex.join(cmd)}\n{proc.stderr[-20000:]}")
        if proc.stderr.strip() and self.verbose:
            print(proc.stderr, file=sys.stderr)
        with open(self._stamp(out), "w") as f:
            f.write(shlex.join(cmd))

    def run(self):
        t0 = time.time()
        compiles = [s for s in self.steps if s[0] == "compile" and not self._up_to_date(s[1], s[2], s[3])]
        links = [s for s in self.steps if s[0] == "link"]
        total = len(compiles) + len(links)
        counter = iter(range(1, total + 1))
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(lambda s: self._run(s, next(counter), total), compiles))
        stale = set(s[1] for s in compiles)
        for s in links:
            if any(i in stale for i in s[2]) or not self._up_to_date(s[1], s[2], s[3]):
                self._run(s, next(counter), total)
        print(f"alterops build: done in {time.time() - t0:.0f} s ({len(compiles)} files compiled)",
              file=sys.stderr, flush=True)


def build(out_dir: str, *, build_dir: str | None = None, cpu_arch: str = "portable", cuda: bool | None = None,
          cuda_arch_list: str = "8.0;9.0", jobs: int | None = None, debug: bool = False, verbose: bool = False,
          kernels: bool = True) -> list[str]:
    """Builds the shared objects into ``out_dir``; returns their paths. ``kernels=False`` leaves
    out the CPU kernel levels (the binding library and the CUDA library only: enough to load the
    ops and check their registration, not to run them on the CPU)."""
    cxx = _cxx()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    build_dir = build_dir or os.path.join(ROOT, "build", "alterops-libs")
    jobs = jobs or os.cpu_count() or 1
    b = Builder(build_dir, jobs, verbose)
    includes, torch_lib = torch_paths()
    inc = [f"-I{p}" for p in includes]
    strip = [] if debug else ["-s"]
    dbg = ["-g"] if debug else []
    products = []

    levels = ["native"] if cpu_arch == "native" else list(LEVELS)
    for level in levels if kernels else []:
        objs = []
        march = " ".join(level_flags(level))
        for src in kernel_sources():
            obj = os.path.join(build_dir, level, os.path.relpath(src, CSRC).replace(os.sep, "_") + ".o")
            b.compile(src, obj, [cxx, *COMMON_FLAGS, *level_flags(level), *dbg, f'-DALTEROPS_MARCH="{march}"',
                                 "-c", src, "-o", obj])
            objs.append(obj)
        so = os.path.join(out_dir, f"libalterops_kernels_{level}.so")
        b.link(so, objs, [cxx, "-shared", *level_flags(level), *objs, "-o", so, "-Wl,-z,defs", "-Wl,--as-needed",
                          *strip])
        products.append(so)

    bind_flags = [*COMMON_FLAGS, *BASELINE_FLAGS, "-O2", *inc, f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", *dbg]
    objs = []
    for src in binding_sources():
        obj = os.path.join(build_dir, "binding", os.path.relpath(src, CSRC).replace(os.sep, "_") + ".o")
        b.compile(src, obj, [cxx, *bind_flags, "-c", src, "-o", obj])
        objs.append(obj)
    so = os.path.join(out_dir, "libalterops_cpu.so")
    b.link(so, objs, [cxx, "-shared", *objs, "-o", so, f"-L{torch_lib}", "-ltorch_cpu", "-ldl", "-Wl,--as-needed", *strip])
    products.append(so)

    if cuda is None:
        cuda = cuda_available()
    if cuda:
        products.append(_add_cuda(b, out_dir, build_dir, cxx, inc, torch_lib, cuda_arch_list, dbg, strip))
    b.run()
    return products


def nvcc_path():
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_available() -> bool:
    import torch

    return torch.version.cuda is not None and nvcc_path() is not None


def _nvcc_toolkit(nvcc: str) -> dict:
    """What nvcc itself uses, read from ``nvcc -dryrun`` (nvcc may be a wrapper script elsewhere
    on PATH, so the toolkit is not always ``dirname(nvcc)/..``): its CUDA major version, include
    directory and library directory (the one with libcudart, not the driver stubs)."""
    proc = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    inc = re.findall(r'INCLUDES="-I([^"]+)"', log)
    libs = [d for d in re.findall(r'"-L([^"]+)"', log) if os.path.basename(os.path.normpath(d)) != "stubs"]
    major = re.findall(r"-D__CUDACC_VER_MAJOR__=(\d+)", log)
    return {
        "include": os.path.normpath(inc[0].strip()) if inc else os.path.join(home, "include"),
        "lib": os.path.normpath(libs[0]) if libs else os.path.join(home, "lib64"),
        "major": int(major[0]) if major else None,
    }


def _add_cuda(b, out_dir, build_dir, cxx, inc, torch_lib, cuda_arch_list, dbg, strip):
    """``libalterops_cuda.so``: the kernels (``csrc/<family>/*_cuda.cu``, nvcc, no torch headers)
    and their stable-ABI bindings (``csrc/<family>/*_cuda_binding.cpp``, the C++ compiler with
    torch's and the CUDA headers; ``USE_CUDA`` exposes the CUDA entry points of torch's C shim).
    Linked against libtorch_cpu, libtorch_cuda and the shared CUDA runtime (libcudart.so.<major>
    of nvcc), so it loads only into a torch built for that CUDA major; ``-z defs`` makes every
    symbol it needs resolve at link time."""
    import torch

    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("CUDA kernels requested but nvcc was not found (set CUDA_HOME)")
    toolkit = _nvcc_toolkit(nvcc)
    torch_major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    if torch_major is not None and toolkit["major"] is not None and torch_major != toolkit["major"]:
        raise RuntimeError(
            f"nvcc ({nvcc}) is CUDA {toolkit['major']} but torch {torch.__version__} is built for CUDA "
            f"{torch.version.cuda}: the CUDA library would need libcudart.so.{toolkit['major']}, which this torch "
            f"does not load. Use an nvcc of CUDA {torch_major} (CUDA_HOME) or set ALTEROPS_SKIP_CUDA=1")
    gencode = []
    for arch in cuda_arch_list.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        gencode += [f"-gencode=arch=compute_{num},code=sm_{num}"]
        if ptx:
            gencode += [f"-gencode=arch=compute_{num},code=compute_{num}"]
    cu, cpp = cuda_sources()
    objs = []
    for src in cu:
        obj = os.path.join(build_dir, "cuda", os.path.relpath(src, CSRC).replace(os.sep, "_") + ".o")
        b.compile(src, obj, [nvcc, "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "-Xcompiler", "-fPIC",
                             "-Xcompiler", "-fvisibility=hidden", f"-I{CSRC}", *gencode, "-c", src, "-o", obj])
        objs.append(obj)
    for src in cpp:
        obj = os.path.join(build_dir, "cuda", os.path.relpath(src, CSRC).replace(os.sep, "_") + ".o")
        b.compile(src, obj, [cxx, *COMMON_FLAGS, *BASELINE_FLAGS, "-O2", *inc, f"-I{toolkit['include']}",
                             f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", "-DUSE_CUDA", *dbg,
                             "-c", src, "-o", obj])
        objs.append(obj)
    so = os.path.join(out_dir, "libalterops_cuda.so")
    b.link(so, objs, [cxx, "-shared", *objs, "-o", so, f"-L{torch_lib}", f"-L{toolkit['lib']}", "-ltorch_cpu",
                      "-ltorch_cuda", "-lcudart", "-Wl,-z,defs", "-Wl,--as-needed", *strip])
    return so


def main(argv=None):
    import argparse

    sys.path.insert(0, os.path.join(ROOT, "alterops"))
    import _config  # noqa: E402

    opts = _config.build_options()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "alterops", "_lib"))
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    build(a.out, cpu_arch=opts["cpu_arch"], cuda=None if not (opts["force_cuda"] or opts["skip_cuda"]) else opts["force_cuda"],
          cuda_arch_list=opts["cuda_arch_list"], jobs=opts["build_jobs"], debug=opts["debug"], verbose=a.verbose)


if __name__ == "__main__":
    main()
