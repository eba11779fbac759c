"""The installed build on CPUs older than this one, by emulation.

``qemu-x86_64 -cpu MODEL`` (Debian's qemu-user) runs a whole Python process on an emulated CPU:
``Haswell`` has AVX2 and FMA but no AVX-512 (torch reports AVX2), ``Nehalem`` has no AVX at all
(torch reports DEFAULT). There ``import alterops`` and every op family must work on small
tensors, match the reference backend, and report the right level. A build with AVX-512 code on
its load path dies here with "Illegal instruction" (exit 132): that is what this catches.
Importing torch under emulation takes about 25 s; each run is one process.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from alterops import _ext

QEMU = shutil.which("qemu-x86_64")

SCRIPT = r"""
import json, torch, alterops
torch.manual_seed(0)
out = {"isa": alterops.cpu_isa(), "capability": str(torch.backends.cpu.get_cpu_capability()), "errors": {}}
def check(name, fn):
    try:
        a, b = fn("cpu"), fn("reference")
        a = a if isinstance(a, (list, tuple)) else [a]
        b = b if isinstance(b, (list, tuple)) else [b]
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-5)
    except Exception as e:
        out["errors"][name] = f"{type(e).__name__}: {e}"[:500]
x = torch.randn(2, 3, 11, 13)
check("box_blur2d", lambda b: alterops.box_blur2d(x, backend=b))
check("tanh_blur2d", lambda b: alterops.tanh_blur2d(x, 3, padding="same", pad_mode="reflect", backend=b))
xs = torch.randn(2, 3, 12, 12)
check("delta_log_amplitude", lambda b: alterops.delta_log_amplitude(xs, backend=b))
check("feature_variance", lambda b: alterops.feature_variance(xs, backend=b))
q, k, v = torch.randn(3, 1, 9, 10, 2, 16).unbind(0)
table = torch.randn(2, 5, 5)
def na(b):
    qq, kk, vv, tt = (t.clone().requires_grad_() for t in (q, k, v, table))
    y = alterops.neighborhood_attention2d(qq, kk, vv, kernel_size=3, rel_pos_bias=tt, backend=b)
    y.square().sum().backward()
    return [y.detach(), qq.grad, kk.grad, vv.grad, tt.grad]
check("neighborhood_attention2d", na)
def wa(b):
    qq, kk, vv, tt = (t.clone().requires_grad_() for t in (q, k, v, table))
    y = alterops.window_attention2d(qq, kk, vv, window_size=3, shift=1, rel_pos_bias=tt, backend=b)
    y.square().sum().backward()
    return [y.detach(), qq.grad, kk.grad, vv.grad, tt.grad]
check("window_attention2d", wa)
q1, k1, v1 = torch.randn(3, 2, 13, 4, 8).unbind(0)
def na1(b):  # the N-d kernel's strided, causal, even-kernel, grouped-head path
    qq, kk, vv = (t.clone().requires_grad_() for t in (q1, k1[:, :, :2], v1[:, :, :2]))
    y = alterops.neighborhood_attention1d(qq, kk, vv, kernel_size=4, stride=2, is_causal=True, backend=b)
    y.square().sum().backward()
    return [y.detach(), qq.grad, kk.grad, vv.grad]
check("neighborhood_attention1d", na1)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (apt-get install qemu-user)")
@pytest.mark.skipif(not _ext.loaded(), reason=f"compiled kernels not loaded: {_ext.load_error()}")
@pytest.mark.skipif("native" in _ext.built_isas(), reason="a -march=native build targets this machine only")
@pytest.mark.parametrize("model,isa,capability", [("Haswell", "avx2", "AVX2"), ("Nehalem", "generic", "DEFAULT")])
def test_runs_on_an_older_cpu(model, isa, capability):
    env = {k: v for k, v in os.environ.items() if k not in ("ALTEROPS_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env["OMP_NUM_THREADS"] = "2"
    proc = subprocess.run([QEMU, "-cpu", model, sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode} under -cpu {model}:\n{proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(line[0][len("RESULT "):])
    assert res["capability"] == capability
    assert res["isa"] == isa
    assert not res["errors"], res["errors"]
