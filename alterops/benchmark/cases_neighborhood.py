"""Benchmark cases of neighborhood_attention1d / 2d / 3d.

Peers:

* ``flex_attention``: ``torch.compile(flex_attention)`` with a block mask of the same clamp
  neighbourhood (NATTEN's rule for stride 1, not causal, dilation 1, per axis on row-major token
  indices), compiled and masked once in ``make``; inputs pre-permuted to its
  ``(B, heads, N, d)`` layout.
* ``natten``: ``natten.na1d`` / ``na2d`` / ``na3d`` (clamp rule), only when ``natten`` is
  importable (otherwise the report lists it as left out, with the reason). On the CPU NATTEN runs
  FlexAttention without ``torch.compile``, which materialises the ``N x N`` scores: at the full
  1-D shape one call takes tens of seconds and about 8 GB.
* ``alterops_cuda`` (GPU cases of ``neighborhood_attention1d/2d/3d``): the CUDA C++ backend, timed
  beside ``auto``'s choice (Triton first on CUDA devices), with its output and gradients checked too.
* ``unfold_autograd``: the paper's ``ConvAttention2d`` math (``F.unfold`` with zero padding,
  einsum, softmax, einsum) differentiated by autograd; compared with ``border="zero"``.
* ``reference`` (the DiNAT cases): the ``reference`` backend, plain PyTorch (autograd for the
  backward). The DiNAT cases are a dilated layer of DiNAT at 224x224 input (stage 1: 56x56, 2
  heads, k=7, dilation 8, where each dilation sub-grid is one window); FlexAttention is left out of
  them (its block mask here is the dilation-1 rule).

Forward+backward cases time the forward and ``torch.autograd.grad`` of every input for a
``ones`` output gradient (on every side alike): fresh gradients, as the attention bench takes them
and as a training step gets them after ``optimizer.zero_grad()`` (``.grad`` set to ``None``).
Calling ``.backward()`` on inputs whose ``.grad`` is already set would also time autograd adding
each new gradient into the old one, which is not the op's work (about 1 ms of the 2-D CPU case).

Useful FLOPs: ``4 * B * heads * N * prod(kernel_size) * head_dim`` for the forward (two
products), three times that for forward + backward (the backward has four products, the forward
two). CPU cases are float32 and measured against the float32 matmul ceiling, GPU cases bfloat16
against the bfloat16 one.

Quick mode: the 2-D CPU cases run B=1 at 28x28 (named ``..._28x28_k7``; the DiNAT ones with
dilation 4), the 2-D GPU cases B=2
(the one at the CPU cases' shape B=1 at 28x28); the 1-D and 3-D cases run B=1 at L=512, k=33 and at
4x16x16, k=3x5x5 on every device. Names
state the shapes built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import alterops as ao

from .registry import Case, Workload, register


def _inputs(device, dtype, B, spatial, heads, d, seed=0):
    """q, k, v of shape ``(B, *spatial, heads, d)`` (heads-last)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *spatial, heads, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _fwd_bwd(out, leaves, gout):
    """``out`` and the gradients of ``leaves`` for the output gradient ``gout`` (not accumulated
    into their ``.grad``)."""
    return (out,) + torch.autograd.grad(out, leaves, gout)


