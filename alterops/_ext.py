"""Loading alterops' compiled kernels and asking what they provide.

The compiled part is a set of plain shared objects in ``alterops/_lib`` (no Python C API), loaded
with ``torch.ops.load_library``:

``libalterops_cpu.so``
    The CPU bindings (LibTorch stable ABI, baseline x86-64 code). Loading it registers the
    ``torch.ops.alterops.*`` ops; it runs no kernel code by itself.
``libalterops_kernels_<level>.so``
    The CPU kernels compiled for one instruction-set level: ``generic``, ``avx2`` (AVX2+FMA) or
    ``avx512`` (F/BW/VL/DQ). One level is loaded: ``ALTEROPS_CPU_ISA`` if set (an error if this
    CPU cannot run it), else the best level torch's CPU capability reports (so
    ``ATEN_CPU_CAPABILITY`` lowers it too) that was built.
``libalterops_cuda.so``
    The CUDA kernels, loaded when torch is a CUDA build.

When a compiled part exists but cannot be loaded, ``import alterops`` warns once with the cause
and the fix (``ALTEROPS_QUIET=1`` silences it; ``alterops info`` shows it), and the
``reference`` (and ``triton``) backends keep working.
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

from . import _config

LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib")
CPU_LIB = "libalterops_cpu.so"
CUDA_LIB = "libalterops_cuda.so"
ISAS = _config.CPU_ISAS  # lowest to highest

_loaded = False
_load_error = ""
_has_cuda = False
_cuda_error = ""
_cpu_isa: str | None = None
_cpu_march = ""
_isa_note = ""


def _reinstall_hint() -> str:
    return ("reinstall alterops for this torch and CPU (`pip install --force-reinstall alterops`, or from "
            "source: `pip install --no-build-isolation -e .`)")


def _warn(message: str) -> None:
    if not _config.quiet():
        warnings.warn(f"alterops: {message} (set ALTEROPS_QUIET=1 to silence this)", RuntimeWarning, stacklevel=3)


def kernel_path(level: str) -> str:
    return os.path.join(LIB_DIR, f"libalterops_kernels_{level}.so")


def built_isas() -> list[str]:
    """The kernel levels present in this install (``native`` for a ``-march=native`` build)."""
    found = []
    for level in ISAS + ("native",):
        if os.path.exists(kernel_path(level)):
            found.append(level)
    return found


def torch_cpu_capability() -> str:
    """torch's own CPU capability (``DEFAULT``, ``AVX2``, ``AVX512``, ...): honours ATEN_CPU_CAPABILITY."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch or a non-x86 build
        return "DEFAULT"


def supported_isas() -> list[str]:
    """The levels this CPU can execute (asked of the CPU itself, via cpuid)."""
    if not _loaded:
        return []
    return [level for level in ISAS if torch.ops.alterops._cpu_isa_supported(level)]


def _preferred_isa() -> str:
    cap = torch_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "avx512"
    if cap.startswith("AVX2"):
        return "avx2"
    return "generic"


def set_cpu_isa(level: str | None) -> str:
    """Loads the CPU kernels of ``level`` (``None``: the automatic choice) for every later call.

    Raises ``ValueError`` for an unknown level and ``RuntimeError`` when this CPU cannot execute
    it or it was not built. Returns the level now in use.
    """
    global _cpu_isa, _cpu_march, _isa_note
    if not _loaded:
        raise RuntimeError(f"the CPU kernels are not available: {_load_error}")
    built = built_isas()
    if "native" in built:  # a -march=native source build holds one level
        if level not in (None, "native"):
            raise RuntimeError(f"this install was built with ALTEROPS_CPU_ARCH=native and holds only that build; "
                               f"ALTEROPS_CPU_ISA={level} needs the default portable build")
        isa = torch.ops.alterops._cpu_load_kernels(kernel_path("native"))
        _cpu_isa, _cpu_march = str(isa), str(torch.ops.alterops._cpu_loaded_kernels()[1])
        _isa_note = "built with -march=native"
        return _cpu_isa
    if level is not None:
        if level not in ISAS:
            raise ValueError(f"ALTEROPS_CPU_ISA must be one of {ISAS}, got {level!r}")
        if not torch.ops.alterops._cpu_isa_supported(level):
            raise RuntimeError(f"ALTEROPS_CPU_ISA={level}: this CPU cannot execute {level} code "
                               f"(it supports {', '.join(supported_isas())})")
        if level not in built:
            raise RuntimeError(f"ALTEROPS_CPU_ISA={level}: {os.path.basename(kernel_path(level))} is not installed")
        chosen, note = level, "forced by ALTEROPS_CPU_ISA" if _config.cpu_isa_override() == level else "set_cpu_isa"
    else:
        preferred = _preferred_isa()
        candidates = [lv for lv in ISAS[: ISAS.index(preferred) + 1] if lv in built
                      and torch.ops.alterops._cpu_isa_supported(lv)]
        if not candidates:
            raise RuntimeError(f"no CPU kernel level that this CPU can run is installed (found {built})")
        chosen = candidates[-1]
        note = f"torch CPU capability {torch_cpu_capability()}"
    _cpu_isa = str(torch.ops.alterops._cpu_load_kernels(kernel_path(chosen)))
    _cpu_march = str(torch.ops.alterops._cpu_loaded_kernels()[1])
    _isa_note = note
    return _cpu_isa


