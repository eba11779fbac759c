"""Sizes a GPU user reaches, checked without allocating them.

* Element offsets past 2**31: the inputs are small views (``as_strided``) into a storage of more
  than 2**32 elements made with ``torch.empty`` whose pages are never touched (only the view's
  elements are written), placed so that some of their elements sit more than 2**31 elements
  past the view's first element. The views start 2**31 elements into the storage, so an offset
  that wraps in int32 still points into the storage (a wrong value, not a crash). Results are
  compared with a float64 brute force on copies of the small views.
* Launch grids: more than 65535 (batch x heads) or blocks per plane must not land on grid y or
  z (65535 at most on CUDA; the Triton interpreter does not check it). The launches are
  recorded (not run: the interpreter takes ~0.1 s a program) and checked against the CUDA
  limits and for covering every program once; a small problem run with the launch split into
  chunks of a few programs checks the kernels' program offset against the brute force; the
  CPU kernels run the huge batch of tiny maps in full.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import alterops as ao
from helpers import assert_close, skip_unless
from test_neighborhood_attention import brute_force as na_brute_force
from test_window_attention import brute_force as wa_brute_force

BIG = 2**32 + 2**22  # elements of the never-touched storage (8 GiB of address space at 2 bytes)
BASE = 2**31  # storage offset of the views
GRID_X_MAX, GRID_YZ_MAX = 2**31 - 1, 65535


def big_storage(dtype: torch.dtype, device="cpu") -> torch.Tensor:
    return torch.empty(BIG, dtype=dtype, device=device)


def far_views(storage: torch.Tensor, shape, big_dim: int, count: int) -> list[torch.Tensor]:
    """``count`` views of ``shape`` into ``storage`` (from ``BASE`` on, ``512`` elements apart),
    compact except along ``big_dim``, whose last index lies just past 2**31 elements from the
    view's start (its stride stays below 2**31 when that dimension has 3 or more entries, so
    the offset arithmetic itself has to widen), filled with random values."""
    n = shape[big_dim]
    assert n >= 2
    others = [i for i in range(len(shape)) if i != big_dim]
    strides = [0] * len(shape)
    step = 1
    for i in reversed(others):
        strides[i] = step
        step *= shape[i]
    assert step <= 512
    strides[big_dim] = -(-(2**31 + 64) // (n - 1))
    g = torch.Generator().manual_seed(big_dim)
    views = []
    for i in range(count):
        v = torch.as_strided(storage, shape, strides, BASE + 512 * i)
        v.copy_(torch.randn(shape, generator=g, dtype=torch.float64))
        views.append(v)
    assert max((s - 1) * st for s, st in zip(shape, strides)) >= 2**31
    return views


class Recorder:
    """Stands in for a Triton kernel: records each launch (grid, arguments by name), runs nothing."""

    def __init__(self, kernel):
        self.names = list(kernel.arg_names)
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.names, args))
            named.update(kwargs)
            self.launches.append((tuple(grid), named))

        return launch


def check_launches(launches, total: int, what: str) -> None:
    """Every grid within CUDA's limits; the launches' programs (offset by ``PID0``) cover
    ``0 .. total-1`` once, in order."""
    assert launches, f"{what}: nothing launched"
    nxt = 0
    for grid, named in launches:
        assert 1 <= len(grid) <= 3, f"{what}: grid {grid}"
        assert grid[0] <= GRID_X_MAX and all(g <= GRID_YZ_MAX for g in grid[1:]), (
            f"{what}: grid {grid} exceeds CUDA's limits (x <= 2**31-1, y and z <= 65535)")
        assert named.get("PID0", 0) == nxt, f"{what}: launch starts at program {named.get('PID0', 0)}, expected {nxt}"
        nxt += math.prod(grid)
    assert nxt == total, f"{what}: {nxt} programs launched, expected {total}"


def check_against_brute_force(op, brute, q, k, v, dout, table):
    """``op(q, k, v, table)`` and its gradients of q, k, v and table against ``brute`` on float64
    copies (of the small views, never of a big storage). The table gradient, a float32 sum of
    input-dtype terms, is held to the input dtype's tolerance."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    tab = table.clone().requires_grad_()
    out = op(*leaves, tab)
    grads = torch.autograd.grad(out, leaves + [tab], dout)
    ref_leaves = [t.detach().clone().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_tab = table.double().cpu().requires_grad_()
    ref = brute(*ref_leaves, ref_tab)
    ref_grads = torch.autograd.grad(ref, ref_leaves + [ref_tab], dout.detach().clone().double().cpu())
    assert_close(out, ref, name="out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, name=name)
    assert_close(grads[3].to(q.dtype), ref_grads[3], name="dtable")


# ---------------------------------------------------------------------------------------
# neighborhood_attention2d
# ---------------------------------------------------------------------------------------
NA_SHAPE = (2, 3, 3, 3, 8)  # (B, H, W, heads, head_dim)
DIMS = {"batch": 0, "rows": 1, "cols": 2, "heads": 3, "channels": 4}
LOW = {"cpu": torch.bfloat16, "triton": torch.float16}


@pytest.mark.parametrize("backend", ("cpu", "triton"))
@pytest.mark.parametrize("dim", DIMS)
def test_neighborhood_offsets_past_2_31(backend, dim):
    dtype = LOW[backend]
    device = skip_unless("neighborhood_attention2d", backend, dtype)
    if device.type != "cpu":
        pytest.skip("the views live in host memory")
    storage = big_storage(dtype)
    q, k, v, dout = far_views(storage, NA_SHAPE, DIMS[dim], 4)
    table = torch.randn(NA_SHAPE[3], 5, 5, generator=torch.Generator().manual_seed(3))
    check_against_brute_force(
        lambda q, k, v, t: ao.neighborhood_attention2d(q, k, v, 3, border="clamp", rel_pos_bias=t, backend=backend),
        lambda q, k, v, t: na_brute_force(q, k, v, (3, 3), (1, 1), "clamp", t), q, k, v, dout, table)
    del storage


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_neighborhood3d_time_offsets_past_2_31(backend):
    """The third spatial axis of the N-d kernels (T), with grouped heads: element offsets along T
    past 2**31."""
    from na_brute_force import brute_force as nd_brute_force

    dtype = LOW[backend]
    device = skip_unless("neighborhood_attention3d", backend, dtype)
    if device.type != "cpu":
        pytest.skip("the views live in host memory")
    storage = big_storage(dtype)
    q, dout, k, v = far_views(storage, (1, 3, 3, 3, 2, 8), 1, 4)
    k, v = k[..., :1, :], v[..., :1, :]  # one kv head for the two query heads
    table = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    args = ((2, 2, 2), (1, 1, 1), (1, 1, 1), (True, False, False), "clamp")
    check_against_brute_force(
        lambda q, k, v, t: ao.neighborhood_attention3d(q, k, v, 2, is_causal=(True, False, False), rel_pos_bias=t,
                                                       backend=backend),
        lambda q, k, v, t: nd_brute_force(q, k, v, *args, table=t)[0], q, k, v, dout, table)
    del storage


def _na_tiles(kern, H, W, dtype, head_dim, kernel):
    """Blocks of one (batch, head) image of a 2-D call (T = 1) in kernel ``kernel``."""
    cfg = kern.pick_config(kernel, head_dim, dtype, kern.map_rank(1, H, W))
    th, tw = (cfg["TM_H"], cfg["TM_W"]) if kernel != "dkdv" else (cfg["TN_H"], cfg["TN_W"])
    return -(-H // th) * (-(-W // tw))


def check_bh_launches(launches, total_bh: int, tiles: int, what: str) -> None:
    """Neighbourhood kernels: grid (patches, pairs); the launches' (batch, head) pairs, offset by
    ``BH0``, cover ``0 .. total_bh - 1`` once, in order, within CUDA's grid limits."""
    assert launches, f"{what}: nothing launched"
    variants = {named.get("NONFINITE", False) for _, named in launches}
    if len(variants) > 1:  # the forward's non-finite pass (GPU): each pass covers every pair once
        for var in variants:
            check_bh_launches([(g, n) for g, n in launches if n.get("NONFINITE", False) == var], total_bh, tiles, what)
        return
    nxt = 0
    for grid, named in launches:
        assert len(grid) == 2 and grid[0] == tiles, f"{what}: grid {grid}"
        assert grid[0] <= GRID_X_MAX and grid[1] <= GRID_YZ_MAX, f"{what}: grid {grid} exceeds CUDA's limits"
        assert named["BH0"] == nxt, f"{what}: launch starts at pair {named['BH0']}, expected {nxt}"
        nxt += grid[1]
    assert nxt == total_bh, f"{what}: {nxt} (batch, head) pairs launched, expected {total_bh}"


@pytest.mark.parametrize("B,heads", [(65537, 1), (257, 256)], ids=["batch65537", "batch257xheads256"])
def test_neighborhood_triton_grid_within_cuda_limits(monkeypatch, B, heads):
    device = skip_unless("neighborhood_attention2d", "triton", torch.float32)
    from alterops.kernels import neighborhood_attention_nd as kern

    recs = {}
    for name in ("nand_fwd_kernel", "nand_bwd_dq_kernel", "nand_bwd_dkdv_kernel"):
        recs[name] = Recorder(getattr(kern, name))
        monkeypatch.setattr(kern, name, recs[name])
    H = W = 3
    q = torch.zeros(B, H, W, heads, 1, device=device, requires_grad=True)
    out = ao.neighborhood_attention2d(q, q, q, 3, backend="triton")
    out.backward(torch.zeros_like(out))
    for name, kernel in (("nand_fwd_kernel", "fwd"), ("nand_bwd_dq_kernel", "dq"), ("nand_bwd_dkdv_kernel", "dkdv")):
        tiles = _na_tiles(kern, H, W, torch.float32, 1, kernel)
        check_bh_launches(recs[name].launches, B * heads, tiles, name)


def test_neighborhood_triton_split_launches_match_brute_force(monkeypatch):
    """The launches split into chunks of 3 (batch, head) pairs (as past 65535 of them): every
    kernel finds its (batch, head) from the launch's offset."""
    device = skip_unless("neighborhood_attention2d", "triton", torch.float16)
    from alterops.kernels import neighborhood_attention_nd as kern

    monkeypatch.setattr(kern, "GRID_Y_MAX", 3)
    counts = {}
    for name in ("nand_fwd_kernel", "nand_bwd_dq_kernel", "nand_bwd_dkdv_kernel"):
        real = getattr(kern, name)

        class Counting:
            def __init__(self, real, name):
                self.real, self.name = real, name

            def __getitem__(self, grid):
                counts[self.name] = counts.get(self.name, 0) + 1
                return self.real[grid]

        monkeypatch.setattr(kern, name, Counting(real, name))
    g = torch.Generator().manual_seed(5)
    B, H, W, heads, d = 2, 5, 9, 2, 8  # several tiles per (batch, head) in every kernel
    q, k, v = (torch.randn(B, H, W, heads, d, generator=g).half().to(device) for _ in range(3))
    table = torch.randn(heads, 5, 5, generator=g).to(device)
    gout = torch.randn(B, H, W, heads, d, generator=g).half().to(device)
    check_against_brute_force(
        lambda q, k, v, t: ao.neighborhood_attention2d(q, k, v, 3, border="mask", rel_pos_bias=t, backend="triton"),
        lambda q, k, v, t: na_brute_force(q, k, v, (3, 3), (1, 1), "mask", t), q, k, v, gout, table)
    assert all(c >= 2 for c in counts.values()) and len(counts) == 3, counts


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_neighborhood_huge_batch_of_tiny_maps(backend):
    """B = 65537 (> 65535) maps of 3x3, run in full (on Triton only with a GPU: the interpreter
    would take hours; there the grid test above checks the launches)."""
    device = skip_unless("neighborhood_attention2d", backend, torch.float32)
    if backend == "triton" and device.type == "cpu":
        pytest.skip("65537 programs per kernel: too slow for the Triton interpreter (the grid is checked above)")
    g = torch.Generator().manual_seed(7)
    B, H, W, heads, d = 65537, 3, 3, 1, 4
    q, k, v, gout = (torch.randn(B, H, W, heads, d, generator=g) for _ in range(4))
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = ao.neighborhood_attention2d(*leaves, 3, border="zero", backend=backend)
    grads = torch.autograd.grad(out, leaves, gout.to(device))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = na_brute_force(*ref_leaves, (3, 3), (1, 1), "zero")
    ref_grads = torch.autograd.grad(ref, ref_leaves, gout.double())
    assert_close(out, ref, name="out")
    for name, gr, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(gr, r, name=name)


# ---------------------------------------------------------------------------------------
# window_attention2d
# ---------------------------------------------------------------------------------------
WA_SHAPE = (2, 4, 3, 3, 8)  # (B, H, W, heads, head_dim): window 2 pads the width


@pytest.mark.parametrize("backend", ("cpu", "triton"))
@pytest.mark.parametrize("dim", DIMS)
def test_window_offsets_past_2_31(backend, dim):
    dtype = LOW[backend]
    device = skip_unless("window_attention2d", backend, dtype)
    if device.type != "cpu":
        pytest.skip("the views live in host memory")
    storage = big_storage(dtype)
    q, k, v, dout = far_views(storage, WA_SHAPE, DIMS[dim], 4)
    table = torch.randn(WA_SHAPE[3], 3, 3, generator=torch.Generator().manual_seed(3))
    check_against_brute_force(
        lambda q, k, v, t: ao.window_attention2d(q, k, v, 2, shift=1, rel_pos_bias=t, backend=backend),
        lambda q, k, v, t: wa_brute_force(q, k, v, (2, 2), (1, 1), t), q, k, v, dout, table)
    del storage


def test_window_triton_grid_within_cuda_limits(monkeypatch):
    device = skip_unless("window_attention2d", "triton", torch.float32)
    from alterops.kernels import window_attention as kern

    recs = {}
    for name in ("window_attention2d_fwd_kernel", "window_attention2d_bwd_dq_kernel",
                 "window_attention2d_bwd_dkdv_kernel"):
        recs[name] = Recorder(getattr(kern, name))
        monkeypatch.setattr(kern, name, recs[name])
    for shape in ((65537, 2, 2, 1, 4), (1, 2, 2, 65537, 1)):  # > 65535 windows; > 65535 heads
        for rec in recs.values():
            rec.launches.clear()
        q = torch.zeros(shape, device=device, requires_grad=True)
        out = ao.window_attention2d(q, q, q, 2, backend="triton")
        out.backward(torch.zeros_like(out))
        for name, rec in recs.items():
            assert rec.launches, name
            heads = 0
            for grid, named in rec.launches:
                if named.get("NONFINITE"):  # the forward's second, non-finite pass (GPU only) repeats these
                    continue
                assert grid[0] <= GRID_X_MAX and all(g <= GRID_YZ_MAX for g in grid[1:]), f"{name}: grid {grid}"
                assert named["H0"] == heads, f"{name}: launch starts at head {named['H0']}, expected {heads}"
                heads += grid[2]
            assert heads == shape[3], f"{name}: {heads} heads launched, expected {shape[3]}"


def test_window_triton_head_chunks_match_brute_force(monkeypatch):
    """Heads split over launches of 2 (as past 65535 heads): each launch's head offset."""
    device = skip_unless("window_attention2d", "triton", torch.float32)
    from alterops.kernels import window_attention as kern

    monkeypatch.setattr(kern, "GRID_Z_MAX", 2)
    g = torch.Generator().manual_seed(9)
    q, k, v, gout = (torch.randn(1, 5, 4, 3, 8, generator=g).to(device) for _ in range(4))
    table = torch.randn(3, 5, 5, generator=g).to(device)
    check_against_brute_force(
        lambda q, k, v, t: ao.window_attention2d(q, k, v, 3, shift=1, rel_pos_bias=t, backend="triton"),
        lambda q, k, v, t: wa_brute_force(q, k, v, (3, 3), (1, 1), t), q, k, v, gout, table)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_window_huge_batch_of_tiny_maps(backend):
    device = skip_unless("window_attention2d", backend, torch.float32)
    if backend == "triton" and device.type == "cpu":
        pytest.skip("65537 windows: too slow for the Triton interpreter (the grid is checked above)")
    g = torch.Generator().manual_seed(8)
    B, H, W, heads, d = 65537, 2, 2, 1, 4
    q, k, v, gout = (torch.randn(B, H, W, heads, d, generator=g) for _ in range(4))
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = ao.window_attention2d(*leaves, 2, backend=backend)
    grads = torch.autograd.grad(out, leaves, gout.to(device))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = wa_brute_force(*ref_leaves, (2, 2), (0, 0), None)
    ref_grads = torch.autograd.grad(ref, ref_leaves, gout.double())
    assert_close(out, ref, name="out")
    for name, gr, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(gr, r, name=name)


# ---------------------------------------------------------------------------------------
# box_blur2d / tanh_blur2d
# ---------------------------------------------------------------------------------------
def _pointwise(x: torch.Tensor, op: str, tau: float = 2.0) -> torch.Tensor:
    return x if op == "box" else torch.relu(tau * torch.tanh(x / tau))


def _blur(x, op, backend, **kw):
    if op == "box":
        return ao.box_blur2d(x, backend=backend, **kw)
    return ao.tanh_blur2d(x, 2.0, backend=backend, **kw)


@pytest.mark.parametrize("op", ("box", "tanh"))
@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_blur_plane_past_2_31(backend, op):
    """One contiguous plane of 2**31 + 2**17 elements; a 2x2 blur at strides (2**14, 2**15)
    reads 24 of them, the last ones more than 2**31 elements into the plane."""
    dtype = LOW[backend]
    device = skip_unless("box_blur2d", backend, dtype)
    if device.type != "cpu":
        pytest.skip("the plane lives in host memory")
    storage = big_storage(dtype)
    H, W = 2**15 + 2, 2**16
    x = storage[BASE:BASE + H * W].view(1, 1, H, W)
    rows = [0, 1, 2**14, 2**14 + 1, 2**15, 2**15 + 1]
    cols = [0, 1, 2**15, 2**15 + 1]
    g = torch.Generator().manual_seed(11)
    vals = torch.randn(len(rows), len(cols), generator=g, dtype=torch.float64).to(dtype)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            x[0, 0, r, c] = vals[i, j]
    out = _blur(x, op, backend, kernel_size=2, stride=(2**14, 2**15), padding=0)
    assert out.shape == (1, 1, 3, 2)
    f = _pointwise(vals.double(), op)
    ref = torch.stack([torch.stack([f[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for j in range(2)])
                       for i in range(3)]).view(1, 1, 3, 2)
    assert_close(out, ref)
    del x, storage


def test_blur_triton_grid_within_cuda_limits(monkeypatch):
    skip_unless("box_blur2d", "triton", torch.float16)
    from alterops.kernels import blur as kb

    fwd, bwd = Recorder(kb._blur2d_fwd_kernel), Recorder(kb._blur2d_bwd_kernel)
    monkeypatch.setattr(kb, "_blur2d_fwd_kernel", fwd)
    monkeypatch.setattr(kb, "_blur2d_bwd_kernel", bwd)
    cases = [(1, 1, 5800, 5800), (3, 70000, 1, 2)]  # > 65535 blocks of one plane; > 65535 planes
    for B, C, H, W in cases:
        x = torch.empty(B, C, H, W, dtype=torch.float16)  # never written: the kernel does not run
        fwd.launches.clear()
        bwd.launches.clear()
        kb.launch_forward(x, torch.empty_like(x), (1, 1), (1, 1), (0, 0, 0, 0), 0, 0, 10.0)
        check_launches(fwd.launches, B * C * -(-(H * W) // kb.BLOCK), f"forward {B}x{C}x{H}x{W}")
        kb.launch_backward(torch.empty_like(x), x, torch.empty_like(x), (1, 1), (1, 1), (0, 0, 0, 0), 0, 1, 10.0)
        check_launches(bwd.launches, B * C * -(-(H * W) // kb.BLOCK_BWD), f"backward {B}x{C}x{H}x{W}")
    # the backward's limit came at a quarter of the forward's (256-element blocks)
    x = torch.empty(1, 1, 4200, 4200, dtype=torch.float16)
    bwd.launches.clear()
    kb.launch_backward(torch.empty_like(x), None, torch.empty_like(x), (1, 1), (1, 1), (0, 0, 0, 0), 0, 0, 10.0)
    check_launches(bwd.launches, -(-(4200 * 4200) // kb.BLOCK_BWD), "backward 4200x4200")


@pytest.mark.parametrize("op", ("box", "tanh"))
def test_blur_triton_backward_plane_past_2_31(monkeypatch, op):
    """The backward's last block of a plane of 2**31 + 512 elements, computed alone: the launch
    the launcher makes is run for its last program only (the interpreter could not run the
    2**23 others), into a gradient whose pages are otherwise never touched."""
    device = skip_unless("box_blur2d", "triton", torch.float16)
    from alterops.kernels import blur as kb

    real = kb._blur2d_bwd_kernel
    ran = []

    class LastProgram:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args = list(args)
                i = real.arg_names.index("PID0")
                args[i] = args[i] + math.prod(grid) - 1
                ran.append(args[i])
                real[(1,)](*args, **kwargs)

            return launch

    monkeypatch.setattr(kb, "_blur2d_bwd_kernel", LastProgram())
    H, W = 2**23 + 2, 256  # W = one backward block: the last program owns the last row
    assert kb.BLOCK_BWD == W
    gin_storage = big_storage(torch.float16, device)
    grad_x = gin_storage[BASE:BASE + H * W].view(1, 1, H, W)
    grad_x[0, 0, -1].fill_(float("nan"))
    x = None
    g = torch.Generator().manual_seed(13)
    if op == "tanh":
        x_storage = big_storage(torch.float16, device)
        x = x_storage[BASE:BASE + H * W].view(1, 1, H, W)
        x[0, 0, -1].copy_(torch.randn(W, generator=g, dtype=torch.float64))
    gout = torch.randn(1, 1, 3, 2, generator=g, dtype=torch.float64).half().to(device)
    kb.launch_backward(gout, x, grad_x, (2, 2), (2**22, 128), (0, 0, 0, 0), 0, 0 if op == "box" else 2, 2.0)
    assert ran == [(H * W) // W - 1]
    # last row = padded row 2**23 + 1: output row 2 (kernel row 1); columns 0, 1 -> output
    # column 0, columns 128, 129 -> output column 1, the others no output
    ref = torch.zeros(W, dtype=torch.float64)
    for c in (0, 1, 128, 129):
        ref[c] = gout[0, 0, 2, c // 128].double().cpu() / 4
    if op == "tanh":
        xv = x[0, 0, -1].double().cpu()
        t = torch.tanh(xv / 2.0)
        ref = ref * torch.where(t > 0, 1 - t * t, torch.zeros_like(t))
    assert_close(grad_x[0, 0, -1].clone(), ref)


def test_blur_triton_kernels_use_int64_offsets():
    """Static check: compiled for sm_90 (no GPU needed), every pointer offset in the blur
    kernels' TTIR is 64-bit. (The interpreter cannot reach the backward's wrap: that needs
    2**23 programs.)"""
    pytest.importorskip("triton")
    script = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from alterops.kernels import blur as kb
bad = []
for cfg in kb.AOT_CONFIGS:
    if not cfg["name"].startswith(("fwd_f16_act1", "bwd_f16_act1")):
        continue
    src = ASTSource(fn=cfg["kernel"], signature=cfg["signature"], constexprs=cfg["constexprs"])
    ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}).asm["ttir"]
    n = 0
    for line in ttir.splitlines():
        m = re.search(r"tt\.addptr .* : .*, (\S+)(?: loc|$)", line)
        if m is None:
            continue
        n += 1
        if "i64" not in m.group(1):
            bad.append(cfg["name"] + ": " + line.strip()[:160])
    if n == 0:
        bad.append(cfg["name"] + ": no tt.addptr found")
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"32-bit pointer offsets:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