def clamp_neighbourhood_mask(spatial, kernel):
    """FlexAttention ``mask_mod`` of the clamp neighbourhood (stride 1, not causal, dilation 1)
    on row-major token indices of a map of shape ``spatial``; ``kernel`` one size per axis.

    Per axis, query ``i`` of an axis of length ``L`` with kernel ``k`` (``left = k // 2``,
    ``right = k - 1 - left``) has the stride-group leader ``i`` itself; its window starts at
    ``max(i - left, 0)``, moved inward to ``L - k`` when ``i + right >= L`` (then
    ``i - left >= 0``, since ``k <= L``), so it starts at ``clamp(i - left, 0, L - k)`` and holds
    ``k`` keys. A key is in the neighbourhood iff it is in the window on every axis.
    """
    spatial, kernel = tuple(spatial), tuple(kernel)
    if len(spatial) != len(kernel) or any(not 1 <= kk <= size for kk, size in zip(kernel, spatial)):
        raise ValueError(f"the clamp rule needs 1 <= kernel <= size per axis, got kernel {kernel} for map {spatial}")
    steps = [1] * len(spatial)  # row-major: the token index step of one position along each axis
    for a in range(len(spatial) - 2, -1, -1):
        steps[a] = steps[a + 1] * spatial[a + 1]

    def mask_mod(b, h, q_idx, kv_idx):
        inside = None
        for size, kk, step in zip(spatial, kernel, steps):
            qi = (q_idx // step) % size
            ki = (kv_idx // step) % size
            start = (qi - kk // 2).clamp(0, size - kk)
            here = (ki >= start) & (ki < start + kk)
            inside = here if inside is None else inside & here
        return inside

    return mask_mod


class _FlexPeer:
    """Compiled FlexAttention with the clamp block mask on heads-last ``q, k, v`` of shape
    ``(B, *spatial, heads, d)``. Calling it is the timed call (forward, and backward of a
    ``ones`` output gradient when ``backward``). The block mask is built and the compiled
    forward (and backward) run once here, so ``torch.compile`` costs nothing in the timed calls."""

    def __init__(self, q, k, v, kernel, *, backward: bool):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.batch, *self.spatial, self.heads, self.head_dim = q.shape
        self.n_tokens = math.prod(self.spatial)
        self.backward = backward
        self.block_mask = create_block_mask(clamp_neighbourhood_mask(self.spatial, kernel), None, None,
                                            self.n_tokens, self.n_tokens, device=str(q.device))
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.q, self.k, self.v = (self.to_flex(t).detach().requires_grad_(backward) for t in (q, k, v))
        self.gout = torch.ones_like(self.q)
        self()  # compile here, once, not in the timed calls

    def to_flex(self, t):
        """``(B, *spatial, heads, d)`` -> ``(B, heads, N, d)`` contiguous."""
        return t.movedim(-2, 1).reshape(self.batch, self.heads, self.n_tokens, self.head_dim).contiguous()

    def to_ours(self, t):
        """``(B, heads, N, d)`` -> a ``(B, *spatial, heads, d)`` view."""
        return t.view(self.batch, self.heads, *self.spatial, self.head_dim).movedim(1, -2)

    def forward(self):
        return self.flex(self.q, self.k, self.v, block_mask=self.block_mask)

    def __call__(self):
        out = self.forward()
        if self.backward:
            return _fwd_bwd(out, (self.q, self.k, self.v), self.gout)
        return out

    def output_and_grads(self):
        """The output and the gradients of q, k, v for the ``ones`` output gradient, in the
        heads-last layout."""
        out, *grads = _fwd_bwd(self.forward(), (self.q, self.k, self.v), self.gout)
        return self.to_ours(out), [self.to_ours(g) for g in grads]


def unfold_attention(q, k, v, kernel):
    """The paper's ConvAttention2d (zero padding) on heads-last tensors, via F.unfold."""
    B, H, W, heads, d = q.shape
    L = H * W

    def unfold(t):  # (B, H, W, heads, d) -> (B, heads, L, k*k, d)
        t = t.permute(0, 3, 4, 1, 2).reshape(B, heads * d, H, W)
        u = F.unfold(t, kernel, padding=kernel // 2)  # (B, heads*d*k*k, L), channel-major
        return u.view(B, heads, d, kernel * kernel, L).permute(0, 1, 4, 3, 2)

    qf = q.permute(0, 3, 1, 2, 4).reshape(B, heads, L, d)
    dots = torch.einsum("bhnd,bhnwd->bhnw", qf, unfold(k)) * d ** -0.5
    attn = dots.softmax(-1)
    out = torch.einsum("bhnw,bhnwd->bhnd", attn, unfold(v))
    return out.view(B, heads, H, W, d).permute(0, 2, 3, 1, 4)


_NEIGHBORHOOD_ATTENTION = {1: ao.neighborhood_attention1d, 2: ao.neighborhood_attention2d,
                           3: ao.neighborhood_attention3d}
_NATTEN_FUNCTION = {1: "na1d", 2: "na2d", 3: "na3d"}


def _add_natten_peer(q, k, v, kernel, peers, targets, left_out, dilation=1):
    """``natten.na<n>d`` (its clamp rule) as the ``natten`` peer with a 100x speedup target, or the
    reason it is left out."""
    try:
        import natten
    except ImportError as exc:
        left_out["natten"] = f"natten cannot be imported ({exc}); pip install natten"
        return
    attend = getattr(natten, _NATTEN_FUNCTION[q.dim() - 3])
    peers["natten"] = lambda: attend(q, k, v, kernel_size=kernel, dilation=dilation)
    targets["speedup:natten"] = 100.0


def _make_cpu_forward(device, quick):
    B, H, W, heads, d, kernel = (1, 28, 28, 4, 32, 7) if quick else (4, 56, 56, 4, 32, 7)
    q, k, v = _inputs(device, torch.float32, B, (H, W), heads, d)
    flex = _FlexPeer(q, k, v, (kernel, kernel), backward=False)
    peers = {"flex_attention": flex}
    targets = {"speedup:flex_attention": 20.0, "ceiling": 0.40}
    left_out = {}
    _add_natten_peer(q, k, v, kernel, peers, targets, left_out)

    def ours():
        return ao.neighborhood_attention2d(q, k, v, kernel)

    def check():
        torch.testing.assert_close(ours(), flex.to_ours(flex.forward()), atol=2e-4, rtol=2e-4)

    N = B * H * W
    return Workload(ours=ours, peers=peers, bytes=4 * q.numel() * q.element_size(),
                    flops=4.0 * N * kernel * kernel * d * heads, ceiling="matmul_fp32", targets=targets,
                    check=check, note=f"B={B} {H}x{W} heads={heads} d={d} k={kernel} float32, clamp",
                    label=f"na2d_forward_{H}x{W}_k{kernel}", peers_left_out=left_out)


def _make_cpu_fwd_bwd(device, quick):
    B, H, W, heads, d, kernel = (1, 28, 28, 4, 32, 7) if quick else (4, 56, 56, 4, 32, 7)
    q, k, v = (t.requires_grad_() for t in _inputs(device, torch.float32, B, (H, W), heads, d))
    gout = torch.ones_like(q)
    pq, pk, pv = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def ours():
        return _fwd_bwd(ao.neighborhood_attention2d(q, k, v, kernel, border="zero"), (q, k, v), gout)

    def unfold_peer():
        return _fwd_bwd(unfold_attention(pq, pk, pv, kernel), (pq, pk, pv), gout)

    def check():  # the output and the gradients of q, k, v against the peer's
        for what, a, b in zip(("out", "dq", "dk", "dv"), ours(), unfold_peer()):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m, what=what: f"{what}: {m}")

    N = B * H * W
    return Workload(ours=ours, peers={"unfold_autograd": unfold_peer}, bytes=8 * q.numel() * q.element_size(),
                    flops=12.0 * N * kernel * kernel * d * heads, ceiling="matmul_fp32",
                    targets={"speedup:unfold_autograd": 20.0, "ceiling": 0.25}, check=check,
                    note=f"forward+backward, B={B} {H}x{W} heads={heads} d={d} k={kernel} float32, zero border",
                    label=f"na2d_fwd_bwd_zero_{H}x{W}_k{kernel}")


def _make_cpu_dinat(device, quick, *, backward):
    """A dilated layer of DiNAT at 224x224 input, stage 1: B=4, 56x56, 2 heads, d=32, k=7, dilation 8
    (each 7x7 dilation sub-grid one window: alterops runs it as dense attention per sub-grid); quick:
    B=1, 28x28, dilation 4. Peers: the ``reference`` backend (plain PyTorch; autograd for the
    backward) and, for the forward, natten's ``na2d`` with the same dilation."""
    B, HW, heads, d, kernel, dil = (1, 28, 2, 32, 7, 4) if quick else (4, 56, 2, 32, 7, 8)
    q, k, v = _inputs(device, torch.float32, B, (HW, HW), heads, d)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    gout = torch.ones_like(q)

    def run(backend):
        out = ao.neighborhood_attention2d(q, k, v, kernel, dil, backend=backend)
        return _fwd_bwd(out, (q, k, v), gout) if backward else out

    def check():  # the output (and the gradients of q, k, v) against the reference backend's
        got, want = run("cpu"), run("reference")
        for a, b in zip(got, want) if backward else [(got, want)]:
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)

    peers = {"reference": lambda: run("reference")}
    targets, left_out = {}, {}
    if not backward:
        _add_natten_peer(q, k, v, kernel, peers, targets, left_out, dilation=dil)
    N = B * HW * HW
    what = "fwd_bwd" if backward else "forward"
    return Workload(ours=lambda: run("cpu"), peers=peers, bytes=(8 if backward else 4) * q.numel() * q.element_size(),
                    flops=(12.0 if backward else 4.0) * N * kernel * kernel * d * heads, ceiling="matmul_fp32",
                    targets=targets, check=check,
                    note=f"{'forward+backward' if backward else 'forward'}, DiNAT dilated layer, B={B} {HW}x{HW} "
                         f"heads={heads} d={d} k={kernel} dilation={dil} float32, clamp",
                    label=f"na2d_dinat_{what}_{HW}x{HW}_k{kernel}_dil{dil}", peers_left_out=left_out)


def _make_gpu(device, quick, *, B, HW, heads, d, kernel, backward):
    if quick:
        B = 2
    q, k, v = _inputs(device, torch.bfloat16, B, (HW, HW), heads, d)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    gout = torch.ones_like(q)
    flex = _FlexPeer(q, k, v, (kernel, kernel), backward=backward)

    def ours():
        out = ao.neighborhood_attention2d(q, k, v, kernel)
        return _fwd_bwd(out, (q, k, v), gout) if backward else out

    def check():
        with torch.no_grad():
            a = ao.neighborhood_attention2d(q, k, v, kernel).float()
        b = flex.to_ours(flex.forward()).float()
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)

    N = B * HW * HW
    mult = 12.0 if backward else 4.0
    targets = {"speedup:flex_attention": 1.5} if backward else {"ceiling": 0.4}
    return Workload(ours=ours, peers={"flex_attention": flex}, bytes=(8 if backward else 4) * q.numel() * 2,
                    flops=mult * N * kernel * kernel * d * heads, ceiling="matmul_bf16", targets=targets,
                    check=check, note=f"{'forward+backward' if backward else 'forward'}, B={B} {HW}x{HW} "
                                      f"heads={heads} d={d} k={kernel} bfloat16, clamp")


# 1-D and 3-D shapes: (B, spatial, heads, head_dim, kernel_size), full size and quick
_ND_SHAPES = {
    1: {False: (4, (4096,), 8, 64, (65,)), True: (1, (512,), 8, 64, (33,))},
    2: {False: (4, (56, 56), 4, 32, (7, 7)), True: (1, (28, 28), 4, 32, (7, 7))},
    3: {False: (1, (8, 32, 32), 4, 32, (3, 7, 7)), True: (1, (4, 16, 16), 4, 32, (3, 5, 5))},
}


def _nd_names(spatial, kernel):
    """(name part, note part) of a shape and a kernel: ``L4096_k65`` / ``L=4096 k=65`` in 1-D,
    ``8x32x32_k3x7x7`` / ``8x32x32 k=3x7x7`` otherwise."""
    kernel_text = "x".join(map(str, kernel))
    if len(spatial) == 1:
        return f"L{spatial[0]}_k{kernel_text}", f"L={spatial[0]} k={kernel_text}"
    shape = "x".join(map(str, spatial))
    return f"{shape}_k{kernel_text}", f"{shape} k={kernel_text}"


def _make_nd_cpu_forward(device, quick, *, n):
    B, spatial, heads, d, kernel = _ND_SHAPES[n][quick]
    attend = _NEIGHBORHOOD_ATTENTION[n]
    q, k, v = _inputs(device, torch.float32, B, spatial, heads, d)
    flex = _FlexPeer(q, k, v, kernel, backward=False)
    peers = {"flex_attention": flex}
    targets = {"speedup:flex_attention": 20.0, "ceiling": 0.30}
    left_out = {}
    _add_natten_peer(q, k, v, kernel, peers, targets, left_out)

    def ours():
        return attend(q, k, v, kernel)

    def check():
        torch.testing.assert_close(ours(), flex.to_ours(flex.forward()), atol=2e-4, rtol=2e-4)

    name, shape_note = _nd_names(spatial, kernel)
    return Workload(ours=ours, peers=peers, bytes=4 * q.numel() * q.element_size(),
                    flops=4.0 * B * heads * math.prod(spatial) * math.prod(kernel) * d, ceiling="matmul_fp32",
                    targets=targets, check=check,
                    note=f"B={B} {shape_note} heads={heads} d={d} float32, clamp",
                    label=f"na{n}d_forward_{name}", peers_left_out=left_out)


def _make_nd_cpu_fwd_bwd(device, quick, *, n):
    """Forward + backward of the N-d op on the CPU, fresh gradients as a training step gets them.
    FlexAttention has no CPU backward (torch raises NotImplementedError), so the peer is the same
    op on the ``reference`` backend (plain PyTorch autograd over gathered windows, memory
    O(N * prod(kernel))), the path a CPU user would have without these kernels."""
    B, spatial, heads, d, kernel = _ND_SHAPES[n][quick]
    attend = _NEIGHBORHOOD_ATTENTION[n]
    q, k, v = (t.requires_grad_() for t in _inputs(device, torch.float32, B, spatial, heads, d))
    gout = torch.ones_like(q)
    pq, pk, pv = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def ours():
        return _fwd_bwd(attend(q, k, v, kernel), (q, k, v), gout)

    def reference():
        return _fwd_bwd(attend(pq, pk, pv, kernel, backend="reference"), (pq, pk, pv), gout)

    def check():  # the output and the gradients of q, k, v against the reference backend's
        for what, a, b in zip(("out", "dq", "dk", "dv"), ours(), reference()):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m, what=what: f"{what}: {m}")

    name, shape_note = _nd_names(spatial, kernel)
    return Workload(ours=ours, peers={"reference_autograd": reference}, bytes=8 * q.numel() * q.element_size(),
                    flops=12.0 * B * heads * math.prod(spatial) * math.prod(kernel) * d, ceiling="matmul_fp32",
                    check=check, note=f"forward+backward, B={B} {shape_note} heads={heads} d={d} float32, clamp",
                    label=f"na{n}d_fwd_bwd_{name}")


