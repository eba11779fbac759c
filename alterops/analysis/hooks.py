"""Capture block outputs of any model and accumulate the paper's statistics over a data loader.

``FeatureRecorder(model, blocks=None)`` registers forward hooks on the model's blocks. Every
block output that is a feature map is turned into ``(B, C, H, W)``:

* ``(B, C, H, W)`` tensors are used as they are;
* ViT token maps ``(B, N, C)`` lose a CLS token (``cls_token=True``; ``"auto"``: when ``N`` is
  not a square and ``N - 1`` is) and are reshaped to ``√N × √N``;
* tuples / lists / model-output objects contribute their first tensor; anything else (logits,
  token counts that are not squares) is skipped.

Memory stays bounded: the recorder keeps running sums, per block, of ``planes x Δ log
amplitude`` (the plane-weighted per-frequency mean log amplitude minus its DC value) and of
``planes x mean variance``, never the maps. The maps of one forward pass are reduced together
after the pass (``alterops.feature_statistics``: one fused call per op for all blocks).

``results()`` gives an :class:`AnalysisResult`: per block the Δ curve (square maps: the paper's
diagonal Δ; non-square maps: ``radial_log_amplitude``), the high-frequency Δ (last entry) and
the variance, against normalised depth ``i / (n_blocks - 1)``; MSA and downsampling blocks
are recorded for shading (named by the user, or detected: a block whose class or a submodule's
class name says attention/MSA; a block whose map is smaller than the previous block's).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .. import statistics as _stats

__all__ = ["AnalysisResult", "FeatureRecorder", "analyze", "default_blocks", "to_feature_map"]

_ATTENTION_NAME = re.compile(r"(attention|attn|msa)", re.IGNORECASE)


# ---------------------------------------------------------------------------------------
# Converting block outputs to feature maps
# ---------------------------------------------------------------------------------------
def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            t = _first_tensor(item)
            if t is not None:
                return t
        return None
    for attr in ("last_hidden_state", "hidden_states"):  # Hugging Face model outputs
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        for item in output.values():
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _is_square(n: int) -> bool:
    r = math.isqrt(n) if n >= 0 else -1
    return r >= 1 and r * r == n


def to_feature_map(output, cls_token: bool | str = "auto") -> torch.Tensor | None:
    """A block output as a ``(B, C, H, W)`` map, or ``None`` when it is not a feature map.

    ``cls_token``: ``True`` drops the first token of a ``(B, N, C)`` token map, ``False``
    keeps all tokens, ``"auto"`` drops it when ``N`` is not a perfect square but ``N - 1`` is.
    """
    t = _first_tensor(output)
    if t is None or not t.dtype.is_floating_point:
        return None
    if t.dim() == 4:
        return t
    if t.dim() != 3:
        return None
    B, N, C = t.shape
    if cls_token is True or (cls_token == "auto" and not _is_square(N) and _is_square(N - 1)):
        t = t[:, 1:]
        N -= 1
    if not _is_square(N):
        return None
    side = math.isqrt(N)
    return t.reshape(B, side, side, C).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------
# Which modules are "blocks"
# ---------------------------------------------------------------------------------------
_CONTAINERS = (nn.Sequential, nn.ModuleList)


def _holds_composite_container(module: nn.Module) -> bool:
    """True when the module holds a Sequential/ModuleList of >= 2 modules that have children."""
    for child in module.modules():
        if child is module or not isinstance(child, _CONTAINERS):
            continue
        items = list(child.children())
        if len(items) >= 2 and sum(1 for m in items if len(list(m.children())) > 0) >= 2:
            return True
    return False


def default_blocks(model: nn.Module) -> list[str]:
    """Names of the modules treated as blocks when none are given.

    Walks the children in order: the items of ``nn.Sequential`` / ``nn.ModuleList``
    containers are expanded recursively; a module that holds such a container of composite
    modules (a Hugging Face encoder, a stage wrapper) is looked into; every other module is a
    block. For a ResNet-style model this gives the stem and every residual block (the
    paper's decomposition); for a plain ``nn.Sequential`` every layer.
    """
    names: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, _CONTAINERS):
                visit(full, child)
            elif _holds_composite_container(child):
                visit(full, child)
            else:
                names.append(full)

    visit("", model)
    if not names and len(list(model.children())) == 0:
        names.append("")
    return names


def _resolve_blocks(model: nn.Module, blocks) -> list[str]:
    modules = dict(model.named_modules())
    if blocks is None:
        return default_blocks(model)
    if callable(blocks) and not isinstance(blocks, (list, tuple)):
        return [n for n, m in model.named_modules() if n and blocks(n, m)]
    if isinstance(blocks, str):
        pattern = re.compile(blocks)
        return [n for n in modules if n and pattern.fullmatch(n)]
    names = list(blocks)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"blocks {missing} are not modules of the model (see model.named_modules())")
    return names


def _select_indices(spec, names: Sequence[str]) -> list[int] | None:
    """User selection of blocks for shading: indices, names, or a regex over names."""
    if spec is None:
        return None
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return [i for i, n in enumerate(names) if pattern.search(n)]
    out = []
    for item in spec:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(item if item >= 0 else len(names) + item)
        elif isinstance(item, str):
            if item not in names:
                raise ValueError(f"{item!r} is not a recorded block (blocks: {list(names)})")
            out.append(names.index(item))
        else:
            raise TypeError(f"block selections are ints or names, got {item!r}")
    return sorted(set(out))


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------
@dataclass
class AnalysisResult:
    """Per-block statistics in block order (only blocks that produced feature maps)."""

    names: list
    depth: list  # normalised depth i / (n - 1)
    delta: list  # Δ log amplitude curves (float64 CPU tensors); kind says diagonal or radial
    kind: list
    variance: list  # mean unbiased spatial variance
    shapes: list  # (C, H, W) of the last map seen
    planes: list  # planes accumulated (images x channels)
    msa: list = field(default_factory=list)  # indices of MSA blocks (shaded grey)
    downsample: list = field(default_factory=list)  # indices of downsampling blocks (shaded blue)

    @property
    def high_frequency(self) -> list:
        """Δ log amplitude at the highest frequency (last entry of each curve), as in Fig. 8."""
        return [float(d[-1]) if len(d) else float("nan") for d in self.delta]

    def frequencies(self, i: int) -> torch.Tensor:
        """The x-axis of curve ``i`` in units of π, as the paper plots it: linspace(0, 1, len)."""
        return torch.linspace(0.0, 1.0, len(self.delta[i]), dtype=torch.float64)

    def to_dict(self) -> dict:
        return {
            "blocks": [
                {"index": i, "name": n, "depth": d, "shape": list(s), "planes": p, "kind": k,
                 "frequency_pi": self.frequencies(i).tolist(), "delta_log_amplitude": c.tolist(),
                 "high_frequency_delta": hf, "variance": v, "msa": i in self.msa,
                 "downsample": i in self.downsample}
                for i, (n, d, s, p, k, c, hf, v) in enumerate(zip(
                    self.names, self.depth, self.shapes, self.planes, self.kind, self.delta,
                    self.high_frequency, self.variance))
            ],
            "msa": list(self.msa),
            "downsample": list(self.downsample),
        }


# ---------------------------------------------------------------------------------------
# The recorder
# ---------------------------------------------------------------------------------------
class _BlockStats:
    __slots__ = ("planes", "delta_sum", "var_sum", "kind", "shape")

    def __init__(self):
        self.planes = 0
        self.delta_sum = None
        self.var_sum = 0.0
        self.kind = None
        self.shape = None


class FeatureRecorder:
    """Forward hooks that accumulate Δ log amplitude and variance per block.

    Args:
        model: any ``nn.Module``.
        blocks: module names (list), a regex over names, a predicate ``(name, module) -> bool``,
            or ``None`` for :func:`default_blocks`.
        cls_token: see :func:`to_feature_map`.
        eps: the ``eps`` of the log amplitude (1e-6 as in the paper).
        msa_blocks, downsample_blocks: indices / names / regex of recorded blocks to shade;
            ``None`` detects them (see the module docstring); ``()`` shades none.
        backend: passed to the statistics ops.

    Use as a context manager (hooks removed on exit) or call :meth:`close`. ``update`` is
    called automatically after each forward of ``model``.
    """

    def __init__(self, model: nn.Module, blocks=None, *, cls_token: bool | str = "auto", eps: float = 1e-6,
                 msa_blocks=None, downsample_blocks=None, backend: str | None = None):
        if cls_token not in (True, False, "auto"):
            raise ValueError(f"cls_token must be True, False or 'auto', got {cls_token!r}")
        self.model = model
        self.block_names = _resolve_blocks(model, blocks)
        if not self.block_names:
            raise ValueError("no blocks to record: pass blocks=[module names]")
        self.cls_token = cls_token
        self.eps = float(eps)
        self.backend = backend
        self._msa_spec = msa_blocks
        self._down_spec = downsample_blocks
        self._stats = [_BlockStats() for _ in self.block_names]
        self._pending: list[tuple[int, torch.Tensor]] = []
        modules = dict(model.named_modules())
        self._handles = []
        for i, name in enumerate(self.block_names):
            self._handles.append(modules[name].register_forward_hook(self._make_hook(i)))
        self._handles.append(model.register_forward_hook(lambda m, a, o: self.update()))
        self._attention_like = [self._looks_like_attention(modules[n]) for n in self.block_names]

    @staticmethod
    def _looks_like_attention(module: nn.Module) -> bool:
        return any(_ATTENTION_NAME.search(type(m).__name__) for m in module.modules())

    def _make_hook(self, index: int) -> Callable:
        def hook(module, args, output):
            fmap = to_feature_map(output, self.cls_token)
            if fmap is not None and fmap.shape[2] * fmap.shape[3] >= 2:
                self._pending.append((index, fmap.detach()))

        return hook

    # -- accumulation ---------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """Reduce the maps captured since the last call into the running sums."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        square = [(i, m) for i, m in pending if m.shape[2] == m.shape[3]]
        other = [(i, m) for i, m in pending if m.shape[2] != m.shape[3]]
        for group, stats, kind in ((square, ("delta_log_amplitude", "feature_variance"), "diagonal"),
                                   (other, ("radial_log_amplitude", "feature_variance"), "radial")):
            if not group:
                continue
            maps = [m for _, m in group]
            results = _stats.feature_statistics(maps, stats=stats, eps=self.eps, backend=self.backend)
            curve_key = stats[0]
            for (i, m), res in zip(group, results):
                planes = m.shape[0] * m.shape[1]
                if planes == 0:
                    continue
                s = self._stats[i]
                curve = res[curve_key].detach().double().cpu() * planes
                if s.delta_sum is None or s.kind != kind or s.delta_sum.shape != curve.shape:
                    s.delta_sum, s.var_sum, s.planes = curve, 0.0, 0  # first map (or a new size)
                else:
                    s.delta_sum += curve
                s.var_sum += float(res["feature_variance"]) * planes
                s.planes += planes
                s.kind = kind
                s.shape = tuple(m.shape[1:])

    def reset(self) -> None:
        self._pending = []
        self._stats = [_BlockStats() for _ in self.block_names]

    def results(self) -> AnalysisResult:
        self.update()
        kept = [i for i, s in enumerate(self._stats) if s.planes > 0]
        n = len(kept)
        names = [self.block_names[i] for i in kept]
        res = AnalysisResult(
            names=names,
            depth=[k / (n - 1) if n > 1 else 0.0 for k in range(n)],
            delta=[self._stats[i].delta_sum / self._stats[i].planes for i in kept],
            kind=[self._stats[i].kind for i in kept],
            variance=[self._stats[i].var_sum / self._stats[i].planes for i in kept],
            shapes=[self._stats[i].shape for i in kept],
            planes=[self._stats[i].planes for i in kept],
        )
        msa = _select_indices(self._msa_spec, names)
        if msa is None:
            msa = [k for k, i in enumerate(kept) if self._attention_like[i]]
            if len(msa) == n:  # every block holds attention (a ViT's whole blocks): nothing to contrast
                msa = []
        down = _select_indices(self._down_spec, names)
        if down is None:
            down = [k for k in range(1, n) if res.shapes[k][1] * res.shapes[k][2]
                    < res.shapes[k - 1][1] * res.shapes[k - 1][2]]
        res.msa, res.downsample = msa, down
        return res

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FeatureRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batch_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("pixel_values", "images", "image", "input", "x"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError("a batch must be a tensor, a (inputs, ...) tuple/list, or a dict with 'pixel_values'/'images'")


@torch.no_grad()
def analyze(model: nn.Module, loader: Iterable, blocks=None, *, cls_token: bool | str = "auto", eps: float = 1e-6,
            msa_blocks=None, downsample_blocks=None, device=None, max_batches: int | None = None,
            backend: str | None = None, progress: bool = False) -> AnalysisResult:
    """Run ``model`` (in eval mode) over ``loader`` and return the per-block statistics.

    ``loader`` yields tensors, ``(inputs, labels)`` pairs or dicts with ``pixel_values``.
    Inputs are moved to ``device`` (default: the device of the model's first parameter).
    The model's training flag is restored afterwards.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        total = max_batches if max_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
        iterator = tqdm(loader, total=total, desc="analyze", unit="batch")
    try:
        with FeatureRecorder(model, blocks, cls_token=cls_token, eps=eps, msa_blocks=msa_blocks,
                             downsample_blocks=downsample_blocks, backend=backend) as rec:
            for b, batch in enumerate(iterator):
                if max_batches is not None and b >= max_batches:
                    break
                model(_batch_input(batch).to(device))
                rec.update()
            return rec.results()
    finally:
        model.train(was_training)
