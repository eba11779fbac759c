import os
import sys

# Before anything imports Triton or alterops: Triton kernels run under the interpreter on a
# machine without a GPU, and kernel outputs are NaN-poisoned so unwritten elements show.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and os.path.exists("/dev/nvidia0"):
    pass
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ALTEROPS_POISON_OUTPUTS", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Waiting threads of torch's OpenMP pool sleep instead of spinning. Under pytest-xdist the
# workers' pools together hold more threads than the machine has CPUs (each keeps two, below), and
# a spinning waiter takes the core its own team's straggler, or another worker, needs: on two
# CPUs, with another process busy, a multi-threaded kernel test ran 2.5x slower (31 s against
# 12.6 s for test_band_backward_float32); alone, sleeping waits cost nothing measurable. OpenMP
# reads this when torch loads it, hence before the import (and inherited by subprocesses).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.manual_seed(0)
# Tests compare with float64 references: on an Ampere or later GPU, cuDNN's default TF32
# convolutions (the model tests' layers around the fused ops) would dominate the error.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# Under pytest-xdist (the README runs `-n logical --maxprocesses 4 --dist worksteal`) each worker
# process keeps torch's default thread count, capped so that the workers together use about as
# many threads as the machine has CPUs, but never below two: the kernels' multi-threaded splits
# still run.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _workers > 1:
    torch.set_num_threads(max(2, min(torch.get_num_threads(), (os.cpu_count() or 2) // _workers)))


def pytest_configure(config):
    # also when the tests run from a copy outside the source tree (against an installed wheel),
    # where pyproject.toml's marker list is not read
    config.addinivalue_line("markers", "slow: long interpreter or model tests")
    config.addinivalue_line("markers", "cuda_emulated: CUDA C++ kernels run on the CPU executor of tests/cuda_emu")


def pytest_addoption(parser):
    parser.addoption("--sweep-long", action="store_true", default=False,
                     help="run 10x more random configurations in tests/test_sweep.py")


# Tests that take a minute or more each (a CUDA library build, re-runs of the CPU tests at the
# other kernel levels, nvcc, emulated older CPUs) run first: with --dist worksteal the first
# worker starts on them while the others take the rest (and steal the end of its queue), instead
# of one of them starting late and leaving the others idle at the end. (A stable sort: every
# worker collects the same order, as xdist requires.)
_LONG_FIRST = ("test_cuda_library.py", "test_isa_levels.py", "test_nvcc_compile.py", "test_qemu.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in _LONG_FIRST)