def _make_nd_gpu_fwd_bwd(device, quick, *, n):
    B, spatial, heads, d, kernel = _ND_SHAPES[n][quick]
    attend = _NEIGHBORHOOD_ATTENTION[n]
    q, k, v = (t.requires_grad_() for t in _inputs(device, torch.bfloat16, B, spatial, heads, d))
    gout = torch.ones_like(q)
    flex = _FlexPeer(q, k, v, kernel, backward=True)
    peers = {"flex_attention": flex}
    left_out = {}
    # The backend ``auto`` does not pick on CUDA devices, timed beside it: the CUDA C++ kernels
    # while Triton comes first (what decides that order), or Triton if it ever does not.
    table = ao.neighborhood_attention_nd._TABLES[n]
    chosen = table.select(None, q.device, q.dtype)
    other = "cuda" if chosen != "cuda" else "triton"
    why_not = table.why_not(other, q.device, q.dtype)
    if why_not is None:
        def other_backend():
            return _fwd_bwd(attend(q, k, v, kernel, backend=other), (q, k, v), gout)
        peers[f"alterops_{other}"] = other_backend
    else:
        left_out[f"alterops_{other}"] = why_not

    def ours():
        return _fwd_bwd(attend(q, k, v, kernel), (q, k, v), gout)

    def check():  # the output and the gradients of q, k, v (both timed backends) against the compiled peer's
        ref_out, ref_grads = flex.output_and_grads()
        for backend in (None, other) if "alterops_" + other in peers else (None,):
            out, *grads = _fwd_bwd(attend(q, k, v, kernel, backend=backend), (q, k, v), gout)
            for what, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
                torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2,
                                           msg=lambda m, what=what, be=backend or chosen: f"{be} {what}: {m}")

    name, shape_note = _nd_names(spatial, kernel)
    return Workload(ours=ours, peers=peers, bytes=8 * q.numel() * q.element_size(),
                    flops=12.0 * B * heads * math.prod(spatial) * math.prod(kernel) * d, ceiling="matmul_bf16",
                    targets={"speedup:flex_attention": 1.5}, check=check,
                    note=f"forward+backward, B={B} {shape_note} heads={heads} d={d} bfloat16, clamp; "
                         f"ours = backend {chosen!r} (auto)",
                    label=f"na{n}d_gpu_{name}_fwd_bwd", peers_left_out=left_out)


