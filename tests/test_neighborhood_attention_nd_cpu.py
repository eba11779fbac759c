"""The fused N-d neighbourhood attention CPU ops (``alterops::neighborhood_attention_nd_fwd`` /
``_bwd``) against the float64 brute force of tests/na_brute_force.py: every query's window built
from the per-axis rule (NATTEN's "clamp" with stride, causal windows and even kernels; centred
"mask" and "zero"), its logits, softmax, output and logsumexp, and the gradients (dq, dk, dv,
dbias, with a non-zero dlse) taken by autograd through it.
"""
from __future__ import annotations


import pytest
import torch

import alterops  # noqa: F401  (loads the ops)
from alterops import _ext
from na_brute_force import brute_force as shared_brute_force

pytestmark = pytest.mark.skipif(not _ext.has_op("neighborhood_attention_nd_fwd"),
                                reason="alterops CPU kernels not built")


def brute_force(q, k, v, ks, dil, st, causal, border, bias, scale):
    """out (B, T, H, W, heads, D) and lse (B, heads, T, H, W) of the shared float64 brute force."""
    out, lse = shared_brute_force(q, k, v, ks, dil, st, causal, border, table=bias, scale=scale)
    return out, lse.permute(0, 4, 1, 2, 3)


def make_inputs(spatial, heads, heads_kv, D, dtype, layout, seed=0):
    """q, k, v as views of one fused tensor ("fused"), with every other channel ("channel
    stride"), with each head's tokens contiguous ("head major"), or contiguous."""
    g = torch.Generator().manual_seed(seed)
    B = 2
    if layout == "fused":
        base = torch.randn(B, *spatial, heads + 2 * heads_kv, D, generator=g, dtype=torch.float64).to(dtype)
        return base[..., :heads, :], base[..., heads:heads + heads_kv, :], base[..., heads + heads_kv:, :]
    if layout == "channel stride":
        mk = lambda h: torch.randn(B, *spatial, h, 2 * D, generator=g, dtype=torch.float64).to(dtype)[..., ::2]
        return mk(heads), mk(heads_kv), mk(heads_kv)
    if layout == "head major":
        mk = lambda h: torch.randn(B, h, *spatial, D, generator=g, dtype=torch.float64).to(dtype).movedim(1, -2)
        return mk(heads), mk(heads_kv), mk(heads_kv)
    mk = lambda h: torch.randn(B, *spatial, h, D, generator=g, dtype=torch.float64).to(dtype)
    return mk(heads), mk(heads_kv), mk(heads_kv)


def run_fused(q, k, v, ks, dil, st, causal, border, bias, scale, dout, dlse):
    fwd = torch.ops.alterops.neighborhood_attention_nd_fwd
    bwd = torch.ops.alterops.neighborhood_attention_nd_bwd
    c = [int(x) for x in causal]
    out, lse = fwd(q, k, v, list(ks), list(dil), list(st), c, border, bias, scale)
    grads = bwd(dout, q, k, v, out, lse, dlse, list(ks), list(dil), list(st), c, border, bias, scale,
                bias is not None)
    return out, lse, grads


