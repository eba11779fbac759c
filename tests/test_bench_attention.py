"""``alterops bench attention``: the CLI end to end on tiny cases (JSON, CSV, chart), the
failure statuses (out of memory, a killed worker, a timeout, a mismatching implementation,
simulated through the public ``register_impl``), and every peer's semantics against an
independent float64 brute force."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import time

import pytest
import torch

import alterops as ao
from alterops import cli
from alterops.benchmark import attention as bench
from alterops.benchmark import peers_attention as peers
from alterops.benchmark.peers_attention import AttnCase, Impl, Prepared


# ---------------------------------------------------------------------------------------
# test doubles, registered through the public extension point (module-level: they are
# pickled to the worker processes)
# ---------------------------------------------------------------------------------------
def _build_oom(case):
    def fn(q, k, v, table):  # a real allocation failure, not a raised stand-in
        return torch.empty(2 ** 62, dtype=torch.uint8)
    return Prepared(fn)


def _build_killed(case):
    def fn(q, k, v, table):  # what the kernel's OOM killer does to a process
        os.kill(os.getpid(), signal.SIGKILL)
    return Prepared(fn)


def _build_slow(case):
    def fn(q, k, v, table):
        time.sleep(60)
    return Prepared(fn)


def _build_wrong_scale(case):
    """A plausible bug: the logit scale off by 10%."""
    def fn(q, k, v, table):
        return ao.neighborhood_attention2d(q, k, v, case.kernel, case.dilation, border=case.border,
                                           rel_pos_bias=table, scale=1.1 * case.head_dim ** -0.5)
    return Prepared(fn)


FAKES = [
    Impl("test-oom", ("neighborhood", "window"), build=_build_oom),
    Impl("test-killed", ("neighborhood", "window"), build=_build_killed),
    Impl("test-slow", ("neighborhood", "window"), build=_build_slow),
    Impl("test-wrong-scale", ("neighborhood",), build=_build_wrong_scale),
]


@pytest.fixture
def fakes():
    for impl in FAKES:
        peers.register_impl(impl)
    yield
    for impl in FAKES:
        peers.unregister_impl(impl.name)


def _records(path):
    with open(path) as fh:
        report = json.load(fh)
    return report, {r["implementation"]: r for r in report["records"]}


# ---------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------
def test_neighborhood_fwd_bwd_end_to_end_with_failures(tmp_path, fakes, capsys):
    out = tmp_path / "na"
    impl = "alterops-cpu,sdpa-dense,unfold,natten,swin,test-oom,test-killed,test-wrong-scale,alterops-triton"
    rc = cli.main(["bench", "attention", "--op", "neighborhood", "--batch", "2", "--size", "12x10", "--heads", "2",
                   "--head-dim", "16", "--kernel", "5", "--dtype", "float32", "--pass", "fwd+bwd", "--out", str(out),
                   "--impl", impl, "--repeats", "3", "--min-time", "0", "--no-progress"])
    assert rc == 0
    report, rec = _records(out / "attention-neighborhood.json")
    assert set(rec) == set(impl.split(","))
    for r in report["records"]:
        assert r["status"] in bench.STATUSES
        assert r["case"] == {"op": "neighborhood", "batch": 2, "height": 12, "width": 10, "heads": 2, "head_dim": 16,
                             "kernel": 5, "dilation": 1, "border": "clamp", "bias": False, "dtype": "float32",
                             "device": "cpu", "pass": "fwd+bwd"}
    for name in ("alterops-cpu", "sdpa-dense"):
        r = rec[name]
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["repeats"] >= 3
        assert r["spread_ms"]["min"] <= r["median_ms"] <= r["spread_ms"]["max"]
        assert r["peak_memory_bytes"] > 0
        assert r["max_err"] < 1e-4 and r["checked_on"] == "whole case"
        assert r["tflops"] == pytest.approx(bench.flops(AttnCase("neighborhood", 2, 12, 10, 2, 16, kernel=5,
                                                                 pass_="fwd+bwd")) / r["median_ms"] * 1e-9)
        assert 0 < r["ceiling_fraction"]
    assert bench.flops(AttnCase("neighborhood", 2, 12, 10, 2, 16, kernel=5, pass_="fwd+bwd")) == 3.5 * 4 * 2 * 2 * 120 * 25 * 16
    ours, dense = rec["alterops-cpu"], rec["sdpa-dense"]
    assert ours["speedup_over"] == {"sdpa-dense": pytest.approx(dense["median_ms"] / ours["median_ms"])}
    assert dense["speedup_over"]["alterops-cpu"] == pytest.approx(ours["median_ms"] / dense["median_ms"])
    # the simulated failures are recorded as such, and the run went on past each of them
    assert rec["test-oom"]["status"] == "oom" and "allocate" in rec["test-oom"]["reason"]
    assert rec["test-killed"]["status"] == "oom" and "SIGKILL" in rec["test-killed"]["reason"]
    wrong = rec["test-wrong-scale"]
    assert wrong["status"] == "mismatch" and wrong["median_ms"] is None and wrong["speedup_over"] == {}
    assert wrong["max_err"] > 1e-3
    assert "test-wrong-scale" not in ours["speedup_over"]
    for name, why in (("unfold", "clamp"), ("swin", "window attention"), ("alterops-triton", "interpreter")):
        assert rec[name]["status"] == "skipped" and why in rec[name]["reason"], rec[name]
    if rec["natten"]["status"] == "skipped":
        assert rec["natten"]["reason"]
    with open(out / "attention-neighborhood.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["implementation"]: r["status"] for r in rows} == {n: r["status"] for n, r in rec.items()}
    printed = capsys.readouterr().out
    assert "alterops-cpu" in printed and "mismatch" in printed and "wrote" in printed


def test_timeout_is_recorded_and_the_run_goes_on(tmp_path, fakes):
    rc = cli.main(["bench", "attention", "--op", "window", "--batch", "1", "--size", "8", "--heads", "1",
                   "--head-dim", "8", "--window", "4", "--impl", "test-slow,alterops-cpu", "--timeout", "2",
                   "--repeats", "3", "--min-time", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    _, rec = _records(tmp_path / "attention-window.json")
    assert rec["test-slow"]["status"] == "timeout" and "2 s" in rec["test-slow"]["reason"]
    assert rec["test-slow"]["wall_s"] < 30
    assert rec["alterops-cpu"]["status"] == "ok"


def test_window_sweep_chart_and_exponents(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "win"
    rc = cli.main(["bench", "attention", "--op", "window", "--batch", "2", "--size", "28", "--heads", "3",
                   "--head-dim", "32", "--window", "7", "--shift", "3", "--sweep", "size=14,28,56", "--out", str(out),
                   "--impl", "alterops-cpu,sdpa-dense", "--repeats", "3", "--min-time", "0", "--no-progress"])
    assert rc == 0
    report, _ = _records(out / "attention-window.json")
    assert len(report["records"]) == 6
    assert sorted({r["tokens"] for r in report["records"]}) == [196, 784, 3136]
    assert all(r["status"] == "ok" for r in report["records"]), [(r["implementation"], r["reason"])
                                                                 for r in report["records"] if r["status"] != "ok"]
    png = out / "attention-window.png"
    assert png.stat().st_size > 20_000
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    (exps,) = report["sweep"]["exponents"].values()
    # the dense N x N mask grows quadratically with the tokens, the fused kernel's memory linearly
    assert exps["sdpa-dense"]["memory"] > 1.4
    assert exps["sdpa-dense"]["memory"] > exps["alterops-cpu"]["memory"] + 0.5
    assert 0.5 < exps["alterops-cpu"]["memory"] < 1.4
    assert all(e["time"] is not None and math.isfinite(e["time"]) for e in exps.values())


def test_bad_options_fail_with_a_clear_message(tmp_path, capsys):
    base = ["bench", "attention", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(base + ["--kernel", "0"]) == 2
    assert "kernel_size" in capsys.readouterr().err
    assert cli.main(base + ["--size", "6", "--kernel", "7"]) == 2  # clamp needs kernel <= size
    assert "border='clamp'" in capsys.readouterr().err
    assert cli.main(base + ["--impl", "alterops-cpu,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(base + ["--sweep", "heads=1,2"]) == 2
    assert "--sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base + ["--size", "0"])
    assert "--size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_help_mentions_the_command_and_shows_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "attention" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "attention", "--help"])
    text = capsys.readouterr().out
    assert "--sweep size=14,28,56" in text and "--pass fwd+bwd" in text and "examples:" in text


# ---------------------------------------------------------------------------------------
# every peer computes the op's exact semantics (independent float64 brute force)
# ---------------------------------------------------------------------------------------
def _brute_na(q, k, v, kernel, dilation, border, table):
    """Per query: the key set by the rules of docs/semantics.md, written loop by loop."""
    B, H, W, h, d = q.shape
    r = (kernel - 1) // 2
    out = torch.zeros_like(q)

    def axis(p, L):
        if border == "clamp":
            res = p % dilation
            n = (L - res + dilation - 1) // dilation
            start = res + dilation * min(max(p // dilation - r, 0), n - kernel)
            return [start + dilation * i for i in range(kernel)]
        return [p + dilation * (i - r) for i in range(kernel)]

    for y in range(H):
        for x in range(W):
            keys = [(ky, kx) for ky in axis(y, H) for kx in axis(x, W)]
            logits, vals = [], []
            for ky, kx in keys:
                inside = 0 <= ky < H and 0 <= kx < W
                if not inside and border == "mask":
                    continue
                kk = k[:, ky, kx] if inside else torch.zeros_like(k[:, 0, 0])
                vv = v[:, ky, kx] if inside else torch.zeros_like(v[:, 0, 0])
                s = (q[:, y, x] * kk).sum(-1) * d ** -0.5
                if table is not None:
                    s = s + table[:, (ky - y) // dilation + kernel - 1, (kx - x) // dilation + kernel - 1]
                logits.append(s)
                vals.append(vv)
            a = torch.softmax(torch.stack(logits, -1), -1)
            out[:, y, x] = (a[..., None] * torch.stack(vals, -2)).sum(-2)
    return out


def _brute_window(q, k, v, window, shift, table):
    B, H, W, h, d = q.shape
    Hp, Wp = -(-H // window) * window, -(-W // window) * window

    def info(p, Lp):
        pr = (p - shift) % Lp
        reg = (pr >= Lp - window) + (pr >= Lp - shift) if shift else 0
        return pr // window, reg, pr % window

    out = torch.zeros_like(q)
    for y in range(H):
        for x in range(W):
            wy, gy, oy = info(y, Hp)
            wx, gx, ox = info(x, Wp)
            logits, vals = [], []
            for ky in range(H):
                for kx in range(W):
                    kwy, kgy, koy = info(ky, Hp)
                    kwx, kgx, kox = info(kx, Wp)
                    if (kwy, kgy, kwx, kgx) != (wy, gy, wx, gx):
                        continue
                    s = (q[:, y, x] * k[:, ky, kx]).sum(-1) * d ** -0.5
                    if table is not None:
                        s = s + table[:, koy - oy + window - 1, kox - ox + window - 1]
                    logits.append(s)
                    vals.append(v[:, ky, kx])
            a = torch.softmax(torch.stack(logits, -1), -1)
            out[:, y, x] = (a[..., None] * torch.stack(vals, -2)).sum(-2)
    return out


_PEER_CASES = [
    AttnCase("neighborhood", 1, 7, 9, 2, 4, kernel=3, dilation=2, bias=True, border="clamp"),
    AttnCase("neighborhood", 1, 7, 6, 2, 4, kernel=5, border="mask", bias=True),
    AttnCase("neighborhood", 1, 8, 7, 2, 4, kernel=3, dilation=2, border="zero", bias=True),
    AttnCase("window", 1, 8, 8, 2, 4, window=4, shift=2, bias=True),
    AttnCase("window", 1, 7, 6, 2, 4, window=4, shift=1, bias=True),  # padded to multiples
    AttnCase("window", 2, 6, 6, 2, 4, window=3, shift=0),
]


@pytest.mark.parametrize("case", _PEER_CASES, ids=lambda c: c.label().replace(" ", "_"))
def test_every_peer_computes_the_op(case):
    case = AttnCase(**{**case.__dict__, "dtype": "float64"})
    g = torch.Generator().manual_seed(3)
    shape = (case.batch, case.height, case.width, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    K = case.kernel if case.op == "neighborhood" else case.window
    table = torch.randn(case.heads, 2 * K - 1, 2 * K - 1, generator=g, dtype=torch.float64) if case.bias else None
    if case.op == "neighborhood":
        want = _brute_na(q, k, v, case.kernel, case.dilation, case.border, table)
    else:
        want = _brute_window(q, k, v, case.window, case.shift, table)
    ran = []
    for name in ("flex-eager", "sdpa-dense", "unfold", "swin", "hf-swin"):
        impl = peers.impls()[name]
        reason = impl.reason(case)
        if reason is not None:
            continue
        prep = impl.build(case)
        nat = prep.to_native or (lambda t: t)
        ours = prep.to_ours or (lambda t: t)
        with torch.no_grad():
            got = ours(prep.fn(nat(q), nat(k), nat(v), table))
        # Swin's -100 shift mask leaves exp(-100) of weight across regions: exact to 1e-12 here
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
        ran.append(name)
    expected = {"neighborhood": {"clamp": {"flex-eager", "sdpa-dense"}, "mask": {"flex-eager", "sdpa-dense", "unfold"},
                                 "zero": {"unfold"}}[case.border],
                "window": {"flex-eager", "sdpa-dense"} | ({"swin", "hf-swin"} if case.height % case.window == 0
                                                          and case.width % case.window == 0 else set())}[case.op]
    if importlib.util.find_spec("transformers") is None:
        expected.discard("hf-swin")
    assert set(ran) == expected
