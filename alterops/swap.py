"""Swap the fused ops into existing models, in place: ``alterops.swap(model)``.

What is recognised (by structure: the attributes and children each family's forward uses):

=====================================  ==========================================================
family                                 fused as
=====================================  ==========================================================
Hugging Face ``SwinLayer``,             LayerNorm → zero-pad to window multiples (as Swin) → the
``DonutSwinLayer`` (4.x and 5.x)        layer's q/k/v projections → ``window_attention2d`` with the
                                        layer's shift (cyclic shift + mask fused) and its bias
                                        table → crop → output projection; the rest unchanged
Hugging Face ``Swinv2Layer``            the same with cosine attention: ``normalize(q)·τ_h`` and
                                        ``normalize(k)`` (``τ_h = exp(min(logit_scale, log 100))``),
                                        ``scale=1`` and the continuous position bias
                                        ``16·sigmoid(cpb_mlp(coords))`` as ``rel_pos_bias``
timm ``SwinTransformerBlock`` (>= 0.9)  its ``_attn`` (roll, pad, partition, attention, merge) as
                                        one ``window_attention2d`` call
timm ``SwinTransformerV2Block``         the same with Swin V2's cosine attention (as Hugging Face's
                                        above; q and v biases, ``qkv_bias_separate``) and its CPB
                                        table ``16·sigmoid(cpb_mlp(relative_coords_table))``
timm ``SwinTransformerV2CrBlock``       its ``_shifted_window_attn`` likewise: cosine attention
                                        with per-head ``logit_scale``, the ``meta_mlp`` bias
                                        evaluated once per query-key offset
paper's ``LocalAttention``              ``window_attention2d`` with the shared table
paper's ``ConvAttention2d``             ``neighborhood_attention2d(border="zero")`` (same padding,
                                        stride 1 only)
NATTEN's ``NeighborhoodAttention1D/2D/  ``neighborhood_attention{1,2,3}d`` with the module's kernel,
3D`` (0.20 and later)                   stride, dilation, causal axes and scale (natten need not be
                                        installed: matched by ``na_dim``, ``qkv``, ``proj``)
Hugging Face DiNAT / NAT                ``neighborhood_attention2d`` with the module's kernel,
``NeighborhoodAttentionModule``         dilation and ``rpb`` (their models' math, q/k/v
(transformers 4.57 and 5.x; natten      projections, ``q / sqrt(d)``, softmax, weighted values),
not needed, see                         then the module's output projection
``alterops.compat.natten``)
paper's ``TanhBlurBlock``               ``tanh_blur2d`` (its blur must be an ``AvgPool2d``)
``nn.AvgPool2d`` with stride 1          ``box_blur2d`` (the blur paper's ``AvgPool2d(2, 1, 1)``)
=====================================  ==========================================================

Other Swin copies in transformers (``MaskFormerSwinLayer``, ``Swin2SRLayer``) differ in details
of their forward and are reported as skipped. So is, with what made it look like attention, every
other attention-like module the walk meets (``nn.MultiheadAttention``, a class named ``*Attention*``
/ ``*Attn*``, a module with ``qkv`` or query/key/value projection children, e.g. a ViT's global
attention): the report lists each one that is left alone, outermost module only.

How. Each matched module keeps its identity, children, parameters, buffers, hooks and state-dict
keys: only its class is switched to a generated subclass (``Fused<Name>``) whose ``forward`` calls
the fused op. ``isinstance`` checks against the original class still hold, ``copy.deepcopy`` and
pickling work, and :func:`unswap` (``from alterops.swap import unswap``) switches the classes back. The bias tables are read from the
original parameters on every call (Hugging Face / timm tables are indexed query-minus-key; they are
viewed and flipped into the op's key-minus-query layout), so gradients reach the original
parameters and an optimizer built before the swap keeps working.

When the fused path cannot reproduce a call, the original forward runs for that call: attention
dropout active in training (for SwinV2-CR also its meta-MLP dropout, which makes the bias differ
per query-key pair in training), the paper modules' external ``mask``, Hugging Face
``output_attentions`` / ``head_mask``, a layer whose runtime window no longer matches its bias
table, a timm block whose static shift mask (built for its ``input_resolution``) does not fit the
padded size of the map it is called with. The fused forwards return ``None`` where the originals
return attention probabilities.
DiNAT / NAT are the exception: there those calls (probabilities requested, attention dropout active
in training) run the models' computation through the unfused ops of ``alterops.compat.natten``
(their own forward is broken in transformers 4.57 and 5.x) and return the probabilities.
Numerics: Swin adds -100 to the logits of cross-region pairs of shifted windows; the op excludes
them exactly, a difference below ``exp(-100 + spread)`` relative, where ``spread`` is the range of
a window's logits (Swin V2: at most ``2·τ + 16`` with ``τ = exp(logit_scale) <= 100``, so below
``exp(-64)`` at timm's initial ``τ = 10``; a head whose ``τ`` nears 40 or more no longer masks
those pairs out in the original, and there the two differ).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["swap", "unswap", "SwapReport"]

_OPS = ("attention", "blur")


def _ops():
    import alterops

    return alterops


# =========================================================================================
# Report
# =========================================================================================
@dataclass
class SwapReport:
    """What :func:`swap` did: ``replaced`` and ``skipped`` as ``(module name, family, detail)``."""

    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"alterops.swap: {len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced {name or '<root>'} ({fam}): {detail}" for name, fam, detail in self.replaced]
        lines += [f"  skipped  {name or '<root>'} ({fam}): {detail}" for name, fam, detail in self.skipped]
        return "\n".join(lines)

    def count(self, family: str | None = None) -> int:
        return sum(1 for _, fam, _ in self.replaced if family is None or fam == family)


# =========================================================================================
# Generated subclasses (class switching keeps everything about the instance)
# =========================================================================================
_FUSED_CLASSES: dict = {}


def _fused_class(base: type, kind: str) -> type:
    key = (base, kind)
    cls = _FUSED_CLASSES.get(key)
    if cls is None:
        import inspect

        mixin = _MIXINS[kind]
        try:
            params = inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            params = {}
        # names of the optional positional arguments after (self, hidden_states, input_dimensions),
        # for the Hugging Face layers whose signatures changed across versions
        attrs = {"__module__": __name__, "_alterops_kind": kind, "_alterops_base": base,
                 "_alterops_argnames": tuple(params)[3:]}
        cls = type(f"Fused{base.__name__}", (mixin, base), attrs)
        _FUSED_CLASSES[key] = cls
    return cls


def _rebuild(base: type, kind: str):
    cls = _fused_class(base, kind)
    return cls.__new__(cls)


class _Fused:
    """Common behaviour of the generated classes: pickling / deepcopy by (original class, kind)."""

    _alterops_kind = ""
    _alterops_base = object

    def __reduce_ex__(self, protocol):
        return (_rebuild, (self._alterops_base, self._alterops_kind), self.__dict__.copy())

    def _alterops_backend_name(self):
        return self.__dict__.get("alterops_backend")


def _qkv_proj(x, lq, lk, lv, heads):
    """q, k, v ``(..., heads, d)`` from three projection modules, each called as a module (so that
    hooks and adapters wrapping them, e.g. LoRA, still apply); no weight concatenation per call."""
    return tuple(l(x).unflatten(-1, (heads, -1)) for l in (lq, lk, lv))


def _qk_flip_table(table, wh, ww, heads):
    """``((2wh-1)(2ww-1), heads)`` indexed query-minus-key → ``(heads, 2wh-1, 2ww-1)`` key-minus-query."""
    return table.view(2 * wh - 1, 2 * ww - 1, heads).flip(0, 1).permute(2, 0, 1)


def _collecting_attentions() -> bool:
    """transformers 5.x records attention weights through a context variable, not an argument."""
    if torch.compiler.is_compiling():
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
    except Exception:
        return False
    try:
        collected = _active_collector.get()
    except LookupError:
        return False
    return bool(collected) and "attentions" in collected


# -----------------------------------------------------------------------------------------
# Hugging Face Swin (v1)
# -----------------------------------------------------------------------------------------
def _hf_swin_attention_parts(layer):
    """(q, k, v, out Linear, out dropout or None, attention-dropout p, table, heads, head_dim, scale)."""
    a = layer.attention
    if hasattr(a, "q_proj"):  # transformers 5.x
        rpb = a.relative_position_bias
        return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, None, float(a.attention_dropout),
                rpb.relative_position_bias_table, tuple(rpb.window_size), a.num_attention_heads, a.head_dim,
                a.scaling)
    s = a.self  # transformers 4.x
    return (s.query, s.key, s.value, a.output.dense, a.output.dropout, float(s.dropout.p),
            s.relative_position_bias_table, tuple(s.window_size), s.num_attention_heads,
            s.attention_head_size, s.attention_head_size ** -0.5)


def _hf_swin_attend(layer, x, H, W):
    """``x``: the normed ``(B, H, W, C)`` map → attention output ``(B, H*W, C)`` (before drop_path)."""
    q_l, k_l, v_l, o_l, o_drop, _, table, _, heads, _, scale = _hf_swin_attention_parts(layer)
    B, C = x.shape[0], x.shape[-1]
    x, _ = layer.maybe_pad(x, H, W)  # zero features, as Swin: they take part in the attention
    ws, shift = int(layer.window_size), int(layer.shift_size)
    q, k, v = _qkv_proj(x, q_l, k_l, v_l, heads)
    out = _ops().window_attention2d(
        q, k, v, ws, shift=shift, rel_pos_bias=_qk_flip_table(table, ws, ws, heads), scale=scale,
        backend=layer.__dict__.get("alterops_backend"),
    )
    out = o_l(out[:, :H, :W].reshape(B, H * W, C))
    return o_drop(out) if o_drop is not None else out


class _FusedHFSwinLayer(_Fused):
    def _alterops_can_fuse(self) -> bool:
        parts = _hf_swin_attention_parts(self)
        if self.training and parts[5] > 0:
            return False
        ws = self.window_size
        if not isinstance(ws, int) or parts[7] != (ws, ws):
            return False
        return not _collecting_attentions()

    def forward(self, hidden_states, input_dimensions, *args, **kwargs):
        new_api = hasattr(self.attention, "q_proj")
        # 4.x: (…, head_mask=None, output_attentions=False, always_partition=False);
        # 5.x: (…, always_partition=False, **kwargs); DonutSwin 5.x: (…, output_attentions, always_partition)
        opts = dict(zip(self._alterops_argnames, args))
        opts.update(kwargs)
        always_partition = bool(opts.get("always_partition", False))
        unsupported = opts.get("head_mask") is not None or bool(opts.get("output_attentions"))
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        if unsupported or not self._alterops_can_fuse():
            return super().forward(hidden_states, input_dimensions, *args, **kwargs)
        H, W = input_dimensions
        B, _, C = hidden_states.shape
        shortcut = hidden_states
        x = self.layernorm_before(hidden_states).view(B, H, W, C)
        attn = _hf_swin_attend(self, x, H, W)
        if new_api:
            attn = self.dropout(attn)
            hidden_states = shortcut + self.drop_path(attn)
            residual = hidden_states
            hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + residual
            return hidden_states, None
        hidden_states = shortcut + self.drop_path(attn)
        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        return (hidden_states + self.output(layer_output),)


# transformers classes whose forward is Swin's (checked against their source); other Swin copies
# in transformers (MaskFormerSwinLayer, Swin2SRLayer, ...) differ in details and are reported skipped.
_HF_SWIN_V1 = ("SwinLayer", "DonutSwinLayer")
_HF_SWIN_V2 = ("Swinv2Layer",)


def _match_hf_other(m):
    name = type(m).__name__
    if (type(m).__module__.startswith("transformers.") and "Swin" in name and name.endswith("Layer")
            and name not in _HF_SWIN_V1 + _HF_SWIN_V2 and hasattr(m, "attention")):
        return ("skip", f"{name}: a Swin variant whose forward differs from SwinLayer's; not swapped")
    return None


def _match_hf_swin(m):
    if type(m).__name__ not in _HF_SWIN_V1 or not type(m).__module__.startswith("transformers."):
        return None
    need = ("layernorm_before", "layernorm_after", "attention", "drop_path", "maybe_pad",
            "set_shift_and_window_size", "window_size", "shift_size")
    if not all(hasattr(m, n) for n in need):
        return ("skip", "a Swin layer without the attributes of transformers' SwinLayer")
    a = m.attention
    if hasattr(a, "q_proj"):
        ok = all(hasattr(a, n) for n in ("k_proj", "v_proj", "o_proj", "relative_position_bias", "scaling"))
        ok = ok and hasattr(m, "mlp") and hasattr(m, "dropout")
    else:
        s = getattr(a, "self", None)
        ok = s is not None and all(hasattr(s, n) for n in ("query", "key", "value", "relative_position_bias_table"))
        ok = ok and hasattr(a, "output") and hasattr(m, "intermediate") and hasattr(m, "output")
        ok = ok and not hasattr(s, "logit_scale")
    if not ok:
        return ("skip", "unrecognised attention layout inside a SwinLayer")
    return ("fuse", "hf_swin", f"window {m.window_size}, shift {m.shift_size}")


# -----------------------------------------------------------------------------------------
# Hugging Face Swin V2
# -----------------------------------------------------------------------------------------
class _FusedHFSwinV2Layer(_Fused):
    def forward(self, hidden_states, input_dimensions, *args, **kwargs):
        # 4.x: (…, head_mask=None, output_attentions=False); 5.x: (…, output_attentions=False)
        opts = dict(zip(self._alterops_argnames, args))
        opts.update(kwargs)
        sa = self.attention.self
        ws = int(self.window_size)
        if (opts.get("head_mask") is not None or opts.get("output_attentions")
                or (self.training and sa.dropout.p > 0) or tuple(sa.window_size) != (ws, ws)):
            return super().forward(hidden_states, input_dimensions, *args, **kwargs)
        H, W = input_dimensions
        B, _, C = hidden_states.shape
        shortcut = hidden_states
        x = hidden_states.view(B, H, W, C)
        x, _ = self.maybe_pad(x, H, W)
        heads = sa.num_attention_heads
        q, k, v = _qkv_proj(x, sa.query, sa.key, sa.value, heads)
        tau = torch.clamp(sa.logit_scale, max=math.log(1.0 / 0.01)).exp().view(heads, 1)
        q = F.normalize(q, dim=-1) * tau.to(q.dtype)
        k = F.normalize(k, dim=-1)
        table = sa.continuous_position_bias_mlp(sa.relative_coords_table)
        table = 16 * torch.sigmoid(_qk_flip_table(table.reshape(-1, heads), ws, ws, heads))
        out = _ops().window_attention2d(
            q, k, v, ws, shift=int(self.shift_size), rel_pos_bias=table, scale=1.0,
            backend=self.__dict__.get("alterops_backend"),
        )
        out = self.attention.output.dense(out[:, :H, :W].reshape(B, H * W, C))
        out = self.attention.output.dropout(out)
        hidden_states = shortcut + self.drop_path(self.layernorm_before(out))
        layer_output = self.output(self.intermediate(hidden_states))
        layer_output = hidden_states + self.drop_path(self.layernorm_after(layer_output))
        return (layer_output,)


def _match_hf_swinv2(m):
    if type(m).__name__ not in _HF_SWIN_V2 or not type(m).__module__.startswith("transformers."):
        return None
    s = getattr(getattr(m, "attention", None), "self", None)
    need = ("query", "key", "value", "logit_scale", "continuous_position_bias_mlp", "relative_coords_table",
            "window_size", "num_attention_heads", "dropout")
    if s is None or not all(hasattr(s, n) for n in need):
        return ("skip", "a Swin V2 layer without the cosine-attention / CPB layout of transformers' Swinv2Layer")
    if not all(hasattr(m, n) for n in ("layernorm_before", "layernorm_after", "intermediate", "output",
                                        "drop_path", "maybe_pad", "window_size", "shift_size")):
        return ("skip", "unrecognised Swinv2Layer layout")
    ws = tuple(s.window_size)
    if ws[0] != ws[1] or ws[0] != m.window_size:
        return ("skip", f"window {ws} of the attention differs from the layer's {m.window_size}")
    return ("fuse", "hf_swinv2", f"window {m.window_size}, shift {m.shift_size}, cosine attention + CPB bias")


# -----------------------------------------------------------------------------------------
# timm Swin blocks (timm >= 0.9: the blocks attend through `_attn(x)` / `_shifted_window_attn(x)`
# on (B, H, W, C) maps: roll, zero-pad, partition, attention with the block's mask, merge, crop,
# roll back)
# -----------------------------------------------------------------------------------------
def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _standard_rel_index(wh, ww):
    """timm's / Swin's ``relative_position_index``: query-minus-key offsets, row-major table."""
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)


def _buffer_equals(buf, expected) -> bool:
    """Content check of an index / coordinate buffer (buffers on the meta device are not checked)."""
    if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != tuple(expected.shape):
        return False
    if buf.device.type == "meta":
        return True
    return torch.equal(buf.detach().cpu().to(expected.dtype), expected)


def _timm_mask_matches(block, Hp, Wp, wh, ww) -> bool:
    """The shift mask the block itself would use is the op's for the padded ``(Hp, Wp)`` map:
    a dynamic mask always is; a static one (a buffer built for ``input_resolution`` /
    ``feat_size``) only when the runtime map pads to the same size."""
    if getattr(block, "dynamic_mask", False):
        return True
    mask = getattr(block, "attn_mask", None)
    if mask is None:  # shifted windows without a mask: not Swin's semantics
        return False
    res = getattr(block, "input_resolution", None)
    if res is None:
        res = getattr(block, "feat_size", None)
    if res is None:
        return False
    rh, rw = _pair(res)
    return ((-(-int(rh) // wh) * wh, -(-int(rw) // ww) * ww) == (Hp, Wp)
            and tuple(mask.shape) == ((Hp // wh) * (Wp // ww), wh * ww, wh * ww))


def _timm_window_attention(block, x, fallback, qkv_fn, table_fn, scale):
    """``x``: the block's ``(B, H, W, C)`` attention input → the attention branch's output, as the
    block's own roll/pad/partition/attention/merge/crop/roll-back, in one ``window_attention2d``.

    ``qkv_fn(z)`` → ``(B, Hp, Wp, 3 * heads * d)`` of the padded map, ``table_fn()`` → the bias
    ``(heads, 2wh-1, 2ww-1)`` key-minus-query, ``scale`` the logit scale. ``fallback(x)`` runs
    the block's original method when the fused op cannot reproduce the call."""
    a = block.attn
    wh, ww = block.window_size
    sh, sw = block.shift_size
    B, H, W, C = x.shape
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    shifted = sh > 0 or sw > 0
    if shifted and not _timm_mask_matches(block, Hp, Wp, wh, ww):
        return fallback(x)
    padded = (Hp, Wp) != (H, W)
    # timm rolls the unpadded map and pads afterwards (zero features that take part); the op
    # rolls the padded map. z = roll_Hp(pad(roll_H(x, -s)), +s) makes the two agree.
    if padded and shifted:
        z = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        z = torch.roll(F.pad(z, (0, 0, 0, Wp - W, 0, Hp - H)), shifts=(sh, sw), dims=(1, 2))
    elif padded:
        z = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    else:
        z = x
    heads = a.num_heads
    qkv = qkv_fn(z)
    qkv = qkv.view(B, Hp, Wp, 3, heads, qkv.shape[-1] // (3 * heads))
    q, k, v = qkv.unbind(3)
    if callable(scale):  # cosine attention: normalised q, k; the per-head scale folded into q
        q, k, scale = scale(q, k)
    out = _ops().window_attention2d(
        q, k, v, (wh, ww), shift=(sh, sw) if shifted else 0, rel_pos_bias=table_fn(), scale=scale,
        backend=block.__dict__.get("alterops_backend"),
    )
    if padded and shifted:
        out = torch.roll(out, shifts=(-sh, -sw), dims=(1, 2))[:, :H, :W]
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    elif padded:
        out = out[:, :H, :W]
    out = a.proj(out.reshape(B, H, W, -1))
    return a.proj_drop(out)


def _cosine_qk(logit_scale, heads):
    """Swin V2's cosine attention as the op's inputs: ``normalize(q)·τ_h``, ``normalize(k)``,
    ``scale=1``, with ``τ_h = exp(min(logit_scale_h, log 100))``."""
    def fold(q, k):
        tau = torch.clamp(logit_scale, max=math.log(1.0 / 0.01)).exp().reshape(heads, 1)
        return F.normalize(q, dim=-1) * tau.to(q.dtype), F.normalize(k, dim=-1), 1.0
    return fold


def _dropout_active(module) -> bool:
    return module.training and any(isinstance(d, nn.Dropout) and d.p > 0 for d in module.modules())


class _FusedTimmSwinBlock(_Fused):
    def _attn(self, x):
        a = self.attn
        wh, ww = self.window_size
        if (self.training and a.attn_drop.p > 0) or tuple(a.window_size) != (wh, ww):
            return super()._attn(x)
        return _timm_window_attention(
            self, x, super()._attn, a.qkv,
            lambda: _qk_flip_table(a.relative_position_bias_table, wh, ww, a.num_heads), a.scale)


def _timm_block_check(m, method):
    if not callable(getattr(m, method, None)):
        return f"timm older than 0.9 (no {type(m).__name__}.{method}); upgrade timm to swap it"
    ws, ss = getattr(m, "window_size", None), getattr(m, "shift_size", None)
    if not (isinstance(ws, tuple) and isinstance(ss, tuple) and len(ws) == 2 and len(ss) == 2):
        return "window_size / shift_size are not pairs as in timm >= 0.9"
    if not (0 <= ss[0] < ws[0] and 0 <= ss[1] < ws[1]):
        return f"shift {ss} outside [0, window {ws})"
    if _pair(m.attn.window_size) != ws:
        return f"window {_pair(m.attn.window_size)} of the attention differs from the block's {ws}"
    return None


def _match_timm_swin(m):
    if type(m).__name__ != "SwinTransformerBlock" or not hasattr(m, "attn"):
        return None
    a = m.attn
    need = ("qkv", "proj", "proj_drop", "attn_drop", "relative_position_bias_table", "num_heads", "scale",
            "window_size")
    if not all(hasattr(a, n) for n in need):
        return ("skip", "attention module without timm WindowAttention's attributes")
    why = _timm_block_check(m, "_attn")
    if why:
        return ("skip", why)
    wh, ww = m.window_size
    if not _buffer_equals(getattr(a, "relative_position_index", None), _standard_rel_index(wh, ww)):
        return ("skip", "relative_position_index is not Swin's query-minus-key index")
    return ("fuse", "timm_swin", f"window {m.window_size}, shift {m.shift_size}")


class _FusedTimmSwinV2Block(_Fused):
    def _attn(self, x):
        a = self.attn
        wh, ww = self.window_size
        if (self.training and a.attn_drop.p > 0) or _dropout_active(a.cpb_mlp) or tuple(a.window_size) != (wh, ww):
            return super()._attn(x)
        heads = a.num_heads

        def qkv(z):  # as WindowAttention.forward: q and v biases, the zero k bias buffer
            if a.q_bias is None:
                return a.qkv(z)
            bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
            if getattr(a, "qkv_bias_separate", False):
                return a.qkv(z) + bias
            return F.linear(z, a.qkv.weight, bias)

        def table():  # the continuous position bias, 16·sigmoid(cpb_mlp(log-spaced coordinates))
            t = a.cpb_mlp(a.relative_coords_table).reshape(-1, heads)
            return 16 * torch.sigmoid(_qk_flip_table(t, wh, ww, heads))

        return _timm_window_attention(self, x, super()._attn, qkv, table, _cosine_qk(a.logit_scale, heads))


def _match_timm_swinv2(m):
    if type(m).__name__ != "SwinTransformerV2Block" or not hasattr(m, "attn"):
        return None
    a = m.attn
    need = ("qkv", "proj", "proj_drop", "attn_drop", "logit_scale", "cpb_mlp", "relative_coords_table",
            "relative_position_index", "q_bias", "k_bias", "v_bias", "num_heads", "window_size")
    if not all(hasattr(a, n) for n in need):
        return ("skip", "attention module without timm Swin V2 WindowAttention's attributes (cosine attention, cpb_mlp)")
    why = _timm_block_check(m, "_attn")
    if why:
        return ("skip", why)
    wh, ww = m.window_size
    if not isinstance(a.qkv, nn.Linear) or (a.q_bias is None) != (a.v_bias is None):
        return ("skip", "qkv is not an nn.Linear with timm's separate q / v biases")
    if tuple(a.logit_scale.shape) != (a.num_heads, 1, 1):
        return ("skip", f"logit_scale of shape {tuple(a.logit_scale.shape)}, not (heads, 1, 1)")
    if tuple(a.relative_coords_table.shape) != (1, 2 * wh - 1, 2 * ww - 1, 2):
        return ("skip", "relative_coords_table is not the (1, 2wh-1, 2ww-1, 2) grid of the window")
    if not _buffer_equals(a.relative_position_index, _standard_rel_index(wh, ww)):
        return ("skip", "relative_position_index is not Swin's query-minus-key index")
    return ("fuse", "timm_swinv2", f"window {m.window_size}, shift {m.shift_size}, cosine attention + CPB bias")


def _cr_offset_rows(wh, ww):
    """Rows of the ``(N*N)`` pair list (query-major, N = wh*ww) of SwinV2-CR's
    ``relative_coordinates_log``, one pair per offset ``key - query = (a - wh + 1, b - ww + 1)``,
    in the op's ``(2wh-1, 2ww-1)`` table order; and, for every pair, the row of its offset."""
    dy, dx = torch.arange(2 * wh - 1) - (wh - 1), torch.arange(2 * ww - 1) - (ww - 1)
    qy, qx = (-dy).clamp(min=0), (-dx).clamp(min=0)
    qi = qy[:, None] * ww + qx[None, :]
    ki = (qy + dy)[:, None] * ww + (qx + dx)[None, :]
    rows = (qi * (wh * ww) + ki).flatten()
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    offset = (ys[None, :] - ys[:, None] + wh - 1) * (2 * ww - 1) + (xs[None, :] - xs[:, None] + ww - 1)
    return rows, offset.flatten()


class _FusedTimmSwinV2CrBlock(_Fused):
    def _shifted_window_attn(self, x):
        a = self.attn
        wh, ww = self.window_size
        if _dropout_active(a) or tuple(a.window_size) != (wh, ww):
            return super()._shifted_window_attn(x)
        heads = a.num_heads

        def table():  # meta_mlp of the log-spaced offsets, once per offset (it depends on nothing else)
            rows = _cr_offset_rows(wh, ww)[0].to(a.relative_coordinates_log.device)
            t = a.meta_mlp(a.relative_coordinates_log[rows])  # ((2wh-1)(2ww-1), heads)
            return t.t().reshape(heads, 2 * wh - 1, 2 * ww - 1)

        return _timm_window_attention(self, x, super()._shifted_window_attn, a.qkv, table,
                                      _cosine_qk(a.logit_scale, heads))


def _match_timm_swinv2_cr(m):
    if type(m).__name__ != "SwinTransformerV2CrBlock" or not hasattr(m, "attn"):
        return None
    a = m.attn
    need = ("qkv", "proj", "proj_drop", "attn_drop", "logit_scale", "meta_mlp", "relative_coordinates_log",
            "num_heads", "window_size")
    if not all(hasattr(a, n) for n in need):
        return ("skip", "attention module without timm SwinV2-CR WindowMultiHeadAttention's attributes")
    why = _timm_block_check(m, "_shifted_window_attn")
    if why:
        return ("skip", why)
    wh, ww = m.window_size
    if tuple(a.logit_scale.shape) != (a.num_heads,):
        return ("skip", f"logit_scale of shape {tuple(a.logit_scale.shape)}, not (heads,)")
    coords = a.relative_coordinates_log
    if not isinstance(coords, torch.Tensor) or tuple(coords.shape) != ((wh * ww) ** 2, 2):
        return ("skip", "relative_coordinates_log is not the (N*N, 2) pair list of the window")
    if coords.device.type != "meta":  # the bias must depend on the offset only (it does in timm)
        rows, offset = _cr_offset_rows(wh, ww)
        c = coords.detach().cpu()
        if not torch.equal(c, c[rows][offset]):
            return ("skip", "relative_coordinates_log is not a function of the query-key offset")
    return ("fuse", "timm_swinv2_cr", f"window {m.window_size}, shift {m.shift_size}, cosine attention + "
                                      "meta-MLP bias")


# -----------------------------------------------------------------------------------------
# The papers' modules (matched by structure)
# -----------------------------------------------------------------------------------------
def _is_1x1(conv) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.dilation == (1, 1))


