"""Figures in the style of the paper (matplotlib, Agg canvas: no display needed).

* :func:`plot_fourier` — Δ log amplitude vs frequency (0 … 1.0π), one line per block coloured
  by normalised depth (Fig. 2a; the paper leaves out the last latent, the logits, which the
  recorder never captures).
* :func:`plot_high_frequency` — Δ log amplitude at the highest frequency vs normalised depth
  (Fig. 8), MSA blocks shaded grey and downsampling blocks shaded blue.
* :func:`plot_variance` — feature-map variance vs normalised depth (Fig. 9), same shading; a
  log y-axis on request (``log=True``) or, by default, when the variances span more than
  :data:`LOG_RANGE` (max / min): on a linear axis such a curve is flat near 0 after the first blocks.

Each function takes an :class:`~alterops.analysis.hooks.AnalysisResult`, draws on ``ax`` when
given (a matplotlib Axes) or on a new figure, saves to ``path`` when given, and returns the figure.
``title`` (``alterops analyze`` passes the model, the data and the number of images) goes above the plot.
"""
from __future__ import annotations

from .hooks import AnalysisResult

__all__ = ["plot_fourier", "plot_high_frequency", "plot_variance", "save_all", "wants_log_scale", "LOG_RANGE"]

LOG_RANGE = 100.0  # variances spanning more than this ratio (max / min) get a log axis by default

MSA_COLOR = "0.85"  # grey, as the paper's MSA shading
DOWNSAMPLE_COLOR = "#cfe0f5"  # light blue, as the paper's subsampling shading


def _figure(ax, size=(4.2, 3.2)):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=150)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def _shade(ax, result: AnalysisResult) -> None:
    depth = result.depth
    half = 0.5 / (len(depth) - 1) if len(depth) > 1 else 0.5
    for indices, color, label in ((result.msa, MSA_COLOR, "MSA"), (result.downsample, DOWNSAMPLE_COLOR, "downsampling")):
        for j, i in enumerate(indices):
            if 0 <= i < len(depth):
                ax.axvspan(depth[i] - half, depth[i] + half, color=color, lw=0, zorder=0,
                           label=label if j == 0 else None)


def plot_fourier(result: AnalysisResult, path=None, *, ax=None, cmap: str = "plasma", title: str | None = None):
    """Δ log amplitude vs frequency (units of π), one curve per block, coloured by depth."""
    import matplotlib

    fig, ax = _figure(ax, (4.4, 3.2))
    colormap = matplotlib.colormaps[cmap]
    for i, curve in enumerate(result.delta):
        if len(curve) < 2:
            continue
        x = result.frequencies(i).numpy()
        ax.plot(x, curve.numpy(), color=colormap(result.depth[i]), lw=1.2)
    ax.set_xlim(0.0, 1.0)
    ax.set_xticks([0.0, 0.5, 1.0])
    ax.set_xticklabels(["0.0π", "0.5π", "1.0π"])
    ax.set_xlabel("Frequency")
    ax.set_ylabel("Δ Log amplitude")
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=colormap)
    fig.colorbar(mappable, ax=ax, label="Normalized depth")
    _title(ax, title)
    return _finish(fig, path)


def _title(ax, title) -> None:
    if title:
        ax.set_title(title, fontsize=7 if "\n" in title or len(title) > 45 else 9)


def wants_log_scale(values, log="auto") -> bool:
    """Whether to draw ``values`` on a log axis: ``log`` True/False, or ``"auto"``/``None``: when
    every value is positive and finite and max / min exceeds :data:`LOG_RANGE`. A log axis needs
    positive values, so ``True`` with a value <= 0 raises ``ValueError``."""
    vals = [float(v) for v in values]
    positive = bool(vals) and all(v > 0 and v != float("inf") for v in vals)
    if log is True:
        if not positive:
            raise ValueError("a log axis needs positive variances; some are <= 0 (use log=False or 'auto')")
        return True
    if log is False:
        return False
    if log not in (None, "auto"):
        raise ValueError(f"log must be True, False or 'auto', got {log!r}")
    return positive and max(vals) / min(vals) > LOG_RANGE


def _versus_depth(result, values, ylabel, path, ax, title, log=False, marker_color="tab:red"):
    fig, ax = _figure(ax)
    _shade(ax, result)
    ax.plot(result.depth, values, color=marker_color, marker="o", ms=3, lw=1.2, zorder=2)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("Normalized depth")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if result.msa or result.downsample:
        ax.legend(loc="best", fontsize="small", frameon=False)
    _title(ax, title)
    return _finish(fig, path)


def plot_high_frequency(result: AnalysisResult, path=None, *, ax=None, title: str | None = None):
    """Δ log amplitude of the highest frequency vs normalised depth."""
    return _versus_depth(result, result.high_frequency, "Δ Log amplitude (high freq.)", path, ax, title)


def plot_variance(result: AnalysisResult, path=None, *, ax=None, log="auto", title: str | None = None):
    """Feature-map variance vs normalised depth; ``log``: True, False or ``"auto"`` (see
    :func:`wants_log_scale`)."""
    log = wants_log_scale(result.variance, log)
    return _versus_depth(result, result.variance, "Feature map variance" + (" (log scale)" if log else ""), path,
                         ax, title, log=log, marker_color="tab:blue")


def save_all(result: AnalysisResult, folder: str, *, prefix: str = "", title: str | None = None,
             variance_log="auto") -> dict:
    """Writes ``fourier.png``, ``high_frequency.png`` and ``variance.png``; returns their paths.
    ``variance_log``: the y-axis of the variance plot (True, False or ``"auto"``)."""
    import os

    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{prefix}{name}.png") for name in ("fourier", "high_frequency", "variance")}
    plot_fourier(result, paths["fourier"], title=title)
    plot_high_frequency(result, paths["high_frequency"], title=title)
    plot_variance(result, paths["variance"], title=title, log=variance_log)
    return paths
