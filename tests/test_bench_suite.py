"""``alterops bench`` (the fixed suite) end to end on tiny cases: quick mode names the shapes it ran
and applies no full-size targets, cases that need a missing package are reported as left out,
``--isa all`` runs every CPU kernel level this CPU can run side by side, and the chart is laid out
so that nothing covers anything. Timing itself is not asserted."""
import json
import sys
import time

import pytest
import torch

from alterops import _ext, benchmark
from alterops import cli as alterops_cli
from alterops.benchmark import Case, Workload, harness

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")
CEILINGS = {"bandwidth": 10.0, "matmul_fp32": 100.0}


def registered(family, name):
    (case,) = [c for c in benchmark.cases() if c.family == family and c.name == name]
    return case


@pytest.fixture
def fixed_ceilings(monkeypatch):
    """The ceilings are not what these tests are about: skip the 1-2 s of measuring them."""
    monkeypatch.setattr(harness, "measure_ceilings", lambda device, quick=False: dict(CEILINGS))


def slow_case(name="slow_sleep"):
    """ours 3 ms, the peer 1 ms: misses a 2x speedup target whenever targets are applied."""
    def make(device, quick):
        return Workload(ours=lambda: time.sleep(0.003), peers={"fast": lambda: time.sleep(0.001)},
                        bytes=1e6, targets={"speedup:fast": 2.0})

    return Case("test", name, make, devices=("cpu",), max_repeats=3)


# ---------------------------------------------------------------------------------------------
# quick mode
# ---------------------------------------------------------------------------------------------
def test_quick_mode_names_the_shapes_run_and_applies_no_targets(fixed_ceilings):
    na = registered("neighborhood", "na2d_fwd_bwd_zero_56x56_k7")
    w = na.make(CPU, True)
    assert w.label == "na2d_fwd_bwd_zero_28x28_k7"  # the quick shapes, not the full-size name
    assert "28x28" in w.note and "B=1" in w.note

    def labelled(device, quick):
        return Workload(ours=lambda: time.sleep(0.001), peers={"peer": lambda: time.sleep(0.001)},
                        targets={"speedup:peer": 50.0, "ceiling": 0.9}, bytes=1e6,
                        label="tiny_4x4" if quick else "big_512x512")

    report = harness.run_suite([Case("test", "big_512x512", labelled, devices=("cpu",), max_repeats=3), slow_case()],
                               CPU, quick=True, progress=False)
    by_case = {r["case"]: r for r in report["results"]}
    assert by_case["big_512x512"]["name"] == "tiny_4x4" and by_case["slow_sleep"]["name"] == "slow_sleep"
    for r in report["results"]:
        assert r["status"] == "ok" and r["targets"] == {} and "no target in quick mode" in r["targets_note"]
    assert report["quick"] is True and "no target in quick mode" in report["targets"]
    table = harness.format_table(report)
    assert table.startswith("QUICK RUN") and "MISS" not in table and "512x512" not in table
    assert "test/tiny_4x4" in table and "none (quick mode)" in table
    assert "QUICK RUN" in harness.draw_chart(report).axes[0].get_title()

    # the same slow case at full size does get its target, and misses it
    full = harness.run_case(slow_case(), CPU, CEILINGS, quick=False)
    assert full.targets["speedup:fast"]["met"] is False and not full.targets_note
    full_report = {"machine": report["machine"], "ceilings": CEILINGS, "quick": False,
                   "results": [full.as_dict()]}
    assert "fast>=2:MISS" in harness.format_table(full_report)
    assert "QUICK" not in harness.format_table(full_report)


