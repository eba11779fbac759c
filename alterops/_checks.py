"""Input validation shared by every op: errors name the argument and what was expected."""
from __future__ import annotations

from typing import Sequence

import torch

from . import _config

_POISON = _config.poison_outputs()


def empty(shape, *, like: torch.Tensor | None = None, dtype=None, device=None) -> torch.Tensor:
    """Allocate a kernel output. Under ``ALTEROPS_POISON_OUTPUTS=1`` it is NaN-filled first."""
    dtype = dtype if dtype is not None else like.dtype
    device = device if device is not None else like.device
    if _POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def tensor(name: str, x, *, ndim: int | None = None, layout: str = "") -> torch.Tensor:
    """``x`` must be a floating-point tensor of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        where = f" {layout}" if layout else ""
        raise ValueError(
            f"{name} must have {ndim} dimensions{where}, got shape {tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    return x


def same(names: Sequence[str], tensors: Sequence[torch.Tensor], *, shape: bool = True) -> None:
    """The tensors share device, dtype and (optionally) shape."""
    first, ref = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != ref.device:
            raise ValueError(f"{n} is on {t.device} but {first} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {first} has dtype {ref.dtype}")
        if shape and t.shape != ref.shape:
            raise ValueError(
                f"{n} has shape {tuple(t.shape)} but {first} has shape {tuple(ref.shape)}"
            )


MAX_INT = 2**31 - 1  # every size-like int argument (kernels, strides, padding, ...) is below this


def pair(name: str, value, *, minimum: int | None = None, odd: bool = False) -> tuple[int, int]:
    """An int or a pair of ints, returned as a pair, checked against ``minimum`` and oddness."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        out = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        out = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if minimum is not None and min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(out) > MAX_INT:
        raise ValueError(f"{name} must be <= {MAX_INT}, got {value!r}")
    if odd and (out[0] % 2 == 0 or out[1] % 2 == 0):
        raise ValueError(f"{name} must be odd, got {value!r}")
    return out


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if positive and not out > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out
