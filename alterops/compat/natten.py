"""NATTEN's removed neighbourhood-attention API (versions 0.14 to 0.17), on alterops.

NATTEN 0.20 removed its unfused ops (``qk``: attention logits of each query against its
neighbourhood, ``av``: the neighbourhood-weighted sum of values), their relative position biases
and the modules built on them. Code written for them runs after changing the import::

    from alterops.compat.natten import natten2dqkrpb, natten2dav   # was: from natten.functional import ...
    from alterops.compat.natten import NeighborhoodAttention2D     # was: from natten import ...

Functions (NATTEN's names, argument order and defaults; the version that last had each):

* ``na{1,2,3}d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False,
  rpb=None)`` and ``na{1,2,3}d_av(attn, value, kernel_size, dilation=1, additional_values=None,
  is_causal=False)`` (0.17.5; ``na3d_av`` has no default dilation there, nor here);
* ``na{1,2}d_qk_with_bias(query, key, bias, kernel_size, dilation, additional_keys=None)`` and
  ``na3d_qk_with_bias(query, key, bias, kernel_size_d, kernel_size, dilation_d, dilation,
  additional_keys=None)`` (0.15.1);
* ``natten{1,2}dqkrpb(query, key, rpb, kernel_size, dilation)``, ``natten{1,2}dqk(query, key,
  kernel_size, dilation)``, ``natten{1,2}dav(attn, value, kernel_size, dilation)`` (0.14) and the
  3-D ones with ``(kernel_size_d, kernel_size, dilation_d, dilation)`` (0.15), all kept as
  deprecated aliases until 0.17.4;
* ``na{1,2,3}d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
  additional_keys=None, additional_values=None, xformers_kwargs=None)``: the fused form of 0.17.5,
  on :func:`alterops.neighborhood_attention1d` / ``2d`` / ``3d``.

Layouts (NATTEN's): the unfused ops are heads-first, ``query``/``key``/``value``
``(B, heads, *spatial, head_dim)``, ``attn`` ``(B, heads, *spatial, prod(kernel_size) + n_extra)``
with the neighbour slots in row-major order over the kernel axes, followed by one column per
additional key; the fused ``na*d`` are heads-last, ``(B, *spatial, heads, head_dim)``.
``additional_keys`` / ``additional_values`` are ``(B, heads, n_extra, head_dim)``: keys every query
attends to besides its neighbourhood.

Semantics (from NATTEN 0.17.5's CPU reference kernels, ``csrc/include/natten/cpu/naive/``:
``get_window_start``, ``get_window_end`` and ``get_pb_start`` in ``natten_cpu_commons.h``, and the
argument checks of ``csrc/include/natten/pytorch/helpers.h``):

* ``kernel_size`` odd and > 1, ``dilation >= 1``, ``kernel_size * dilation <= size`` on every axis,
  else ``ValueError`` (NATTEN raised from its C++ checks). ``kernel_size``/``dilation``/``is_causal``
  are an int (bool) or one per axis.
* The window of query ``i`` on an axis of length ``L`` lies in ``i``'s dilation sub-grid (length
  ``Lg``, index ``ig = i // dilation``): not causal, ``k`` keys starting at
  ``max(ig - k//2, 0)``, shifted back to ``Lg - k`` at the far border; causal, the keys
  ``max(ig - k + 1, 0) .. ig``. This is the ``border="clamp"`` rule of
  :func:`alterops.neighborhood_attention_nd.axis_window` with stride 1 (equal for odd kernels, both
  causal and not). A causal slot without a key gets the logit ``-inf`` from ``qk``, is ignored by
  ``av`` and passes no gradient.
* ``rpb`` (``(heads, 2k-1[, 2k-1[, 2k-1]])``, NATTEN's layout) is indexed by key minus query divided
  by the dilation, plus ``k - 1``, per axis (``get_pb_start`` + slot); the same table layout as
  ``rel_pos_bias`` of :func:`alterops.neighborhood_attention2d`. With ``is_causal`` NATTEN raised
  ``NotImplementedError`` for a bias; so does this module.
* ``qk`` does not scale (callers scale ``query`` first); ``rpb`` is cast to the key's dtype; the
  logits are computed in float32 for float16/bfloat16 inputs and returned in the query's dtype.
  ``av`` casts ``attn`` to the value's dtype and returns the value's dtype.

Implementation: the separate ``qk`` / ``av`` ops run unfused kernels over precomputed neighbour
tables (``alterops/_na_unfused.py``): ``cpu`` (C++, per instruction-set level) and ``triton``
for float32/float64 computations (float16/bfloat16 inputs compute in float32), and a plain-PyTorch
``reference`` everywhere else. The backend follows :func:`alterops.set_backend` /
``ALTEROPS_BACKEND`` (table ``natten_qk_av`` in ``alterops info``). Memory is the logits
``O(N * prod(kernel_size))`` plus ``O(N * head_dim)``; every backward pass is deterministic
(no atomics: the key and value gradients are gathers over the inverse neighbourhood). The
modules call the fused kernels instead (``alterops.neighborhood_attention{1,2,3}d``) whenever
attention dropout is inactive.

Not provided: NATTEN's nested-tensor inputs, forward-mode AD, double backward of the unfused ops,
and the context functions of ``natten`` (``use_fused_na``, the autotuner, ...).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import types
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import _na_unfused
from ..neighborhood_attention_nd import (
    merge_attentions,
    neighborhood_attention1d,
    neighborhood_attention2d,
    neighborhood_attention3d,
)

__all__ = [
    "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
    "na1d_qk_with_bias", "na2d_qk_with_bias", "na3d_qk_with_bias",
    "natten1dqkrpb", "natten2dqkrpb", "natten3dqkrpb", "natten1dqk", "natten2dqk", "natten3dqk",
    "natten1dav", "natten2dav", "natten3dav",
    "na1d", "na2d", "na3d",
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
    "enable_transformers", "hf_neighborhood_attention_forward",
]

_FUSED = {1: neighborhood_attention1d, 2: neighborhood_attention2d, 3: neighborhood_attention3d}


# =========================================================================================
# Arguments (NATTEN's rules)
# =========================================================================================
def _per_axis_int(name: str, value, n: int, default: Optional[int] = None) -> tuple:
    """An int or a tuple/list of ``n`` ints (``None`` -> ``default`` where NATTEN allowed it)."""
    if value is None and default is not None:
        return (default,) * n
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")


def _per_axis_bool(value, n: int) -> tuple:
    if value is None:
        return (False,) * n
    if isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(isinstance(x, bool) for x in value):
        return tuple(value)
    raise ValueError(f"is_causal must be a bool or a tuple of {n} bools, got {value!r}")


def _args(n: int, spatial: Sequence[int], kernel_size, dilation, is_causal):
    ks = _per_axis_int("kernel_size", kernel_size, n)
    ds = _per_axis_int("dilation", dilation, n, default=1)
    cs = _per_axis_bool(is_causal, n)
    for k, d, size in zip(ks, ds, spatial):
        if k <= 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be odd and greater than 1 on every axis, got {ks}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1 on every axis, got {ds}")
        if k * d > size:
            raise ValueError(f"every spatial axis must be at least kernel_size * dilation long: kernel_size {ks}, "
                             f"dilation {ds}, spatial shape {tuple(spatial)}")
    return ks, ds, cs


def _check_heads_first(n: int, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.is_nested:
        raise NotImplementedError(f"{name}: nested tensors are not supported")
    if t.dim() != n + 3:
        raise ValueError(f"{name} must be (B, heads, *spatial, head_dim) with {n} spatial axes ({n + 3}-D), "
                         f"got shape {tuple(t.shape)}")


def _check_extra(name: str, extra: Optional[Tensor], like: Tensor, n_dims: int) -> int:
    """``additional_keys`` / ``additional_values``: ``(B, heads, n_extra, head_dim)``; returns n_extra."""
    if extra is None:
        return 0
    if not isinstance(extra, Tensor) or extra.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (B, heads, n_extra, head_dim), got "
                         f"{tuple(extra.shape) if isinstance(extra, Tensor) else type(extra).__name__}")
    if extra.shape[0] != like.shape[0] or extra.shape[1] != like.shape[1] or (
            n_dims and extra.shape[-1] != like.shape[-1]):
        raise ValueError(f"{name} of shape {tuple(extra.shape)} must match batch, heads"
                         f"{' and head_dim' if n_dims else ''} of {tuple(like.shape)}")
    if extra.device != like.device:
        raise ValueError(f"{name} is on {extra.device} but the inputs are on {like.device}")
    return extra.shape[2]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# =========================================================================================
# The unfused ops (heads-first)
# =========================================================================================
def _qk(n: int, query, key, kernel_size, dilation, additional_keys, is_causal, rpb):
    _check_heads_first(n, "query", query)
    _check_heads_first(n, "key", key)
    if query.shape != key.shape:
        raise ValueError(f"query and key must have the same shape, got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.dtype != key.dtype or query.device != key.device:
        raise ValueError(f"query and key must have the same dtype and device, got {query.dtype} on {query.device} "
                         f"and {key.dtype} on {key.device}")
    spatial = tuple(query.shape[2:2 + n])
    ks, ds, cs = _args(n, spatial, kernel_size, dilation, is_causal)
    heads = query.shape[1]
    if rpb is not None:
        if any(cs):
            raise NotImplementedError("a relative position bias with causal neighbourhood attention is not defined "
                                      "by NATTEN; use alterops.neighborhood_attention{1,2,3}d for that combination")
        want = (heads, *(2 * k - 1 for k in ks))
        if not isinstance(rpb, Tensor) or tuple(rpb.shape) != want:
            raise ValueError(f"rpb must have shape {want} for {heads} heads and kernel_size {ks}, got "
                             f"{tuple(rpb.shape) if isinstance(rpb, Tensor) else type(rpb).__name__}")
        if rpb.device != query.device:
            raise ValueError(f"rpb is on {rpb.device} but query is on {query.device}")
    n_extra = _check_extra("additional_keys", additional_keys, query, 1)
    B, D = query.shape[0], query.shape[-1]
    compute = _compute_dtype(query.dtype)
    backend = _na_unfused.TABLE.select(None, query.device, compute)
    t = _na_unfused.tables(spatial, ks, ds, cs, query.device)
    q = query.to(compute).reshape(B, heads, -1, D)
    k = key.to(compute).reshape(B, heads, -1, D)
    table = None if rpb is None else rpb.to(key.dtype).to(compute).reshape(heads, -1)
    attn = _na_unfused.NeighbourQK.apply(q, k, table, t, backend)
    if n_extra:
        extra = torch.matmul(q, additional_keys.to(compute).transpose(-1, -2))
        attn = torch.cat([attn, extra], dim=-1)
    return attn.reshape(B, heads, *spatial, -1).to(query.dtype)


def _av(n: int, attn, value, kernel_size, dilation, additional_values, is_causal):
    _check_heads_first(n, "attn", attn)
    _check_heads_first(n, "value", value)
    if attn.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"attn {tuple(attn.shape)} and value {tuple(value.shape)} must match in batch, heads "
                         f"and spatial axes")
    if attn.device != value.device:
        raise ValueError(f"attn is on {attn.device} but value is on {value.device}")
    spatial = tuple(value.shape[2:2 + n])
    ks, ds, cs = _args(n, spatial, kernel_size, dilation, is_causal)
    K = math.prod(ks)
    n_extra = _check_extra("additional_values", additional_values, value, 1)
    if attn.shape[-1] != K + n_extra:
        raise ValueError(f"attn must have {K} neighbourhood weights{f' + {n_extra} additional' if n_extra else ''} "
                         f"per query for kernel_size {ks}, got {attn.shape[-1]}")
    B, heads, D = value.shape[0], value.shape[1], value.shape[-1]
    compute = _compute_dtype(value.dtype)
    a = attn.to(value.dtype).to(compute).reshape(B, heads, -1, K + n_extra)
    v = value.to(compute).reshape(B, heads, -1, D)
    backend = _na_unfused.TABLE.select(None, value.device, compute)
    t = _na_unfused.tables(spatial, ks, ds, cs, value.device)
    out = _na_unfused.NeighbourAV.apply(a[..., :K], v, t, backend)
    if n_extra:
        out = out + torch.matmul(a[..., K:], additional_values.to(compute))
    return out.reshape(value.shape).to(value.dtype)


def na1d_qk(query: Tensor, key: Tensor, kernel_size, dilation=1, additional_keys: Optional[Tensor] = None,
            is_causal=False, rpb: Optional[Tensor] = None) -> Tensor:
    """1-D logits ``(B, heads, L, kernel_size [+ n_extra])`` of ``query`` against its neighbours
    in ``key`` (both ``(B, heads, L, head_dim)``), plus ``rpb[h, key - query + k - 1]``."""
    return _qk(1, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na2d_qk(query: Tensor, key: Tensor, kernel_size, dilation=1, additional_keys: Optional[Tensor] = None,
            is_causal=False, rpb: Optional[Tensor] = None) -> Tensor:
    """2-D logits ``(B, heads, H, W, kh * kw [+ n_extra])``; inputs ``(B, heads, H, W, head_dim)``."""
    return _qk(2, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na3d_qk(query: Tensor, key: Tensor, kernel_size, dilation=1, additional_keys: Optional[Tensor] = None,
            is_causal=False, rpb: Optional[Tensor] = None) -> Tensor:
    """3-D logits ``(B, heads, T, H, W, kt * kh * kw [+ n_extra])``; inputs ``(B, heads, T, H, W, head_dim)``."""
    return _qk(3, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na1d_av(attn: Tensor, value: Tensor, kernel_size, dilation=1, additional_values: Optional[Tensor] = None,
            is_causal=False) -> Tensor:
    """``(B, heads, L, head_dim)``: each query's neighbours in ``value`` weighted by ``attn``."""
    return _av(1, attn, value, kernel_size, dilation, additional_values, is_causal)


