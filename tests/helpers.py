"""Shared test utilities: which backends to test, and the error rule for comparisons."""
from __future__ import annotations

import pytest
import torch

import alterops._dispatch as dispatch

FUSED = ("cpu", "triton", "cuda")

# dtype -> (atol, rtol) floors used on top of the "twice the naive error" rule.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

# dtype -> (atol, rtol) ceilings: however large the naive error is measured to be (it comes from
# the library's own reference, which could itself be wrong), the allowed error never exceeds these.
CAP = {
    torch.float64: (1e-8, 1e-8),
    torch.float32: (5e-4, 5e-4),
    torch.bfloat16: (1e-1, 5e-2),
    torch.float16: (2e-2, 1e-2),
}


def device_for(backend: str) -> torch.device:
    """Where a backend's tests run on this machine (Triton: CUDA if present, else interpreter)."""
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def skip_unless(op: str, backend: str, dtype: torch.dtype, device: torch.device | None = None) -> torch.device:
    """Skip the test (saying why) unless ``backend`` runs ``op`` for ``dtype``; return its device.

    CPU and Triton-interpreter backends never skip on a machine where the package is built as
    the README says: ``tests/test_package.py`` fails if the extension or Triton is missing.
    """
    device = device or device_for(backend)
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    table = dispatch.registry()[op]
    reason = table.why_not(backend, device, dtype)
    if reason is not None:
        pytest.skip(reason)
    return device


def assert_close(out: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor | None = None, *, factor: float = 2.0, name: str = "output") -> None:
    """``out`` against a float64 reference.

    The allowed error is ``factor`` times the error of ``naive`` (the same math done plainly in
    the input dtype) when given, never below the dtype's floor from ``TOL`` and never above its
    ceiling from ``CAP``: a wrong ``naive`` cannot loosen the bar past a fixed limit.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype != torch.float64 or ref64.dtype == torch.float64
    o = out.detach().double().cpu()
    r = ref64.detach().double().cpu()
    assert torch.isfinite(o).all() == torch.isfinite(r).all(), f"{name}: non-finite values (unwritten output?)"
    atol, rtol = TOL.get(out.dtype, (1e-5, 1e-5))
    err = (o - r).abs().max().item() if o.numel() else 0.0
    bound = atol + rtol * (r.abs().max().item() if r.numel() else 0.0)
    if naive is not None and naive.numel():
        naive_err = (naive.detach().double().cpu() - r).abs().max().item()
        cap_atol, cap_rtol = CAP.get(out.dtype, (1e-3, 1e-3))
        cap = cap_atol + cap_rtol * (r.abs().max().item() if r.numel() else 0.0)
        bound = max(bound, min(factor * naive_err, cap))
    assert err <= bound, f"{name}: max abs error {err:.3e} > allowed {bound:.3e} ({out.dtype})"


def assert_fused(out: torch.Tensor, backend: str) -> None:
    """``out`` came from one of alterops' fused autograd Functions unless ``backend`` is the
    reference (which is plain PyTorch): a fused backend must not quietly fall back."""
    node, fn = out.grad_fn, None
    for _ in range(4):  # through the views (reshapes) a public function puts on the kernel's output
        if node is None:
            break
        fn = getattr(node, "_forward_cls", None)
        if fn is not None or type(node).__name__ not in ("ViewBackward0", "UnsafeViewBackward0", "AliasBackward0"):
            break
        node = node.next_functions[0][0] if node.next_functions else None
    fused = fn is not None and fn.__module__.startswith("alterops")
    if backend == "reference":
        assert not fused, f"the reference backend ran {fn.__name__}"
    else:
        assert fused, f"backend {backend!r} did not run a fused kernel (grad_fn {out.grad_fn})"


def interpreted(backend: str) -> bool:
    """True when ``backend`` runs under the Triton interpreter (no GPU): such runs are ~1000x
    slower, so some tests keep them to a subset; on a GPU every case runs."""
    return backend == "triton" and device_for(backend).type == "cpu"
