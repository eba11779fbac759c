"""AlterNet under DistributedDataParallel: two gloo processes on the CPU give the single-process gradients.

Each rank takes half of the batch; the loss is a batch mean, so DDP's averaged gradients equal the
full-batch gradients of one process. Batch norm runs in eval mode (running statistics) so that the
per-rank batches do not change the function. Only localhost is used, on a free port, with a
bounded timeout.
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import alterops._dispatch as dispatch

STEPS = 3
TIMEOUT_S = 120


def fused_backend() -> str:
    ok = all(dispatch.registry()[op].why_not("cpu", torch.device("cpu"), torch.float32) is None
             for op in ("window_attention2d", "tanh_blur2d"))
    return "cpu" if ok else "reference"


def build(backend: str):
    from alterops.models import AlterNet

    torch.manual_seed(0)
    model = AlterNet((1, 2, 2, 2), (0, 1, 1, 1), (1, 2, 2, 2), widths=(8, 16, 16, 16), dim_head=16,
                     num_classes=10, window_size=4, smoothing=True, backend=backend)
    # non-trivial running statistics, then eval-mode batch norm
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    return model.eval()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([1, 4, 7, 9])


def run(model, x, y, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    params = {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}
    return grads, params


def worker(rank: int, world: int, port: int, backend: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model = nn.parallel.DistributedDataParallel(build(backend))
        x, y = data()
        per = x.shape[0] // world
        grads, params = run(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per], STEPS)
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_two_processes_match_single_process(tmp_path):
    backend = fused_backend()
    world = 2
    ctx = mp.start_processes(worker, args=(world, free_port(), backend, str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    torch.set_num_threads(1)
    x, y = data()
    grads, params = run(build(backend), x, y, STEPS)
    for r in range(world):
        for step in range(STEPS):
            for name, g in grads[step].items():
                got = results[r]["grads"][step][name]
                scale = g.abs().max().item()
                assert (got - g).abs().max().item() <= 1e-4 * scale + 1e-6, f"rank {r} step {step} grad {name}"
        for name, p in params.items():
            torch.testing.assert_close(results[r]["params"][name], p, rtol=1e-4, atol=1e-5)
    # the attention tables were trained (their gradients are not zero)
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "rel_pos_bias" in n)
