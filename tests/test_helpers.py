"""The tests' own yardsticks can fail: a wrong result is caught even when the "naive" error that
scales the tolerance comes from an equally wrong computation."""
from __future__ import annotations

import pytest
import torch

from helpers import CAP, TOL, assert_close, assert_fused


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_wrong_naive_cannot_loosen_the_bar(dtype):
    ref = torch.linspace(-1, 1, 50, dtype=torch.float64)
    cap_atol, cap_rtol = CAP[dtype]
    wrong = ref + 2 * (cap_atol + cap_rtol)  # off by twice the ceiling
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close(wrong.to(dtype), ref, naive=wrong, factor=10.0)
    # a naive error below the ceiling does widen the bar (to factor x that error), past the floor
    atol, rtol = TOL[dtype]
    off = 0.5 * (cap_atol + cap_rtol)
    assert off > atol + rtol
    small = ref + off
    assert_close(small.to(dtype), ref, naive=small, factor=2.0)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close(small.to(dtype), ref)  # without it, the floor alone rejects the same error


def test_assert_fused_tells_the_paths_apart():
    import alterops as ao

    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    assert_fused(ao.box_blur2d(x, backend="reference"), "reference")
    with pytest.raises(AssertionError, match="did not run a fused kernel"):
        assert_fused(ao.box_blur2d(x, backend="reference"), "cpu")
