"""The CPU kernels at every instruction-set level, and the code that runs before the choice.

The CPU kernels are compiled once per level (generic x86-64, AVX2+FMA, AVX-512) into separate
shared objects, and the level is chosen at run time. These tests check that

- the binding library, which runs before the choice (op registration, argument checks), and the
  generic kernels contain no instruction above baseline x86-64, and the AVX2 kernels none of
  AVX-512 (a disassembly audit: what would die with "Illegal instruction" on an older CPU);
- every level this CPU can execute passes the CPU test cases of every op family (re-run in a
  subprocess with ``ALTEROPS_CPU_ISA``; the level in use already ran them in this process).

The qemu tests (tests/test_qemu.py) run the installed build on emulated CPUs without AVX-512
and without AVX.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from alterops import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
OBJDUMP = shutil.which("objdump")
pytestmark = pytest.mark.skipif(not _ext.loaded(), reason=f"compiled kernels not loaded: {_ext.load_error()}")

# AVX and later: any VEX/EVEX-encoded instruction names a ymm/zmm register or is a v-prefixed
# SIMD instruction on xmm registers; AVX-512 also uses the opmask registers k0-k7.
AVX_RE = re.compile(r"%[yz]mm\d|\bv[a-z0-9]+\s.*%xmm\d|%k[0-7]\b")
AVX512_RE = re.compile(r"%zmm\d|%k[0-7]\b|\{%k[0-7]\}")
FAMILY_TESTS = ["test_blur.py", "test_statistics.py", "test_neighborhood_attention.py",
                "test_neighborhood_attention_nd_cpu.py", "test_na_unfused.py", "test_window_attention.py",
                "test_memory.py"]
# What depends on the level: the tests of the `cpu` backend (parametrised or named so, and the
# kernel-only module test_neighborhood_attention_nd_cpu.py) and the output pool the kernels write
# into; the reference backend's cases and the argument checks run the same code at every level.
LEVEL_SELECTION = "(cpu or test_memory) and not triton and not cuda and not compile"


def _disassembly(path: str) -> list[str]:
    out = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _offenders(path: str, pattern: re.Pattern) -> list[str]:
    func, bad = "?", []
    for line in _disassembly(path):
        if line.endswith(">:"):
            func = line.split("<", 1)[-1][:-2]
        elif pattern.search(line):
            bad.append(f"{func}: {line.strip()}")
    return bad


@pytest.mark.skipif(OBJDUMP is None, reason="objdump (binutils) not installed")
@pytest.mark.skipif("native" in _ext.built_isas(), reason="a -march=native build targets this machine only")
@pytest.mark.parametrize("name,pattern,level", [
    ("libalterops_cpu.so", AVX_RE, "baseline x86-64"),
    ("libalterops_kernels_generic.so", AVX_RE, "baseline x86-64"),
    ("libalterops_kernels_avx2.so", AVX512_RE, "AVX2"),
])
def test_no_instruction_above_the_objects_level(name, pattern, level):
    path = os.path.join(_ext.LIB_DIR, name)
    assert os.path.exists(path), f"{name} is not installed"
    bad = _offenders(path, pattern)
    assert not bad, f"{name} must run on any {level} CPU but has {len(bad)} instructions above it:\n" + \
        "\n".join(bad[:20])


@pytest.mark.skipif(OBJDUMP is None, reason="objdump (binutils) not installed")
@pytest.mark.skipif("native" in _ext.built_isas(), reason="a -march=native build targets this machine only")
def test_the_fast_levels_hold_their_simd_paths():
    """The AVX2 and AVX-512 objects really contain those paths (a flag lost in the build would
    leave three generic copies that pass every other test)."""
    avx2 = "\n".join(_disassembly(os.path.join(_ext.LIB_DIR, "libalterops_kernels_avx2.so")))
    avx512 = "\n".join(_disassembly(os.path.join(_ext.LIB_DIR, "libalterops_kernels_avx512.so")))
    assert "vfmadd" in avx2 and "%ymm" in avx2
    assert "%zmm" in avx512


@pytest.mark.slow
@pytest.mark.parametrize("level", _ext.ISAS)
def test_cpu_test_cases_pass_at_level(level):
    if level not in _ext.supported_isas():
        pytest.skip(f"this CPU cannot execute {level} code (the qemu tests cover lower levels)")
    if level not in _ext.built_isas():
        pytest.skip(f"{level} is not built here")
    if level == _ext.cpu_isa():
        pytest.skip(f"{level} is the level in use: this test run already executes it")
    if os.environ.get("ALTEROPS_CPU_ISA_SUBRUN"):
        pytest.skip("inside a per-level run")
    env = {**os.environ, "ALTEROPS_CPU_ISA": level, "ALTEROPS_CPU_ISA_SUBRUN": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly",
           "-k", LEVEL_SELECTION, *[os.path.join(HERE, f) for f in FAMILY_TESTS]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=HERE)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"CPU tests at ALTEROPS_CPU_ISA={level} failed:\n{tail}"
    assert re.search(r"\d+ passed", proc.stdout), tail
