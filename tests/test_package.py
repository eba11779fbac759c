"""Packaging, dispatch and CLI: the foundation every op family relies on."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import alterops
from alterops import _dispatch, _ext
from alterops.benchmark import Case, Workload, harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


# --- the install the README describes provides every CPU-side backend ------------------
@pytest.mark.skipif(os.environ.get("ALTEROPS_NO_EXTENSION") == "1", reason="pure-Python install requested")
def test_extension_is_built_and_loaded():
    assert _ext.loaded(), _ext.load_error()
    # every family registers at least one compiled CPU op
    ops = [name for name in dir(torch.ops.alterops) if not name.startswith("_")]
    assert ops, "alterops._C registered no ops"


@pytest.mark.skipif(os.environ.get("ALTEROPS_NO_EXTENSION") == "1", reason="pure-Python install requested")
@pytest.mark.skipif(os.environ.get("ALTEROPS_CPU_ARCH", "native") != "native", reason="a non-native CPU build")
def test_cpu_kernels_use_this_cpus_simd_path():
    """The default build (-march=native) compiles the best SIMD path this CPU runs (AVX-512, AVX2)."""
    host = _ext.host_cpu_simd()
    if host is None:
        pytest.skip("CPU flags unknown here")
    assert _ext.cpu_simd() == host


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton is a Linux dependency")
def test_triton_is_available():
    ok, why = _dispatch.triton_status()
    assert ok, why


def test_every_op_is_exported_and_registered():
    table = _dispatch.registry()
    expected = {"box_blur2d", "tanh_blur2d", "neighborhood_attention2d", "window_attention2d",
                "delta_log_amplitude", "feature_variance"}
    assert expected <= set(table), f"missing dispatch tables: {expected - set(table)}"
    for name in expected:
        assert callable(getattr(alterops, name)), name
        assert name in alterops.__all__
        assert "reference" in table[name].backends


# --- dispatch -----------------------------------------------------------------------------
def test_set_backend_nests_and_restores():
    assert _dispatch.get_backend() is None
    with alterops.set_backend("reference"):
        assert _dispatch.get_backend() == "reference"
        with alterops.set_backend("cpu"):
            assert _dispatch.get_backend() == "cpu"
        with alterops.set_backend(None):
            assert _dispatch.get_backend() is None
        assert _dispatch.get_backend() == "reference"
    assert _dispatch.get_backend() is None


def test_set_backend_is_per_thread():
    seen = {}

    def worker():
        seen["other"] = _dispatch.get_backend()

    with alterops.set_backend("reference"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert seen["other"] is None


def test_bad_backend_names_are_rejected():
    with pytest.raises(ValueError, match="set_backend"):
        with alterops.set_backend("gpu"):
            pass
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        alterops.box_blur2d(x, backend="fast")


def test_explicit_unavailable_backend_says_why():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(alterops.BackendUnavailableError, match="cuda.*CUDA tensors"):
        alterops.box_blur2d(x, backend="cuda")


def test_env_default_backend():
    code = "import alterops, torch; print(alterops.get_backend())"
    assert _run(code, ALTEROPS_BACKEND="reference").stdout.strip() == "reference"
    proc = _run(code, ALTEROPS_BACKEND="bogus")
    assert proc.returncode != 0 and "ALTEROPS_BACKEND" in proc.stderr


def test_constant_marking_matches_torch():
    """_dispatch marks its selection function constant for dynamo the way torch's own decorator does."""
    import torch._dynamo

    def f():
        return 1

    marked = torch._dynamo.assume_constant_result(f)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert getattr(_dispatch._select_constant, "_dynamo_marked_constant", False) is True


def test_backend_choice_under_torch_compile_follows_set_backend():
    x = torch.randn(1, 2, 6, 5)
    f = torch.compile(lambda t: alterops.box_blur2d(t), fullgraph=True)
    expected = torch.nn.functional.avg_pool2d(x, 2, 1, 1)
    torch.testing.assert_close(f(x), expected)
    with alterops.set_backend("reference"):
        torch.testing.assert_close(f(x), expected)


def test_auto_falls_back_to_reference_for_unsupported_dtype():
    table = _dispatch.registry()["box_blur2d"]
    assert table.select(None, torch.device("cpu"), torch.float16) == "reference"