# (spatial (T, H, W), kernel, dilation, stride, causal, border, heads, heads_kv, bias heads, D, layout)
CASES = [
    # 1-D
    ((1, 1, 41), (1, 1, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 4, 4, 16, "fused"),
    ((1, 1, 37), (1, 1, 6), (1, 1, 2), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 1, 16, "contiguous"),
    ((1, 1, 29), (1, 1, 7), (1, 1, 1), (1, 1, 3), (0, 0, 0), "clamp", 4, 1, 0, 16, "fused"),
    ((1, 1, 39), (1, 1, 5), (1, 1, 2), (1, 1, 1), (0, 0, 1), "clamp", 4, 2, 4, 16, "channel stride"),
    ((1, 1, 27), (1, 1, 6), (1, 1, 1), (1, 1, 2), (0, 0, 1), "clamp", 4, 4, 0, 16, "fused"),
    ((1, 1, 35), (1, 1, 7), (1, 1, 2), (1, 1, 1), (0, 0, 0), "mask", 4, 2, 4, 16, "fused"),
    ((1, 1, 33), (1, 1, 4), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 4, 1, 1, 16, "fused"),
    # 2-D
    ((1, 5, 34), (1, 3, 5), (1, 1, 2), (1, 1, 1), (0, 0, 0), "clamp", 4, 4, 4, 16, "fused"),
    ((1, 8, 10), (1, 4, 3), (1, 1, 1), (1, 2, 3), (0, 1, 0), "clamp", 4, 2, 1, 8, "fused"),
    ((1, 6, 9), (1, 3, 3), (1, 1, 2), (1, 1, 1), (0, 0, 0), "mask", 4, 2, 1, 8, "channel stride"),
    ((1, 4, 26), (1, 3, 4), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 4, 1, 4, 16, "fused"),
    # "zero" / "mask" backward on key rows with zero margins: dilated windows reaching past both
    # ends, a last slot block partly past the row; maps narrower than the window
    ((1, 7, 37), (1, 3, 5), (1, 2, 3), (1, 1, 1), (0, 0, 0), "zero", 4, 2, 4, 16, "fused"),
    ((1, 4, 5), (1, 5, 7), (1, 1, 2), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 2, 8, "channel stride"),
    ((1, 6, 35), (1, 3, 5), (1, 2, 3), (1, 1, 1), (0, 0, 0), "mask", 4, 4, 4, 16, "fused"),
    ((1, 5, 6), (1, 3, 9), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 1, 0, 8, "contiguous"),
    # 3-D
    ((3, 3, 24), (3, 2, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "fused"),
    ((4, 3, 10), (2, 3, 4), (1, 1, 2), (1, 1, 2), (1, 0, 1), "clamp", 4, 4, 1, 8, "fused"),
    ((4, 3, 7), (2, 3, 3), (2, 1, 1), (2, 3, 1), (0, 1, 0), "clamp", 4, 1, 4, 8, "contiguous"),
    ((3, 4, 6), (3, 2, 3), (1, 2, 1), (1, 1, 1), (0, 0, 0), "mask", 4, 2, 4, 8, "fused"),
    ((3, 3, 7), (2, 3, 3), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 4, 4, 1, 8, "fused"),
]


# The band routes (the 1-D forward's interior band and border slots' band, the band backward) are
# AVX2/AVX-512 code; the generic build takes its general routes for these cases, and the other
# tests here run those at every width. So at the generic level (the per-level rerun of this file in
# test_isa_levels.py) the band tests run each case at one of their widths, in turn.
GENERIC_LEVEL = _ext.cpu_isa() == "generic"


def in_turn(cases, widths):
    """Each case at one of the widths, in turn."""
    return [(c, widths[i % len(widths)]) for i, c in enumerate(cases)]


def band_runs(cases, widths):
    return in_turn(cases, widths) if GENERIC_LEVEL else [(c, D) for D in widths for c in cases]


def width_ids(runs):
    return [f"{D}-{case_id(c)}" for c, D in runs]


def case_id(c):
    sp, ks, dil, st, ca, border, heads, hkv, nb, D, layout = c
    dims = "x".join(str(s) for s in sp)
    return (f"{dims}-k{''.join(map(str, ks))}-d{''.join(map(str, dil))}-s{''.join(map(str, st))}"
            f"-c{''.join(map(str, ca))}-{border}-kv{hkv}-b{nb}-{layout.replace(' ', '')}")


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def check_case(case, dtype, D=None, seed=0, dout_layout="dense"):
    sp, ks, dil, st, causal, border, heads, hkv, nb, d0, layout = case
    D = D or d0
    q, k, v = make_inputs(sp, heads, hkv, D, dtype, layout, seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 1)
    bias = None
    if nb:
        bias = torch.randn(nb, 2 * ks[0] - 1, 2 * ks[1] - 1, 2 * ks[2] - 1, generator=g, dtype=torch.float64)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    if dout_layout == "channels expanded":  # one value per token and head, stride 0 along head_dim
        dout = dout[..., :1]
    elif dout_layout == "all expanded":  # the gradient of out.sum()
        dout = torch.ones((1,) * q.dim(), dtype=torch.float64)
    dlse = torch.randn(q.shape[0], heads, *sp, generator=g, dtype=torch.float64)
    scale = D ** -0.5
    dout_in = dout.to(dtype).expand(q.shape)  # (expanded after the cast, which would copy it)
    dout = dout.expand(q.shape)
    if dout_layout == "channel stride 3":  # every third element of a wider buffer
        dout_in = torch.zeros(*q.shape[:-1], 3 * D, dtype=dtype)[..., ::3]
        dout_in.copy_(dout)
    assert dout_layout == "dense" or dout_in.stride(-1) != 1
    out, lse, (dq, dk, dv, dbias) = run_fused(
        q, k, v, ks, dil, st, causal, border, None if bias is None else bias.to(acc), scale,
        dout_in, dlse.to(acc))

    # the brute force on the same (rounded) inputs, in float64
    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    b64 = None if bias is None else bias.to(acc).to(torch.float64).requires_grad_()
    r_out, r_lse = brute_force(q64, k64, v64, ks, dil, st, causal, border, b64, scale)
    leaves = [q64, k64, v64] + ([b64] if b64 is not None else [])
    r_grads = torch.autograd.grad((r_out * dout.to(dtype).to(torch.float64)).sum()
                                  + (r_lse * dlse.to(acc).to(torch.float64)).sum(), leaves)

    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (q.shape[0], heads, *sp) and lse.dtype == acc
    assert dk.shape == k.shape and dv.shape == v.shape and dq.dtype == dtype
    tol = TOL[dtype]
    got = [out, lse, dq, dk, dv] + ([dbias] if bias is not None else [])
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    for name, a, b in zip(names, got, [r_out, r_lse, *r_grads]):
        err = (a.to(torch.float64) - b).abs().max().item()
        size = max(b.abs().max().item(), 1.0)
        assert err <= tol * size, f"{name}: max error {err:.3g} (scale {size:.3g})"
    if bias is None:
        assert dbias.shape == (0,)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64(case):
    check_case(case, torch.float64)


# float32 at a width of the dedicated forward (16), a width outside it (20) and one with two
# vectors per head on AVX-512 (32); bfloat16 and float16 at a fast width and another.
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 3, 4, 7, 10, 11, 12)], ids=case_id)
@pytest.mark.parametrize("dtype,D", [(torch.float32, 16), (torch.float32, 20), (torch.float32, 32),
                                     (torch.bfloat16, 16), (torch.bfloat16, 12), (torch.float16, 32),
                                     (torch.float16, 12)], ids=str)
def test_float32_16bit(case, dtype, D):
    check_case(case, dtype, D=D)


# 1-D windows wider than a vector of queries (kw > 16): the float32 forward forms the logits of
# adjacent query blocks together (one key vector for every block whose window holds it), over
# rows longer than one segment of query slots (128), with causal, even and border variants.
# Without a bias table (and up to kw = 93 on AVX-512) the interior blocks take the band
# logits instead (4 queries against 2-6 key vectors, a query-major softmax and P.V), the others
# the shifted-key blocks. Rows of more than 256 query slots on the band route are split into
# column chunks (one task per batch, chunk and head, heads innermost): the rows of 530 to 1100
# below, with several key/value heads so that consecutive tasks read different keys.
WIDE_1D = [
    ((1, 1, 700), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 1, 1100), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 4, 0, 16, "contiguous"),
    ((1, 1, 1100), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 4, 2, 0, 16, "contiguous"),
    ((1, 1, 613), (1, 1, 40), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 0, 16, "fused"),
    ((1, 1, 530), (1, 1, 93), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "contiguous"),
    ((1, 1, 300), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 1, 0, 16, "fused"),
    ((1, 1, 300), (1, 1, 93), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "contiguous"),
    ((1, 1, 201), (1, 1, 40), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 0, 16, "fused"),
    ((1, 1, 300), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 1, 2, 16, "fused"),
    ((1, 1, 181), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 2, 2, 0, 16, "contiguous"),
    ((1, 1, 90), (1, 1, 17), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 1, 1, 16, "fused"),
    ((1, 1, 150), (1, 1, 40), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 2, 16, "fused"),
    ((1, 1, 267), (1, 1, 129), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 1, 16, "fused"),
    # strided windows: nearly every slot a border slot through the band, the adjacent queries of a
    # stride group together, over rows of several column chunks (each packing its own bands' keys)
    ((1, 1, 1100), (1, 1, 33), (1, 1, 1), (1, 1, 2), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 1, 700), (1, 1, 65), (1, 1, 1), (1, 1, 4), (0, 0, 0), "clamp", 2, 2, 2, 16, "contiguous"),
    ((1, 1, 613), (1, 1, 40), (1, 1, 1), (1, 1, 40), (0, 0, 0), "clamp", 2, 1, 1, 16, "head major"),
    ((1, 1, 530), (1, 1, 17), (1, 1, 1), (1, 1, 3), (0, 0, 0), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 1, 300), (1, 1, 93), (1, 1, 1), (1, 1, 7), (0, 0, 0), "clamp", 2, 2, 2, 16, "fused"),
]