# ---------------------------------------------------------------------------------------------
# cases left out: never silently
# ---------------------------------------------------------------------------------------------
def test_cases_needing_transformers_are_reported_as_left_out(tmp_path, monkeypatch, capsys, fixed_ceilings):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    hf = [c for c in benchmark.cases() if c.name.startswith("hf_swin_t")]
    assert len(hf) == 2
    assert all("transformers is not installed" in c.unavailable() and "alterops[bench]" in c.unavailable()
               for c in hf)
    assert not harness.select_cases(hf, CPU)  # code that cannot report them does not get them
    rc = alterops_cli.main(["bench", "--quick", "--device", "cpu", "--family", "models", "--case", "hf_swin",
                            "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "left out: models/hf_swin_t_fwd_b8: transformers is not installed; pip install 'alterops[bench]'" in out
    assert "left out: models/hf_swin_t_train_step_b8" in out
    text = (tmp_path / "bench-cpu-quick.json").read_text()
    assert "NaN" not in text  # strict JSON: a case that did not run has no time (null), not NaN
    report = json.loads(text)
    assert all(r["ours_ms"] is None for r in report["results"])
    assert [x["case"] for x in report["left_out"]] == ["models/hf_swin_t_fwd_b8", "models/hf_swin_t_train_step_b8"]
    assert all(r["status"] == "skipped" and "transformers" in r["skipped"] for r in report["results"])
    assert (tmp_path / "bench-cpu-quick.png").read_bytes()[:8] == PNG_MAGIC
    notes = "\n".join(t.get_text() for t in harness.draw_chart(report).texts)
    assert "left out: models/hf_swin_t_fwd_b8: transformers is not installed" in notes


def test_missing_peer_is_named_in_the_table():
    report = {"machine": {"device_name": "cpu", "torch": torch.__version__, "threads": 1}, "ceilings": {},
              "quick": False, "results": [dict(harness.Result("f", "c", 1.0, peers_ms={"p": 2.0}, speedups={"p": 2.0},
                                                              peers_left_out={"natten": "natten is not installed"}
                                                              ).as_dict())]}
    assert "peer left out: natten in f/c: natten is not installed" in harness.format_table(report)


# ---------------------------------------------------------------------------------------------
# --isa
# ---------------------------------------------------------------------------------------------
needs_kernels = pytest.mark.skipif(not _ext.loaded(), reason="the compiled CPU kernels are not loaded")


@needs_kernels
def test_isa_all_runs_every_level_this_cpu_can_run(tmp_path, capsys, fixed_ceilings):
    levels = harness.isa_levels("all")
    runnable = [lv for lv in _ext.supported_isas() if lv in _ext.built_isas()]
    assert levels == (["native"] if "native" in _ext.built_isas() else runnable)
    before = _ext.cpu_isa()
    rc = alterops_cli.main(["bench", "--quick", "--isa", "all", "--family", "statistics",
                            "--case", "feature_variance_fwd", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert _ext.cpu_isa() == before  # the level chosen at load time is back
    report = json.loads((tmp_path / "bench-cpu-isa-all-quick.json").read_text())
    assert report["isa_levels"] == levels
    results = report["results"]
    assert [r["isa"] for r in results] == levels
    assert all(r["status"] == "ok" and r["case"] == "feature_variance_fwd" and r["ours_ms"] > 0 for r in results)
    assert len({r["peers_ms"]["torch_var"] for r in results}) == 1  # the peer is timed once per case
    for level in levels:
        assert f"statistics/feature_variance_fwd  {level}" in out
    assert (tmp_path / "bench-cpu-isa-all-quick.png").read_bytes()[:8] == PNG_MAGIC
    labels = [t.get_text() for t in harness.draw_chart(report).axes[0].get_yticklabels()]
    assert labels == [f"statistics/feature_variance_fwd vs torch_var [{lv}]" for lv in levels]


@needs_kernels
def test_isa_levels_really_switch_the_kernels(fixed_ceilings):
    import alterops

    seen = []

    def make(device, quick):
        x = torch.randn(2, 3, 9, 9)

        def ours():
            seen.append(torch.ops.alterops._cpu_loaded_kernels()[0])
            return torch.zeros(())

        return Workload(ours=ours, peers={"torch": lambda: x.var(dim=(2, 3)).mean()},
                        check=lambda: torch.testing.assert_close(alterops.feature_variance(x),
                                                                 x.double().var(dim=(2, 3)).mean().float()))

    levels = harness.isa_levels("all")
    report = harness.run_suite([Case("test", "which_level", make, devices=("cpu",), max_repeats=3)], CPU,
                               quick=True, progress=False, isa=levels)
    assert [r["isa"] for r in report["results"]] == levels
    assert list(dict.fromkeys(seen)) == levels


@needs_kernels
def test_isa_bad_values_are_errors_naming_the_option(tmp_path, capsys):
    assert alterops_cli.main(["bench", "--isa", "sse9", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--isa must be 'all' or one of generic, avx2, avx512, got 'sse9'" in capsys.readouterr().err
    if "avx512" not in _ext.supported_isas() and "native" not in _ext.built_isas():
        assert alterops_cli.main(["bench", "--isa", "avx512", "--out", str(tmp_path), "--no-progress"]) == 2
        assert "--isa avx512: this CPU cannot execute it" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--isa selects CPU kernel levels"):
        harness.run_suite([slow_case()], torch.device("cuda"), quick=True, progress=False, isa=["generic"])


# ---------------------------------------------------------------------------------------------
# the chart
# ---------------------------------------------------------------------------------------------
def test_chart_numbers_legend_and_notes_are_readable(tmp_path):
    pytest.importorskip("matplotlib")

    def result(name, speedup, target=None, bound=None, **kw):
        r = harness.Result("fam", name, 1.0, peers_ms={"peer": speedup}, speedups={"peer": speedup}, **kw)
        if target is not None:
            r.targets = {"speedup:peer": {"target": target, "value": speedup, "met": speedup >= target}}
        if bound is not None:
            r.bounds = {"peer": bound}
        return r.as_dict()

    report = {"machine": {"device_name": "test CPU"}, "quick": False,
              "left_out": [{"case": "models/x", "reason": "x is not installed; pip install x"}],
              "results": [result("met", 20.0, target=10.0), result("missed", 1.1, target=1.3, bound=1.2),
                          result("none", 0.8), dict(result("broken", 1.0), error="RuntimeError: boom", status="error")]}
    fig = harness.draw_chart(report)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["target met", "target missed", "no target", "target"]
    assert any(text.startswith("bound") for text in legend)
    numbers = list(ax.texts)
    assert [t.get_text() for t in numbers] == ["20.0x  target 10x", "1.10x  target 1.3x  bound 1.20x", "0.80x"]
    plot_area = ax.get_window_extent(renderer)
    for t in numbers:  # the numbers sit in a column right of the plot: no bar or tick under them
        assert t.get_window_extent(renderer).x0 >= plot_area.x1
    bound = [line for line in ax.lines if line.get_marker() == "D"]
    assert len(bound) == 1 and bound[0].get_markersize() >= 6 and bound[0].get_xdata()[0] == 1.2
    notes = "\n".join(t.get_text() for t in fig.texts)
    assert "left out: models/x: x is not installed" in notes and "error: fam/broken: RuntimeError: boom" in notes
    assert "speedup of alterops over the peer" in ax.get_xlabel()
    path = tmp_path / "chart.png"
    harness.write_chart(report, str(path))
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_bench_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        alterops_cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "alterops bench --quick" in out and "alterops bench --isa all" in out
    assert "--isa LEVEL" in out


@needs_kernels
@pytest.mark.parametrize("name", ["natten2d_unfused_fwd_bwd_56x56_k7", "na2d_fwd_bwd_zero_56x56_k7",
                                  "na2d_dinat_fwd_bwd_56x56_k7_dil8"])
def test_backward_cases_time_fresh_gradients(name):
    """A forward+backward case's timed calls (ours and every peer) return the output and fresh
    gradients, the same on every call (nothing accumulates into ``.grad`` between them, which
    would time autograd's additions too), and its check passes after them (every level of
    ``--isa all`` after the first runs it after timed calls)."""
    wl = registered("neighborhood", name).make(CPU, True)
    for fn in [wl.ours, *wl.peers.values()]:
        first, second = fn(), fn()
        assert len(first) >= 4  # out, dq, dk, dv (and dbias)
        for a, b in zip(first, second):
            assert a.shape == first[0].shape or a.dim() == 3
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    wl.check()