def _load() -> None:
    global _loaded, _load_error, _has_cuda, _cuda_error
    if _config.extension_disabled():
        _load_error = "the compiled kernels are disabled by ALTEROPS_DISABLE_EXTENSION=1"
        return
    cpu_lib = os.path.join(LIB_DIR, CPU_LIB)
    if not os.path.exists(cpu_lib):
        _load_error = ("the compiled kernels are not installed (alterops/_lib is empty: a pure-Python install, "
                       "ALTEROPS_NO_EXTENSION=1 or no C++ compiler at build time); install the wheel or "
                       "rebuild with `pip install --no-build-isolation -e .`")
        return
    try:
        torch.ops.load_library(cpu_lib)
    except Exception as exc:  # wrong torch, corrupt file, missing symbol: say so once, keep going
        cause = getattr(exc, "__cause__", None) or exc
        _load_error = (f"the compiled CPU kernels could not be loaded ({cause}); they need torch >= 2.11 on "
                       f"x86-64 Linux (this is torch {torch.__version__}); {_reinstall_hint()}")
        _warn(_load_error + "; falling back to the reference backend")
        return
    _loaded = True
    try:
        set_cpu_isa(_config.cpu_isa_override())
    except (RuntimeError, ValueError) as exc:
        if _config.cpu_isa_override() is not None:
            raise  # an explicit request that cannot be met is the caller's error, not a warning
        _loaded = False
        _load_error = f"no CPU kernel level could be loaded ({exc}); {_reinstall_hint()}"
        _warn(_load_error)
        return
    torch.ops.alterops.cpu_pool_set_limit(_config.cpu_pool_limit_bytes())
    if torch.version.cuda is None:
        _cuda_error = "torch is a CPU-only build"
        return
    cuda_lib = os.path.join(LIB_DIR, CUDA_LIB)
    if not os.path.exists(cuda_lib):
        _cuda_error = ("this install has no CUDA kernels (built without nvcc or a CUDA build of torch); rebuild "
                       "on a machine with both: `pip install --no-build-isolation -e .`")
        return
    try:
        torch.ops.load_library(cuda_lib)
        _has_cuda = True
    except Exception as exc:
        cause = getattr(exc, "__cause__", None) or exc
        _cuda_error = (f"the CUDA kernels could not be loaded ({cause}); torch's CUDA major must match the one "
                       f"they were built with (torch has CUDA {torch.version.cuda}); {_reinstall_hint()}")
        _warn(_cuda_error)


_load()


def loaded() -> bool:
    return _loaded


def load_error() -> str:
    return _load_error


def has_cuda_kernels() -> bool:
    return _has_cuda


def cuda_error() -> str:
    return _cuda_error


def cpu_isa() -> str | None:
    """The instruction-set level of the CPU kernels in use: ``"generic"``, ``"avx2"`` or
    ``"avx512"`` (``None`` without the compiled kernels)."""
    return _cpu_isa if _loaded else None


def cpu_isa_info() -> dict:
    """What ``alterops info`` reports about the CPU kernel levels."""
    return {
        "in_use": cpu_isa(),
        "why": _isa_note,
        "flags": _cpu_march,
        "built": built_isas(),
        "cpu_supports": supported_isas(),
        "torch_capability": torch_cpu_capability(),
    }


def has_op(name: str) -> bool:
    return _loaded and hasattr(torch.ops.alterops, name)


def missing_ops(names, cuda: bool = False) -> str | None:
    """Why the compiled ops ``names`` cannot be used (``None`` when they can)."""
    if not _loaded:
        return _load_error
    if cuda and not _has_cuda:
        return _cuda_error or "the CUDA kernels are not loaded"
    key = "CUDA" if cuda else "CPU"
    for name in names:
        if not hasattr(torch.ops.alterops, name):
            return f"the compiled kernels have no op {name!r}; {_reinstall_hint()}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"alterops::{name}", key):
            return f"the compiled kernels have no {key} kernel for {name!r}; {_reinstall_hint()}"
    return None


def lib_files() -> list[str]:
    return sorted(glob.glob(os.path.join(LIB_DIR, "*.so")))
