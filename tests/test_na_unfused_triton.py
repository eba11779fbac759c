"""The Triton kernels of the unfused neighbourhood-attention primitives (``alterops::na_unfused_dot_triton``,
``..._sum_triton``, ``..._scatter_triton``; the math is stated in ``alterops/_na_unfused.py``), against a
float64 brute force written here with Python loops over queries and slots, and the neighbour tables
of ``alterops._na_unfused.tables`` against NATTEN's window rule written out independently
(``tests/na_brute_force.py``)."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close, device_for
from na_brute_force import axis_neighbours, neighbour_table

triton = pytest.importorskip("triton")

import alterops._na_unfused_triton as launch  # noqa: E402  (registers the ops)
from alterops._na_unfused import tables  # noqa: E402

DEVICE = device_for("triton")
OPS = torch.ops.alterops
F32, F64 = torch.float32, torch.float64


# ---------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------
def expected_tables(spatial, ks, ds, cs):
    """nb, ok, cell (K, N) from the per-axis neighbour lists of tests/na_brute_force.py: slot j of
    an axis is the j-th neighbour of the query on that axis (in increasing position), a slot past
    the end of a short (causal) list holds no key; slots are row-major over the axes."""
    n = len(spatial)
    K, N = math.prod(ks), math.prod(spatial)
    nb = torch.zeros(K, N, dtype=torch.long)
    ok = torch.zeros(K, N, dtype=torch.bool)
    cell = torch.zeros(K, N, dtype=torch.long)
    for p in range(N):
        pos, rest = [], p
        for s in reversed(spatial):
            pos.append(rest % s)
            rest //= s
        pos = pos[::-1]
        lists = [axis_neighbours(pos[a], spatial[a], ks[a], ds[a], 1, cs[a], "clamp") for a in range(n)]
        for c in range(K):
            js, rest = [], c
            for k in reversed(ks):
                js.append(rest % k)
                rest //= k
            js = js[::-1]
            if all(js[a] < len(lists[a]) for a in range(n)):
                key = cel = 0
                for a in range(n):
                    kp, bi = lists[a][js[a]]
                    key = key * spatial[a] + kp
                    cel = cel * (2 * ks[a] - 1) + bi
                nb[c, p], ok[c, p], cell[c, p] = key, True, cel
    return nb, ok, cell


def ref_dot(x, y, nb, ok, table, cell, fill):
    x, y = x.double().cpu(), y.double().cpu()
    B, heads, N, _ = x.shape
    K = nb.shape[0]
    out = torch.full((B, heads, N, K), fill, dtype=F64)
    for p in range(N):
        for c in range(K):
            if ok is None or ok[c, p]:
                v = (x[:, :, p] * y[:, :, nb[c, p]]).sum(-1)
                if table is not None:
                    v = v + table.double().cpu()[:, cell[c, p]]
                out[:, :, p, c] = v
    return out


def ref_sum(w, y, nb, ok):
    w, y = w.double().cpu(), y.double().cpu()
    out = torch.zeros_like(y)
    for p in range(y.shape[2]):
        for c in range(nb.shape[0]):
            if ok is None or ok[c, p]:
                out[:, :, p] += w[:, :, p, c, None] * y[:, :, nb[c, p]]
    return out


def ref_scatter(w, x, nb, ok):
    """The key-side sum written from the forward tables: every (query, slot) that holds key j adds
    w * x[query] to row j (in increasing query, then slot order: the order of the entries)."""
    w, x = w.double().cpu(), x.double().cpu()
    out = torch.zeros_like(x)
    for p in range(x.shape[2]):
        for c in range(nb.shape[0]):
            if ok is None or ok[c, p]:
                out[:, :, nb[c, p]] += w[:, :, p, c, None] * x[:, :, p]
    return out


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------
# name: (spatial, kernel, dilation, causal, B, heads, head_dim, table rows ("heads" | 1 | None), layout);
# kernel * dilation <= size on every axis (NATTEN's requirement, checked by the callers)
CASES = {
    "1d_dil": ((13,), (5,), (2,), (False,), 2, 2, 7, "heads", "contiguous"),
    "1d_causal_d1": ((11,), (3,), (1,), (True,), 1, 3, 1, None, "transposed"),
    "1d_causal_table_d32": ((19,), (7,), (2,), (True,), 2, 1, 32, 1, "sliced"),
    "2d": ((5, 7), (3, 5), (1, 1), (False, False), 1, 2, 32, "heads", "stepped"),
    "2d_causal_dil_d100": ((7, 9), (3, 3), (2, 3), (True, False), 1, 2, 100, "heads", "transposed"),
    "3d_causal": ((3, 5, 7), (3, 3, 3), (1, 1, 2), (False, True, False), 1, 2, 7, None, "broadcast"),
    "3d_dil": ((6, 3, 5), (3, 3, 5), (2, 1, 1), (False, False, False), 2, 1, 16, "heads", "sliced"),
}
FLOAT32 = ("1d_dil", "2d_causal_dil_d100", "3d_causal")


def strided(shape, layout, g, dtype):
    """A (B, heads, N, last) tensor of random values with the layout's strides."""
    B, heads, N, last = shape

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=F64).to(dtype).to(DEVICE)

    if layout == "contiguous":
        return rnd(B, heads, N, last)
    if layout == "sliced":  # a column range of a wider row
        return rnd(B, heads, N, last + 5)[..., 3:3 + last]
    if layout == "transposed":  # heads-last storage; the last axis of w has stride N
        return rnd(B, N, heads, last).transpose(1, 2)
    if layout == "stepped":  # every other column, batch and head axes swapped in memory
        return rnd(heads, B, N, 2 * last).transpose(0, 1)[..., ::2]
    if layout == "broadcast":  # one image seen as B (batch stride 0), N-major columns
        return rnd(1, heads, last, N).transpose(2, 3).expand(B, heads, N, last)
    raise ValueError(layout)


