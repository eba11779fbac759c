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


needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"compiled kernels not loaded: {_ext.load_error()}")


def _expected_default_isa() -> str:
    """The level the loader must pick: the best one torch's capability allows that the CPU runs."""
    cap = _ext.torch_cpu_capability().upper()
    want = "avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") else "generic"
    able = [lv for lv in _ext.supported_isas() if lv in _ext.built_isas()]
    order = list(_ext.ISAS)
    return max((lv for lv in able if order.index(lv) <= order.index(want)), key=order.index)


@needs_ext
@pytest.mark.skipif("native" in _ext.built_isas(), reason="a -march=native build holds one level")
def test_default_cpu_isa_is_the_best_this_cpu_runs():
    if os.environ.get("ALTEROPS_CPU_ISA"):
        assert alterops.cpu_isa() == os.environ["ALTEROPS_CPU_ISA"]
    else:
        assert alterops.cpu_isa() == _expected_default_isa()
    assert set(_ext.built_isas()) == {"generic", "avx2", "avx512"}
    assert "generic" in _ext.supported_isas()


@needs_ext
@pytest.mark.skipif("native" in _ext.built_isas(), reason="a -march=native build holds one level")
def test_cpu_isa_env_forces_a_level_and_torch_capability_lowers_it():
    code = "import alterops; print(alterops.cpu_isa())"
    proc = _run(code, ALTEROPS_CPU_ISA="generic")
    assert proc.returncode == 0 and proc.stdout.strip() == "generic", proc.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "ALTEROPS_CPU_ISA"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**env, "ATEN_CPU_CAPABILITY": "default"})
    assert proc.returncode == 0 and proc.stdout.strip() == "generic", proc.stderr[-2000:]
    proc = _run(code, ALTEROPS_CPU_ISA="sse9")
    assert proc.returncode != 0 and "ALTEROPS_CPU_ISA" in proc.stderr
    unsupported = [lv for lv in _ext.ISAS if lv not in _ext.supported_isas()]
    if unsupported:  # a level above this CPU: a clear error, not an illegal instruction
        proc = _run(code, ALTEROPS_CPU_ISA=unsupported[0])
        assert proc.returncode != 0 and "cannot execute" in proc.stderr, proc.stderr[-2000:]


@needs_ext
def test_switching_levels_in_process_gives_the_same_results():
    x = torch.randn(2, 3, 17, 19)
    before = _ext.cpu_isa()
    outs = {}
    try:
        for level in _ext.supported_isas():
            if level in _ext.built_isas():
                _ext.set_cpu_isa(level)
                assert alterops.cpu_isa() == level
                outs[level] = alterops.box_blur2d(x, backend="cpu")
    finally:
        _ext.set_cpu_isa(before if not os.environ.get("ALTEROPS_CPU_ISA") else os.environ["ALTEROPS_CPU_ISA"])
    ref = torch.nn.functional.avg_pool2d(x, 2, 1, 1)
    for level, y in outs.items():
        torch.testing.assert_close(y, ref, msg=level)


def _copy_package(tmp_path, lib_setup):
    """A copy of the installed package whose _lib folder is set up by lib_setup(dir)."""
    import shutil

    src = os.path.dirname(alterops.__file__)
    dst = tmp_path / "site" / "alterops"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_lib", "__pycache__"))
    lib_setup(dst / "_lib")
    return str(tmp_path / "site")


def _run_in(site: str, code: str, **env):
    full = {**os.environ, **env}
    full["PYTHONPATH"] = site
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300,
                          cwd=site)


def test_broken_compiled_kernels_warn_once_and_fall_back(tmp_path):
    def corrupt(lib):
        os.makedirs(lib)
        (lib / "libalterops_cpu.so").write_bytes(b"not an ELF file" * 100)

    site = _copy_package(tmp_path, corrupt)
    code = """
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    import alterops
    from alterops import cli
msgs = [str(x.message) for x in w if "alterops" in str(x.message)]
print(len(msgs)); print(msgs[0] if msgs else "")
x = torch.randn(1, 2, 5, 5)
assert torch.allclose(alterops.box_blur2d(x), torch.nn.functional.avg_pool2d(x, 2, 1, 1))
assert alterops.cpu_isa() is None
print(alterops.__file__)
"""
    proc = _run_in(site, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "1", proc.stdout
    assert "could not be loaded" in lines[1] and "reinstall" in lines[1] and "ALTEROPS_QUIET" in lines[1]
    assert lines[2].startswith(site)
    quiet = _run_in(site, code.replace("print(len(msgs))", "assert not msgs, msgs; print(0)"), ALTEROPS_QUIET="1")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    info = _run_in(site, "from alterops import cli; cli.main(['info'])", ALTEROPS_QUIET="1")
    assert "could not be loaded" in info.stdout, info.stdout[-2000:]


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
    assert table.select(None, torch.device("cpu"), torch.float8_e4m3fn) == "reference"


def test_import_without_extension_or_triton(tmp_path):
    """A pure-Python install (no compiled kernels) and no Triton imports alterops silently and
    runs `reference`; asking for a missing backend names what is missing and how to get it."""
    code = """
import sys, warnings
warnings.simplefilter("error")
sys.modules["triton"] = None       # a machine where `import triton` fails
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
    site = _copy_package(tmp_path, lambda lib: None)
    proc = _run_in(site, code, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" | ", 1) for line in proc.stdout.strip().splitlines())
    assert "pip install" in lines["cpu"] and "compiled kernels are not installed" in lines["cpu"]
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
    # the attention ops say why Triton comes before the CUDA C++ kernels on GPUs
    for name in ("neighborhood_attention2d", "window_attention2d"):
        block = proc.stdout.split(f"\n{name}\n", 1)[1]
        assert block.splitlines()[0].startswith("  auto order: on cpu cpu > reference, on cuda triton > cuda"), block[:300]
        assert "Triton's neighbourhood attention kernels take less GPU time" in block.splitlines()[0]
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


def test_cli_version():
    proc = subprocess.run([sys.executable, "-m", "alterops", "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"alterops {alterops.__version__}"


def test_cli_bench_without_matplotlib_writes_json_and_says_how(tmp_path):
    code = f"""
import sys
sys.modules["matplotlib"] = None   # matplotlib not installed
from alterops import cli
sys.exit(cli.main(["bench", "--quick", "--family", "smoothing", "--case", "box_blur2d_k2_fwd",
                   "--out", {str(tmp_path)!r}, "--no-progress"]))
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "bench-cpu-quick.json").exists()
    assert not (tmp_path / "bench-cpu-quick.png").exists()
    assert "pip install matplotlib" in proc.stderr and "Traceback" not in proc.stderr


def test_runtime_dependencies_are_only_what_runs():
    from importlib.metadata import requires

    reqs = [r for r in (requires("alterops") or []) if "extra ==" not in r]
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in reqs}
    assert names == {"torch", "numpy", "tqdm"}, reqs