def na2d_av(attn: Tensor, value: Tensor, kernel_size, dilation=1, additional_values: Optional[Tensor] = None,
            is_causal=False) -> Tensor:
    """``(B, heads, H, W, head_dim)``: each query's neighbours in ``value`` weighted by ``attn``."""
    return _av(2, attn, value, kernel_size, dilation, additional_values, is_causal)


def na3d_av(attn: Tensor, value: Tensor, kernel_size, dilation, additional_values: Optional[Tensor] = None,
            is_causal=False) -> Tensor:
    """``(B, heads, T, H, W, head_dim)``: each query's neighbours in ``value`` weighted by ``attn``."""
    return _av(3, attn, value, kernel_size, dilation, additional_values, is_causal)


# NATTEN 0.15: the bias as the third positional argument; 3-D with separate depth arguments
def na1d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size: int, dilation: int,
                      additional_keys: Optional[Tensor] = None) -> Tensor:
    return _qk(1, query, key, kernel_size, dilation, additional_keys, False, bias)


def na2d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size: int, dilation: int,
                      additional_keys: Optional[Tensor] = None) -> Tensor:
    return _qk(2, query, key, kernel_size, dilation, additional_keys, False, bias)


def na3d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size_d: int, kernel_size: int,
                      dilation_d: int, dilation: int, additional_keys: Optional[Tensor] = None) -> Tensor:
    return _qk(3, query, key, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation),
               additional_keys, False, bias)


