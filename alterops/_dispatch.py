"""Backend selection: ``backend=`` arguments, ``set_backend``, ``ALTEROPS_BACKEND``.

Every public op owns one :class:`OpBackends` table that says, per backend, which dtypes and
devices it handles and which compiled op it needs. ``select`` resolves a request to a backend
name or raises :class:`BackendUnavailableError` saying why the requested one cannot run and
how to get it. Automatic selection prefers fused backends and falls back to ``reference``.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from . import _config, _ext
from ._config import BACKENDS

__all__ = ["BackendUnavailableError", "set_backend", "get_backend", "OpBackends"]

_ENV_DEFAULT = _config.default_backend()
_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


def _check_name(name: str | None, what: str) -> str | None:
    if name is None or name == "auto":
        return None
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {('auto',) + BACKENDS} or None, got {name!r}")
    return name


@contextlib.contextmanager
def set_backend(name: str | None) -> Iterator[None]:
    """Use backend ``name`` for every op called inside the ``with`` block (this thread only).

    ``None`` or ``"auto"`` restores automatic selection. An explicit ``backend=`` argument of
    an op still wins.
    """
    name = _check_name(name, "set_backend(name)")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def get_backend() -> str | None:
    """The backend in force for this thread (``None``: automatic)."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _ENV_DEFAULT


# ---------------------------------------------------------------------------------------
# Availability of the backends' runtimes, each with the reason when missing.
# ---------------------------------------------------------------------------------------
_triton_state: tuple[bool, str] | None = None


def triton_status() -> tuple[bool, str]:
    """(importable, reason-if-not). Imports Triton at most once."""
    global _triton_state
    if _triton_state is None:
        if _config.triton_disabled():
            _triton_state = (False, "Triton is disabled by ALTEROPS_DISABLE_TRITON=1")
        else:
            try:
                import triton  # noqa: F401

                _triton_state = (True, "")
            except Exception as exc:  # ImportError, or a broken install
                _triton_state = (
                    False,
                    f"Triton is not importable ({type(exc).__name__}: {exc}); "
                    "install it with `pip install triton` (Linux)",
                )
    return _triton_state


def _triton_device_reason(device: torch.device) -> str | None:
    ok, why = triton_status()
    if not ok:
        return why
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _config.triton_interpret():
            return None
        return (
            "Triton kernels need a CUDA device; on the CPU they run only under its interpreter "
            "(set TRITON_INTERPRET=1 before importing alterops; slow, meant for tests)"
        )
    return f"Triton kernels do not run on device type {device.type!r}"


# ---------------------------------------------------------------------------------------
# Per-op tables
# ---------------------------------------------------------------------------------------
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Backend:
    """What one backend of one op handles.

    ``ops``: names of the compiled ``torch.ops.alterops`` ops it needs (``cpu``/``cuda``).
    """

    dtypes: tuple = _FLOATS
    ops: tuple = ()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# The attention ops' GPU order (the issue's rule: Triton first until a GPU run shows the CUDA C++
# kernels faster on the bench shapes). The first GPU run (bench/results/nvidia-h200) timed the
# neighbourhood kernels: Triton's take less GPU time, the CUDA C++ path less host time.
ATTENTION_GPU_ORDER = ("on CUDA devices Triton before the CUDA C++ kernels: on an H200 Triton's neighbourhood "
                       "attention kernels take less GPU time (bench/results/nvidia-h200; window attention not timed "
                       "there yet); at small shapes, where a call is bound by its host side, backend='cuda' is "
                       "faster end to end (bench/gpu_run.sh times both)")


@dataclass
class OpBackends:
    """The backends of one public op and how ``auto`` orders them per device type."""

    op: str
    backends: dict = field(default_factory=dict)
    auto_cuda: tuple = ("cuda", "triton", "reference")
    auto_cpu: tuple = ("cpu", "reference")
    # Why the ``auto`` order is what it is (``alterops info`` prints it), when it is not obvious.
    auto_why: str = ""

    def why_not(self, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """``None`` if ``backend`` can run this op on (device, dtype), else the reason."""
        spec = self.backends.get(backend)
        if spec is None:
            return f"{self.op} has no {backend!r} backend (it has {sorted(self.backends)})"
        if backend == "cpu":
            if device.type != "cpu":
                return f"the 'cpu' backend needs CPU tensors, got device {device}"
            reason = _ext.missing_ops(spec.ops)
            if reason:
                return reason
        elif backend == "cuda":
            if device.type != "cuda":
                return f"the 'cuda' backend needs CUDA tensors, got device {device}"
            reason = _ext.missing_ops(spec.ops, cuda=True)
            if reason:
                return reason
        elif backend == "triton":
            reason = _triton_device_reason(device)
            if reason:
                return reason
        if dtype not in spec.dtypes:
            names = ", ".join(_dtype_name(d) for d in spec.dtypes)
            return f"the {backend!r} backend of {self.op} supports {names}, not {_dtype_name(dtype)}"
        return None

    def select(self, requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
        """The backend to run: ``requested`` if given and able, else the one in force
        (``set_backend`` / ``ALTEROPS_BACKEND``), else the first able one in the ``auto`` order.

        Under ``torch.compile`` the choice is made once at trace time: it depends only on the
        process (what is installed and built), the request, the backend in force (read here, so
        dynamo guards on it), the device and the dtype.
        """
        return _select_constant(self.op, _check_name(requested, "backend"), get_backend(), device, dtype)

    def _select(self, requested: str | None, in_force: str | None, device: torch.device, dtype: torch.dtype) -> str:
        if requested is None:
            requested = in_force
        if requested is not None:
            reason = self.why_not(requested, device, dtype)
            if reason is not None:
                raise BackendUnavailableError(
                    f"{self.op}: backend {requested!r} cannot run here: {reason}"
                )
            return requested
        order = self.auto_cuda if device.type == "cuda" else self.auto_cpu
        for name in order:
            if self.why_not(name, device, dtype) is None:
                return name
        return "reference"

    def report(self, device: torch.device, dtypes: Iterable[torch.dtype]) -> dict:
        """{backend: {dtype: reason or None}} for ``alterops info``."""
        return {
            b: {_dtype_name(d): self.why_not(b, device, d) for d in dtypes}
            for b in self.backends
        }


_REGISTRY: dict[str, OpBackends] = {}


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` when
    alterops is imported (that import pulls in Triton, which a pure-CPU user may not have).
    ``tests/test_package.py`` checks that this is what torch's decorator does."""
    fn._dynamo_marked_constant = True
    return fn


# Backends chosen so far, by (op, requested, in force, device, dtype, TRITON_INTERPRET): what can run
# is fixed once the kernels are loaded at import, and the checks (dispatcher lookups, Triton's
# status) took 10-20 us of every call. Only choices are kept: a request that cannot be met raises
# again each time.
_SELECTED: dict = {}


@_assume_constant_result
def _select_constant(op: str, requested: str | None, in_force: str | None, device: torch.device,
                     dtype: torch.dtype) -> str:
    # Availability checks call into the dispatcher and import Triton: not traceable, and
    # constant for the life of the process, so dynamo treats the result as a constant.
    key = (op, requested, in_force, device, dtype, _config.triton_interpret())
    name = _SELECTED.get(key)
    if name is None:
        name = _SELECTED[key] = _REGISTRY[op]._select(requested, in_force, device, dtype)
    return name


def register(table: OpBackends) -> OpBackends:
    _REGISTRY[table.op] = table
    return table


def registry() -> dict[str, OpBackends]:
    return dict(_REGISTRY)