def _make_unfused_fwd_bwd(device, quick):
    """NATTEN 0.17's separate ops as DiNAT calls them (``natten2dqkrpb`` -> softmax ->
    ``natten2dav``, heads-first, dilation 2), forward + backward, on the backend automatic
    selection picks for this device (``cpu`` / ``triton`` unfused kernels); the peer is the same
    calls on the ``reference`` backend (plain PyTorch, one kernel slot at a time)."""
    from ..compat import natten as cn

    B, H, W, heads, d, kernel, dil = (1, 28, 28, 4, 32, 7, 2) if quick else (4, 56, 56, 4, 32, 7, 2)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, H, W, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(device=device,
                                                                            dtype=dtype).requires_grad_()
    gout = torch.ones_like(q)

    def run():
        attn = cn.natten2dqkrpb(q * d ** -0.5, k, rpb, kernel, dil).softmax(-1)
        return _fwd_bwd(cn.natten2dav(attn, v, kernel, dil), (q, k, v, rpb), gout)

    def reference():
        with ao.set_backend("reference"):
            return run()

    def check():  # the output and every gradient, against the reference backend's
        got, want = run(), reference()
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-4 if dtype == torch.float32 else 3e-2, rtol=2e-3)

    N = B * H * W
    return Workload(ours=run, peers={"reference": reference}, bytes=8 * q.numel() * q.element_size(),
                    flops=12.0 * N * kernel * kernel * d * heads,
                    ceiling="matmul_fp32" if dtype == torch.float32 else "matmul_bf16",
                    check=check, note=f"natten2dqkrpb + softmax + natten2dav, forward+backward, B={B} {H}x{W} "
                    f"heads={heads} d={d} k={kernel} dilation={dil} {str(dtype)[6:]}",
                    label=f"natten2d_unfused_fwd_bwd_{H}x{W}_k{kernel}")