# NATTEN <= 0.14 (kept as deprecated aliases up to 0.17.4)
def natten1dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: int, dilation: int) -> Tensor:
    return _qk(1, query, key, kernel_size, dilation, None, False, rpb)


def natten2dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: int, dilation: int) -> Tensor:
    return _qk(2, query, key, kernel_size, dilation, None, False, rpb)


def natten3dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size_d: int, kernel_size: int,
                  dilation_d: int, dilation: int) -> Tensor:
    return _qk(3, query, key, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation),
               None, False, rpb)


def natten1dqk(query: Tensor, key: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _qk(1, query, key, kernel_size, dilation, None, False, None)


def natten2dqk(query: Tensor, key: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _qk(2, query, key, kernel_size, dilation, None, False, None)


def natten3dqk(query: Tensor, key: Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> Tensor:
    return _qk(3, query, key, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation),
               None, False, None)


def natten1dav(attn: Tensor, value: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _av(1, attn, value, kernel_size, dilation, None, False)


def natten2dav(attn: Tensor, value: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _av(2, attn, value, kernel_size, dilation, None, False)


def natten3dav(attn: Tensor, value: Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> Tensor:
    return _av(3, attn, value, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation),
               None, False)


# =========================================================================================
# The fused form (heads-last), NATTEN 0.17.5's na1d / na2d / na3d
# =========================================================================================
def _fused(n: int, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
           additional_values, xformers_kwargs):
    if xformers_kwargs is not None:
        raise ValueError("xformers_kwargs configures NATTEN's xformers attention for additional tokens; "
                         "alterops computes that attention itself and takes no such options")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != n + 3:
            raise ValueError(f"{name} must be (B, *spatial, heads, head_dim) with {n} spatial axes")
    spatial = tuple(query.shape[1:1 + n])
    ks, ds, cs = _args(n, spatial, kernel_size, dilation, is_causal)
    if rpb is not None and any(cs):
        raise NotImplementedError("a relative position bias with causal neighbourhood attention is not defined "
                                  "by NATTEN; use alterops.neighborhood_attention{1,2,3}d for that combination")
    if scale is None:
        scale = query.shape[-1] ** -0.5
    extra = additional_keys is not None
    if extra:  # (B, heads, n_extra, D) against the heads-last inputs
        _check_extra("additional_keys", additional_keys, query.movedim(-2, 1), 1)
        _check_extra("additional_values", additional_values, value.movedim(-2, 1), 1)
    out = _FUSED[n](query, key, value, ks, ds, is_causal=cs, rel_pos_bias=rpb, scale=scale, return_lse=extra)
    if not extra:
        return out
    out, lse = out
    B, heads, D = query.shape[0], query.shape[-2], query.shape[-1]
    compute = _compute_dtype(query.dtype)
    q = query.to(compute).reshape(B, -1, heads, D).transpose(1, 2)  # (B, heads, N, D)
    logits = torch.matmul(q, additional_keys.to(compute).transpose(-1, -2)) * scale
    lse_extra = torch.logsumexp(logits, dim=-1)
    out_extra = torch.matmul(torch.softmax(logits, dim=-1), additional_values.to(compute))
    out_extra = out_extra.transpose(1, 2).reshape(out.shape).to(out.dtype)
    lse_extra = lse_extra.transpose(1, 2).reshape(lse.shape).to(lse.dtype)
    return merge_attentions([out, out_extra], [lse, lse_extra])[0]


def na1d(query: Tensor, key: Tensor, value: Tensor, kernel_size, dilation=1, is_causal=False,
         rpb: Optional[Tensor] = None, scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
         additional_values: Optional[Tensor] = None, xformers_kwargs=None) -> Tensor:
    """Fused 1-D neighbourhood attention, ``(B, L, heads, head_dim)`` in and out."""
    return _fused(1, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs)


def na2d(query: Tensor, key: Tensor, value: Tensor, kernel_size, dilation=1, is_causal=False,
         rpb: Optional[Tensor] = None, scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
         additional_values: Optional[Tensor] = None, xformers_kwargs=None) -> Tensor:
    """Fused 2-D neighbourhood attention, ``(B, H, W, heads, head_dim)`` in and out."""
    return _fused(2, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs)


def na3d(query: Tensor, key: Tensor, value: Tensor, kernel_size, dilation=1, is_causal=False,
         rpb: Optional[Tensor] = None, scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
         additional_values: Optional[Tensor] = None, xformers_kwargs=None) -> Tensor:
    """Fused 3-D neighbourhood attention, ``(B, T, H, W, heads, head_dim)`` in and out."""
    return _fused(3, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs)


# =========================================================================================
# The modules of NATTEN 0.17 (NeighborhoodAttention1D / 2D / 3D), checkpoint-compatible
# =========================================================================================
_QK = {1: na1d_qk, 2: na2d_qk, 3: na3d_qk}
_AV = {1: na1d_av, 2: na2d_av, 3: na3d_av}


class _NeighborhoodAttention(nn.Module):
    _dims = 0

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, is_causal=False,
                 rel_pos_bias: bool = False, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, use_experimental_ops: bool = False, *,
                 bias: Optional[bool] = None, kernel_size_d: Optional[int] = None,
                 dilation_d: Optional[int] = None):
        super().__init__()
        n = self._dims
        if bias is not None:  # NATTEN <= 0.15 name of rel_pos_bias
            rel_pos_bias = bias
        if n == 3 and (kernel_size_d is not None or dilation_d is not None):  # NATTEN 0.15's 3-D arguments
            if not isinstance(kernel_size, int) or not isinstance(dilation, int):
                raise ValueError("kernel_size_d / dilation_d go with an int kernel_size and dilation (NATTEN 0.15)")
            kernel_size = (kernel_size_d or kernel_size, kernel_size, kernel_size)
            dilation = (dilation_d or dilation, dilation, dilation)
        self.kernel_size = _per_axis_int("kernel_size", kernel_size, n)
        self.dilation = _per_axis_int("dilation", dilation, n, default=1)
        self.is_causal = _per_axis_bool(is_causal, n)
        if any(k <= 1 or k % 2 == 0 for k in self.kernel_size) or min(self.dilation) < 1:
            raise ValueError(f"kernel_size must be odd and > 1 and dilation >= 1, got {self.kernel_size}, "
                             f"{self.dilation}")
        if any(self.is_causal) and rel_pos_bias:
            raise NotImplementedError("causal neighbourhood attention with a relative position bias is not defined "
                                      "by NATTEN")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_experimental_ops = use_experimental_ops

    def forward(self, x: Tensor) -> Tensor:
        n = self._dims
        if x.dim() != n + 2:
            raise ValueError(f"{type(self).__name__} expects a rank-{n + 2} input (B, *spatial, C), got {x.dim()}-D")
        B, *spatial, C = x.shape
        qkv = self.qkv(x).reshape(B, *spatial, 3, self.num_heads, self.head_dim)
        if self.training and self.attn_drop.p > 0:
            # NATTEN's unfused path: dropout on the attention weights
            q, k, v = qkv.movedim(n + 1, 0).movedim(-2, 2).unbind(0)  # (B, heads, *spatial, D) each
            attn = _QK[n](q * self.scale, k, self.kernel_size, self.dilation, is_causal=self.is_causal, rpb=self.rpb)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = _AV[n](attn, v, self.kernel_size, self.dilation, is_causal=self.is_causal)
            out = out.movedim(1, -2)
        else:
            _args(n, spatial, self.kernel_size, self.dilation, self.is_causal)
            q, k, v = qkv.unbind(-3)
            out = _FUSED[n](q, k, v, self.kernel_size, self.dilation, is_causal=self.is_causal,
                            rel_pos_bias=self.rpb, scale=self.scale)
        return self.proj_drop(self.proj(out.reshape(B, *spatial, C)))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, has_bias={self.rpb is not None}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """NATTEN 0.17's ``NeighborhoodAttention1D``: input and output ``(B, L, dim)``; parameters
    ``qkv``, ``rpb`` (``(heads, 2k-1)`` when ``rel_pos_bias``), ``proj``."""
    _dims = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """NATTEN 0.17's ``NeighborhoodAttention2D``: input and output ``(B, H, W, dim)``; parameters
    ``qkv``, ``rpb`` (``(heads, 2kh-1, 2kw-1)`` when ``rel_pos_bias``), ``proj``."""
    _dims = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """NATTEN 0.17's ``NeighborhoodAttention3D``: input and output ``(B, T, H, W, dim)``; parameters
    ``qkv``, ``rpb`` (``(heads, 2kt-1, 2kh-1, 2kw-1)`` when ``rel_pos_bias``), ``proj``."""
    _dims = 3


# =========================================================================================
# Hugging Face DiNAT / NAT
# =========================================================================================
# transformers modules whose models call natten2dqkrpb / natten2dav
_HF_MODELING = (
    "transformers.models.dinat.modeling_dinat",
    "transformers.models.nat.modeling_nat",
    "transformers.models.deprecated.nat.modeling_nat",
)


def hf_neighborhood_attention_forward(self, hidden_states: Tensor, output_attentions: bool = False, *args,
                                      **kwargs):
    """The computation of transformers' DiNAT / NAT ``NeighborhoodAttention`` modules, on the
    ``(B, H, W, C)`` map they receive: ``query``/``key``/``value`` projections to
    ``(B, heads, H, W, head_dim)``, the query divided by ``sqrt(head_dim)``, ``natten2dqkrpb`` with
    the module's ``rpb``, kernel and dilation (NAT: 1), softmax, the module's ``dropout``,
    ``natten2dav``, heads back into channels. Returns ``(context,)`` or ``(context, probs)``."""
    B, H, W, _ = hidden_states.shape
    heads, d = self.num_attention_heads, self.attention_head_size
    dilation = getattr(self, "dilation", 1)

    def heads_first(layer):
        return layer(hidden_states).view(B, H, W, heads, d).permute(0, 3, 1, 2, 4)

    q = heads_first(self.query) / math.sqrt(d)
    k, v = heads_first(self.key), heads_first(self.value)
    probs = natten2dqkrpb(q, k, self.rpb, self.kernel_size, dilation).softmax(dim=-1)
    probs = self.dropout(probs)
    context = natten2dav(probs, v, self.kernel_size, dilation).permute(0, 2, 3, 1, 4).reshape(B, H, W, heads * d)
    return (context, probs) if output_attentions else (context,)


def _requires_backends_without_natten(original):
    def requires_backends(obj, backends):
        if not isinstance(backends, (list, tuple)):
            backends = [backends]
        rest = [b for b in backends if b != "natten"]
        if rest:
            original(obj, rest)

    requires_backends._alterops_original = original
    return requires_backends


def _functional_namespace(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.natten2dqkrpb, module.natten2dav = natten2dqkrpb, natten2dav
    return module


@contextlib.contextmanager
def _natten_functional_standin():
    """While importing a transformers modeling module: ``natten.functional`` (and ``natten`` when the
    installed one cannot be imported) in ``sys.modules`` exposing this module's functions. The
    previous entries are restored afterwards."""
    try:
        importlib.import_module("natten")
        parent_ok = True
    except ImportError:
        parent_ok = False
    missing = object()
    saved = {name: sys.modules.get(name, missing) for name in ("natten", "natten.functional")}
    try:
        functional = _functional_namespace("natten.functional")
        sys.modules["natten.functional"] = functional
        if not parent_ok:
            package = types.ModuleType("natten")
            package.__path__ = []
            package.functional = functional
            sys.modules["natten"] = package
        yield
    finally:
        for name, module in saved.items():
            if module is missing:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _import_modeling(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        # natten installed but without natten2dqkrpb / natten2dav (NATTEN >= 0.17.5), or broken
        if (e.name or "").split(".")[0] != "natten":
            raise
    with _natten_functional_standin():
        return importlib.import_module(name)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package does not exist in this transformers version
        return False


def enable_transformers() -> tuple:
    """Make transformers' DiNAT and NAT models (``DinatModel``, ``DinatForImageClassification``,
    ``DinatBackbone``; ``NatModel``, ... in 4.x) construct and run without NATTEN, or with a NATTEN
    (>= 0.17.5) that no longer has ``natten2dqkrpb`` / ``natten2dav``.

    It imports the modeling modules that exist in the installed transformers
    (``models.dinat.modeling_dinat``, ``models.deprecated.nat.modeling_nat`` / ``models.nat``) and,
    in each, rebinds three module-level names: ``natten2dqkrpb`` and ``natten2dav`` to this module's
    functions, ``requires_backends`` to a wrapper that no longer requires ``"natten"`` (other
    backends are still checked by transformers' own function). In DiNAT's module it also sets
    ``NeighborhoodAttention.forward`` to :func:`hf_neighborhood_attention_forward` (transformers
    4.57 and 5.x shape the projections wrongly there). Nothing else of transformers or of an
    installed ``natten`` changes; if importing a modeling module fails on ``from natten.functional
    import ...``, it is imported while a stand-in ``natten.functional`` is in ``sys.modules``, which
    is removed again. Idempotent. Returns the names of the modules patched.

    ``alterops.swap(model)`` then replaces their attention with the fused op.
    """
    importlib.import_module("transformers")
    patched = []
    for name in _HF_MODELING:
        if not _module_exists(name):
            continue
        module = _import_modeling(name)
        module.natten2dqkrpb, module.natten2dav = natten2dqkrpb, natten2dav
        current = getattr(module, "requires_backends", None)
        if current is not None and not hasattr(current, "_alterops_original"):
            module.requires_backends = _requires_backends_without_natten(current)
        if name.endswith("modeling_dinat"):
            module.NeighborhoodAttention.forward = hf_neighborhood_attention_forward
        patched.append(name)
    if not patched:
        raise ImportError("the installed transformers has neither DiNAT nor NAT modeling modules")
    return tuple(patched)
