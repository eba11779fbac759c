"""Loading the compiled extension ``alterops._C`` and asking what it provides."""
from __future__ import annotations

import torch

from . import _config

_loaded = False
_load_error = ""
_has_cuda = False
_cpu_simd = None

if _config.extension_disabled():
    _load_error = "the extension is disabled by ALTEROPS_DISABLE_EXTENSION=1"
else:
    try:
        from . import _C  # noqa: F401  (loading registers the torch.ops.alterops.* ops)

        _loaded = True
        _has_cuda = bool(getattr(_C, "WITH_CUDA", False))
        _cpu_simd = getattr(_C, "CPU_SIMD", None)
        if hasattr(torch.ops.alterops, "cpu_pool_set_limit"):
            torch.ops.alterops.cpu_pool_set_limit(_config.cpu_pool_limit_bytes())
    except ImportError as exc:
        _load_error = (
            f"the compiled extension alterops._C is not available ({exc}); reinstall with a C++ "
            "compiler present: `pip install --no-build-isolation -e .` "
            "(and without ALTEROPS_NO_EXTENSION=1)"
        )


def loaded() -> bool:
    return _loaded


def load_error() -> str:
    return _load_error


def has_cuda_kernels() -> bool:
    return _has_cuda


def cpu_simd() -> str | None:
    """The SIMD path the CPU kernels were compiled for: ``"avx512"``, ``"avx2"`` (AVX2 + FMA) or
    ``"generic"`` (``None`` without the extension)."""
    return _cpu_simd


def host_cpu_simd() -> str | None:
    """The best of those paths this machine's CPU can run (x86-64 Linux; ``None`` where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return None
    if not flags:
        return None
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "generic"


def has_op(name: str) -> bool:
    return _loaded and hasattr(torch.ops.alterops, name)


def missing_ops(names, cuda: bool = False) -> str | None:
    """Why the compiled ops ``names`` cannot be used (``None`` when they can)."""
    if not _loaded:
        return _load_error
    if cuda and not _has_cuda:
        return (
            "alterops._C was built without CUDA kernels; rebuild on a machine with a CUDA build "
            "of torch and nvcc (or set ALTEROPS_FORCE_CUDA=1)"
        )
    key = "CUDA" if cuda else "CPU"
    for name in names:
        if not hasattr(torch.ops.alterops, name):
            return f"alterops._C has no op {name!r}; rebuild the extension"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"alterops::{name}", key):
            return f"alterops._C has no {key} kernel for {name!r}; rebuild the extension"
    return None