def _paper_projection_check(a):
    """Checks Attention2d / ConvAttention2d projections; returns a skip reason or None."""
    if not all(hasattr(a, n) for n in ("to_q", "to_kv", "to_out", "heads", "scale")):
        return "missing to_q / to_kv / to_out / heads / scale"
    if not (_is_1x1(a.to_q) and a.to_q.bias is None):
        return "to_q is not a bias-free 1x1 conv"
    if not (isinstance(a.to_kv, nn.Conv2d) and a.to_kv.bias is None and a.to_kv.groups == 1):
        return "to_kv is not a bias-free conv"
    if not _is_1x1(a.to_kv):
        return f"to_kv has kernel {a.to_kv.kernel_size} (spatially reduced keys/values): no fused equivalent"
    to_out = a.to_out
    if not (isinstance(to_out, nn.Sequential) and len(to_out) >= 1 and _is_1x1(to_out[0])
            and all(isinstance(t, (nn.Dropout, nn.Identity)) for t in list(to_out)[1:])):
        return "to_out is not Sequential(1x1 conv, [Dropout])"
    inner = a.to_q.out_channels
    if a.to_kv.out_channels != 2 * inner or inner % a.heads or to_out[0].in_channels != inner:
        return "projection widths do not match heads"
    return None


def _paper_qkv(a, x):
    B, C, H, W = x.shape
    w = torch.cat([a.to_q.weight, a.to_kv.weight], 0).flatten(1)
    qkv = F.linear(x.permute(0, 2, 3, 1), w)
    return qkv.view(B, H, W, 3, a.heads, w.shape[0] // (3 * a.heads)).unbind(3)


def _paper_out(a, out):
    B, H, W = out.shape[:3]
    conv = a.to_out[0]
    y = F.linear(out.reshape(B, H, W, -1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)
    for extra in list(a.to_out)[1:]:
        y = extra(y)
    return y.contiguous()


class _FusedLocalAttention(_Fused):
    def forward(self, x, mask=None):
        if mask is not None:
            return super().forward(x, mask)
        a = self.attn
        q, k, v = _paper_qkv(a, x)
        p = self.window_size
        out = _ops().window_attention2d(
            q, k, v, p, rel_pos_bias=self.pos_embedding.view(1, 2 * p - 1, 2 * p - 1), scale=a.scale,
            backend=self.__dict__.get("alterops_backend"),
        )
        return _paper_out(a, out), None


def _match_local_attention(m):
    if not (hasattr(m, "attn") and hasattr(m, "pos_embedding") and hasattr(m, "window_size")):
        return None
    if not isinstance(m.pos_embedding, torch.Tensor) or m.pos_embedding.dim() != 2:
        return None
    p = m.window_size
    if not isinstance(p, int) or tuple(m.pos_embedding.shape) != (2 * p - 1, 2 * p - 1):
        return ("skip", "pos_embedding is not a (2p-1, 2p-1) table for window_size p")
    why = _paper_projection_check(m.attn)
    if why:
        return ("skip", why)
    return ("fuse", "local_attention", f"window {p}, heads {m.attn.heads}")


class _FusedConvAttention2d(_Fused):
    def forward(self, x, mask=None):
        if mask is not None:
            return super().forward(x, mask)
        q, k, v = _paper_qkv(self, x)
        args = self.conv_args
        out = _ops().neighborhood_attention2d(
            q, k, v, args["kernel_size"], args.get("dilation", 1), border="zero", scale=self.scale,
            backend=self.__dict__.get("alterops_backend"),
        )
        return _paper_out(self, out), None


def _match_conv_attention(m):
    args = getattr(m, "conv_args", None)
    if not isinstance(args, dict) or not hasattr(m, "to_q"):
        return None
    why = _paper_projection_check(m)
    if why:
        return ("skip", why)
    k, d = args.get("kernel_size", 1), args.get("dilation", 1)
    pad, stride = args.get("padding", 0), args.get("stride", 1)
    if not all(isinstance(t, int) for t in (k, d, pad, stride)):
        return ("skip", "conv_args with per-axis values")
    if stride != 1:
        return ("skip", f"stride {stride}: only stride-1 neighbourhood attention is fused")
    if k % 2 == 0:
        return ("skip", f"even kernel {k}: neighbourhoods are centred, kernels must be odd")
    if pad != d * (k - 1) // 2:
        return ("skip", f"padding {pad} != dilation*(k-1)/2 = {d * (k - 1) // 2}: the output would not match the map")
    return ("fuse", "conv_attention", f"kernel {k}, dilation {d}, zero border")


class _FusedNattenNA(_Fused):
    """NATTEN's ``NeighborhoodAttention1D/2D/3D`` (0.20 and later): qkv projection, the op with the
    module's kernel, stride, dilation, causal axes and scale, output projection, its dropout."""

    def forward(self, x):
        n = self.na_dim
        if x.dim() != n + 2 or x.shape[-1] != self.embed_dim:
            return super().forward(x)  # the original raises its own error
        B, *spatial, C = x.shape
        q, k, v = self.qkv(x).view(B, *spatial, 3, self.num_heads, self.head_dim).unbind(-3)
        out = getattr(_ops(), f"neighborhood_attention{n}d")(
            q, k, v, tuple(self.kernel_size), tuple(self.dilation), stride=tuple(self.stride),
            is_causal=tuple(bool(c) for c in self.is_causal), scale=self.scale,
            backend=self.__dict__.get("alterops_backend"),
        )
        return self.proj_drop(self.proj(out.reshape(B, *spatial, C)))


def _match_natten_na(m):
    n = getattr(m, "na_dim", None)
    if n not in (1, 2, 3) or not isinstance(getattr(m, "qkv", None), nn.Linear) \
            or not isinstance(getattr(m, "proj", None), nn.Linear):
        return None
    fields = {name: getattr(m, name, None) for name in ("kernel_size", "stride", "dilation", "is_causal")}
    if not all(isinstance(v, (tuple, list)) and len(v) == n for v in fields.values()):
        return ("skip", "kernel_size / stride / dilation / is_causal are not one entry per axis")
    heads, head_dim, embed = getattr(m, "num_heads", None), getattr(m, "head_dim", None), getattr(m, "embed_dim", None)
    if not all(isinstance(t, int) for t in (heads, head_dim, embed)) or heads * head_dim != embed \
            or m.qkv.in_features != embed or m.qkv.out_features != 3 * embed:
        return ("skip", "qkv is not a Linear(embed_dim, 3 * embed_dim) over num_heads x head_dim")
    if not isinstance(getattr(m, "scale", None), (int, float)):
        return ("skip", "no numeric scale")
    if hasattr(m, "rpb"):
        return ("skip", "a relative position bias (the NATTEN <= 0.17 module layout), which this family does not read")
    detail = f"{n}-D, kernel {tuple(fields['kernel_size'])}, heads {heads}"
    for name, plain in (("stride", 1), ("dilation", 1), ("is_causal", False)):
        if any(v != plain for v in fields[name]):
            detail += f", {name} {tuple(fields[name])}"
    return ("fuse", "natten_na", detail)


def _box_pool_args(pool):
    """``(k, s, p)`` if ``pool`` is an ``nn.AvgPool2d`` that ``box_blur2d`` reproduces, else a reason."""
    if type(pool) is not nn.AvgPool2d:
        return f"{type(pool).__name__} is not an nn.AvgPool2d box filter"
    if pool.ceil_mode or not pool.count_include_pad or pool.divisor_override is not None:
        return "AvgPool2d with ceil_mode, count_include_pad=False or divisor_override"
    return (pool.kernel_size, pool.stride if pool.stride is not None else pool.kernel_size, pool.padding)


def _stride_one(s) -> bool:
    return s == 1 or (isinstance(s, (tuple, list)) and all(v == 1 for v in s))


class _FusedTanhBlur(_Fused):
    def forward(self, x):
        if "bn" in self._modules:
            x = self.bn(x)
        k, s, p = _box_pool_args(self.blur)
        return _ops().tanh_blur2d(x, float(self.temp), k, s, p, relu=True,
                                  backend=self.__dict__.get("alterops_backend"))


def _match_tanh_blur(m):
    names = set(m._modules)
    if names not in ({"relu", "tanh", "blur"}, {"bn", "relu", "tanh", "blur"}) or not hasattr(m, "temp"):
        return None
    if not (isinstance(m.relu, nn.ReLU) and isinstance(m.tanh, nn.Tanh)):
        return ("skip", "relu / tanh children are not nn.ReLU / nn.Tanh")
    if "bn" in names and not isinstance(m.bn, nn.modules.batchnorm._BatchNorm):
        return ("skip", "bn child is not a batch norm")
    args = _box_pool_args(m.blur)
    if isinstance(args, str):
        return ("skip", f"its blur is not a box filter ({args}); only AvgPool2d blurs are fused")
    if not isinstance(m.temp, (int, float)) or m.temp <= 0:
        return ("skip", "temp is not a positive number")
    return ("fuse", "tanh_blur", f"tau {float(m.temp):g}, kernel {args[0]}, stride {args[1]}, padding {args[2]}")


class _FusedAvgPool(_Fused):
    def forward(self, x):
        return _ops().box_blur2d(x, self.kernel_size, self.stride, self.padding,
                                 backend=self.__dict__.get("alterops_backend"))


def _match_avgpool(m):
    if type(m) is not nn.AvgPool2d:
        return None
    args = _box_pool_args(m)
    if isinstance(args, str):
        return ("skip", args)
    if not _stride_one(args[1]):
        return ("skip", f"stride {args[1]}: a downsampling pool, not a blur; left as is")
    return ("fuse", "box_blur", f"kernel {args[0]}, padding {args[2]}")


_MIXINS = {
    "hf_swin": _FusedHFSwinLayer,
    "hf_swinv2": _FusedHFSwinV2Layer,
    "timm_swin": _FusedTimmSwinBlock,
    "timm_swinv2": _FusedTimmSwinV2Block,
    "timm_swinv2_cr": _FusedTimmSwinV2CrBlock,
    "local_attention": _FusedLocalAttention,
    "conv_attention": _FusedConvAttention2d,
    "natten_na": _FusedNattenNA,
    "tanh_blur": _FusedTanhBlur,
    "box_blur": _FusedAvgPool,
}

# (op group, matcher), tried in order; the first that recognises a module decides.
_MATCHERS = (
    ("attention", _match_hf_swin),
    ("attention", _match_hf_swinv2),
    ("attention", _match_hf_other),
    ("attention", _match_timm_swin),
    ("attention", _match_timm_swinv2),
    ("attention", _match_timm_swinv2_cr),
    ("attention", _match_local_attention),
    ("attention", _match_conv_attention),
    ("attention", _match_natten_na),
    ("blur", _match_tanh_blur),
    ("blur", _match_avgpool),
)


# =========================================================================================
# Attention that no family recognises: reported, with what made it look like attention
# =========================================================================================
_PROJECTION_SETS = (("qkv",), ("to_qkv",), ("in_proj",), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"),
                    ("to_q", "to_k", "to_v"), ("to_q", "to_kv"), ("q", "k", "v"), ("q", "kv"))


def _attention_like(m) -> str | None:
    """A reason string when ``m`` looks like an attention module (nn.MultiheadAttention, a class name
    with "Attention" / "Attn", or query/key/value projection children), else None."""
    name = type(m).__name__
    evidence = None
    if isinstance(m, nn.MultiheadAttention):
        evidence = "nn.MultiheadAttention"
    elif "attention" in name.lower() or "attn" in name.lower():
        evidence = f"class {name}"
    else:
        children = m._modules
        for names in _PROJECTION_SETS:
            if all(isinstance(children.get(n), (nn.Linear, nn.Conv1d, nn.Conv2d)) for n in names):
                evidence = f"{name} with {'/'.join(names)} projections"
                break
        else:
            if isinstance(m.__dict__.get("_parameters", {}).get("in_proj_weight"), torch.Tensor):
                evidence = f"{name} with an in_proj_weight"
    if evidence is None:
        return None
    return (f"{evidence}: attention that no swap family matches (alterops fuses Swin-style window and "
            f"neighbourhood attention only); left as is")


# =========================================================================================
# Public functions
# =========================================================================================
def swap(model: nn.Module, ops=("attention", "blur"), backend: str | None = None) -> SwapReport:
    """Replace, in place, the attention and blur modules of ``model`` by fused ones.

    Args:
        model: any ``nn.Module`` (Hugging Face Swin / Swin V2, timm Swin / Swin V2 / SwinV2-CR,
            the papers' modules, or a model containing them). It is modified in place; the same object is kept.
        ops: which groups to swap: ``"attention"`` and/or ``"blur"``.
        backend: passed to the ops on every call (``None``: automatic selection per call). A
            module swapped before gets the new backend.

    Returns:
        A :class:`SwapReport` listing each replaced module (name, family, detail) and each
        candidate left alone with the reason, attention-like modules no family recognises
        included (family ``"unrecognised"``; with ``"attention"`` in ``ops``). Modules inside a
        replaced one are not visited.

    The swapped model computes the same function (up to the dtype's rounding; see the module
    docstring for the cases that run the original forward) with the same parameters (the same
    tensor objects), buffers and state-dict keys, and gradients reach the same parameters.
    """
    if isinstance(ops, str):
        ops = (ops,)
    ops = tuple(ops)
    bad = [o for o in ops if o not in _OPS]
    if bad:
        raise ValueError(f"ops must be a subset of {_OPS}, got {ops!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None:
        from ._dispatch import _check_name

        _check_name(backend, "backend")
    report = SwapReport()

    def visit(name: str, m: nn.Module, covered: bool) -> None:
        # covered: inside an attention module already reported as skipped (reported once, outermost)
        if isinstance(m, _Fused):
            m.__dict__["alterops_backend"] = backend
            report.replaced.append((name, m._alterops_kind, "already swapped (backend updated)"))
            return
        recognised = False
        for group, matcher in _MATCHERS:
            result = matcher(m)
            if result is None:
                continue
            recognised = True
            if group not in ops:
                break
            if result[0] == "skip":
                if not covered:
                    report.skipped.append((name, matcher.__name__[len("_match_"):], result[1]))
                covered = covered or group == "attention"
                break
            _, kind, detail = result
            m.__class__ = _fused_class(type(m), kind)
            m.__dict__["alterops_backend"] = backend
            report.replaced.append((name, kind, detail))
            return
        if not recognised and not covered and "attention" in ops:
            why = _attention_like(m)
            if why:
                report.skipped.append((name, "unrecognised", why))
                covered = True
        for child_name, child in m.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, covered)

    visit("", model, False)
    return report


def unswap(model: nn.Module) -> int:
    """Switch every module swapped by :func:`swap` back to its original class; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, _Fused):
            m.__class__ = m._alterops_base
            m.__dict__.pop("alterops_backend", None)
            n += 1
    return n



# -----------------------------------------------------------------------------------------
# Hugging Face DiNAT / NAT (transformers 4.x and 5.x), and the NATTEN <= 0.17 modules of
# alterops.compat.natten
# -----------------------------------------------------------------------------------------
def _hf_natten_attend(a, hidden_states, output_attentions, backend):
    """transformers' DiNAT / NAT ``NeighborhoodAttention`` ``a`` on ``(B, H, W, C)``: the model's
    computation (:func:`alterops.compat.natten.hf_neighborhood_attention_forward`: q/k/v
    projections, ``q / sqrt(head_dim)``, clamp-window logits plus ``rpb``, softmax, weighted values)
    as one ``neighborhood_attention2d`` call with ``rel_pos_bias=rpb``; that unfused computation
    itself when the probabilities are requested or the attention dropout is active in training
    (the same dropout, exactly). Returns ``(context,)`` or ``(context, probs)``."""
    from .compat.natten import hf_neighborhood_attention_forward

    if output_attentions or (a.training and a.dropout.p > 0) or hidden_states.dim() != 4 or _collecting_attentions():
        return hf_neighborhood_attention_forward(a, hidden_states, output_attentions)
    heads, d = a.num_attention_heads, a.attention_head_size
    B, H, W, _ = hidden_states.shape
    q, k, v = _qkv_proj(hidden_states, a.query, a.key, a.value, heads)
    out = _ops().neighborhood_attention2d(
        q, k, v, int(a.kernel_size), int(getattr(a, "dilation", 1)), rel_pos_bias=a.rpb, scale=d ** -0.5,
        backend=backend,
    )
    return (out.reshape(B, H, W, heads * d),)


class _FusedHFNeighborhoodAttentionModule(_Fused):
    """``NeighborhoodAttentionModule``: the fused attention (``self.self``), then ``self.output``."""

    def forward(self, hidden_states, output_attentions=False):
        outputs = _hf_natten_attend(self.self, hidden_states, output_attentions, self.__dict__.get("alterops_backend"))
        return (self.output(outputs[0], hidden_states),) + tuple(outputs[1:])


class _FusedHFNeighborhoodAttention(_Fused):
    def forward(self, hidden_states, output_attentions=False):
        return _hf_natten_attend(self, hidden_states, output_attentions, self.__dict__.get("alterops_backend"))


def _hf_natten_check(m):
    """None when ``m`` has the layout of transformers' DiNAT / NAT ``NeighborhoodAttention``, else why not."""
    need = ("query", "key", "value", "rpb", "dropout", "kernel_size", "num_attention_heads", "attention_head_size")
    if not all(hasattr(m, n) for n in need):
        return "a NeighborhoodAttention without the attributes of transformers' DiNAT / NAT module"
    k, d = m.kernel_size, getattr(m, "dilation", 1)
    heads, hd = m.num_attention_heads, m.attention_head_size
    if not (isinstance(k, int) and isinstance(d, int) and k > 1 and k % 2 == 1 and d >= 1):
        return f"kernel {k!r} / dilation {d!r} are not an odd int > 1 and an int >= 1"
    if not all(isinstance(l, nn.Linear) and l.out_features == heads * hd for l in (m.query, m.key, m.value)):
        return "query / key / value are not Linear layers onto num_attention_heads x attention_head_size"
    if not isinstance(m.rpb, torch.Tensor) or tuple(m.rpb.shape) != (heads, 2 * k - 1, 2 * k - 1):
        return f"rpb is not a ({heads}, {2 * k - 1}, {2 * k - 1}) table (pruned heads?)"
    if not isinstance(m.dropout, nn.Dropout):
        return "dropout is not an nn.Dropout"
    return None


def _hf_natten_detail(m):
    return f"kernel {m.kernel_size}, dilation {getattr(m, 'dilation', 1)}, heads {m.num_attention_heads}, rpb"


def _is_transformers(m, name):
    return type(m).__name__ == name and type(m).__module__.startswith("transformers.")


def _match_hf_natten_module(m):
    if not _is_transformers(m, "NeighborhoodAttentionModule"):
        return None
    a, out = getattr(m, "self", None), getattr(m, "output", None)
    if a is None or out is None or not _is_transformers(a, "NeighborhoodAttention"):
        return ("skip", "a NeighborhoodAttentionModule without transformers' self / output children")
    why = _hf_natten_check(a)
    if why:
        return ("skip", why)
    return ("fuse", "hf_natten", _hf_natten_detail(a))


def _match_hf_natten(m):
    if not _is_transformers(m, "NeighborhoodAttention"):
        return None
    why = _hf_natten_check(m)
    if why:
        return ("skip", why)
    return ("fuse", "hf_natten_attention", _hf_natten_detail(m))


def _match_compat_natten(m):
    if type(m).__module__ != "alterops.compat.natten" or not hasattr(m, "rpb"):
        return None
    return ("skip", "alterops.compat.natten module: calls the fused op already (the unfused ops only while "
                    "attention dropout is active)")


_MIXINS["hf_natten"] = _FusedHFNeighborhoodAttentionModule
_MIXINS["hf_natten_attention"] = _FusedHFNeighborhoodAttention
_MATCHERS = _MATCHERS + (
    ("attention", _match_hf_natten_module),
    ("attention", _match_hf_natten),
    ("attention", _match_compat_natten),
)
