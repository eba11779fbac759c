"""Triton helpers shared by the attention kernels."""
import triton
import triton.language as tl


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