def make_case(name, dtype, seed=0):
    spatial, ks, ds, cs, B, heads, D, table_rows, layout = CASES[name]
    g = torch.Generator().manual_seed(seed)
    N, K = math.prod(spatial), math.prod(ks)
    x = strided((B, heads, N, D), layout, g, dtype)
    y = strided((B, heads, N, D), layout if layout != "broadcast" else "stepped", g, dtype)
    w = strided((B, heads, N, K), layout, g, dtype)
    table = None
    if table_rows is not None:
        rows = heads if table_rows == "heads" else 1
        cells = math.prod(2 * k - 1 for k in ks)
        table = torch.randn(rows, cells, generator=g, dtype=F64).to(dtype).to(DEVICE)
    t = tables(spatial, ks, ds, cs, DEVICE)
    return x, y, w, table, t


def _assert_layout(name, x, y, w):
    layout = CASES[name][-1]
    if layout != "contiguous":
        assert not (x.is_contiguous() and y.is_contiguous() and w.is_contiguous()), name


def check_case(name, dtype):
    x, y, w, table, t = make_case(name, dtype)
    _assert_layout(name, x, y, w)
    spatial, ks, ds, cs = CASES[name][:4]
    nb, ok, cell = expected_tables(spatial, ks, ds, cs)
    ok_ref = None if not any(cs) else ok
    K = t.K
    for fill in (float("-inf"), 0.0):
        out = OPS.na_unfused_dot_triton(x, y, t.nb, t.ok, table, None if table is None else t.cell, fill)
        assert out.dtype == dtype and out.is_contiguous() and out.device == x.device
        ref = ref_dot(x, y, nb, ok_ref, table, cell, fill)
        if ok_ref is not None:
            assert (out.cpu()[:, :, ~ok.t()] == fill).all(), "slots without a key must hold exactly fill"
            assert_close(out.cpu()[:, :, ok.t()], ref[:, :, ok.t()], name=f"{name} dot")
        else:
            assert_close(out, ref, name=f"{name} dot")
    s = OPS.na_unfused_sum_triton(w, y, t.nb, t.ok)
    assert s.dtype == dtype and s.is_contiguous()
    assert_close(s, ref_sum(w, y, nb, ok_ref), name=f"{name} sum")
    sc = OPS.na_unfused_scatter_triton(w, x, t.rowptr, t.entries, K)
    assert sc.dtype == dtype and sc.is_contiguous()
    assert_close(sc, ref_scatter(w, x, nb, ok_ref), name=f"{name} scatter")


