"""Layers built on the fused ops: local multi-head self-attention on NCHW maps and spatial smoothing.

``WindowMSA2d`` is the paper's ``LocalAttention`` (AlterNet's window MSA, optionally shifted as in
Swin), ``NeighborhoodMSA2d`` its convolutional (k×k neighbourhood) counterpart, ``BoxBlur2d`` and
``TanhBlur2d`` the blur paper's ``AvgPool2d(2, 1, 1)`` and ``TanhBlurBlock``. Every layer takes
``backend=`` (``None`` = automatic, or ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``), passed to
the op on every call.

Projections. The attention layers compute q, k and v with one fused 1×1 projection
``to_qkv`` (``dim_in → 3·heads·dim_head``, no bias) applied to the channels-last view of the input,
so the result ``(B, H, W, 3·inner)`` is viewed as ``(B, H, W, 3, heads, dim_head)`` and q, k, v are
passed to the op as strided views without a copy. The channel order inside each of q, k, v is
head-major (channel ``h·dim_head + d``), as in the paper's code; the output projection ``to_out``
(``inner → dim_out``, with bias) is applied channels-last too. The output has the input's memory
format (a channels-last input gives a channels-last output, without a copy).

Relative position bias. ``pos_bias="shared"`` (default, as the paper's ``LocalAttention``): one
table of shape ``(1, 2·kh-1, 2·kw-1)`` shared by all heads; ``"per_head"``: ``(heads, 2·kh-1,
2·kw-1)``; ``None``: no bias (the paper's ``ConvAttention2d``). The offset is key minus query (the
paper's sign, see ``alterops.window_attention2d``). Initialised ``N(0, 0.02²)`` as in the paper; the
projections keep PyTorch's default ``Conv2d`` initialisation, as in the paper's code.

Loading the paper's weights. ``WindowMSA2d`` also loads a state dict of the paper's
``LocalAttention`` (keys ``attn.to_q.weight``, ``attn.to_kv.weight``, ``attn.to_out.0.weight``,
``attn.to_out.0.bias``, ``pos_embedding``) and ``NeighborhoodMSA2d`` one of the paper's
``ConvAttention2d`` (``to_q.weight``, ``to_kv.weight``, ``to_out.0.*``): the q and kv weights are
concatenated into ``to_qkv.weight`` (the paper's kv split is k first, then v, matching ours).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from . import _checks

__all__ = ["WindowMSA2d", "NeighborhoodMSA1d", "NeighborhoodMSA2d", "NeighborhoodMSA3d", "BoxBlur2d", "TanhBlur2d",
           "DropPath"]


def _ops():
    # Looked up at call time: the op modules are independent of this one.
    import alterops

    return alterops


class _LocalMSA2d(nn.Module):
    """Shared parts of the two attention layers: projections, bias table, forward plumbing."""

    ndim = 2  # spatial axes of the input (B, C, *spatial)

    def __init__(
        self,
        dim_in: int,
        dim_out: int | None,
        heads: int,
        dim_head: int,
        table_size: tuple[int, ...],
        pos_bias: str | None,
        dropout: float,
        scale: float | None,
        backend: str | None,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("dim_in", dim_in), ("heads", heads), ("dim_head", dim_head)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
            raise ValueError(f"kv_heads must be a positive int dividing heads={heads}, got {kv_heads!r}")
        self.kv_heads = kv_heads
        dim_out = dim_in if dim_out is None else dim_out
        if not isinstance(dim_out, int) or dim_out <= 0:
            raise ValueError(f"dim_out must be a positive int or None, got {dim_out!r}")
        if pos_bias not in ("shared", "per_head", None):
            raise ValueError(f"pos_bias must be 'shared', 'per_head' or None, got {pos_bias!r}")
        self.dim_in, self.dim_out, self.heads, self.dim_head = dim_in, dim_out, heads, dim_head
        self.inner_dim = heads * dim_head
        self.scale = dim_head ** -0.5 if scale is None else float(scale)
        self.pos_bias = pos_bias
        self.backend = backend
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.ndim - 1]
        self.to_qkv = conv(dim_in, (heads + 2 * kv_heads) * dim_head, 1, bias=False)
        self.to_out = conv(self.inner_dim, dim_out, 1, bias=True)
        self.proj_drop = nn.Dropout(dropout)
        if pos_bias is None:
            self.register_parameter("rel_pos_bias", None)
        else:
            n = 1 if pos_bias == "shared" else heads
            self.rel_pos_bias = nn.Parameter(torch.empty(n, *[2 * t - 1 for t in table_size]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default ``Conv2d`` init for the projections, ``N(0, 0.02²)`` for the table."""
        self.to_qkv.reset_parameters()
        self.to_out.reset_parameters()
        if self.rel_pos_bias is not None:
            with torch.no_grad():
                self.rel_pos_bias.normal_(0.0, 0.02)

    def _attend(self, q, k, v, table):  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, dim_in, *spatial)`` → ``(B, dim_out, *spatial)`` in the input's memory format."""
        n = self.ndim
        if x.dim() != n + 2 or x.shape[1] != self.dim_in:
            axes = ", ".join(("L",) if n == 1 else ("H", "W") if n == 2 else ("T", "H", "W"))
            raise ValueError(
                f"{type(self).__name__}: x must have shape (B, {self.dim_in}, {axes}), got {tuple(x.shape)}"
            )
        B, C, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        xl = x.movedim(1, -1)  # (B, *spatial, C): a free view for a channels-last input
        channels_last = n > 1 and xl.is_contiguous() and not x.is_contiguous()
        qkv = F.linear(xl, self.to_qkv.weight.reshape(-1, C))
        hq, hkv, d = self.heads, self.kv_heads, self.dim_head
        # strided views into the one projection: q, then k and v
        q = qkv[..., :hq * d].view(B, *spatial, hq, d)
        k, v = qkv[..., hq * d:].view(B, *spatial, 2, hkv, d).unbind(-3)
        # the ops read the table in their compute precision whatever its dtype (e.g. a float32
        # table with bfloat16 q/k/v under autocast), so it is passed as is
        out = self._attend(q, k, v, self.rel_pos_bias)  # (B, *spatial, heads, dim_head)
        out = F.linear(
            out.reshape(B, *spatial, self.inner_dim),
            self.to_out.weight.reshape(self.dim_out, self.inner_dim),
            self.to_out.bias,
        )
        out = self.proj_drop(out).movedim(-1, 1)  # NC... shape, channels-last strides
        return out if channels_last else out.contiguous()

    # -- loading the paper's parameter layout ------------------------------------------------
    _paper_prefix = ""  # overridden: where to_q / to_kv / to_out live in the paper's module
    _paper_table = None  # name of the paper's bias table, if any

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        p = prefix + self._paper_prefix
        if p + "to_q.weight" in state_dict and p + "to_kv.weight" in state_dict:
            wq = state_dict.pop(p + "to_q.weight")
            wkv = state_dict.pop(p + "to_kv.weight")
            if wkv.shape[-1] != 1:
                raise ValueError(
                    f"{type(self).__name__}: the paper's to_kv with kernel k={wkv.shape[-1]} > 1 "
                    "(reduced keys/values) has no equivalent here"
                )
            state_dict[prefix + "to_qkv.weight"] = torch.cat([wq, wkv], 0)
            for name in ("weight", "bias"):
                key = p + "to_out.0." + name
                if key in state_dict:
                    state_dict[prefix + "to_out." + name] = state_dict.pop(key)
            if self._paper_table and prefix + self._paper_table in state_dict:
                t = state_dict.pop(prefix + self._paper_table)
                state_dict[prefix + "rel_pos_bias"] = t.reshape(1, *t.shape[-2:])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _common_repr(self) -> str:
        s = f"{self.dim_in}, {self.dim_out}, heads={self.heads}, dim_head={self.dim_head}"
        s += f", pos_bias={self.pos_bias!r}"
        if self.scale != self.dim_head ** -0.5:
            s += f", scale={self.scale:g}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class WindowMSA2d(_LocalMSA2d):
    """Window multi-head self-attention on an NCHW map (the paper's ``LocalAttention``).

    Non-overlapping ``window_size`` windows tile the map from the top-left corner; ``shift`` gives
    Swin's shifted windows (cyclic shift by ``-shift`` and region mask, in one fused op). Maps whose
    size is not a multiple of the window are handled by ``alterops.window_attention2d`` (absent
    tokens, never attended to); the paper's code errors there.

    Args:
        dim_in: input channels. dim_out: output channels (default ``dim_in``; AlterNet expands
            ``C/4 → C`` here). heads, dim_head: as the paper (``inner = heads·dim_head``;
            ``scale = dim_head**-0.5`` unless given).
        window_size: int or ``(wh, ww)``. shift: int or ``(sh, sw)`` in ``[0, window)``.
        pos_bias: ``"shared"`` (one table, paper), ``"per_head"`` (Swin) or ``None``.
        dropout: dropout after the output projection (the paper's ``to_out`` dropout).
        backend: passed to ``alterops.window_attention2d``.

    Shapes: ``(B, dim_in, H, W)`` → ``(B, dim_out, H, W)``; any floating dtype the backend takes.
    """

    _paper_prefix = "attn."
    _paper_table = "pos_embedding"

    def __init__(
        self,
        dim_in: int,
        dim_out: int | None = None,
        *,
        heads: int = 8,
        dim_head: int = 64,
        window_size=7,
        shift=0,
        pos_bias: str | None = "shared",
        dropout: float = 0.0,
        scale: float | None = None,
        backend: str | None = None,
    ) -> None:
        self.window_size = _checks.pair("window_size", window_size)
        self.shift = _checks.pair("shift", shift)
        if min(self.window_size) <= 0:
            raise ValueError(f"window_size must be positive, got {window_size!r}")
        if not all(0 <= s < w for s, w in zip(self.shift, self.window_size)):
            raise ValueError(f"shift must lie in [0, window_size), got shift={shift!r} window_size={window_size!r}")
        super().__init__(dim_in, dim_out, heads, dim_head, self.window_size, pos_bias, dropout, scale, backend)

    def _attend(self, q, k, v, table):
        shift = self.shift if any(self.shift) else 0
        return _ops().window_attention2d(
            q, k, v, self.window_size, shift=shift, rel_pos_bias=table, scale=self.scale, backend=self.backend
        )

    def extra_repr(self) -> str:
        s = self._common_repr() + f", window_size={self.window_size}"
        if any(self.shift):
            s += f", shift={self.shift}"
        return s


