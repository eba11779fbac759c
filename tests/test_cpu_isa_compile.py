"""Every CPU kernel source compiles for each x86 instruction-set level it has a path for.

The CPU kernels pick their SIMD path when compiled (``-march``, default ``native``): AVX-512
(x86-64-v4), AVX2 + FMA (x86-64-v3) or the generic C++ (x86-64). A machine runs only the path
of its own CPU, so the others would otherwise go uncompiled until a user with that CPU builds
them. This checks (``-fsyntax-only``: parsing, template instantiation, intrinsic signatures) that
each source compiles at every level, whatever CPU runs the tests; the level the installed build
already compiled for this CPU is skipped. Skipped off x86-64 or without a C++ compiler.
"""
import glob
import os
from concurrent.futures import ThreadPoolExecutor
import platform
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
LEVELS = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "generic": "x86-64"}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction-set levels")
@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("level", list(LEVELS), ids=list(LEVELS))
def test_cpu_sources_compile_at_level(level):
    from alterops import _ext

    if level == _ext.host_cpu_simd() and os.environ.get("ALTEROPS_CPU_ARCH", "native") == "native":
        pytest.skip(f"{level} is this CPU's level: the installed extension was built for it")
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]

    def compile_one(source):
        cmd = [CXX, "-std=c++20", "-fsyntax-only", "-fopenmp", f"-march={LEVELS[level]}", "-Wall",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", *includes, source]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return source, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, SOURCES))
    failed = [f"{os.path.basename(src)}:\n{err[-3000:]}" for src, rc, err in results if rc != 0 or " error" in err]
    assert not failed, "\n".join(failed)