# ---------------------------------------------------------------------------------------
# The neighbour tables against NATTEN's rule
# ---------------------------------------------------------------------------------------
TABLE_CASES = [(s, k, d, c) for s, k, d, c, *_ in CASES.values()] + [
    ((9,), (9,), (1,), (False,)),  # the kernel spans the map
    ((6, 8), (5, 3), (1, 2), (True, True)),  # even sizes, causal on both axes
    ((4, 4, 9), (3, 3, 3), (1, 1, 3), (True, False, True)),
]


@pytest.mark.parametrize("spatial,ks,ds,cs", TABLE_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_tables_follow_natten_window_rule(spatial, ks, ds, cs):
    t = tables(spatial, ks, ds, cs, "cpu")
    nb, ok, cell = expected_tables(spatial, ks, ds, cs)
    K, N = math.prod(ks), math.prod(spatial)
    assert t.nb.shape == (K, N) and t.nb.dtype == torch.int32 and t.cell.dtype == torch.int32
    if any(cs):
        assert t.ok is not None and t.ok.dtype == torch.bool and torch.equal(t.ok, ok)
    else:
        assert t.ok is None and ok.all()
    assert torch.equal(t.nb[ok].long(), nb[ok]) and torch.equal(t.cell[ok].long(), cell[ok])
    assert (t.nb >= 0).all() and (t.nb < N).all(), "every slot, keyless or not, must point into the map"
    # the same neighbours as the whole-window brute force, query by query (key and bias cell)
    idx, valid, bidx = neighbour_table(spatial, ks, ds, (1,) * len(spatial), cs, "clamp")
    strides = [math.prod(2 * k - 1 for k in ks[a + 1:]) for a in range(len(ks))]
    flat_cell = (bidx * torch.tensor(strides)).sum(-1)
    for p in range(N):
        want = sorted(zip(idx[p][valid[p]].tolist(), flat_cell[p][valid[p]].tolist()))
        got = sorted(zip(t.nb[ok[:, p], p].tolist(), t.cell[ok[:, p], p].tolist()))
        assert got == want, f"query {p}"
        if not any(cs):  # full windows: the whole-window rows list the slots in the same order
            assert t.nb[:, p].tolist() == idx[p].tolist()
    # the inverse: for each key, p * K + c of every (query, slot) holding it, increasing; the
    # slots without a key after rowptr[N]
    assert t.rowptr.shape == (N + 1,) and t.entries.shape == (N * K,)
    assert t.rowptr.dtype == t.entries.dtype == torch.int32 and t.rowptr[0] == 0
    rows = [[] for _ in range(N)]
    for p in range(N):
        for c in range(K):
            if ok[c, p]:
                rows[nb[c, p]].append(p * K + c)
    for j in range(N):
        assert t.entries[t.rowptr[j]:t.rowptr[j + 1]].tolist() == rows[j], f"key {j}"
    assert t.rowptr[N] == int(ok.sum())
    assert sorted(t.entries[t.rowptr[N]:].tolist()) == [p * K + c for p in range(N) for c in range(K) if not ok[c, p]]


# ---------------------------------------------------------------------------------------
# The ops against the brute force
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_float64(name):
    check_case(name, F64)


@pytest.mark.parametrize("name", FLOAT32)
def test_float32(name):
    check_case(name, F32)


def test_int64_inverse_tables_and_wide_offsets_give_the_same_bits(monkeypatch):
    """scatter with int64 rowptr / entries (the tables of maps with N * K >= 2**31), and all three
    kernels with int64 offsets within a (batch, head) (WIDE, forced here), equal the plain runs."""
    x, y, w, table, t = make_case("2d_causal_dil_d100", F32)
    args = (w, x, t.rowptr, t.entries, t.K)
    plain = [OPS.na_unfused_dot_triton(x, y, t.nb, t.ok, table, t.cell, float("-inf")),
             OPS.na_unfused_sum_triton(w, y, t.nb, t.ok),
             OPS.na_unfused_scatter_triton(*args)]
    long_tables = OPS.na_unfused_scatter_triton(w, x, t.rowptr.long(), t.entries.long(), t.K)
    assert torch.equal(long_tables, plain[2])
    monkeypatch.setattr(launch, "_INT32_LIMIT", 0)
    wide = [OPS.na_unfused_dot_triton(x, y, t.nb, t.ok, table, t.cell, float("-inf")),
            OPS.na_unfused_sum_triton(w, y, t.nb, t.ok),
            OPS.na_unfused_scatter_triton(*args)]
    for a, b in zip(plain, wide):
        assert torch.equal(a, b)


def test_deterministic():
    x, y, w, table, t = make_case("3d_dil", F32, seed=1)
    runs = [(OPS.na_unfused_dot_triton(x, y, t.nb, t.ok, table, t.cell, float("-inf")),
             OPS.na_unfused_sum_triton(w, y, t.nb, t.ok),
             OPS.na_unfused_scatter_triton(w, x, t.rowptr, t.entries, t.K)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Non-finite values at slots without a key
# ---------------------------------------------------------------------------------------
def _causal_1d(dtype, D=5):
    g = torch.Generator().manual_seed(7)
    spatial, ks, ds, cs = (12,), (5,), (1,), (True,)
    t = tables(spatial, ks, ds, cs, DEVICE)
    nb, ok, _ = expected_tables(spatial, ks, ds, cs)
    N, K = 12, 5
    x, y = (torch.randn(2, 2, N, D, generator=g, dtype=F64).to(dtype).to(DEVICE) for _ in range(2))
    w = torch.randn(2, 2, N, K, generator=g, dtype=F64).to(dtype).to(DEVICE)
    return t, nb, ok, x, y, w


# the interpreter's reductions meet the NaN rows (which then reach the outputs they belong to)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", (F32, F64))
def test_dot_fill_is_exact_where_no_key(dtype):
    """Query 0's inputs are NaN and position 0 (where keyless slots point) holds inf: the keyless
    slots are exactly fill, the others follow IEEE (as in the brute force)."""
    t, nb, ok, x, y, _ = _causal_1d(dtype)
    assert (t.nb[~t.ok] == 0).all() and (~t.ok).any()
    x[:, :, 0] = float("nan")
    y[:, 0, 0] = float("inf")
    y[:, 1, 0, 2] = float("nan")
    for fill in (float("-inf"), 0.1):  # 0.1: not a float32 value (float64 keeps every bit)
        out = OPS.na_unfused_dot_triton(x, y, t.nb, t.ok, None, t.cell, fill).cpu()
        ref = ref_dot(x, y, nb, ok, None, None, fill)
        assert (out[:, :, ~ok.t()] == fill).all()
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        fin = ref.isfinite()
        assert ref.isnan().any() and fin.sum() > out.numel() // 2
        assert_close(out[fin], ref[fin], name="dot")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", (F32, F64))
def test_sum_and_scatter_ignore_nonfinite_weights_and_rows_of_keyless_slots(dtype):
    """NaN weights at every keyless slot and an inf row where those slots point (position 0): the
    inf reaches exactly the queries that hold key 0, the NaN weights reach nothing."""
    t, nb, ok, x, y, w = _causal_1d(dtype)
    w[:, :, ~ok.t().to(DEVICE)] = float("nan")
    y[:, :, 0] = float("inf")
    s = OPS.na_unfused_sum_triton(w, y, t.nb, t.ok).cpu()
    ref = ref_sum(w, y, nb, ok)
    assert not ref.isnan().all() and torch.equal(s.isnan(), ref.isnan()) and torch.equal(s.isinf(), ref.isinf())
    holds0 = ((nb == 0) & ok).any(0)
    assert s[:, :, ~holds0].isfinite().all() and not s[:, :, holds0].isfinite().any()
    fin = ref.isfinite()
    assert_close(s[fin], ref[fin], name="sum")
    sc = OPS.na_unfused_scatter_triton(w, x, t.rowptr, t.entries, t.K)
    assert sc.isfinite().all()
    assert_close(sc, ref_scatter(w, x, nb, ok), name="scatter")


# ---------------------------------------------------------------------------------------
# Sizes: empty inputs, launches split over the (batch, head) pairs
# ---------------------------------------------------------------------------------------
def test_empty_batch_and_empty_map():
    t = tables((5,), (3,), (1,), (True,), DEVICE)
    x = torch.randn(0, 2, 5, 4, device=DEVICE, dtype=F64)
    w = torch.randn(0, 2, 5, 3, device=DEVICE, dtype=F64)
    assert OPS.na_unfused_dot_triton(x, x, t.nb, t.ok, None, t.cell, 0.0).shape == (0, 2, 5, 3)
    assert OPS.na_unfused_sum_triton(w, x, t.nb, t.ok).shape == (0, 2, 5, 4)
    assert OPS.na_unfused_scatter_triton(w, x, t.rowptr, t.entries, 3).shape == (0, 2, 5, 4)
    # N = 0: tables of an empty map
    x = torch.randn(1, 2, 0, 4, device=DEVICE)
    w = torch.randn(1, 2, 0, 3, device=DEVICE)
    nb = torch.zeros(3, 0, dtype=torch.int32, device=DEVICE)
    rowptr = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    entries = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    assert OPS.na_unfused_dot_triton(x, x, nb, None, None, nb, 0.0).shape == (1, 2, 0, 3)
    assert OPS.na_unfused_sum_triton(w, x, nb, None).shape == (1, 2, 0, 4)
    assert OPS.na_unfused_scatter_triton(w, x, rowptr, entries, 3).shape == (1, 2, 0, 4)


def test_split_launches_match_brute_force(monkeypatch):
    """Launches of at most 2 (batch, head) pairs (as past CUDA's 65535): each finds its pairs
    from the launch's offset."""
    from alterops.kernels import na_unfused as kern
    from alterops.kernels import neighborhood_attention_nd as nd

    monkeypatch.setattr(nd, "GRID_Y_MAX", 2)
    grids = {}
    for name in ("na_unfused_dot_kernel", "na_unfused_sum_kernel", "na_unfused_scatter_kernel"):
        real = getattr(kern, name)

        class Recording:
            def __init__(self, real, name):
                self.real, self.name = real, name

            def __getitem__(self, grid):
                grids.setdefault(self.name, []).append(grid)
                return self.real[grid]

        monkeypatch.setattr(kern, name, Recording(real, name))
    g = torch.Generator().manual_seed(11)
    spatial, ks, ds, cs = (3, 5), (3, 3), (1, 2), (False, True)
    B, heads, N, D, K = 5, 1, 15, 6, 9
    x, y = (torch.randn(B, heads, N, D, generator=g, dtype=F64).to(DEVICE) for _ in range(2))
    w = torch.randn(B, heads, N, K, generator=g, dtype=F64).to(DEVICE)
    table = torch.randn(heads, 25, generator=g, dtype=F64).to(DEVICE)
    t = tables(spatial, ks, ds, cs, DEVICE)
    nb, ok, cell = expected_tables(spatial, ks, ds, cs)
    out = OPS.na_unfused_dot_triton(x, y, t.nb, t.ok, table, t.cell, float("-inf"))
    ref = ref_dot(x, y, nb, ok, table, cell, float("-inf"))
    assert torch.equal(out.cpu().isinf(), ref.isinf())
    assert_close(out.cpu()[:, :, ok.t()], ref[:, :, ok.t()], name="dot")
    assert_close(OPS.na_unfused_sum_triton(w, y, t.nb, t.ok), ref_sum(w, y, nb, ok), name="sum")
    assert_close(OPS.na_unfused_scatter_triton(w, x, t.rowptr, t.entries, K),
                 ref_scatter(w, x, nb, ok), name="scatter")
    assert len(grids) == 3
    for name, gs in grids.items():
        assert [gr[1] for gr in gs] == [2, 2, 1], (name, gs)


# ---------------------------------------------------------------------------------------
# Registration and argument checks
# ---------------------------------------------------------------------------------------
def test_opcheck():
    x, y, w, table, t = make_case("2d", F64)
    x, y, w = x[:1, :1].contiguous(), y[:1, :1].contiguous(), w[:1, :1].contiguous()
    table = table[:1]
    tc = tables((5, 7), (3, 5), (1, 1), (True, False), DEVICE)
    torch.library.opcheck(OPS.na_unfused_dot_triton.default, (x, y, tc.nb, tc.ok, table, tc.cell, float("-inf")))
    torch.library.opcheck(OPS.na_unfused_dot_triton.default, (x, y, t.nb, None, None, None, 0.0))
    torch.library.opcheck(OPS.na_unfused_sum_triton.default, (w, y, tc.nb, tc.ok))
    torch.library.opcheck(OPS.na_unfused_sum_triton.default, (w, y, t.nb, None))
    torch.library.opcheck(OPS.na_unfused_scatter_triton.default, (w, x, tc.rowptr, tc.entries, tc.K))


def test_argument_checks():
    t = tables((5,), (3,), (1,), (True,), DEVICE)
    x = torch.randn(1, 2, 5, 4, device=DEVICE, dtype=F64)
    w = torch.randn(1, 2, 5, 3, device=DEVICE, dtype=F64)
    dot, wsum, scat = OPS.na_unfused_dot_triton, OPS.na_unfused_sum_triton, OPS.na_unfused_scatter_triton
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        dot(x.half(), x.half(), t.nb, t.ok, None, t.cell, 0.0)
    with pytest.raises(TypeError, match="y has dtype"):
        dot(x, x.float(), t.nb, t.ok, None, t.cell, 0.0)
    with pytest.raises(ValueError, match="y must have x's shape"):
        dot(x, x[:, :1], t.nb, t.ok, None, t.cell, 0.0)
    with pytest.raises(ValueError, match="y is on meta"):  # the launcher (the op would dispatch to its fake)
        launch.dot(x, torch.empty_like(x, device="meta"), t.nb, t.ok, None, t.cell, 0.0)
    with pytest.raises(TypeError, match="nb must have dtype torch.int32"):
        dot(x, x, t.nb.long(), t.ok, None, t.cell, 0.0)
    with pytest.raises(ValueError, match="nb must have shape"):
        dot(x, x, t.nb[:, :4], t.ok, None, t.cell, 0.0)
    with pytest.raises(TypeError, match="ok must have dtype torch.bool"):
        dot(x, x, t.nb, t.ok.int(), None, t.cell, 0.0)
    with pytest.raises(ValueError, match="table must have 2"):
        dot(x, x, t.nb, t.ok, torch.zeros(3, 5, dtype=F64, device=DEVICE), t.cell, 0.0)
    with pytest.raises(TypeError, match="cell must be a torch.Tensor"):
        dot(x, x, t.nb, t.ok, torch.zeros(2, 5, dtype=F64, device=DEVICE), None, 0.0)
    with pytest.raises(TypeError, match="table has dtype"):
        dot(x, x, t.nb, t.ok, torch.zeros(2, 5, device=DEVICE), t.cell, 0.0)
    with pytest.raises(ValueError, match="w must have shape"):
        wsum(w[..., :2], x, t.nb, t.ok)
    with pytest.raises(TypeError, match="w has dtype"):
        wsum(w.float(), x, t.nb, t.ok)
    with pytest.raises(ValueError, match="rowptr must have shape"):
        scat(w, x, t.rowptr[:-1], t.entries, 3)
    with pytest.raises(TypeError, match="entries must have dtype"):
        scat(w, x, t.rowptr, t.entries.short(), 3)
    with pytest.raises(ValueError, match="w must have shape"):
        scat(w, x, t.rowptr, t.entries, 4)
