"""Inputs for the analysis: models by import path or built-in name, images from a folder, or
random tensors."""
from __future__ import annotations

import importlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BUILTIN_MODELS", "load_model", "image_files", "image_batches", "random_batches", "NORMALIZATION"]

BUILTIN_MODELS = ("alternet50", "preresnet50")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "none": None,
}


def load_model(spec: str, **kwargs) -> nn.Module:
    """A model from ``"package.module:factory"`` (called with ``kwargs``; an ``nn.Module``
    attribute is used as it is) or a built-in name (``alternet50``, ``preresnet50`` from
    ``alterops.models``)."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from exc
        target = module
        for part in attr.split("."):
            if not hasattr(target, part):
                raise ValueError(f"{module_name!r} has no attribute {attr!r} (model {spec!r})")
            target = getattr(target, part)
        model = target if isinstance(target, nn.Module) else target(**kwargs)
    elif spec in BUILTIN_MODELS:
        try:
            models = importlib.import_module("alterops.models")
            factory = getattr(models, spec)
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"the built-in model {spec!r} needs alterops.models.{spec}, which is not available here ({exc})"
            ) from exc
        model = factory(**kwargs)
    else:
        raise ValueError(f"model must be 'package.module:factory' or one of {BUILTIN_MODELS}, got {spec!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist")
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    return sorted(files)


def read_image(path: str) -> torch.Tensor:
    """``(3, H, W)`` float32 in [0, 1] (Pillow when installed, else matplotlib's reader)."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            import numpy as np

            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except ImportError:
        import matplotlib.image as mpimg
        import numpy as np

        array = np.asarray(mpimg.imread(path), dtype=np.float32)
        if array.max() > 1.0:
            array = array / 255.0
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        array = array[..., :3]
    t = torch.from_numpy(array.copy())
    if t.dim() == 2:
        t = t[..., None].expand(-1, -1, 3)
    return t.permute(2, 0, 1).contiguous()


def _normalize(batch: torch.Tensor, normalize: str) -> torch.Tensor:
    stats = NORMALIZATION[normalize]
    if stats is None:
        return batch
    mean = torch.tensor(stats[0]).view(1, 3, 1, 1)
    std = torch.tensor(stats[1]).view(1, 3, 1, 1)
    return (batch - mean) / std


def image_batches(folder: str, size: int, batch_size: int, *, normalize: str = "imagenet",
                  limit: int | None = None) -> list[torch.Tensor]:
    """Images of ``folder`` resized to ``size x size`` (bilinear, antialiased), normalised, in batches."""
    if normalize not in NORMALIZATION:
        raise ValueError(f"normalize must be one of {tuple(NORMALIZATION)}, got {normalize!r}")
    files = image_files(folder)[:limit]
    batches = []
    for start in range(0, len(files), batch_size):
        imgs = [F.interpolate(read_image(p)[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)[0] for p in files[start:start + batch_size]]
        batches.append(_normalize(torch.stack(imgs), normalize))
    return batches


def random_batches(count: int, size: int, batch_size: int, *, channels: int = 3, seed: int = 0) -> Iterator[torch.Tensor]:
    """``count`` standard-normal images of ``channels x size x size`` in batches (seeded)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        yield torch.randn(n, channels, size, size, generator=g)