WIDE_1D_RUNS = band_runs(WIDE_1D, (16, 32, 64))


@pytest.mark.parametrize("case,D", WIDE_1D_RUNS, ids=width_ids(WIDE_1D_RUNS))
def test_wide_window_1d_float32(case, D):
    check_case(case, torch.float32, D=D)


# 2-D and 3-D maps whose rows are longer than a segment (128 query slots): the float32 forward packs
# each key row's columns as the segments reach them, for every key row of a row group. Then 1-D
# rows of several column chunks off the band route (kernels up to 16, dilation, bias tables,
# causal windows, "mask" borders), with several key/value heads.
LONG_ROWS = [
    ((1, 6, 150), (1, 3, 7), (1, 2, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 1, 2, 16, "fused"),
    ((3, 4, 140), (2, 3, 5), (1, 1, 2), (1, 1, 1), (1, 0, 0), "clamp", 2, 2, 1, 16, "contiguous"),
    ((1, 5, 133), (1, 3, 21), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 1, 0, 16, "fused"),
    ((1, 1, 700), (1, 1, 13), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 1, 900), (1, 1, 33), (1, 1, 2), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "contiguous"),
    ((1, 1, 650), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "fused"),
    ((1, 1, 800), (1, 1, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 2, 1, 16, "fused"),
    ((1, 1, 777), (1, 1, 10), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 4, 2, 0, 16, "contiguous"),
]


@pytest.mark.parametrize("case", LONG_ROWS, ids=case_id)
@pytest.mark.parametrize("D", [16, 32], ids=str)
def test_long_rows_float32(case, D):
    check_case(case, torch.float32, D=D)


# Maps with many query rows: the float32 backward takes the query rows in groups (3 with AVX2, 5
# with AVX-512) whose logits, dP and dQ read each shared key row once; these cases hold several
# groups, a last partial group, row chunks of a pair split across tasks (fewer than 16 (batch,
# head) pairs), and key rows read by every row of a group and by one only.
TALL = [
    ((1, 23, 19), (1, 7, 5), (1, 2, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "fused"),
    ((1, 29, 21), (1, 7, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 1, 16, "contiguous"),
    ((1, 17, 22), (1, 6, 3), (1, 1, 1), (1, 2, 1), (0, 1, 0), "clamp", 4, 4, 0, 16, "fused"),
    ((1, 19, 20), (1, 5, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 4, 1, 4, 16, "channel stride"),
    ((1, 13, 18), (1, 5, 3), (1, 2, 1), (1, 1, 1), (0, 0, 0), "zero", 4, 2, 1, 16, "fused"),
    ((5, 7, 18), (3, 5, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 1, 2, 16, "fused"),
]


@pytest.mark.parametrize("case", TALL, ids=case_id)
@pytest.mark.parametrize("D", [20, 32], ids=str)
def test_tall_maps_float32(case, D):
    check_case(case, torch.float32, D=D)


# Outputs of 4 MiB and more, which the AVX2 float32 forward writes with streaming stores: value
# rows of tokens that hold several heads ("fused", "contiguous"), which the forward copies into its
# ring of packed rows, and value rows whose tokens are contiguous ("head major"), read in place.
# The last two are rows of the interior band (1-D, one key row per query row, windows wider than a
# vector), whose P.V tiles stream their output at AVX-512 too: rows longer than a column chunk,
# value tokens of several heads read in place, grouped heads and a bias table.
# The AVX2 backward streams dq of 4 MiB and more (all of these), and dk and dv of 4 MiB and more
# (the last two: written by the tasks themselves with 16 (batch, head) pairs, after the reduction
# of the row chunks' partials with 8).
LARGE = [
    ((1, 64, 64), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 16, 4, 0, 16, "fused"),
    ((1, 48, 44), (1, 5, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 8, 2, 8, 64, "head major"),
    ((1, 44, 46), (1, 7, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 8, 1, 1, 64, "contiguous"),
    ((1, 36, 37), (1, 5, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 8, 8, 0, 64, "contiguous"),
    ((1, 40, 53), (1, 3, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 4, 4, 4, 64, "fused"),
    ((1, 1, 2053), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 8, 8, 0, 32, "fused"),
    ((1, 2, 1027), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 64, "head major"),
]


@pytest.mark.parametrize("case", LARGE, ids=case_id)
def test_large_outputs_float32(case):
    check_case(case, torch.float32)


# 16-bit outputs of 4 MiB and more whose rows are whole 64-byte lines: the AVX-512 forward's
# interior tiles write them with streaming stores too, bfloat16 through the 1-D band (grouped heads,
# a bias table), float16 through the 2-D tiles.
LARGE_16BIT = [
    (((1, 1, 2053), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 8, 4, 8, 64, "fused"), torch.bfloat16),
    (((1, 48, 44), (1, 5, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 8, 8, 0, 64, "head major"), torch.float16),
]


@pytest.mark.parametrize("case,dtype", LARGE_16BIT, ids=[f"{str(dt)[6:]}-{case_id(c)}" for c, dt in LARGE_16BIT])
def test_large_outputs_16bit(case, dtype):
    check_case(case, dtype)


# The float32 band backward of AVX-512 and AVX2 (one key row per query row, its own; dilation 1; kw > 16;
# "clamp", causal windows too; no bias table): rows whose middle keys (seen by interior
# queries only) are summed as P.V tiles over a ring of P and dS rows, the others ("zones") per
# query. Rows from just wider than the window (no middle) to several ring turns (256 slots), odd and
# even windows of 2 to 6 key vectors, head-major tokens read in place, 2-D and 3-D maps with a
# kernel of 1 on the outer axes (several rows, each its own key row), and grouped heads with enough (batch, key/value head, row) tasks (B = 2, 8 key/value
# heads), which sum their query heads in turn; then the same with bias tables (the table's values in
# the logits, its gradient summed per task, then over the tasks in order). The generic build takes
# the general backward for all of them.
BAND_BWD = [
    ((1, 1, 66), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 1, 81), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "contiguous"),
    ((1, 1, 150), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "head major"),
    ((1, 1, 613), (1, 1, 40), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 1, 97), (1, 1, 20), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 1, 203), (1, 1, 17), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "contiguous"),
    ((1, 1, 400), (1, 1, 93), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 4, 131), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "fused"),
    ((3, 2, 90), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "contiguous"),
    ((1, 1, 170), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 16, 8, 0, 16, "fused"),
    ((1, 1, 77), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 16, 8, 0, 16, "contiguous"),
    # with a bias table (per head or shared) and its gradient
    ((1, 1, 150), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 2, 16, "fused"),
    ((1, 1, 66), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 1, 16, "contiguous"),
    ((1, 1, 613), (1, 1, 40), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 1, 16, "head major"),
    ((3, 2, 90), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 2, 16, "fused"),
    ((1, 1, 170), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 16, 8, 16, 16, "fused"),
    ((1, 1, 300), (1, 1, 93), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 16, 8, 1, 16, "contiguous"),
    # causal: the windows near the start hold fewer keys (their other slots masked by -inf)
    ((1, 1, 150), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 1, 66), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 2, 2, 2, 16, "contiguous"),
    ((1, 1, 613), (1, 1, 40), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 2, 2, 1, 16, "head major"),
    ((3, 2, 90), (1, 1, 33), (1, 1, 1), (1, 1, 3), (0, 0, 1), "clamp", 2, 2, 2, 16, "fused"),
    ((1, 1, 170), (1, 1, 17), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 16, 8, 16, 16, "fused"),
    # grouped heads with few key/value heads (fewer than 16 tasks of a key/value head's row): a task
    # per query head, dK/dV slices summed afterwards
    ((1, 1, 150), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "fused"),
    ((1, 1, 170), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 6, 1, 1, 16, "contiguous"),
    ((1, 3, 90), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "head major"),
    # "mask" / "zero": border queries read a run of kw keys from the row's end, the keys of the run
    # outside their window masked, "zero" non-keys in the softmax and the bias gradient only; rows
    # just wider than the window (no middle), odd and even kernels, with and without bias tables,
    # grouped heads (a task per query head too), and a row narrower than the band (general route)
    ((1, 1, 150), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 2, 0, 16, "fused"),
    ((1, 1, 150), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 0, 16, "contiguous"),
    ((1, 1, 66), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 2, 16, "head major"),
    ((1, 1, 67), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 2, 1, 16, "fused"),
    ((1, 1, 613), (1, 1, 40), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 1, 16, "fused"),
    ((3, 2, 90), (1, 1, 33), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 2, 2, 16, "contiguous"),
    ((1, 1, 170), (1, 1, 18), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 16, 8, 16, 16, "fused"),
    ((1, 1, 150), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 4, 2, 4, 16, "fused"),
    ((1, 1, 25), (1, 1, 31), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 1, 2, 16, "fused"),
]


BAND_BWD_RUNS = band_runs(BAND_BWD, (16, 48, 64))


@pytest.mark.parametrize("case,D", BAND_BWD_RUNS, ids=width_ids(BAND_BWD_RUNS))
def test_band_backward_float32(case, D):
    check_case(case, torch.float32, D=D)


# Windows wider than 6 vectors (the band's logits in passes), each at one head width: up to the
# widest band (238 keys on AVX-512, 248 with AVX2; the last case takes the general route on AVX-512)
BAND_WIDE = [
    ((1, 1, 300), (1, 1, 127), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 48, "fused"),
    ((1, 1, 260), (1, 1, 238), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 1, 16, "contiguous"),
    ((1, 1, 200), (1, 1, 101), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 4, 2, 4, 64, "fused"),
    ((1, 1, 180), (1, 1, 120), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 2, 48, "head major"),
    ((1, 1, 250), (1, 1, 248), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 2, 2, 0, 16, "fused"),
]


@pytest.mark.parametrize("case", BAND_WIDE, ids=case_id)
def test_band_backward_wide_windows(case):
    check_case(case, torch.float32)


# Dilated maps run as one op of dilation 1 per dilation sub-grid (strided views in, outputs copied
# into place, dbias summed over the sub-grids): the forward where every dilated axis's shortest
# sub-grid (length // dilation) holds a window (always with "clamp"), the float32 backward of 1-D
# windows of the band's width (kw > 16) on sub-grids of two windows (the first four cases).
# Sub-grids of unequal lengths (length not a multiple of the dilation), causal and strided
# windows, "mask" / "zero", bias tables and grouped heads. The last two cases ("mask" / "zero"
# windows longer than a sub-grid) stay on the dilated map in both directions.
DILATED = [
    ((1, 1, 301), (1, 1, 33), (1, 1, 2), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "fused"),
    ((1, 1, 250), (1, 1, 18), (1, 1, 3), (1, 1, 4), (0, 0, 1), "clamp", 4, 4, 1, 16, "contiguous"),
    ((1, 1, 331), (1, 1, 25), (1, 1, 4), (1, 1, 1), (0, 0, 0), "zero", 2, 1, 2, 16, "fused"),
    ((1, 1, 331), (1, 1, 25), (1, 1, 4), (1, 1, 1), (0, 0, 0), "mask", 2, 2, 1, 16, "head major"),
    ((1, 30, 29), (1, 5, 3), (1, 2, 3), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "channel stride"),
    ((1, 23, 40), (1, 3, 4), (1, 3, 2), (1, 2, 3), (0, 1, 0), "clamp", 4, 4, 0, 16, "fused"),
    ((9, 13, 22), (2, 3, 3), (2, 2, 3), (1, 1, 1), (0, 0, 0), "zero", 4, 4, 1, 8, "fused"),
    ((1, 20, 21), (1, 3, 3), (1, 2, 4), (1, 1, 1), (0, 0, 0), "mask", 4, 2, 4, 16, "fused"),
    ((1, 1, 200), (1, 1, 20), (1, 1, 7), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 2, 16, "fused"),
    ((7, 9, 26), (2, 3, 5), (2, 1, 2), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 8, "fused"),
    ((1, 1, 20), (1, 1, 7), (1, 1, 4), (1, 1, 1), (0, 0, 0), "mask", 4, 2, 4, 16, "fused"),
    ((1, 9, 10), (1, 5, 5), (1, 3, 2), (1, 1, 1), (0, 0, 0), "zero", 4, 4, 1, 16, "contiguous"),
]


@pytest.mark.parametrize("case", DILATED, ids=case_id)
@pytest.mark.parametrize("dtype,D", [(torch.float64, None), (torch.float32, 16), (torch.float32, 32),
                                     (torch.float32, 20), (torch.bfloat16, 16)], ids=str)
def test_dilated_subgrids(case, dtype, D):
    check_case(case, dtype, D=D)


# Maps whose windows are whole cells (every axis of kernel 1, or "clamp" with length == kernel *
# dilation: each dilation sub-grid is one window, whatever the stride), which float32 runs as dense
# attention per cell (forward and backward; bfloat16's forward is widened to it): NAT's last stage,
# DiNAT's dilated layers (dilations differing per axis), 3-D, even kernels, an axis of kernel 1 with
# and without dilation, cells of more than four vectors of queries (144 members), grouped heads,
# shared and per-head bias tables, strided windows (which change nothing here), and one layout with
# a channel stride (which takes the general routes).
WHOLE = [
    ((1, 7, 7), (1, 7, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 4, 4, 32, "fused"),
    ((1, 14, 21), (1, 7, 7), (1, 2, 3), (1, 2, 3), (0, 0, 0), "clamp", 4, 2, 1, 16, "contiguous"),
    ((3, 14, 7), (3, 7, 7), (1, 2, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 1, 2, 16, "head major"),
    ((5, 8, 6), (1, 8, 6), (1, 1, 1), (1, 3, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "fused"),
    ((1, 1, 26), (1, 1, 13), (1, 1, 2), (1, 1, 3), (0, 0, 0), "clamp", 4, 4, 0, 48, "fused"),
    ((4, 9, 20), (1, 3, 5), (3, 3, 4), (1, 1, 1), (0, 0, 0), "clamp", 4, 4, 4, 16, "fused"),
    ((1, 12, 24), (1, 12, 12), (1, 1, 2), (1, 5, 7), (0, 0, 0), "clamp", 2, 2, 1, 16, "contiguous"),
    ((1, 14, 14), (1, 7, 7), (1, 2, 2), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "channel stride"),
]


@pytest.mark.parametrize("case", WHOLE, ids=case_id)
@pytest.mark.parametrize("dtype,D", [(torch.float32, 16), (torch.float32, 48), (torch.float32, 64),
                                     (torch.bfloat16, 32)], ids=str)
def test_whole_window_cells(case, dtype, D):
    check_case(case, dtype, D=D)


# Heads of 96 and 128 channels on the float32 forward's fast path and the band backward (their P.V
# tiles in passes of half the channels): the 1-D band with its border slots, zones and stride
# groups, bias tables, causal windows, grouped heads; 2-D and 3-D interior tiles, clamped windows
# shared by the queries at the ends of a row, "mask" / "zero"; bfloat16 (widened) at 128.
WIDE_HEADS = ([WIDE_1D[i] for i in (0, 2, 3, 8, 12, 13, 16)] + [BAND_BWD[i] for i in (0, 6, 9, 11, 17)]
              + [LONG_ROWS[i] for i in (0, 1, 2)] + [TALL[i] for i in (0, 3, 4, 5)] + [CASES[i] for i in (2, 9, 12)])


# (each case at one of the two widths, in turn: both widths share their code paths)
WIDE_HEAD_RUNS = in_turn(WIDE_HEADS, (96, 128))


@pytest.mark.parametrize("case,D", WIDE_HEAD_RUNS, ids=width_ids(WIDE_HEAD_RUNS))
def test_wide_heads(case, D):
    check_case(case, torch.float32, D=D)


@pytest.mark.parametrize("case", [WIDE_HEADS[i] for i in (1, 5, 8, 12, 16)], ids=case_id)
def test_wide_heads_bfloat16(case):
    check_case(case, torch.bfloat16, D=128)


# Heads of other widths between 16 and 128 (24, 40, 72, 80, 112) run padded with zero channels to a
# fast width (the forward always, the backward where the band or the whole-window cells take it):
# the 1-D band (a bias table; "mask" on several rows; "zero" with a task per query head), 2-D
# interior tiles and clamped windows, 3-D, whole-window cells, a channel-strided layout, bfloat16;
# and a width padded by more than a third (20), which stays on the general routes.
# Each case at three of the widths, in turn.
PADDED = [BAND_BWD[i] for i in (11, 30, 32)] + [CASES[i] for i in (7, 9, 15)] + [WHOLE[1]]
PADDED_WIDTHS = [(torch.float32, 24), (torch.float32, 80), (torch.float32, 40), (torch.float32, 112),
                 (torch.float32, 72), (torch.bfloat16, 80), (torch.float32, 20), (torch.float16, 40)]
PADDED_RUNS = [(c, *PADDED_WIDTHS[(i + j) % len(PADDED_WIDTHS)]) for i, c in enumerate(PADDED) for j in range(3)]


@pytest.mark.parametrize("case,dtype,D", PADDED_RUNS,
                         ids=[f"{case_id(c)}-{str(dt)[6:]}-{D}" for c, dt, D in PADDED_RUNS])
def test_padded_head_widths(case, dtype, D):
    check_case(case, dtype, D=D)


# 16-bit backward of windows along W alone wider than 16 keys at the fast widths (D % 16 == 0 up
# to 64, and 96 and 128): the band backward (and the dilation sub-grids) runs the float32
# arithmetic on the bfloat16 / float16 tensors, so the gradients are the float32 backward's rounded
# to the input dtype, bit for bit;
# elsewhere (D = 20 here) the 16-bit kernels run. Both against the float64 brute force. The
# forward reads 16-bit inputs in place at the fast widths (test_forward_16bit_in_place).
# (At the generic level, whose float32 backward takes the general route here, one width per case.
# float16 differs from bfloat16 in its conversions alone: four of the cases, one width each.)
BF16_BWD = [BAND_BWD[i] for i in (0, 3, 7, 9, 11, 17, 20)] + [WIDE_1D[10], DILATED[0]]
HALF_BWD_RUNS = ([(c, torch.bfloat16, D) for c, D in band_runs(BF16_BWD, (16, 64, 128, 20))]
                 + [(c, torch.float16, D) for c, D in in_turn([BF16_BWD[i] for i in (0, 4, 7, 8)], (64, 128, 20, 16))])


def dtype_width_ids(runs):
    return [f"{str(dt)[6:]}-{D}-{case_id(c)}" for c, dt, D in runs]


@pytest.mark.parametrize("case,dtype,D", HALF_BWD_RUNS, ids=dtype_width_ids(HALF_BWD_RUNS))
def test_backward_16bit(case, dtype, D):
    check_case(case, dtype, D=D)
    sp, ks, dil, st, causal, border, heads, hkv, nb, _, layout = case
    q, k, v = make_inputs(sp, heads, hkv, D, dtype, layout, 3)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(nb, 2 * ks[0] - 1, 2 * ks[1] - 1, 2 * ks[2] - 1, generator=g) if nb else None
    dout = torch.randn(q.shape, generator=g).to(dtype)
    dlse = torch.randn(q.shape[0], heads, *sp, generator=g)
    f32 = [t.float() for t in (q, k, v)]
    fwd = torch.ops.alterops.neighborhood_attention_nd_fwd
    bwd = torch.ops.alterops.neighborhood_attention_nd_bwd
    window = (list(ks), list(dil), list(st), [int(x) for x in causal], border, bias, D ** -0.5)
    out, lse = fwd(q, k, v, *window)
    if D % 16 == 0:
        out32, lse32 = fwd(*f32, *window)
        assert torch.equal(out, out32.to(dtype)) and torch.equal(lse, lse32)
    # the backward of the same out and lse in both dtypes
    got = bwd(dout, q, k, v, out, lse, dlse, *window, bias is not None)
    want = bwd(dout.float(), *f32, out.float(), lse, dlse, *window, bias is not None)
    widened = D % 16 == 0 and (D <= 64 or D in (96, 128)) and ks[0] == ks[1] == 1 and ks[2] > 16
    for name, a, b in zip(["dq", "dk", "dv"], got[:3], want[:3]):
        assert a.dtype == dtype
        if widened:
            assert torch.equal(a, b.to(dtype)), name
    if widened:
        assert torch.equal(got[3], want[3])


# The 16-bit forward at the fast widths reads and writes bfloat16 / float16 in place (tokens widened
# as the float32 forward packs, copies or stages them; the output narrowed as it is stored): bit for
# bit the float32 op on the widened inputs, rounded to the input dtype, with the same logsumexp,
# over every route: 1-D/2-D/3-D, the 1-D band over rows of several column chunks (their clamped
# border windows read columns that the chunk did not pack), strided and causal windows, dilation
# sub-grids, rows longer than a segment on 2-D/3-D maps, whole-window cells (which keep their
# float32 copies), layouts with heads major and with a channel stride (copies too). Each case at
# one of the widths, in turn, with the float64 brute force as well. float16, whose conversions
# alone differ, takes every third case (1-D, 2-D and 3-D maps, the band, long rows, sub-grids,
# whole-window cells), at the widths shifted by one.
BF16_FWD = (CASES + [WIDE_1D[i] for i in (0, 3, 4, 8, 10, 11, 13, 14, 16)] + LONG_ROWS[:3] + [LONG_ROWS[6]]
            + DILATED[:2] + [WHOLE[1]])
BF16_FWD_WIDTHS = (16, 32, 64, 128, 48)
HALF_FWD_RUNS = ([(c, torch.bfloat16, D) for c, D in in_turn(BF16_FWD, BF16_FWD_WIDTHS)]
                 + [(c, torch.float16, D) for c, D in in_turn(BF16_FWD[::3] + [BF16_FWD[-1]], BF16_FWD_WIDTHS[1:] + BF16_FWD_WIDTHS[:1])])


@pytest.mark.parametrize("case,dtype,D", HALF_FWD_RUNS, ids=dtype_width_ids(HALF_FWD_RUNS))
def test_forward_16bit_in_place(case, dtype, D):
    sp, ks, dil, st, causal, border, heads, hkv, nb, _, layout = case
    q, k, v = make_inputs(sp, heads, hkv, D, dtype, layout, 5)
    g = torch.Generator().manual_seed(6)
    bias = torch.randn(nb, 2 * ks[0] - 1, 2 * ks[1] - 1, 2 * ks[2] - 1, generator=g) if nb else None
    window = (list(ks), list(dil), list(st), [int(x) for x in causal], border, bias, D ** -0.5)
    fwd = torch.ops.alterops.neighborhood_attention_nd_fwd
    before = [t.clone() for t in (q, k, v)]
    out, lse = fwd(q, k, v, *window)
    out32, lse32 = fwd(*[t.float() for t in (q, k, v)], *window)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, out32.to(dtype))
    assert torch.equal(lse, lse32)
    for a, b in zip((q, k, v), before):
        assert torch.equal(a, b)
    want, want_lse = brute_force(*[t.double() for t in (q, k, v)], ks, dil, st, causal, border,
                                 None if bias is None else bias.double(), D ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-3, rtol=1e-3)


# The band backward with a dout whose channels are not contiguous (copied a row at a time): the
# expanded gradients of out.sum() and of a per-token loss, and a strided view. The general backward
# reads every stride in place; one of its cases too.
@pytest.mark.parametrize("case", [BAND_BWD[i] for i in (0, 2, 3, 9, 11, 15)] + [CASES[7]], ids=case_id)
@pytest.mark.parametrize("dout_layout", ["all expanded", "channels expanded", "channel stride 3"])
def test_backward_dout_channel_strides(case, dout_layout):
    check_case(case, torch.float32, D=32, dout_layout=dout_layout)


# The same in bfloat16 and float16 (the band backward widens a dout of any channel stride itself):
# bit for bit the float32 band backward on the widened tensors, rounded, and against the float64
# brute force.
HALF_DOUT_RUNS = ([(c, torch.bfloat16) for c in (BAND_BWD[0], BAND_BWD[3], BAND_BWD[11])]
                  + [(BAND_BWD[3], torch.float16)])


@pytest.mark.parametrize("case,dtype", HALF_DOUT_RUNS, ids=[f"{str(dt)[6:]}-{case_id(c)}" for c, dt in HALF_DOUT_RUNS])
@pytest.mark.parametrize("dout_layout", ["all expanded", "channels expanded", "channel stride 3"])
def test_backward_16bit_dout_channel_strides(case, dout_layout, dtype):
    check_case(case, dtype, D=32, dout_layout=dout_layout)
    sp, ks, dil, st, causal, border, heads, hkv, nb, _, layout = case
    q, k, v = make_inputs(sp, heads, hkv, 32, dtype, layout, 2)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(q.shape, generator=g).to(dtype)
    if dout_layout == "channels expanded":
        dout = dout[..., :1].expand(q.shape)
    elif dout_layout == "all expanded":
        dout = torch.ones((1,) * q.dim(), dtype=dtype).expand(q.shape)
    else:
        wide = torch.zeros(*q.shape[:-1], 96, dtype=dtype)
        wide[..., ::3] = dout
        dout = wide[..., ::3]
    assert dout.stride(-1) != 1
    dlse = torch.randn(q.shape[0], heads, *sp, generator=g)
    window = (list(ks), list(dil), list(st), [int(x) for x in causal], border, None, 32 ** -0.5)
    fwd = torch.ops.alterops.neighborhood_attention_nd_fwd
    bwd = torch.ops.alterops.neighborhood_attention_nd_bwd
    out, lse = fwd(q, k, v, *window)
    got = bwd(dout, q, k, v, out, lse, dlse, *window, False)
    want = bwd(dout.float(), *[t.float() for t in (q, k, v)], out.float(), lse, dlse, *window, False)
    for name, a, b in zip(["dq", "dk", "dv"], got[:3], want[:3]):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype)), name


# Plans are kept and reused by later calls of the same shapes, window and bias table values: calls
# that differ from the one before in a single field of that key (batch, map, heads, key/value heads,
# head width, kernel, dilation, stride, causal, border; a bias table, its values) must not get its
# plan. Each call in turn, against the brute force, twice round.
PLAN_KEY_CASES = [
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 5, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 22), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 4, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 32, "fused"),
    ((1, 4, 21), (1, 3, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 2, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 2), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 2), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 2, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 1, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 4, 2, 0, 16, "fused"),
    ((1, 4, 21), (1, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "fused"),
    ((2, 4, 21), (2, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 0, 16, "fused"),
    ((1, 1, 300), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 1, 300), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 1), "clamp", 2, 2, 0, 16, "fused"),
    ((1, 1, 300), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 2, 2, 0, 16, "fused"),
    ((1, 1, 300), (1, 1, 65), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 2, 2, 1, 16, "fused"),
]


def test_plans_are_not_reused_across_shapes_or_windows():
    for _ in range(2):
        for case in PLAN_KEY_CASES:
            check_case(case, torch.float32)
    # the same shapes with other bias tables (other seeds), then the first one's again
    for case in (PLAN_KEY_CASES[15], PLAN_KEY_CASES[-1]):
        for seed in (0, 1, 0, 2):
            check_case(case, torch.float32, seed=seed)
    # and the batch: make_inputs builds B = 2; B = 1 and 3 of the same map and window in turn
    case = PLAN_KEY_CASES[0]
    sp, ks, dil, st, causal, border, heads, hkv, _, D, _ = case
    for B in (1, 3, 1):
        q, k, v = (torch.randn(B, *sp, h, D, dtype=torch.float64) for h in (heads, hkv, hkv))
        out, lse = torch.ops.alterops.neighborhood_attention_nd_fwd(
            q.float(), k.float(), v.float(), list(ks), list(dil), list(st), list(causal), border, None, D ** -0.5)
        r_out, _ = brute_force(q, k, v, ks, dil, st, causal, border, None, D ** -0.5)
        assert (out.double() - r_out).abs().max().item() < 1e-5, B


# Several heads per task: the float32 forward takes every head of a batch element's rows in one
# task where the batch elements (in row chunks where there are fewer than twice the threads) give
# two tasks per thread and the heads' packed key rows fit in half of L2 (the value rows then read
# in place). A call with one head never does. At one and two threads, B = 2 and B = 1 (the maps
# of more than one row in row chunks; 1-D rows, B = 2 at one thread only): the B = 2 results
# against the brute force (check_case), and every result bit for bit against each head computed
# alone. Grouped and shared key/value heads, bias tables per head and shared, each layout, the
# 2-D and 3-D routes and the 1-D band (a window wider than a vector).
HEAD_GROUP_CASES = [CASES[i] for i in (7, 8, 10, 13, 15, 16)] + [
    ((1, 1, 60), (1, 1, 21), (1, 1, 1), (1, 1, 1), (0, 0, 0), "clamp", 4, 2, 4, 16, "fused"),
    ((1, 1, 50), (1, 1, 19), (1, 1, 1), (1, 1, 1), (0, 0, 0), "zero", 4, 1, 1, 16, "head major"),
    ((1, 9, 23), (1, 5, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "mask", 6, 3, 6, 16, "contiguous"),
]


@pytest.mark.parametrize("case", HEAD_GROUP_CASES, ids=case_id)
@pytest.mark.parametrize("dtype,D", [(torch.float32, 32), (torch.float32, 16), (torch.bfloat16, 32)], ids=str)
def test_forward_head_groups(case, dtype, D):
    sp, ks, dil, st, causal, border, heads, hkv, nb, _, layout = case
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_case(case, dtype, D=D)
        q, k, v = make_inputs(sp, heads, hkv, D, dtype, layout, seed=3)
        bias = torch.randn(nb, 2 * ks[0] - 1, 2 * ks[1] - 1, 2 * ks[2] - 1) if nb else None
        args = (list(ks), list(dil), list(st), [int(c) for c in causal], border)
        fwd = torch.ops.alterops.neighborhood_attention_nd_fwd
        scale = D ** -0.5
        # each head alone (one head: never grouped), at one thread
        alone = []
        for h in range(heads):
            hk = h // (heads // hkv)
            tab = None if bias is None else bias[h:h + 1] if nb == heads else bias
            alone.append(fwd(q[..., h:h + 1, :], k[..., hk:hk + 1, :], v[..., hk:hk + 1, :], *args, tab, scale))
        want_out = torch.cat([o for o, _ in alone], -2)
        want_lse = torch.cat([l for _, l in alone], 1)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b0, b1 in ((0, 2), (0, 1), (1, 2)):
                out, lse = fwd(q[b0:b1], k[b0:b1], v[b0:b1], *args, bias, scale)
                assert torch.equal(out, want_out[b0:b1]), (threads, b0, b1)
                assert torch.equal(lse, want_lse[b0:b1]), (threads, b0, b1)
    finally:
        torch.set_num_threads(before)


# The backward's bits do not depend on the thread count: the general route (3-D, causal, grouped
# heads, bias table), the band route (1-D, grouped heads summed in turn, bias table; and with few
# key/value heads, a task per query head with its dK/dV slices summed afterwards), the
# dilation sub-grids (dbias summed over them in order), and the whole-window cells (dbias per task,
# summed in task order).
@pytest.mark.parametrize("sp,ks,dil,causal,heads,heads_kv,bias_shape", [
    ((2, 3, 40), (2, 3, 7), (1, 1, 1), (1, 0, 0), 4, 2, (4, 3, 5, 13)),
    ((1, 1, 300), (1, 1, 65), (1, 1, 1), (0, 0, 0), 16, 8, (16, 1, 1, 129)),
    ((1, 1, 301), (1, 1, 33), (1, 1, 2), (0, 0, 0), 16, 8, (1, 1, 1, 65)),
    ((1, 28, 28), (1, 7, 7), (1, 4, 4), (0, 0, 0), 8, 4, (8, 1, 13, 13)),
    ((1, 1, 300), (1, 1, 65), (1, 1, 1), (0, 0, 0), 8, 2, (8, 1, 1, 129)),
], ids=["general", "band", "dilation sub-grids", "whole-window cells", "band, a task per query head"])
def test_backward_same_bits_any_thread_count(sp, ks, dil, causal, heads, heads_kv, bias_shape):
    st, border = (1, 1, 1), "clamp"
    q, k, v = make_inputs(sp, heads, heads_kv, 32, torch.float32, "fused")
    bias = torch.randn(bias_shape)
    dout, dlse = torch.randn(q.shape), torch.randn(2, heads, *sp)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run_fused(q, k, v, ks, dil, st, causal, border, bias, 0.25, dout, dlse))
    finally:
        torch.set_num_threads(before)
    (o1, l1, g1), (o2, l2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    (dict(stride=[1, 1, 4]), "stride"),
    (dict(kernel_size=[1, 3, 50]), "clamp"),
    (dict(border="mask", causal=[0, 0, 1]), "'mask' and 'zero'"),
    (dict(border="edge"), "border"),
    (dict(kernel_size=[1, 3]), "3 entries"),
])
def test_argument_errors(bad, match):
    q, k, v = make_inputs((1, 5, 20), 4, 2, 8, torch.float32, "contiguous")
    args = dict(kernel_size=[1, 3, 3], dilation=[1, 1, 1], stride=[1, 1, 1], causal=[0, 0, 0], border="clamp")
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.alterops.neighborhood_attention_nd_fwd(q, k, v, args["kernel_size"], args["dilation"],
                                                         args["stride"], args["causal"], args["border"], None, 1.0)


def test_heads_not_a_multiple():
    q, _, _ = make_inputs((1, 5, 20), 4, 4, 8, torch.float32, "contiguous")
    k, v, _ = make_inputs((1, 5, 20), 3, 3, 8, torch.float32, "contiguous")
    with pytest.raises(RuntimeError, match="multiple"):
        torch.ops.alterops.neighborhood_attention_nd_fwd(q, k, v, [1, 3, 3], [1, 1, 1], [1, 1, 1], [0, 0, 0],
                                                         "clamp", None, 1.0)


# Every floating dtype of a CPU tensor takes the fused kernels when nothing is asked for (float16
# had gone to `reference`).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_auto_selection_takes_cpu(dtype):
    from alterops import neighborhood_attention_nd as na
    for n in (1, 2, 3):
        assert na._TABLES[n].select(None, torch.device("cpu"), dtype) == "cpu"