def test_import_without_extension_or_triton():
    """A machine with no compiler and no Triton imports alterops and runs `reference`; asking
    for a missing backend names what is missing and how to get it."""
    code = """
import sys
sys.modules["triton"] = None       # a machine where `import triton` fails
sys.modules["alterops._C"] = None  # and where the extension was never built
import torch, alterops
x = torch.randn(2, 3, 6, 7)
y = alterops.box_blur2d(x, backend="reference")
ref = torch.nn.functional.avg_pool2d(x, 2, 1, 1, count_include_pad=True)
assert torch.allclose(y, ref, atol=1e-6)
assert alterops.box_blur2d(x).shape == ref.shape   # auto picks reference
for b in ("cpu", "triton"):
    try:
        alterops.box_blur2d(x, backend=b)
    except alterops.BackendUnavailableError as e:
        print(b, "|", e)
    else:
        raise SystemExit(f"backend {b} should be unavailable")
"""
    proc = _run(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" | ", 1) for line in proc.stdout.strip().splitlines())
    assert "pip install" in lines["cpu"] and "alterops._C" in lines["cpu"]
    assert "Triton is not importable" in lines["triton"] and "pip install triton" in lines["triton"]


def test_import_is_light():
    """Importing alterops loads neither Triton nor torch._dynamo; they load when first needed."""
    proc = _run("import sys, alterops; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False"]


def test_disable_flags_are_named_in_errors():
    code = """
import torch, alterops
for b in ("cpu", "triton"):
    try:
        alterops.box_blur2d(torch.randn(1, 1, 4, 4), backend=b)
    except alterops.BackendUnavailableError as e:
        print(e)
"""
    proc = _run(code, ALTEROPS_DISABLE_EXTENSION="1", ALTEROPS_DISABLE_TRITON="1", TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALTEROPS_DISABLE_EXTENSION=1" in proc.stdout and "ALTEROPS_DISABLE_TRITON=1" in proc.stdout


# --- CLI ------------------------------------------------------------------------------------
def test_cli_info_lists_every_op():
    from alterops import cli

    proc = subprocess.run([sys.executable, "-m", "alterops", "info", "-v"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in _dispatch.registry():
        assert f"\n{name}\n" in proc.stdout
    assert "auto picks" in proc.stdout
    assert cli.build_parser().parse_args(["bench", "--quick"]).quick


def test_cli_bench_writes_json_and_png(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "alterops", "bench", "--quick", "--family", "smoothing", "--case", "box_blur2d_k2_fwd",
         "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.load(open(tmp_path / "bench-cpu-quick.json"))
    assert report["ceilings"]["bandwidth"] > 0 and report["ceilings"]["matmul_fp32"] > 0
    assert report["results"] and not any(r["error"] for r in report["results"])
    r = report["results"][0]
    assert r["ours_ms"] > 0 and r["peers_ms"] and r["rate_unit"] == "GB/s"
    assert (tmp_path / "bench-cpu-quick.png").stat().st_size > 1000


# --- the harness ----------------------------------------------------------------------------
def test_harness_speedups_and_targets():
    def make(device, quick):
        return Workload(ours=lambda: time.sleep(0.002), peers={"slow": lambda: time.sleep(0.012)},
                        bytes=2e6, targets={"speedup:slow": 3.0, "ceiling": 1e9})

    case = Case("test", "sleep", make, devices=("cpu",), max_repeats=5)
    res = harness.run_case(case, torch.device("cpu"), {"bandwidth": 10.0})
    assert 3.0 < res.speedups["slow"] < 8.0
    assert res.targets["speedup:slow"]["met"] is True
    assert res.targets["ceiling"]["met"] is False  # 1 GB/s of a 10 GB/s ceiling is not 1e9x
    assert res.rate_unit == "GB/s" and res.ceiling == "bandwidth"


def test_harness_check_failure_is_reported():
    def make(device, quick):
        def check():
            raise AssertionError("mismatch")
        return Workload(ours=lambda: None, check=check)

    report = harness.run_suite([Case("test", "bad", make, devices=("cpu",))], torch.device("cpu"), quick=True,
                               progress=False)
    assert "mismatch" in report["results"][0]["error"]
