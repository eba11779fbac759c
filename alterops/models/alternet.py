"""AlterNet (Alter-ResNet-50) of "How Do Vision Transformers Work?" (Park & Kim, ICLR 2022).

Layout (the paper's ``models/alternet.py``, CIFAR-100 configuration as drawn in the paper):

- stem: pre-activation (``StemB``): CIFAR 3×3/1 conv, ImageNet 7×7/2 conv + 3×3/2 max-pool;
- four stages of widths 64, 128, 256, 512 (outputs ×4); stage ``i`` has ``num_blocks[i]`` blocks of
  which ``num_msa[i]`` are MSA blocks, laid out as ``[Conv] × (n − 2·m)`` then ``[Conv, MSA] × m``;
  only the first block of stages 2–4 has stride 2 (always a conv block);
- conv block: pre-activation bottleneck (:class:`alterops.models.preresnet.Bottleneck`);
- MSA block (the paper's ``AttentionBlockB``): BN → GELU → 1×1 conv (C → C/4, no bias) → BN →
  window MSA (``C/4 → C``: heads 3/6/12/24 per stage, dim_head 64, one relative-position table
  shared by the heads, 1×1 output projection with bias back to C) → stochastic depth → + identity
  skip; no feed-forward layer;
- classifier: BN → ReLU → global average pool → Linear;
- stochastic depth rate ``drop_path · j / (Σ blocks − 1)`` for global block index ``j``.

Variants: ``"cifar"`` — blocks (3, 4, 6, 4), MSA (0, 1, 1, 2), window 4 (33.01 M parameters with
100 classes); ``"imagenet"`` — blocks (3, 4, 6, 4), MSA (0, 1, 3, 2), window 7 (35.92 M with 1000).

``attention="neighborhood"`` replaces each window MSA by a :class:`alterops.nn.NeighborhoodMSA2d`
with the same projections and a shared bias table: kernel 3 for CIFAR (maps 16/8/4; the paper's
ConvViT ablation found 3×3–5×5 best, and 5×5 would not fit the 4×4 map of stage 4 under the
clamped border) and kernel 7 for ImageNet (the window size: 49 keys per query, like the window
variant), NATTEN's ``"clamp"`` border so every query sees a full k×k neighbourhood. Both are
overridable with ``kernel_size=``.

``smoothing=True`` adds a ``TanhBlur2d`` after stages 1–3 (the blur paper's PreResNet placement,
``[1, 1, 1, 0]``: AlterNet is a pre-activation net with a BN-GAP classifier). The blur grows each
map by one pixel, so later maps are not multiples of the window (CIFAR: 17, 9, 5); the fused
window op handles that (absent tokens), where the paper's ``LocalAttention`` would fail.

Parameter names follow the paper's code (``layer0.layer0.0``, ``layer{i}.{j}.norm1/conv/norm2/attn``,
``classifier.0.bn/dense``); the attention's parameters are ``attn.to_qkv``, ``attn.to_out``,
``attn.rel_pos_bias`` (``WindowMSA2d`` also loads the paper's ``attn.attn.to_q`` layout).
"""
from __future__ import annotations

from torch import nn

from ..nn import DropPath, NeighborhoodMSA2d, WindowMSA2d
from .preresnet import Bottleneck, StagedBackbone, Stem, check_variant, stage_rates

__all__ = ["AlterNet", "MSABlock", "alternet50"]


