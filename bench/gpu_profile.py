"""Where the time of one forward+backward of neighbourhood attention goes on a GPU, for the
bench's 1-D, 2-D and 3-D shapes (bfloat16): the Triton and CUDA C++ backends and compiled
FlexAttention, each with

* wall: CUDA events around 20 back-to-back calls (what a training loop sees),
* host-issue: the CPU time to issue one call (no synchronisation),
* GPU kernels: the sum of the kernel times torch.profiler records per call, and the longest.

When host-issue is near the wall and above the GPU kernel time, the call is bound by its host
side (Python, launches), not by its kernels.

    python bench/gpu_profile.py > profile-fwd-bwd.txt
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from alterops.benchmark import cases_neighborhood as c

SHAPES = {2: c._ND_SHAPES[2][False], 1: c._ND_SHAPES[1][False], 3: c._ND_SHAPES[3][False]}
dev = torch.device("cuda")
for n, (B, spatial, heads, d, kernel) in SHAPES.items():
    q, k, v = (t.requires_grad_() for t in c._inputs(dev, torch.bfloat16, B, spatial, heads, d))
    gout = torch.ones_like(q)
    attend = c._NEIGHBORHOOD_ATTENTION[n]
    flex = c._FlexPeer(q, k, v, kernel, backward=True)
    runs = {"flex": flex}
    for be in ("triton", "cuda"):
        def f(be=be):
            out = attend(q, k, v, kernel, backend=be)
            out.backward(gout)
        runs[be] = f
    for name, fn in runs.items():
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                fn()
            b.record()
            torch.cuda.synchronize()
            wall = a.elapsed_time(b) / 20
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            cpu = (time.perf_counter() - t0) / 20 * 1e3
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            ev = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            ev.sort(key=lambda e: -e.device_time_total)
            tot = sum(e.device_time_total for e in ev) / 5 / 1e3
            print(f"na{n}d {name}: wall {wall:.3f} ms/call, host-issue {cpu:.3f} ms/call, "
                  f"GPU kernels {tot:.3f} ms/call", flush=True)
            for e in ev[:8]:
                print(f"    {e.device_time_total/5/1e3:8.3f} ms  x{e.count//5:<3d} {e.key[:110]}")
        except Exception as exc:  # one implementation failing is reported; the others still run
            print(f"na{n}d {name}: ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