register(Case("neighborhood", "na2d_forward_56x56_k7", _make_cpu_forward, devices=("cpu",), max_repeats=10))
register(Case("neighborhood", "natten2d_unfused_fwd_bwd_56x56_k7", _make_unfused_fwd_bwd, max_repeats=5))
register(Case("neighborhood", "na2d_fwd_bwd_zero_56x56_k7", _make_cpu_fwd_bwd, devices=("cpu",), max_repeats=5))
register(Case("neighborhood", "na2d_dinat_forward_56x56_k7_dil8",
              lambda device, quick: _make_cpu_dinat(device, quick, backward=False), devices=("cpu",), max_repeats=10))
register(Case("neighborhood", "na2d_dinat_fwd_bwd_56x56_k7_dil8",
              lambda device, quick: _make_cpu_dinat(device, quick, backward=True), devices=("cpu",), max_repeats=10))
for _n in (1, 2, 3):
    _name = _nd_names(_ND_SHAPES[_n][False][1], _ND_SHAPES[_n][False][4])[0]
    if _n != 2:  # the 2-D CPU forward is na2d_forward_56x56_k7
        register(Case("neighborhood", f"na{_n}d_forward_{_name}",
                      lambda device, quick, _n=_n: _make_nd_cpu_forward(device, quick, n=_n), devices=("cpu",),
                      max_repeats=10))
        # (outside the default suite: ``alterops bench --all``)
        register(Case("neighborhood", f"na{_n}d_fwd_bwd_{_name}",
                      lambda device, quick, _n=_n: _make_nd_cpu_fwd_bwd(device, quick, n=_n), devices=("cpu",),
                      default=False, max_repeats=5))
    register(Case("neighborhood", f"na{_n}d_gpu_{_name}_fwd_bwd",
                  lambda device, quick, _n=_n: _make_nd_gpu_fwd_bwd(device, quick, n=_n), devices=("cuda",)))
for _name, _kw in (
    ("na2d_gpu_56x56_h2_d32", dict(B=64, HW=56, heads=2, d=32, kernel=7)),
    ("na2d_gpu_14x14_h12_d64", dict(B=64, HW=14, heads=12, d=64, kernel=7)),
):
    register(Case("neighborhood", f"{_name}_forward",
                  lambda device, quick, _kw=_kw: _make_gpu(device, quick, backward=False, **_kw), devices=("cuda",)))
    register(Case("neighborhood", f"{_name}_fwd_bwd",
                  lambda device, quick, _kw=_kw: _make_gpu(device, quick, backward=True, **_kw), devices=("cuda",)))
