"""The frequency-based noise robustness test (Fig. 2b of "How Do Vision Transformers Work?").

For every noise frequency ``f``, band-limited random sign noise
(:func:`alterops.frequency_noise`: ``±eps`` signs, Fourier amplitude kept only where
``f - width <= max(|ωy|, |ωx|) < f + width``, phase kept, real part) is added to every input
image, and the accuracy drop against the clean accuracy is reported. The paper's script was
never released; this follows ``ops/adversarial.py`` (``Random`` + ``FreqAttack``) and the
author's pseudo-code in issue #44.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from ..statistics import frequency_noise

__all__ = ["frequency_noise_sweep", "DEFAULT_FREQUENCIES"]

# 0.1π … 0.9π, as the paper's x-axis.
DEFAULT_FREQUENCIES = tuple(round(0.1 * i, 1) for i in range(1, 10))


def _split(batch):
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = batch.get("pixel_values", batch.get("images"))
        y = batch.get("labels", batch.get("label"))
        if x is not None and y is not None:
            return x, y
    raise TypeError("the loader must yield (images, labels) pairs or dicts with pixel_values/images and labels")


def _logits(output):
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in the model output of type {type(output).__name__}")


@torch.no_grad()
def frequency_noise_sweep(model: nn.Module, loader: Iterable, frequencies: Sequence[float] = DEFAULT_FREQUENCIES,
                          width: float = 0.05, eps: float = 0.7, *, device=None, max_batches: int | None = None,
                          seed: int = 0, progress: bool = False) -> dict:
    """Accuracy drop per noise frequency.

    Args:
        model: a classifier; its output (or ``.logits``) is ``(B, classes)``.
        loader: yields ``(images, labels)``; images are in the model's input space (normalised),
            where the noise is added, as in the paper's code.
        frequencies: centres of the bands in units of π (0.1 … 0.9 by default).
        width: half-width of each band in units of π (default 0.05: bands of 0.1π, touching,
            not overlapping). The paper's ``FreqAttack`` default is ``s = 0.2`` rad (≈ 0.064π).
        eps: amplitude of the sign noise before band-pass filtering (issue #44: 0.7).
        seed: seeds the noise (one generator, fixed draw order: reproducible).
    Returns:
        ``{"frequencies_pi", "clean_accuracy", "accuracy", "delta_accuracy", "images"}``,
        accuracies in percent; ``delta_accuracy[i] = accuracy[i] - clean_accuracy``.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    freqs = [float(f) for f in frequencies]
    clean, correct, seen = 0, [0] * len(freqs), 0
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="noise sweep", unit="batch")
    try:
        for b, batch in enumerate(iterator):
            if max_batches is not None and b >= max_batches:
                break
            x, y = _split(batch)
            x, y = x.to(device), y.to(device)
            clean += int((_logits(model(x)).argmax(-1) == y).sum())
            for i, f in enumerate(freqs):
                noise = frequency_noise(tuple(x.shape), f * math.pi, width * math.pi, eps, generator=generator,
                                        dtype=x.dtype, device=device)
                correct[i] += int((_logits(model(x + noise)).argmax(-1) == y).sum())
            seen += int(y.shape[0])
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("the loader yielded no images")
    clean_acc = 100.0 * clean / seen
    acc = [100.0 * c / seen for c in correct]
    return {"frequencies_pi": freqs, "clean_accuracy": clean_acc, "accuracy": acc,
            "delta_accuracy": [a - clean_acc for a in acc], "images": seen}


def plot_noise_sweep(result: dict, path=None, *, ax=None, label: str | None = None):
    """Δ accuracy vs noise frequency (Fig. 2b style)."""
    from .plots import _figure, _finish

    fig, ax = _figure(ax)
    ax.plot(result["frequencies_pi"], result["delta_accuracy"], marker="o", ms=3, label=label)
    ax.set_xlabel("Noise frequency (×π)")
    ax.set_ylabel("Δ Accuracy (%)")
    if label:
        ax.legend(frameon=False)
    return _finish(fig, path)