class MSABlock(nn.Module):
    """The paper's ``AttentionBlockB`` (pre-activation MSA block, no FFN, identity skip)."""

    expansion = 4

    def __init__(self, dim_in: int, channels: int, *, heads: int, dim_head: int = 64, sd: float = 0.0,
                 attention: str = "window", window_size: int = 7, kernel_size: int = 7,
                 backend: str | None = None) -> None:
        super().__init__()
        dim_out = channels * self.expansion
        if dim_in != dim_out:
            raise ValueError(f"an MSA block keeps the width: dim_in={dim_in} != 4*channels={dim_out}")
        width = dim_in // self.expansion
        self.shortcut = nn.Sequential()
        self.norm1 = nn.BatchNorm2d(dim_in)
        self.relu = nn.GELU()
        self.conv = nn.Conv2d(dim_in, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        if attention == "window":
            self.attn = WindowMSA2d(width, dim_out, heads=heads, dim_head=dim_head, window_size=window_size,
                                    backend=backend)
        elif attention == "neighborhood":
            self.attn = NeighborhoodMSA2d(width, dim_out, heads=heads, dim_head=dim_head,
                                          kernel_size=kernel_size, border="clamp", backend=backend)
        else:
            raise ValueError(f"attention must be 'window' or 'neighborhood', got {attention!r}")
        self.sd = DropPath(sd) if sd > 0.0 else nn.Identity()

    def forward(self, x):
        skip = x
        x = self.relu(self.norm1(x))
        x = self.norm2(self.conv(x))
        x = self.attn(x)
        return self.sd(x) + skip


class AlterNet(StagedBackbone):
    """Alternating pre-activation ResNet / MSA network; see the module docstring.

    The defaults are the CIFAR Alter-ResNet-50; ``widths`` (bottleneck widths per stage, outputs ×4)
    and the per-stage tuples allow smaller nets of the same design (e.g. for tests).
    """

    def __init__(self, num_blocks=(3, 4, 6, 4), num_msa=(0, 1, 1, 2), heads=(3, 6, 12, 24), *,
                 num_classes: int = 100, pool_stem: bool = False, window_size: int = 4,
                 attention: str = "window", kernel_size: int = 3, dim_head: int = 64,
                 drop_path: float = 0.0, smoothing: bool = False, widths=(64, 128, 256, 512),
                 backend: str | None = None) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(num_msa) != 4 or len(heads) != 4 or len(widths) != 4:
            raise ValueError("num_blocks, num_msa, heads and widths need one entry per stage (4)")
        for n, m in zip(num_blocks, num_msa):
            if n < 2 * m or (m > 0 and n - 2 * m < 0):
                raise ValueError(f"a stage of {n} blocks cannot hold {m} [conv, MSA] pairs")
        sds = stage_rates(num_blocks, drop_path)
        self.layer0 = Stem(3, widths[0], pool=pool_stem)
        channels, stages = widths[0], []
        for i, width in enumerate(widths):
            kinds = ["conv"] * (num_blocks[i] - 2 * num_msa[i]) + ["conv", "msa"] * num_msa[i]
            blocks = []
            for j, kind in enumerate(kinds):
                if kind == "conv":
                    stride = 2 if (i > 0 and j == 0) else 1
                    blocks.append(Bottleneck(channels, width, stride, sds[i][j]))
                else:
                    blocks.append(MSABlock(channels, width, heads=heads[i], dim_head=dim_head, sd=sds[i][j],
                                           attention=attention, window_size=window_size,
                                           kernel_size=kernel_size, backend=backend))
                channels = width * 4
            stages.append(nn.Sequential(*blocks))
        self._set_stages(stages, channels, num_classes, smoothing, backend)


def alternet50(num_classes: int = 100, variant: str = "cifar", *, attention: str = "window",
               smoothing: bool = False, drop_path: float = 0.1, kernel_size: int | None = None,
               backend: str | None = None) -> AlterNet:
    """Alter-ResNet-50 as in the paper (see the module docstring for the exact layout).

    Args:
        num_classes: classifier outputs (CIFAR-100: 100, ImageNet: 1000).
        variant: ``"cifar"`` (3×3 stem, MSA (0, 1, 1, 2), window 4) or ``"imagenet"`` (7×7/2 stem +
            max-pool, MSA (0, 1, 3, 2), window 7).
        attention: ``"window"`` (the paper's) or ``"neighborhood"`` (k×k MSA; kernel 3 for CIFAR,
            7 for ImageNet unless ``kernel_size`` is given).
        smoothing: add ``TanhBlur2d`` after stages 1–3.
        drop_path: the stochastic-depth rate of the last block (0.1 in the paper's recipes).
        backend: passed to every attention and blur op.
    """
    imagenet = check_variant(variant)
    if kernel_size is None:
        kernel_size = 7 if imagenet else 3
    return AlterNet(
        (3, 4, 6, 4), (0, 1, 3, 2) if imagenet else (0, 1, 1, 2), (3, 6, 12, 24),
        num_classes=num_classes, pool_stem=imagenet, window_size=7 if imagenet else 4,
        attention=attention, kernel_size=kernel_size, drop_path=drop_path, smoothing=smoothing,
        backend=backend,
    )
