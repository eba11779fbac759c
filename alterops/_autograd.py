"""Shared by the fused ops' ``autograd.Function``s: when to use them, when a Triton op may skip
its registered op's dispatch, and their backward is not differentiable."""
from __future__ import annotations

import functools

import torch


def needs_grad(*tensors) -> bool:
    """Whether a call on ``tensors`` (``None`` entries skipped) must go through its
    ``autograd.Function``: grad mode is on and one of them requires grad. Without it the ops call
    their fused kernels directly (the same kernels, without the Function's per-call overhead)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call_ok(args) -> bool:
    """Whether a Triton op may run its Python launcher itself instead of its registered
    ``torch.library.custom_op``: an eager call on plain tensors, outside torch.compile / export
    tracing, torch.jit.trace, functorch transforms and dispatch modes (FakeTensor, make_fx,
    FlopCounterMode, ...), which all need the op. The op's dispatch (custom-op autograd and
    no-dynamo wrappers) costs 30-60 us of host time per call."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active() and torch._C._get_tracing_state() is None
            and all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor)))


def eager_or_op(launcher, op_name: str):
    """A callable that runs ``launcher(*args)`` when :func:`direct_call_ok` and the registered
    op ``torch.ops.alterops.<op_name>`` (same arguments, same results) otherwise."""

    def call(*args):
        if direct_call_ok(args):
            return launcher(*args)
        return getattr(torch.ops.alterops, op_name)(*args)

    call.__name__ = call.__qualname__ = op_name
    call.__doc__ = f"``alterops::{op_name}``, its launcher run directly in eager calls."
    return call


class _SecondOrderError(torch.autograd.Function):
    """Passes gradients through unchanged; differentiating them raises ``RuntimeError(msg)``.
    Its inputs include the tensors the gradients depend on, so the error node lies on every
    path of a second backward (to the op's inputs or to the incoming gradient)."""

    @staticmethod
    def forward(ctx, msg, n, *tensors):
        ctx.msg = msg
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.msg)


def first_order_only(op: str):
    """Decorate a ``backward(ctx, *grads)`` that runs compiled kernels (not differentiable).

    The backward runs without building a graph. When a graph is wanted (``create_graph=True``)
    and the incoming gradients or the saved inputs require grad, the returned gradients are
    routed through a node that raises a ``RuntimeError`` naming the op and the backend when a
    second backward reaches it, instead of the silent zero (or missing) second derivative a
    plain backward gives. First-order gradients, ``create_graph=True`` included, are unchanged.
    """

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            sources = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not sources:
                return outputs
            backend = getattr(ctx, "backend_name", "fused")
            name = getattr(ctx, "op_name", op)  # a Function serving several public ops names the one called
            msg = (f"{name}: double backward (differentiating its gradient) is not supported by the "
                   f"{backend!r} backend; use backend='reference' for higher-order gradients")
            single = not isinstance(outputs, tuple)
            outs = (outputs,) if single else outputs
            idx = [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor)]
            marked = _SecondOrderError.apply(msg, len(idx), *[outs[i] for i in idx], *sources)
            outs = list(outs)
            for i, t in zip(idx, marked):
                outs[i] = t
            return outs[0] if single else tuple(outs)

        return wrapper

    return wrap
