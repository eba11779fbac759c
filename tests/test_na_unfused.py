"""The unfused neighbourhood-attention primitives (``alterops/_na_unfused.py``: ``dot``, ``sum``,
``scatter`` over neighbour tables), called through their ops on every kernel backend, against a
float64 brute force written here: Python loops over queries and slots, with each query's
neighbours taken from NATTEN's window rule in ``tests/na_brute_force.py`` (not from the
library's tables, which are checked against the same rule first)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import alterops  # noqa: F401  (loads the kernels)
from alterops import _ext, _na_unfused
from helpers import device_for
from na_brute_force import axis_neighbours

BACKENDS = ("cpu", "triton")
# (map, kernel, dilation, causal): NATTEN's unfused ops take odd kernels > 1, stride 1
CASES = [
    ((11,), (5,), (2,), (False,)),
    ((13,), (3,), (1,), (True,)),
    ((7, 10), (3, 5), (1, 2), (False, True)),
    ((6, 6), (3, 3), (2, 2), (False, False)),
    ((3, 4, 6), (3, 3, 3), (1, 1, 2), (True, False, False)),
]


def ops(backend):
    """(device, dot, sum, scatter) of a backend, or a skip saying why it cannot run here."""
    if backend == "cpu":
        if not _ext.has_op("na_unfused_dot"):
            pytest.skip("the alterops CPU library is not built")
        o = torch.ops.alterops
        return torch.device("cpu"), o.na_unfused_dot, o.na_unfused_sum, o.na_unfused_scatter
    pytest.importorskip("triton")
    reason = alterops._dispatch.registry()["natten_qk_av"].why_not("triton", device_for("triton"), torch.float32)
    if reason:
        pytest.skip(reason)
    o = torch.ops.alterops
    return device_for("triton"), o.na_unfused_dot_triton, o.na_unfused_sum_triton, o.na_unfused_scatter_triton


# ---------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------
def slots_of(spatial, ks, ds, cs):
    """Per query p (row-major) and slot c (row-major over the kernel axes): (key, bias cell) or
    None where the slot holds no key (past the end of a short causal window)."""
    n = len(spatial)
    out = []
    for p in itertools.product(*[range(s) for s in spatial]):
        lists = [axis_neighbours(p[a], spatial[a], ks[a], ds[a], 1, cs[a], "clamp") for a in range(n)]
        row = []
        for js in itertools.product(*[range(k) for k in ks]):
            if any(j >= len(lists[a]) for a, j in enumerate(js)):
                row.append(None)
                continue
            key = cell = 0
            for a, j in enumerate(js):
                pos, b = lists[a][j]
                key = key * spatial[a] + pos
                cell = cell * (2 * ks[a] - 1) + b
            row.append((key, cell))
        out.append(row)
    return out


def brute_dot(x, y, slots, table, fill):
    B, heads, N, _ = x.shape
    out = torch.full((B, heads, N, len(slots[0])), fill, dtype=torch.float64)
    for p, row in enumerate(slots):
        for c, s in enumerate(row):
            if s is not None:
                out[:, :, p, c] = (x[:, :, p].double() * y[:, :, s[0]].double()).sum(-1)
                if table is not None:
                    out[:, :, p, c] += table[:, s[1]].double()
    return out


def brute_sum(w, y, slots):
    out = torch.zeros(y.shape, dtype=torch.float64)
    for p, row in enumerate(slots):
        for c, s in enumerate(row):
            if s is not None:
                out[:, :, p] += w[:, :, p, c, None].double() * y[:, :, s[0]].double()
    return out


def brute_scatter(w, x, slots):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for p, row in enumerate(slots):
        for c, s in enumerate(row):
            if s is not None:
                out[:, :, s[0]] += w[:, :, p, c, None].double() * x[:, :, p].double()
    return out


def strided(t, device):
    """``t`` on ``device`` as a non-contiguous view (heads and batch swapped in memory, every
    element a second one apart on the last axis)."""
    wide = torch.zeros(t.shape[1], t.shape[0], *t.shape[2:-1], 2 * t.shape[-1], dtype=t.dtype, device=device)
    wide[..., ::2] = t.transpose(0, 1).to(device)
    return wide[..., ::2].transpose(0, 1)


def close(got, want, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    got = got.cpu().double()
    same_inf = torch.equal(torch.isinf(got), torch.isinf(want))
    assert same_inf, "infinite entries differ"
    fin = ~torch.isinf(want)
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    scale = max(1.0, want[fin].abs().max().item()) if fin.any() else 1.0
    assert err <= tol * scale * 10, f"max error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial,ks,ds,cs", CASES)
def test_tables_follow_natten_rule(spatial, ks, ds, cs):
    t = _na_unfused.tables(spatial, ks, ds, cs, "cpu")
    slots = slots_of(spatial, ks, ds, cs)
    N, K = math.prod(spatial), math.prod(ks)
    assert t.nb.shape == (K, N) and t.nb.dtype == torch.int32
    assert (t.ok is None) == (not any(cs))
    inverse = [[] for _ in range(N)]
    for p, row in enumerate(slots):
        for c, s in enumerate(row):
            ok = True if t.ok is None else bool(t.ok[c, p])
            assert ok == (s is not None), (p, c)
            assert 0 <= t.nb[c, p] < N
            if s is not None:
                assert (int(t.nb[c, p]), int(t.cell[c, p])) == s, (p, c)
                inverse[s[0]].append(p * K + c)
    for j in range(N):
        assert t.entries[t.rowptr[j]:t.rowptr[j + 1]].tolist() == inverse[j], j
    assert int(t.rowptr[N]) == sum(map(len, inverse))


# ---------------------------------------------------------------------------------------
# The primitives
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("D", [1, 7, 33])
@pytest.mark.parametrize("spatial,ks,ds,cs", CASES)
def test_primitives_match_brute_force(spatial, ks, ds, cs, D, dtype, backend):
    device, dot, wsum, scatter = ops(backend)
    torch.manual_seed(D + len(spatial))
    t = _na_unfused.tables(spatial, ks, ds, cs, device)
    slots = slots_of(spatial, ks, ds, cs)
    B, heads, N, K = 2, 3, math.prod(spatial), math.prod(ks)
    cells = math.prod(2 * k - 1 for k in ks)
    x, y = (torch.randn(B, heads, N, D, dtype=dtype) for _ in range(2))
    w = torch.randn(B, heads, N, K, dtype=dtype)
    table = torch.randn(heads, cells, dtype=dtype)
    xs, ys, ws = strided(x, device), strided(y, device), strided(w, device)
    assert not xs.is_contiguous()
    before = [a.clone() for a in (xs, ys, ws)]

    for tab in (None, table.to(device)):
        for fill in (float("-inf"), 0.0):
            got = dot(xs, ys, t.nb, t.ok, tab, None if tab is None else t.cell, fill)
            assert got.shape == (B, heads, N, K) and got.dtype == dtype and got.is_contiguous()
            want = brute_dot(x, y, slots, None if tab is None else table, fill)
            close(got, want, dtype)
    got = wsum(ws, ys, t.nb, t.ok)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    close(got, brute_sum(w, y, slots), dtype)
    got = scatter(ws, xs, t.rowptr, t.entries, K)
    assert got.shape == x.shape and got.is_contiguous()
    close(got, brute_scatter(w, x, slots), dtype)
    for a, b in zip((xs, ys, ws), before):
        assert torch.equal(a, b), "an input was written"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_slots_without_a_key_contribute_nothing(backend):
    """NaN / inf weights at slots without a key, and inf in the row a dead slot points at, do not
    leak into sum or scatter; dot writes exactly ``fill`` there."""
    device, dot, wsum, scatter = ops(backend)
    spatial, ks, ds, cs = (9,), (5,), (1,), (True,)
    t = _na_unfused.tables(spatial, ks, ds, cs, device)
    slots = slots_of(spatial, ks, ds, cs)
    B, heads, N, K, D = 1, 2, 9, 5, 4
    x, y = torch.randn(B, heads, N, D), torch.randn(B, heads, N, D)
    w = torch.randn(B, heads, N, K)
    dead = ~t.ok.t().cpu()
    w[:, :, dead] = float("nan")
    y[:, :, 0] = float("inf")  # dead slots point at position 0 (their stand-in)
    x[:, :, 0] = float("inf")
    got = dot(x.to(device), y.to(device), t.nb, t.ok, None, None, -7.0).cpu()
    assert torch.all(got[:, :, dead] == -7.0)
    got = wsum(w.to(device), y.to(device), t.nb, t.ok).cpu()
    want = brute_sum(w, y, slots)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    got = scatter(w.to(device), x.to(device), t.rowptr, t.entries, K).cpu()
    want = brute_scatter(w, x, slots)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_deterministic(backend):
    device, dot, wsum, scatter = ops(backend)
    t = _na_unfused.tables((7, 8), (3, 3), (2, 1), (False, False), device)
    x = torch.randn(0, 2, 56, 5, device=device)
    w = torch.randn(0, 2, 56, 9, device=device)
    assert dot(x, x, t.nb, t.ok, None, None, 0.0).shape == (0, 2, 56, 9)
    assert wsum(w, x, t.nb, t.ok).shape == x.shape
    assert scatter(w, x, t.rowptr, t.entries, 9).shape == x.shape
    x = torch.randn(2, 3, 56, 16, device=device)
    w = torch.randn(2, 3, 56, 9, device=device)
    n = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            runs.append((wsum(w, x, t.nb, t.ok), scatter(w, x, t.rowptr, t.entries, 9)))
    finally:
        torch.set_num_threads(n)
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))


def test_tables_reject_windows_larger_than_the_map():
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        _na_unfused.tables((3, 5), (3, 3), (1, 2), (False, False), "cpu")


def test_cpu_rejects_bad_tables():
    """The CPU ops check every index (the process never reads out of bounds)."""
    device, dot, wsum, scatter = ops("cpu")
    t = _na_unfused.tables((5, 5), (3, 3), (1, 1), (False, False), device)
    x = torch.randn(1, 2, 25, 4)
    w = torch.randn(1, 2, 25, 9)
    bad = t.nb.clone()
    bad[3, 7] = 25
    with pytest.raises(RuntimeError, match="nb holds 25"):
        dot(x, x, bad, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="nb holds 25"):
        wsum(w, x, bad, None)
    with pytest.raises(RuntimeError, match="nb must be int32"):
        wsum(w, x, t.nb.long(), None)
    cell = t.cell.clone()
    cell[0, 0] = 9
    with pytest.raises(RuntimeError, match="cell holds 9"):
        dot(x, x, t.nb, None, torch.randn(2, 9), cell, 0.0)
    with pytest.raises(RuntimeError, match="table must be"):
        dot(x, x, t.nb, None, torch.randn(3, 9), t.cell, 0.0)
    entries = t.entries.clone()
    entries[0] = 25 * 9
    with pytest.raises(RuntimeError, match="entries holds"):
        scatter(w, x, t.rowptr, entries, 9)
    rowptr = t.rowptr.clone()
    rowptr[3] = rowptr[5]
    with pytest.raises(RuntimeError, match="rowptr must not decrease"):
        scatter(w, x, rowptr, t.entries, 9)
    with pytest.raises(RuntimeError, match="K must be"):
        scatter(w, x, t.rowptr, t.entries, 8)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        wsum(w.half(), x.half(), t.nb, None)
    with pytest.raises(RuntimeError, match="y has shape"):
        dot(x, x[:, :1], t.nb, None, None, None, 0.0)


def test_cpu_opcheck():
    device, dot, wsum, scatter = ops("cpu")
    t = _na_unfused.tables((5, 6), (3, 3), (1, 2), (False, True), device)
    x, y = torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    w = torch.randn(2, 2, 30, 9)
    torch.library.opcheck(dot, (x, y, t.nb, t.ok, torch.randn(2, 25), t.cell, float("-inf")))
    torch.library.opcheck(wsum, (w, y, t.nb, t.ok))
    torch.library.opcheck(scatter, (w, x, t.rowptr, t.entries, 9))


# ---------------------------------------------------------------------------------------
# Triton specifics: index widths, offsets, launch splits, registration, argument checks
# ---------------------------------------------------------------------------------------
def triton_case(dtype=torch.float32, B=2, heads=3, D=100, seed=3):
    spatial, ks, ds, cs = (7, 10), (3, 5), (1, 2), (False, True)
    device, *_ = ops("triton")
    g = torch.Generator().manual_seed(seed)
    N, K = math.prod(spatial), math.prod(ks)
    x, y = (torch.randn(B, heads, N, D, generator=g, dtype=dtype) for _ in range(2))
    w = torch.randn(B, heads, N, K, generator=g, dtype=dtype)
    table = torch.randn(heads, 5 * 9, generator=g, dtype=dtype)
    t = _na_unfused.tables(spatial, ks, ds, cs, device)
    return device, slots_of(spatial, ks, ds, cs), x, y, w, table, t


def triton_all(x, y, w, table, t):
    o = torch.ops.alterops
    return [o.na_unfused_dot_triton(x, y, t.nb, t.ok, table, t.cell, float("-inf")),
            o.na_unfused_sum_triton(w, y, t.nb, t.ok),
            o.na_unfused_scatter_triton(w, x, t.rowptr, t.entries, t.K)]


def test_triton_int64_tables_and_wide_offsets_give_the_same_bits(monkeypatch):
    """int64 rowptr / entries (maps with N * K >= 2**31) and int64 offsets within a (batch, head)
    (forced here) give the same bits as the plain runs."""
    from alterops import _na_unfused_triton as launch

    device, _, x, y, w, table, t = triton_case()
    x, y, w, table = (a.to(device) for a in (x, y, w, table))
    plain = triton_all(x, y, w, table, t)
    wide_index = torch.ops.alterops.na_unfused_scatter_triton(w, x, t.rowptr.long(), t.entries.long(), t.K)
    assert torch.equal(wide_index, plain[2])
    monkeypatch.setattr(launch, "_INT32_LIMIT", 0)
    for a, b in zip(plain, triton_all(x, y, w, table, t)):
        assert torch.equal(a, b)


def test_triton_split_launches(monkeypatch):
    """At most 2 (batch, head) pairs per launch (as past CUDA's 65535): every launch finds its
    pairs from its offset."""
    from alterops.kernels import na_unfused as kern
    from alterops.kernels import neighborhood_attention_nd as nd

    device, slots, x, y, w, table, t = triton_case(torch.float64, B=5, heads=1, D=6)
    monkeypatch.setattr(nd, "GRID_Y_MAX", 2)
    grids = {}
    for name in ("na_unfused_dot_kernel", "na_unfused_sum_kernel", "na_unfused_scatter_kernel"):
        real = getattr(kern, name)

        class Recording:
            def __getitem__(self, grid, _real=real, _name=name):
                grids.setdefault(_name, []).append(grid)
                return _real[grid]

        monkeypatch.setattr(kern, name, Recording())
    got = triton_all(x.to(device), y.to(device), w.to(device), table.to(device), t)
    close(got[0], brute_dot(x, y, slots, table, float("-inf")), torch.float64)
    close(got[1], brute_sum(w, y, slots), torch.float64)
    close(got[2], brute_scatter(w, x, slots), torch.float64)
    assert len(grids) == 3 and all([g[1] for g in gs] == [2, 2, 1] for gs in grids.values()), grids


def test_triton_exact_fill_and_empty_map():
    device, dot, wsum, scatter = ops("triton")
    t = _na_unfused.tables((5,), (3,), (1,), (True,), device)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, device=device)
    got = dot(x, x, t.nb, t.ok, None, None, 0.1).cpu()
    assert torch.all(got[:, :, ~t.ok.t().cpu()] == 0.1)  # float64's 0.1, not float32's
    x = torch.randn(1, 2, 0, 4, device=device)
    w = torch.randn(1, 2, 0, 3, device=device)
    nb = torch.zeros(3, 0, dtype=torch.int32, device=device)
    rowptr = torch.zeros(1, dtype=torch.int32, device=device)
    entries = torch.zeros(0, dtype=torch.int32, device=device)
    assert dot(x, x, nb, None, None, None, 0.0).shape == (1, 2, 0, 3)
    assert wsum(w, x, nb, None).shape == (1, 2, 0, 4)
    assert scatter(w, x, rowptr, entries, 3).shape == (1, 2, 0, 4)


def test_triton_opcheck():
    device, dot, wsum, scatter = ops("triton")
    t = _na_unfused.tables((5, 6), (3, 3), (1, 2), (False, True), device)
    x, y = (torch.randn(1, 1, 30, 8, dtype=torch.float64, device=device) for _ in range(2))
    w = torch.randn(1, 1, 30, 9, dtype=torch.float64, device=device)
    torch.library.opcheck(dot, (x, y, t.nb, t.ok, torch.randn(1, 25, dtype=torch.float64, device=device), t.cell,
                                float("-inf")))
    torch.library.opcheck(wsum, (w, y, t.nb, t.ok))
    torch.library.opcheck(scatter, (w, x, t.rowptr, t.entries, 9))


def test_triton_argument_checks():
    from alterops import _na_unfused_triton as launch

    device, dot, wsum, scat = ops("triton")
    t = _na_unfused.tables((5,), (3,), (1,), (True,), device)
    x = torch.randn(1, 2, 5, 4, device=device, dtype=torch.float64)
    w = torch.randn(1, 2, 5, 3, device=device, dtype=torch.float64)
    cases = [
        (TypeError, "x must be float32 or float64", lambda: dot(x.half(), x.half(), t.nb, t.ok, None, None, 0.0)),
        (TypeError, "y has dtype", lambda: dot(x, x.float(), t.nb, t.ok, None, None, 0.0)),
        (ValueError, "y must have x's shape", lambda: dot(x, x[:, :1], t.nb, t.ok, None, None, 0.0)),
        (ValueError, "y is on meta", lambda: launch.dot(x, torch.empty_like(x, device="meta"), t.nb, t.ok, None,
                                                        None, 0.0)),
        (TypeError, "nb must have dtype torch.int32", lambda: dot(x, x, t.nb.long(), t.ok, None, None, 0.0)),
        (ValueError, "nb must have shape", lambda: dot(x, x, t.nb[:, :4], t.ok, None, None, 0.0)),
        (TypeError, "ok must have dtype torch.bool", lambda: dot(x, x, t.nb, t.ok.int(), None, None, 0.0)),
        (ValueError, "table must have 2", lambda: dot(x, x, t.nb, t.ok, torch.zeros(3, 5, dtype=torch.float64,
                                                                                    device=device), t.cell, 0.0)),
        (TypeError, "cell must be a torch.Tensor", lambda: dot(x, x, t.nb, t.ok, torch.zeros(
            2, 5, dtype=torch.float64, device=device), None, 0.0)),
        (ValueError, "w must have shape", lambda: wsum(w[..., :2], x, t.nb, t.ok)),
        (TypeError, "w has dtype", lambda: wsum(w.float(), x, t.nb, t.ok)),
        (ValueError, "rowptr must have shape", lambda: scat(w, x, t.rowptr[:-1], t.entries, 3)),
        (TypeError, "entries must have dtype", lambda: scat(w, x, t.rowptr, t.entries.short(), 3)),
        (ValueError, "w must have shape", lambda: scat(w, x, t.rowptr, t.entries, 4)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()