class _NeighborhoodMSA(_LocalMSA2d):
    """Neighbourhood multi-head self-attention on a channels-first map ``(B, C, *spatial)``.

    Each query attends to its ``kernel_size`` neighbourhood (with ``dilation``, ``stride`` and
    ``is_causal`` per axis, NATTEN's rules), with the border rule of
    ``alterops.neighborhood_attention{1,2,3}d``: ``"clamp"`` (NATTEN, default), ``"mask"`` or
    ``"zero"`` (the paper's ``ConvAttention2d``: zero-padded keys and values keep softmax mass;
    use ``pos_bias=None`` for the paper's module, which has no positional bias).

    Args as :class:`WindowMSA2d`, with ``kernel_size``, ``dilation``, ``stride`` (ints or one per
    axis), ``is_causal`` (bool or one per axis) and ``border`` instead of the window and shift;
    ``kv_heads`` (default ``heads``) gives grouped-query attention: k and v get ``kv_heads`` heads
    (a divisor of ``heads``) and ``to_qkv`` has ``(heads + 2 * kv_heads) * dim_head`` outputs (q,
    then k, then v). The bias table is ``(n, *(2 * kernel_size - 1))``.
    """

    _paper_prefix = ""
    _paper_table = None

    def __init__(
        self,
        dim_in: int,
        dim_out: int | None = None,
        *,
        heads: int = 8,
        dim_head: int = 64,
        kernel_size=7,
        dilation=1,
        stride=1,
        is_causal=False,
        kv_heads: int | None = None,
        border: str = "clamp",
        pos_bias: str | None = "shared",
        dropout: float = 0.0,
        scale: float | None = None,
        backend: str | None = None,
    ) -> None:
        from .neighborhood_attention_nd import BORDERS, _per_axis

        n = self.ndim
        self.kernel_size = _per_axis("kernel_size", kernel_size, n, minimum=1)
        self.dilation = _per_axis("dilation", dilation, n, minimum=1)
        self.stride = _per_axis("stride", stride, n, minimum=1)
        self.is_causal = _per_axis("is_causal", is_causal, n, kind=bool)
        self.border = _checks.choice("border", border, BORDERS)
        if any(s > k for s, k in zip(self.stride, self.kernel_size)):
            raise ValueError(f"stride must be <= kernel_size per axis, got stride={stride!r}, kernel_size={kernel_size!r}")
        if border != "clamp" and (max(self.stride) > 1 or any(self.is_causal)):
            raise ValueError(f"border={border!r} has no stride groups and no causal form; use border='clamp'")
        super().__init__(dim_in, dim_out, heads, dim_head, self.kernel_size, pos_bias, dropout, scale, backend,
                         kv_heads)

    def _attend(self, q, k, v, table):
        fn = getattr(_ops(), f"neighborhood_attention{self.ndim}d")
        return fn(q, k, v, self.kernel_size, self.dilation, stride=self.stride, is_causal=self.is_causal,
                  border=self.border, rel_pos_bias=table, scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        s = self._common_repr() + f", kernel_size={self.kernel_size}"
        for name, plain in (("dilation", 1), ("stride", 1), ("is_causal", False)):
            value = getattr(self, name)
            if any(x != plain for x in value):
                s += f", {name}={value}"
        if self.kv_heads != self.heads:
            s += f", kv_heads={self.kv_heads}"
        return s + f", border={self.border!r}"


class NeighborhoodMSA1d(_NeighborhoodMSA):
    __doc__ = _NeighborhoodMSA.__doc__.replace("(B, C, *spatial)", "(B, C, L)") + """
    Shapes: ``(B, dim_in, L)`` → ``(B, dim_out, L)``.
    """
    ndim = 1


class NeighborhoodMSA2d(_NeighborhoodMSA):
    __doc__ = _NeighborhoodMSA.__doc__.replace("(B, C, *spatial)", "(B, C, H, W)") + """
    Shapes: ``(B, dim_in, H, W)`` → ``(B, dim_out, H, W)``. Loads the paper's ``ConvAttention2d``
    state dict (see the module docstring).
    """
    ndim = 2


class NeighborhoodMSA3d(_NeighborhoodMSA):
    __doc__ = _NeighborhoodMSA.__doc__.replace("(B, C, *spatial)", "(B, C, T, H, W)") + """
    Shapes: ``(B, dim_in, T, H, W)`` → ``(B, dim_out, T, H, W)``.
    """
    ndim = 3


class BoxBlur2d(nn.Module):
    """Depthwise box filter (``alterops.box_blur2d``); defaults = the paper's ``AvgPool2d(2, 1, 1)``.

    ``(B, C, H, W)`` → ``(B, C, H', W')``; with the defaults ``H' = H + 1``, ``W' = W + 1``.
    No parameters.
    """

    def __init__(self, kernel_size=2, stride=1, padding=1, *, pad_mode: str = "zeros", backend: str | None = None):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.pad_mode, self.backend = pad_mode, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops().box_blur2d(
            x, self.kernel_size, self.stride, self.padding, pad_mode=self.pad_mode, backend=self.backend
        )

    def extra_repr(self) -> str:
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}"
        if self.pad_mode != "zeros":
            s += f", pad_mode={self.pad_mode!r}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class TanhBlur2d(BoxBlur2d):
    """The paper's ``TanhBlurBlock``: ``box_blur(relu(tau·tanh(x/tau)))`` in one op (``tanh_blur2d``).

    ``relu=False`` drops the ReLU. Shapes as :class:`BoxBlur2d`. No parameters.
    """

    def __init__(self, tau: float = 10.0, kernel_size=2, stride=1, padding=1, *, relu: bool = True,
                 pad_mode: str = "zeros", backend: str | None = None):
        super().__init__(kernel_size, stride, padding, pad_mode=pad_mode, backend=backend)
        self.tau, self.relu = float(tau), bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops().tanh_blur2d(
            x, self.tau, self.kernel_size, self.stride, self.padding, relu=self.relu,
            pad_mode=self.pad_mode, backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"tau={self.tau:g}, " + super().extra_repr()
        return s if self.relu else s + ", relu=False"


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``p`` (training only).

    Kept samples are scaled by ``1/(1-p)``, as timm's and the paper's ``DropPath``.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must lie in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * (mask / keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"
