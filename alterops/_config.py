"""Every environment flag alterops reads, in one place.

This module imports nothing beyond the standard library, so ``setup.py`` can load it by path
before torch or alterops are importable. The README's "Environment flags" table mirrors it.

Build time (read by ``setup.py``):

``ALTEROPS_NO_EXTENSION=1``
    Install the pure-Python package only (no ``alterops._C``): the ``reference`` and
    ``triton`` backends still work. Also chosen automatically when no C++ compiler is found.
``ALTEROPS_FORCE_CUDA=1`` / ``ALTEROPS_SKIP_CUDA=1``
    Build the CUDA kernels even when torch was built without CUDA support visible at build
    time (fails if nvcc is missing), or never build them. Default: build them when torch is a
    CUDA build and ``nvcc`` is found. A visible GPU is never required.
``ALTEROPS_CUDA_ARCH_LIST``
    Architectures for nvcc, e.g. ``"8.0;9.0"`` (default), ``"8.0;8.6;8.9;9.0+PTX"``.
``ALTEROPS_BUILD_JOBS``
    Parallel compile jobs (default: the number of CPUs).
``ALTEROPS_CPU_ARCH``
    ``portable`` (default): the CPU kernels are compiled once per instruction-set level
    (generic x86-64, AVX2+FMA, AVX-512) and the level is chosen at run time, so the build runs
    on any x86-64 CPU. ``native``: one ``-march=native`` build for this machine only.
``ALTEROPS_BUILD_DEBUG=1``
    Keep debug info in the shared objects (they are stripped otherwise).

Run time:

``ALTEROPS_BACKEND``
    Default backend for every op: ``reference``, ``cpu``, ``triton``, ``cuda`` or ``auto``
    (default). ``alterops.set_backend`` and the ``backend=`` argument take precedence.
``ALTEROPS_DISABLE_EXTENSION=1``
    Do not load ``alterops._C`` even if it is built (behave like a pure-Python install).
``ALTEROPS_DISABLE_TRITON=1``
    Do not import Triton (behave like a machine without it).
``ALTEROPS_POISON_OUTPUTS=1``
    Fill freshly allocated kernel outputs with NaN before the kernel runs, so that an element a
    kernel forgets to write shows up in a test. Set by the test-suite; costs one extra pass.
``ALTEROPS_CPU_POOL_MB``
    Most MiB of freed CPU kernel outputs kept for reuse (default 1024; ``0`` turns the pool
    off). Outputs of 4 MiB and more come from this pool, so a training loop does not pay the
    page faults of fresh memory every step; ``alterops.empty_cache()`` returns the kept blocks.
``ALTEROPS_CPU_ISA``
    ``generic``, ``avx2`` or ``avx512``: run the CPU kernels of that instruction-set level
    (an error if this CPU cannot execute it). Default: the best level torch's own CPU
    capability query reports (so ``ATEN_CPU_CAPABILITY`` lowers it too).
``ALTEROPS_QUIET=1``
    Do not warn at import when the compiled kernels exist but cannot be loaded (``alterops
    info`` still says why).
``TRITON_INTERPRET=1``
    Triton's own flag: run Triton kernels on the CPU with its interpreter (slow; for tests).
"""
from __future__ import annotations

import os

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


# --- build time ---------------------------------------------------------------------------
def build_options() -> dict:
    """The build flags, as ``setup.py`` uses them."""
    jobs = _str("ALTEROPS_BUILD_JOBS", str(os.cpu_count() or 1))
    return {
        "no_extension": _flag("ALTEROPS_NO_EXTENSION"),
        "force_cuda": _flag("ALTEROPS_FORCE_CUDA"),
        "skip_cuda": _flag("ALTEROPS_SKIP_CUDA"),
        "cuda_arch_list": _str("ALTEROPS_CUDA_ARCH_LIST", "8.0;9.0"),
        "build_jobs": int(jobs),
        "cpu_arch": _str("ALTEROPS_CPU_ARCH", "portable"),
        "debug": _flag("ALTEROPS_BUILD_DEBUG"),
    }


# --- run time -----------------------------------------------------------------------------
def default_backend() -> str | None:
    """The backend named by ``ALTEROPS_BACKEND``; ``None`` means automatic selection."""
    value = _str("ALTEROPS_BACKEND", "auto").lower()
    if value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"ALTEROPS_BACKEND={value!r} is not a backend; expected one of "
            f"{('auto',) + BACKENDS}"
        )
    return value


CPU_ISAS = ("generic", "avx2", "avx512")


def cpu_isa_override() -> str | None:
    """The level ``ALTEROPS_CPU_ISA`` forces (``None``: choose automatically)."""
    value = _str("ALTEROPS_CPU_ISA", "").lower()
    if not value or value == "auto":
        return None
    if value not in CPU_ISAS:
        raise ValueError(f"ALTEROPS_CPU_ISA={value!r} is not a level; expected one of {CPU_ISAS} (or 'auto')")
    return value


def quiet() -> bool:
    return _flag("ALTEROPS_QUIET")


def extension_disabled() -> bool:
    return _flag("ALTEROPS_DISABLE_EXTENSION")


def triton_disabled() -> bool:
    return _flag("ALTEROPS_DISABLE_TRITON")


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET")


def poison_outputs() -> bool:
    return _flag("ALTEROPS_POISON_OUTPUTS")


def cpu_pool_limit_bytes() -> int:
    """``ALTEROPS_CPU_POOL_MB`` in bytes (default 1024 MiB)."""
    value = _str("ALTEROPS_CPU_POOL_MB", "1024")
    try:
        mb = int(value)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(f"ALTEROPS_CPU_POOL_MB must be a non-negative integer (MiB), got {value!r}")
    return mb << 20
