"""Pre-activation ResNet-50: the conv-only baseline of AlterNet, and the blocks both models share.

The layout and parameter names follow the papers' code (``models/preresnet_dnn_block.py``,
``models/alternet.py: StemB``, ``models/classifier_block.py: BNGAPBlock``), so their state dicts line
up: ``layer0.layer0.0`` (stem conv), ``layer{1..4}.{i}.{shortcut,bn1,conv1,...}``,
``classifier.0.{bn,dense}``.

Stem (pre-activation, no BN/ReLU): CIFAR 3×3/1 conv; ImageNet 7×7/2 conv + 3×3/2 max-pool.
Bottleneck (expansion 4): BN → ReLU → [1×1 conv shortcut with the stage stride, taken from the
activated input, when the shape changes; else identity on the raw input] → 1×1 → BN → ReLU →
3×3 (stride) → BN → ReLU → 1×1 → stochastic depth → + skip. Classifier: BN → ReLU → global
average pool → Linear. All convs are bias-free.

Spatial smoothing (``smoothing=True``): a ``TanhBlur2d`` (τ = 10, the paper's ``TanhBlurBlock``
with its default ``AvgPool2d(2, 1, 1)`` blur) after stages 1–3, i.e. before each subsampling and
not before the BN-GAP classifier — the placement of the blur paper's PreResNet (``num_sblocks =
[1, 1, 1, 0]``). Each blur grows the map by one pixel (CIFAR: 32 → 33 → 17 → 18 → 9 → 10 → 5).
"""
from __future__ import annotations

from torch import nn

from ..nn import DropPath, TanhBlur2d

__all__ = ["PreResNet", "Bottleneck", "Stem", "BNGAPBlock", "preresnet50"]


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class Stem(nn.Module):
    """Pre-activation stem (the paper's ``StemB``): a conv, plus max-pool for ImageNet."""

    def __init__(self, dim_in: int, dim_out: int, pool: bool) -> None:
        super().__init__()
        if pool:
            self.layer0 = nn.Sequential(
                nn.Conv2d(dim_in, dim_out, 7, stride=2, padding=3, bias=False),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        else:
            self.layer0 = nn.Sequential(conv3x3(dim_in, dim_out))

    def forward(self, x):
        return self.layer0(x)


class Bottleneck(nn.Module):
    """Pre-activation bottleneck (expansion 4); ``channels`` is the bottleneck width."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, sd: float = 0.0) -> None:
        super().__init__()
        out = channels * self.expansion
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out:
            self.shortcut.append(conv1x1(in_channels, out, stride))
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv1x1(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu3 = nn.ReLU()
        self.conv3 = conv1x1(channels, out)
        self.sd = DropPath(sd) if sd > 0.0 else nn.Identity()

    def forward(self, x):
        if len(self.shortcut) > 0:
            x = self.relu1(self.bn1(x))
            skip = self.shortcut(x)
        else:
            skip = x
            x = self.relu1(self.bn1(x))
        x = self.conv1(x)
        x = self.conv2(self.relu2(self.bn2(x)))
        x = self.conv3(self.relu3(self.bn3(x)))
        return self.sd(x) + skip


class BNGAPBlock(nn.Module):
    """Classifier: BN → ReLU → global average pool → Linear."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_features)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.dense = nn.Linear(in_features, num_classes)

    def forward(self, x):
        x = self.gap(self.relu(self.bn(x)))
        return self.dense(x.flatten(1))


def stage_rates(num_blocks, sd: float) -> list[list[float]]:
    """Stochastic-depth rate per block: ``sd·j/(Σ blocks − 1)``, j the global block index."""
    total = sum(num_blocks)
    rates, j = [], 0
    for n in num_blocks:
        rates.append([sd * (j + i) / max(total - 1, 1) for i in range(n)])
        j += n
    return rates


def smoothing_layer(enabled: bool, backend) -> nn.Sequential:
    return nn.Sequential(TanhBlur2d(10.0, backend=backend)) if enabled else nn.Sequential()


def check_variant(variant: str) -> bool:
    if variant not in ("cifar", "imagenet"):
        raise ValueError(f"variant must be 'cifar' or 'imagenet', got {variant!r}")
    return variant == "imagenet"


class StagedBackbone(nn.Module):
    """Stem (``layer0``), four stages (``layer1..4``), optional smoothing after stages 1–3
    (the blur paper's PreResNet placement) and the BN-ReLU-GAP-FC classifier. Subclasses build
    the stages; the attribute names follow the paper's code so state dicts line up."""

    def _set_stages(self, stages, channels: int, num_classes: int, smoothing: bool, backend) -> None:
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.smooth1 = smoothing_layer(smoothing, backend)
        self.smooth2 = smoothing_layer(smoothing, backend)
        self.smooth3 = smoothing_layer(smoothing, backend)
        self.classifier = nn.Sequential(BNGAPBlock(channels, num_classes))

    def forward(self, x):
        x = self.layer0(x)
        x = self.smooth1(self.layer1(x))
        x = self.smooth2(self.layer2(x))
        x = self.smooth3(self.layer3(x))
        x = self.layer4(x)
        return self.classifier(x)


class PreResNet(StagedBackbone):
    """Pre-activation ResNet with bottlenecks; see the module docstring for the layout."""

    def __init__(self, num_blocks=(3, 4, 6, 3), *, num_classes: int = 1000, pool_stem: bool = True,
                 drop_path: float = 0.0, smoothing: bool = False, backend: str | None = None) -> None:
        super().__init__()
        sds = stage_rates(num_blocks, drop_path)
        self.layer0 = Stem(3, 64, pool=pool_stem)
        channels, stages = 64, []
        for i, width in enumerate((64, 128, 256, 512)):
            blocks = []
            for j in range(num_blocks[i]):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(channels, width, stride, sds[i][j]))
                channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self._set_stages(stages, channels, num_classes, smoothing, backend)


def preresnet50(num_classes: int = 1000, variant: str = "imagenet", *, smoothing: bool = False,
                drop_path: float = 0.0, backend: str | None = None) -> PreResNet:
    """Pre-activation ResNet-50 (blocks 3, 4, 6, 3): 23.70 M parameters for CIFAR-100, 25.55 M for ImageNet.

    ``variant="cifar"``: 3×3 stem without pooling; ``"imagenet"``: 7×7/2 stem + max-pool.
    ``smoothing=True`` adds ``TanhBlur2d`` after stages 1–3 (blur paper's PreResNet placement);
    ``backend`` is passed to those blurs.
    """
    pool = check_variant(variant)
    return PreResNet((3, 4, 6, 3), num_classes=num_classes, pool_stem=pool, drop_path=drop_path,
                     smoothing=smoothing, backend=backend)
