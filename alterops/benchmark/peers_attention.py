"""The implementations ``alterops bench attention`` runs, and the way to add one.

An implementation is an :class:`Impl`: a name, the ops it computes, a cheap ``why_not(case)``
(``None`` when it can run the case, else the reason it is skipped) and ``build(case)`` which
returns a :class:`Prepared`: the callable that is timed, plus the layout conversions done once,
outside the timed calls (peers get their native layout, as their users would have it).

Every implementation computes exactly the op's semantics (``docs/semantics.md``) for the case's
options, or says why it cannot; the runner checks each one against a float64 reference before
timing it, so a peer that disagrees is reported as a mismatch, never as a winner.

:func:`register_impl` adds an implementation (a plug-in peer, or a test double). ``build`` and
``why_not`` must be module-level functions (or ``functools.partial`` of them): they are pickled
to the fresh worker process that runs each measurement.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cases_window import swin_relative_index, swin_shift_mask


class SkipImpl(Exception):
    """Raised by ``build`` (or the first call) when an implementation cannot run this case;
    the message is the reason recorded with status ``skipped``."""


@dataclass(frozen=True)
class AttnCase:
    """One benchmark case. ``kernel`` is the neighbourhood size (op ``neighborhood``) and
    ``window`` the window size (op ``window``); the other one is unused."""

    op: str  # "neighborhood" | "window"
    batch: int
    height: int
    width: int
    heads: int
    head_dim: int
    kernel: int = 7
    window: int = 7
    dilation: int = 1
    shift: int = 0
    bias: bool = False
    border: str = "clamp"
    dtype: str = "float32"
    device: str = "cpu"
    pass_: str = "fwd"  # "fwd" | "fwd+bwd"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def keys_per_query(self) -> int:
        return self.kernel ** 2 if self.op == "neighborhood" else self.window ** 2

    @property
    def backward(self) -> bool:
        return self.pass_ == "fwd+bwd"

    def as_dict(self) -> dict:
        d = {"op": self.op, "batch": self.batch, "height": self.height, "width": self.width,
             "heads": self.heads, "head_dim": self.head_dim}
        if self.op == "neighborhood":
            d.update(kernel=self.kernel, dilation=self.dilation, border=self.border)
        else:
            d.update(window=self.window, shift=self.shift)
        d.update(bias=self.bias, dtype=self.dtype, device=self.device, **{"pass": self.pass_})
        return d

    def label(self) -> str:
        size = f"{self.height}x{self.width}"
        if self.op == "neighborhood":
            op = f"na k{self.kernel}" + (f" dil{self.dilation}" if self.dilation > 1 else "") + f" {self.border}"
        else:
            op = f"win w{self.window}" + (f" shift{self.shift}" if self.shift else "")
        return (f"{op} B{self.batch} {size} h{self.heads}x{self.head_dim}" + (" bias" if self.bias else "")
                + f" {self.dtype} {self.pass_}")


@dataclass
class Prepared:
    """What ``Impl.build`` returns.

    ``fn(q, k, v, table)`` is the timed call (``table`` is the op's bias table, or ``None``);
    ``to_native`` maps a heads-last ``(B, H, W, heads, d)`` tensor to the layout ``fn`` takes
    (done once, untimed; gradients are taken with respect to the native tensors) and
    ``to_ours`` maps a native tensor (the output, or a gradient of q, k, v) back.
    ``compiled``: the first call compiles; a failure there means ``skipped``, not ``error``.
    """

    fn: Callable
    to_native: Callable | None = None
    to_ours: Callable | None = None
    compiled: bool = False


@dataclass(frozen=True)
class Impl:
    name: str
    ops: tuple
    build: Callable[[AttnCase], Prepared]
    why_not: Callable[[AttnCase], "str | None"] | None = None
    kind: str = "peer"  # "alterops" | "peer"
    description: str = ""
    # False: run only when named in --impl (listed as skipped with ``not_default`` otherwise)
    default: bool = True
    not_default: str = ""

    def reason(self, case: AttnCase) -> str | None:
        if case.op not in self.ops:
            return f"computes {', '.join(self.ops)} attention, not {case.op}"
        return self.why_not(case) if self.why_not is not None else None


_IMPLS: dict[str, Impl] = {}


def register_impl(impl: Impl, *, replace: bool = False) -> Impl:
    """Add an implementation to ``alterops bench attention`` (see the module docstring)."""
    if impl.name in _IMPLS and not replace:
        raise ValueError(f"an attention implementation named {impl.name!r} is already registered")
    _IMPLS[impl.name] = impl
    return impl


def unregister_impl(name: str) -> None:
    _IMPLS.pop(name, None)


def impls() -> dict[str, Impl]:
    return dict(_IMPLS)


# ---------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------
def _scale(case: AttnCase) -> float:
    return case.head_dim ** -0.5


def _heads_first(case: AttnCase):
    B, H, W, h, d = case.batch, case.height, case.width, case.heads, case.head_dim

    def to_native(t):
        return t.permute(0, 3, 1, 2, 4).reshape(B, h, H * W, d).contiguous()

    def to_ours(t):
        return t.reshape(B, h, H, W, d).permute(0, 2, 3, 1, 4)

    return to_native, to_ours


def _na_axis(q_pos, k_pos, length, kernel, dilation, border):
    """Whether key position ``k_pos`` is in query ``q_pos``'s neighbourhood along one axis
    (broadcasting tensors), and the key-minus-query bias row; the rule of
    ``alterops.neighborhood_attention_nd.axis_window`` written as a predicate."""
    r = (kernel - 1) // 2
    same_grid = (k_pos - q_pos) % dilation == 0
    if border == "clamp":
        residue = q_pos % dilation
        n_grid = (length - residue + dilation - 1) // dilation
        start = residue + dilation * torch.minimum(torch.clamp(q_pos // dilation - r, min=0), n_grid - kernel)
        inside = same_grid & (k_pos >= start) & (k_pos <= start + dilation * (kernel - 1))
    else:  # "mask": centred window, out-of-image keys are not in the sequence at all
        inside = same_grid & ((k_pos - q_pos).abs() <= dilation * r)
    row = torch.clamp(torch.div(k_pos - q_pos, dilation, rounding_mode="floor") + kernel - 1, 0, 2 * kernel - 2)
    return inside, row


def _win_axis(pos, length, window, shift):
    """Rolled (padded) coordinate, window id, region and in-window offset of ``pos``."""
    padded = -(-length // window) * window
    rolled = (pos - shift) % padded
    region = ((rolled >= padded - window).long() + (rolled >= padded - shift).long()) if shift > 0 else rolled * 0
    return rolled // window, region, rolled % window


def _predicates(case: AttnCase):
    """``allowed(q_idx, k_idx)`` and ``bias_rc(q_idx, k_idx) -> (row, col)`` on row-major token
    indices of the ``H*W`` present tokens: the op's exact mask and bias indexing."""
    H, W = case.height, case.width

    if case.op == "neighborhood":
        k, dil, border = case.kernel, case.dilation, case.border

        def both(qi, ki):
            iy, ry = _na_axis(qi // W, ki // W, H, k, dil, border)
            ix, rx = _na_axis(qi % W, ki % W, W, k, dil, border)
            return iy & ix, ry, rx
    else:
        w, s = case.window, case.shift

        def both(qi, ki):
            wqy, gqy, oqy = _win_axis(qi // W, H, w, s)
            wky, gky, oky = _win_axis(ki // W, H, w, s)
            wqx, gqx, oqx = _win_axis(qi % W, W, w, s)
            wkx, gkx, okx = _win_axis(ki % W, W, w, s)
            allowed = (wqy == wky) & (wqx == wkx) & (gqy == gky) & (gqx == gkx)
            return allowed, oky - oqy + w - 1, okx - oqx + w - 1

    return both


def dense_mask(case: AttnCase, device) -> torch.Tensor:
    """The ``(N, N)`` boolean mask of the op (True: query row attends to key column)."""
    idx = torch.arange(case.tokens, device=device)
    allowed, _, _ = _predicates(case)(idx[:, None], idx[None, :])
    return allowed


def _mask_form_reason(case: AttnCase) -> str | None:
    if case.op == "neighborhood" and case.border == "zero":
        return ("border='zero' has no mask form: out-of-image keys are zero vectors that keep softmax "
                "mass, and they are not tokens of the sequence")
    return None


def dense_bytes(case: AttnCase) -> int:
    """Memory an implementation holding the full ``N x N`` logits needs (float32 logits per head
    and batch, twice with the backward, plus the mask)."""
    n2 = case.tokens ** 2
    elem = max(torch.empty((), dtype=case.torch_dtype).element_size(), 4)
    logits = case.batch * case.heads * n2 * elem * (2 if case.backward else 1)
    return logits + n2 * (case.heads if case.bias else 1) * elem


DENSE_BUDGET = {"bytes": None}  # set by the command (--dense-budget-gb); None: the default


def _dense_budget(case: AttnCase) -> int:
    if DENSE_BUDGET["bytes"] is not None:
        return int(DENSE_BUDGET["bytes"])
    if case.device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.5)
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable"))
        return int(min(avail * 0.5, 16 * 2**30))
    except (OSError, StopIteration):
        return 4 * 2**30


def _dense_reason(case: AttnCase) -> str | None:
    need, budget = dense_bytes(case), _dense_budget(case)
    if need > budget:
        return (f"the dense N x N mask and logits would need {need / 2**30:.1f} GiB, over the "
                f"{budget / 2**30:.1f} GiB budget (--dense-budget-gb)")
    return None


# ---------------------------------------------------------------------------------------
# alterops' own backends
# ---------------------------------------------------------------------------------------
_OP_NAME = {"neighborhood": "neighborhood_attention2d", "window": "window_attention2d"}


def _alterops_why_not(case: AttnCase, backend: str) -> str | None:
    from alterops import _dispatch

    table = _dispatch.registry()[_OP_NAME[case.op]]
    device = torch.device(case.device)
    if backend == "triton" and device.type != "cuda":
        return "Triton runs on the CPU only under its interpreter, a correctness tool; not timed"
    return table.why_not(backend, device, case.torch_dtype)


def _alterops_build(case: AttnCase, backend: str) -> Prepared:
    import alterops as ao

    if case.op == "neighborhood":
        def fn(q, k, v, table):
            return ao.neighborhood_attention2d(q, k, v, case.kernel, case.dilation, border=case.border,
                                               rel_pos_bias=table, backend=backend)
    else:
        def fn(q, k, v, table):
            return ao.window_attention2d(q, k, v, case.window, shift=case.shift, rel_pos_bias=table,
                                         backend=backend)
    return Prepared(fn)


def _register_alterops_backends() -> None:
    from alterops import _dispatch
    import alterops  # noqa: F401  (registers the ops' backend tables)

    names = set()
    for op_name in _OP_NAME.values():
        names.update(_dispatch.registry()[op_name].backends)
    for backend in sorted(names, key=lambda b: ("reference", "cpu", "cuda", "triton").index(b)
                          if b in ("reference", "cpu", "cuda", "triton") else 9):
        ops = tuple(op for op, op_name in _OP_NAME.items() if backend in _dispatch.registry()[op_name].backends)
        register_impl(Impl(
            name=f"alterops-{backend}", ops=ops, kind="alterops", default=backend != "reference",
            not_default="the plain-PyTorch ground truth, slow by design; not run by default "
                        "(--impl alterops-reference,... to time it)",
            build=functools.partial(_alterops_build, backend=backend),
            why_not=functools.partial(_alterops_why_not, backend=backend),
            description=f"alterops, backend={backend!r}",
        ))


# ---------------------------------------------------------------------------------------
# FlexAttention (eager and compiled) and SDPA with a dense mask
# ---------------------------------------------------------------------------------------
def _flex_why_not(case: AttnCase, compiled: bool) -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch.nn.attention.flex_attention is not importable ({exc})"
    reason = _mask_form_reason(case)
    if reason:
        return reason
    if not compiled:
        return _dense_reason(case)  # eager FlexAttention materialises the N x N scores
    return None


def _flex_build(case: AttnCase, compiled: bool) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    both = _predicates(case)
    N = case.tokens

    def mask_mod(b, h, q_idx, kv_idx):
        return both(q_idx, kv_idx)[0]

    block_mask = create_block_mask(mask_mod, None, None, N, N, device=case.device)

    def make_score_mod(table):
        if table is None:
            return None

        def score_mod(score, b, h, q_idx, kv_idx):
            _, row, col = both(q_idx, kv_idx)
            head = h if table.shape[0] > 1 else 0
            return score + table[head, row, col]

        return score_mod

    if compiled:
        attend = torch.compile(flex_attention, dynamic=False)
    else:  # run unfused on purpose (this is the peer): its advice to compile is noise here
        import warnings

        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        attend = flex_attention
    scale = _scale(case)

    def fn(q, k, v, table):
        return attend(q, k, v, score_mod=make_score_mod(table), block_mask=block_mask, scale=scale)

    to_native, to_ours = _heads_first(case)
    return Prepared(fn, to_native, to_ours, compiled=compiled)


def _sdpa_why_not(case: AttnCase) -> str | None:
    return _mask_form_reason(case) or _dense_reason(case)


def _sdpa_build(case: AttnCase) -> Prepared:
    device = torch.device(case.device)
    idx = torch.arange(case.tokens, device=device)
    allowed, row, col = _predicates(case)(idx[:, None], idx[None, :])
    scale = _scale(case)

    def fn(q, k, v, table):
        if table is None:
            mask = allowed
        else:  # additive float mask: the bias, -inf outside the neighbourhood / window
            mask = table[:, row, col].to(q.dtype).masked_fill(~allowed, float("-inf")).unsqueeze(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    to_native, to_ours = _heads_first(case)
    return Prepared(fn, to_native, to_ours)


# ---------------------------------------------------------------------------------------
# The paper's unfold form of neighbourhood attention ("How Do ViTs Work?", ConvAttention2d)
# ---------------------------------------------------------------------------------------
def _unfold_why_not(case: AttnCase) -> str | None:
    if case.border == "clamp":
        return ("F.unfold centres every window; border='clamp' slides it inward at the borders "
                "(use --border zero, the paper's rule, or mask)")
    return None


def unfold_attention(q, k, v, table, kernel, dilation, border, scale):
    """Neighbourhood attention the way the paper's code does it: ``F.unfold`` of k and v with
    zero padding (each query's k*k neighbours gathered into channels), einsum, softmax, einsum.
    ``border='mask'`` also unfolds a map of ones and drops the padded keys."""
    B, H, W, h, d = q.shape
    K, L, r = kernel * kernel, H * W, (kernel - 1) // 2
    pad = dilation * r

    def unfold(t):  # (B, H, W, h, d) -> (B, h, d, K, L)
        t = t.permute(0, 3, 4, 1, 2).reshape(B, h * d, H, W)
        return F.unfold(t, kernel, dilation=dilation, padding=pad).view(B, h, d, K, L)

    qf = q.permute(0, 3, 1, 2, 4).reshape(B, h, L, d)
    dots = torch.einsum("bhld,bhdkl->bhlk", qf, unfold(k)) * scale
    if table is not None:  # offset (i, j) of a centred window: key - query = (i - r, j - r)
        dots = dots + table[:, r:r + kernel, r:r + kernel].reshape(1, -1, 1, K).to(dots.dtype)
    if border == "mask":
        ones = torch.ones(1, 1, H, W, device=q.device, dtype=q.dtype)
        inside = F.unfold(ones, kernel, dilation=dilation, padding=pad).view(K, L).t() > 0
        dots = dots.masked_fill(~inside, float("-inf"))
    attn = dots.softmax(-1)
    out = torch.einsum("bhlk,bhdkl->bhld", attn, unfold(v))
    return out.reshape(B, h, H, W, d).permute(0, 2, 3, 1, 4)


def _unfold_build(case: AttnCase) -> Prepared:
    scale = _scale(case)

    def fn(q, k, v, table):
        return unfold_attention(q, k, v, table, case.kernel, case.dilation, case.border, scale)

    return Prepared(fn)


# ---------------------------------------------------------------------------------------
# The Swin way (roll, partition, SDPA with bias + shift mask, reverse, roll back)
# ---------------------------------------------------------------------------------------
def _swin_why_not(case: AttnCase) -> str | None:
    if case.height % case.window or case.width % case.window:
        return (f"Swin pads a {case.height}x{case.width} map to multiples of the window with zero features "
                "that take part in attention; the op leaves them out (different function)")
    return None


def swin_table_from_ours(table: torch.Tensor, heads: int) -> torch.Tensor:
    """The op's ``(heads|1, 2w-1, 2w-1)`` key-minus-query table as Swin's ``((2w-1)^2, heads)``
    query-minus-key table (both axes flipped)."""
    return table.flip(1, 2).reshape(table.shape[0], -1).t().expand(-1, heads)


def _swin_build(case: AttnCase) -> Prepared:
    device = torch.device(case.device)
    w, s, h = case.window, case.shift, case.heads
    B, H, W, d = case.batch, case.height, case.width, case.head_dim
    N, nWy, nWx = w * w, H // w, W // w
    index = swin_relative_index(w, device).view(-1)
    mask = swin_shift_mask(H, W, w, s, device)
    scale = _scale(case)

    def partition(t):
        if s:
            t = torch.roll(t, shifts=(-s, -s), dims=(1, 2))
        t = t.view(B, nWy, w, nWx, w, h, d).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(B * nWy * nWx, h, N, d)

    def fn(q, k, v, table):
        attn_mask = None
        if table is not None:
            attn_mask = swin_table_from_ours(table, h)[index].view(N, N, h).permute(2, 0, 1).unsqueeze(0).to(q.dtype)
        if mask is not None:
            m = mask.to(q.dtype)[:, None]  # (nW, 1, N, N)
            m = m if attn_mask is None else m + attn_mask
            attn_mask = m.unsqueeze(0).expand(B, -1, m.shape[1], -1, -1).reshape(B * nWy * nWx, m.shape[1], N, N)
        out = F.scaled_dot_product_attention(partition(q), partition(k), partition(v), attn_mask=attn_mask,
                                             scale=scale)
        out = out.view(B, nWy, nWx, h, w, w, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, h, d)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out

    return Prepared(fn)


# ---------------------------------------------------------------------------------------
# Hugging Face Swin's attention module (transformers' SwinLayer/SwinAttention code path)
# ---------------------------------------------------------------------------------------
def _hf_why_not(case: AttnCase) -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not importable (pip install transformers)"
    return _swin_why_not(case)


class _Channels(torch.nn.Module):
    """Picks q, k or v out of the concatenated ``[q | k | v]`` channels: stands in for the
    module's q/k/v projections, so the module's attention runs on the case's q, k, v."""

    def __init__(self, part: int, width: int):
        super().__init__()
        self.part, self.width = part, width

    def forward(self, x):
        return x[..., self.part * self.width:(self.part + 1) * self.width]


def _hf_build(case: AttnCase) -> Prepared:
    try:
        from transformers import SwinConfig
        from transformers.models.swin import modeling_swin as hf
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason to skip, recorded
        raise SkipImpl(f"transformers' Swin is not importable ({type(exc).__name__}: {exc})") from exc
    if not hasattr(hf, "SwinLayer") or not hasattr(hf, "window_partition"):
        raise SkipImpl("this transformers version has no SwinLayer/window_partition")
    w, s, h, d = case.window, case.shift, case.heads, case.head_dim
    B, H, W, C = case.batch, case.height, case.width, case.heads * case.head_dim
    config = SwinConfig(window_size=w, embed_dim=C, num_heads=[h], depths=[1])
    config._attn_implementation = "sdpa"
    layer = hf.SwinLayer(config, dim=C, input_resolution=(H, W), num_heads=h, shift_size=s)
    attn = layer.attention
    if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias")):
        raise SkipImpl("this transformers version's SwinAttention has another structure")
    attn.q_proj, attn.k_proj, attn.v_proj = (_Channels(i, C) for i in range(3))
    attn.o_proj = torch.nn.Identity()
    layer = layer.to(device=case.device, dtype=case.torch_dtype).eval()
    rpb = attn.relative_position_bias
    del rpb.relative_position_bias_table  # set per call from the op's table (keeps its gradient)
    zeros = torch.zeros((2 * w - 1) ** 2, h, device=case.device, dtype=case.torch_dtype)
    mask = layer.get_attn_mask(H, W, dtype=case.torch_dtype, device=torch.device(case.device))

    def fn(q, k, v, table):
        rpb.relative_position_bias_table = zeros if table is None else swin_table_from_ours(table, h)
        x = torch.cat([t.reshape(B, H, W, C) for t in (q, k, v)], dim=-1)
        windows = hf.window_partition(layer.cyclic_shift(x), w).view(-1, w * w, 3 * C)
        out = attn(windows, mask)[0]
        out = hf.window_reverse(out.view(-1, w, w, C), w, H, W)
        return layer.cyclic_shift(out, reverse=True).view(B, H, W, h, d)

    return Prepared(fn)


# ---------------------------------------------------------------------------------------
# NATTEN and timm (when importable)
# ---------------------------------------------------------------------------------------
def _natten_why_not(case: AttnCase) -> str | None:
    if importlib.util.find_spec("natten") is None:
        return "natten is not importable (pip install natten)"
    if case.border != "clamp":
        return f"NATTEN implements border='clamp' only, not {case.border!r}"
    if case.bias:
        return "current NATTEN has no relative position bias"
    return None


def _natten_build(case: AttnCase) -> Prepared:
    try:
        from natten.functional import na2d
    except Exception as exc:  # noqa: BLE001 - recorded as the reason
        raise SkipImpl(f"natten.functional.na2d is not importable ({type(exc).__name__}: {exc})") from exc

    def fn(q, k, v, table):
        return na2d(q, k, v, kernel_size=case.kernel, dilation=case.dilation)

    return Prepared(fn)


def _timm_why_not(case: AttnCase) -> str | None:
    if importlib.util.find_spec("timm") is None:
        return "timm is not importable (pip install timm)"
    return _swin_why_not(case)


def _timm_build(case: AttnCase) -> Prepared:
    try:
        from timm.models.swin_transformer import WindowAttention
    except Exception as exc:  # noqa: BLE001 - recorded as the reason
        raise SkipImpl(f"timm's WindowAttention is not importable ({type(exc).__name__}: {exc})") from exc
    w, s, h, d = case.window, case.shift, case.heads, case.head_dim
    B, H, W, C = case.batch, case.height, case.width, case.heads * case.head_dim
    module = WindowAttention(C, num_heads=h, window_size=w)
    if not hasattr(module, "relative_position_bias_table") or not hasattr(module, "qkv"):
        raise SkipImpl("this timm version's WindowAttention has another structure")
    module.qkv = torch.nn.Identity()  # fed [q | k | v] channels, the layout its qkv Linear produces
    module.proj = torch.nn.Identity()
    module = module.to(device=case.device, dtype=case.torch_dtype).eval()
    del module.relative_position_bias_table
    zeros = torch.zeros((2 * w - 1) ** 2, h, device=case.device, dtype=case.torch_dtype)
    mask = swin_shift_mask(H, W, w, s, torch.device(case.device))
    mask = None if mask is None else mask.to(case.torch_dtype)
    nWy, nWx, N = H // w, W // w, w * w

    def fn(q, k, v, table):
        module.relative_position_bias_table = zeros if table is None else swin_table_from_ours(table, h)
        x = torch.cat([t.reshape(B, H, W, C) for t in (q, k, v)], dim=-1)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = x.view(B, nWy, w, nWx, w, 3 * C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, 3 * C)
        out = module(x, mask=mask)
        out = out.view(B, nWy, nWx, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out.view(B, H, W, h, d)

    return Prepared(fn)


def _register_peers() -> None:
    register_impl(Impl("flex-compiled", ("neighborhood", "window"),
                       build=functools.partial(_flex_build, compiled=True),
                       why_not=functools.partial(_flex_why_not, compiled=True),
                       description="torch.compile(flex_attention) with the op's block mask (and bias as score_mod)"))
    register_impl(Impl("flex-eager", ("neighborhood", "window"),
                       build=functools.partial(_flex_build, compiled=False),
                       why_not=functools.partial(_flex_why_not, compiled=False),
                       description="flex_attention without torch.compile (materialises the scores)"))
    register_impl(Impl("sdpa-dense", ("neighborhood", "window"), build=_sdpa_build, why_not=_sdpa_why_not,
                       description="F.scaled_dot_product_attention with a dense N x N boolean (or bias) mask"))
    register_impl(Impl("unfold", ("neighborhood",), build=_unfold_build, why_not=_unfold_why_not,
                       description="the paper's ConvAttention2d form: F.unfold of k and v, einsum, softmax"))
    register_impl(Impl("natten", ("neighborhood",), build=_natten_build, why_not=_natten_why_not,
                       description="natten.functional.na2d"))
    register_impl(Impl("swin", ("window",), build=_swin_build, why_not=_swin_why_not,
                       description="the Swin way: roll, window partition, SDPA with bias + shift mask, reverse"))
    register_impl(Impl("hf-swin", ("window",), build=_hf_build, why_not=_hf_why_not,
                       description="transformers' SwinAttention (sdpa) on the rolled, partitioned map"))
    register_impl(Impl("timm-swin", ("window",), build=_timm_build, why_not=_timm_why_not,
                       description="timm's swin_transformer.WindowAttention"))


_register_alterops_backends()
_register_peers()
