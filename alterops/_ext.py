"""Loading the compiled extension ``alterops._C`` and asking what it provides."""
from __future__ import annotations

import torch

from . import _config

_loaded = False
_load_error = ""
_has_cuda = False

if _config.extension_disabled():
    _load_error = "the extension is disabled by ALTEROPS_DISABLE_EXTENSION=1"
else:
    try:
        from . import _C  # noqa: F401  (loading registers the torch.ops.alterops.* ops)

        _loaded = True
        _has_cuda = bool(getattr(_C, "WITH_CUDA", False))
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
