"""Float64 brute force of the N-d neighbourhood attention family, shared by its test files:
NATTEN's window rule written out with Python integers (one query at a time), each query's key
list turned into index tables, and the attention formed from those lists. Independent of the
library's own window helpers and reference."""
from __future__ import annotations

import functools
import itertools
import math

import torch

# ---------------------------------------------------------------------------------------
def axis_neighbours(i, length, kernel, dilation, stride, causal, border):
    """[(key position or None for a zero key outside the map, bias index)] of query i on one axis."""
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    if border != "clamp":
        out = []
        for j in range(kernel):
            p = i + dilation * (j - left)
            if 0 <= p < length:
                out.append((p, j - left + kernel - 1))
            elif border == "zero":
                out.append((None, j - left + kernel - 1))
        return out
    res, ig = i % dilation, i // dilation
    n_grid = -(-(length - res) // dilation)
    if causal:
        leader = min((ig // stride) * stride + stride - 1, n_grid - 1)
        first, end = max(leader - left - right, 0), min(ig + 1, n_grid)
    else:
        leader = min((ig // stride) * stride + stride // 2, n_grid - 1)
        first = max(leader - left, 0)
        if leader + right >= n_grid:
            first += n_grid - right - leader - 1
        end = first + kernel
    return [(res + dilation * g, g - ig + kernel - 1) for g in range(first, end)]


def neighbour_table(spatial, kernel, dilation, stride, causal, border):
    """Per query (row-major): flat key index (N for a zero key), validity, bias index tuple."""
    args = tuple(tuple(int(x) for x in a) for a in (spatial, kernel, dilation, stride, causal)) + (border,)
    return tuple(t.clone() for t in _neighbour_table(*args))


@functools.lru_cache(maxsize=32)
def _neighbour_table(spatial, kernel, dilation, stride, causal, border):
    # (built once per window rule and map: the test cases run each at several widths and dtypes)
    n = len(spatial)
    N = math.prod(spatial)
    per_axis = [[axis_neighbours(i, spatial[a], kernel[a], dilation[a], stride[a], causal[a], border)
                 for i in range(spatial[a])] for a in range(n)]
    rows = []
    for p in itertools.product(*[range(s) for s in spatial]):
        entries = []
        for combo in itertools.product(*[per_axis[a][p[a]] for a in range(n)]):
            if any(pos is None for pos, _ in combo):
                flat = N
            else:
                flat = 0
                for a, (pos, _) in enumerate(combo):
                    flat = flat * spatial[a] + pos
            entries.append((flat, tuple(b for _, b in combo)))
        rows.append(entries)
    width = max(len(r) for r in rows)
    no_bias = (0,) * n  # (the bias index of padding entries)
    idx = torch.tensor([[f for f, _ in r] + [N] * (width - len(r)) for r in rows], dtype=torch.long)
    valid = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], dtype=torch.bool)
    bidx = torch.tensor([[b for _, b in r] + [no_bias] * (width - len(r)) for r in rows], dtype=torch.long)
    return idx.reshape(N, width), valid.reshape(N, width), bidx.reshape(N, width, n)


def brute_force(q, k, v, kernel, dilation, stride, causal, border, table=None, scale=None):
    """float64 attention of every query over its neighbour list; differentiable. Returns (out, lse)."""
    n = q.dim() - 3
    B, spatial, heads, D = q.shape[0], tuple(q.shape[1:1 + n]), q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    g = heads // hkv
    N = math.prod(spatial)
    scale = D ** -0.5 if scale is None else scale
    idx, valid, bidx = neighbour_table(spatial, kernel, dilation, stride, causal, border)
    qf = q.double().reshape(B, N, hkv, g, D)
    zero = torch.zeros(B, 1, hkv, D, dtype=torch.float64)
    kf = torch.cat([k.double().reshape(B, N, hkv, D), zero], 1)[:, idx]  # (B, N, width, hkv, D)
    vf = torch.cat([v.double().reshape(B, N, hkv, D), zero], 1)[:, idx]
    logits = torch.einsum("bnhgd,bnchd->bnhgc", qf, kf) * scale
    if table is not None:
        t = table.double().expand(heads, *table.shape[1:])
        bias = t[(slice(None), *bidx.unbind(-1))]  # (heads, N, width)
        logits = logits + bias.reshape(hkv, g, N, -1).permute(2, 0, 1, 3).unsqueeze(0)
    logits = logits.masked_fill(~valid[None, :, None, None, :], float("-inf"))
    attn = torch.softmax(logits, -1)
    out = torch.einsum("bnhgc,bnchd->bnhgd", attn, vf).reshape(B, *spatial, heads, D)
    lse = torch.logsumexp(logits, -1).reshape(B, *spatial, heads)
    return out, lse
