"""The pool behind the CPU kernels' large outputs.

A fresh CPU tensor of tens of MB is new memory from the operating system, and the first write
into each of its pages faults and zeroes the page. For a bandwidth-bound op such as a blur that
costs several times the op itself. Like PyTorch's CUDA caching allocator, the ``cpu`` backend
serves outputs of 4 MiB and more from a pool of blocks that earlier outputs released, so a loop
that frees and recomputes same-shaped outputs (every training step) reuses warm pages.

The pool keeps at most ``ALTEROPS_CPU_POOL_MB`` MiB of unused blocks (default 1024; ``0`` turns
it off); memory in use by live tensors is never limited. Other backends allocate as PyTorch does.

The CPU neighbourhood attention kernels also keep the window plans of their last 4 distinct calls
(up to 16 MiB each; ``cpu_plan_cache_bytes`` says how much). ``empty_cache`` drops those too.
"""
from __future__ import annotations

import torch

from . import _ext

__all__ = ["empty_cache", "cpu_pool_stats", "cpu_plan_cache_bytes", "set_cpu_pool_limit"]

_STAT_KEYS = ("cached_bytes", "in_use_bytes", "hits", "misses", "limit_bytes")


def _available() -> bool:
    return _ext.has_op("cpu_pool_stats")


def empty_cache() -> None:
    """Return the pool's unused blocks to the operating system and drop the kept neighbourhood
    attention plans (live tensors are untouched; a later call rebuilds its plan)."""
    if _available():
        torch.ops.alterops.cpu_pool_empty()
    if _ext.has_op("cpu_plan_cache_clear"):
        torch.ops.alterops.cpu_plan_cache_clear()


def cpu_plan_cache_bytes() -> int:
    """Bytes held by the neighbourhood attention plans kept for repeated calls (the window index
    tables, bias columns and a copy of each bias table), 0 without the compiled extension."""
    if not _ext.has_op("cpu_plan_cache_bytes"):
        return 0
    return int(torch.ops.alterops.cpu_plan_cache_bytes())


def cpu_pool_stats() -> dict:
    """``cached_bytes`` (unused, kept), ``in_use_bytes`` (held by live outputs), ``hits`` and
    ``misses`` (requests served from the pool / from the system) and ``limit_bytes``. All zero
    when the compiled extension is not available."""
    if not _available():
        return dict.fromkeys(_STAT_KEYS, 0)
    return dict(zip(_STAT_KEYS, (int(v) for v in torch.ops.alterops.cpu_pool_stats())))


def set_cpu_pool_limit(mib: int) -> None:
    """Keep at most ``mib`` MiB of unused blocks from now on (``0`` turns the pool off and
    releases what it holds). Overrides ``ALTEROPS_CPU_POOL_MB`` for this process."""
    if isinstance(mib, bool) or not isinstance(mib, int) or mib < 0:
        raise ValueError(f"mib must be a non-negative int, got {mib!r}")
    if _available():
        torch.ops.alterops.cpu_pool_set_limit(mib << 20)
