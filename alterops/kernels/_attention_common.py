"""Triton helpers shared by the attention kernels."""
import math

import torch
import triton
import triton.language as tl


def nonfinite_passes(v: torch.Tensor):
    """``(flag, variants)`` for a forward launcher. ``flag`` (float32, one element on v's device)
    is the sum of v, which is finite unless v holds a NaN or inf (or the sum overflows, which
    only costs an IEEE pass that changes nothing): one reduction, where an any(isfinite) flag
    took four kernels. ``variants`` lists the values of the kernel's NONFINITE to launch, in
    order: the plain pass, then the IEEE pass, which returns at once when ``flag`` is finite
    (:func:`flag_clean`; no host sync on a GPU; under the interpreter the host reads the flag for
    free and skips it)."""
    flag = v.sum(dtype=torch.float32).reshape(1)
    variants = [False]
    if v.device.type != "cpu" or not math.isfinite(flag.item()):
        variants.append(True)
    return flag, variants


@triton.jit
def flag_clean(FLAG):
    """Whether the flag of :func:`nonfinite_passes` says v is finite (the IEEE pass returns)."""
    return tl.abs(tl.load(FLAG)) < float("inf")


@triton.jit
def nonfinite_values(p, v, ok):
    """What the non-finite entries of ``v`` add to ``p @ v`` over the allowed keys ``ok`` only,
    with IEEE products: NaN where an allowed key's value is NaN (or an inf meets weight 0),
    +-inf where +-inf meets a weight > 0 (their sum: NaN where +inf and -inf meet), 0 elsewhere.
    The caller computes the dot on ``where(finite, v, 0)``: a key outside a query's window (or
    its shift region) has p = 0 in the tile's dot, and must not give 0 * inf = NaN."""
    pos = (ok & (p > 0)).to(tl.float32)
    zero = (ok & (p == 0)).to(tl.float32)
    i_nan = (v != v).to(tl.float32)
    i_pinf = (v == float("inf")).to(tl.float32)
    i_ninf = (v == float("-inf")).to(tl.float32)
    c_nan = tl.dot(ok.to(tl.float32), i_nan, input_precision="ieee") + tl.dot(
        zero, i_pinf + i_ninf, input_precision="ieee")
    c_pinf = tl.dot(pos, i_pinf, input_precision="ieee")
    c_ninf = tl.dot(pos, i_ninf, input_precision="ieee")
    return (tl.where(c_nan > 0, float("nan"), 0.0) + tl.where(c_pinf > 0, float("inf"), 0.0)
            + tl.where(c_ninf > 0, float("-inf"), 0.0))
