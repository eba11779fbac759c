"""Analysis toolkit of "How Do Vision Transformers Work?" built on the statistics ops.

    from alterops.analysis import analyze, plot_fourier, plot_high_frequency, plot_variance

    result = analyze(model, loader)             # hooks on every block, running sums only
    plot_fourier(result, "fourier.png")         # Δ log amplitude vs frequency, coloured by depth
    plot_high_frequency(result, "hf.png")       # high-frequency Δ vs normalised depth
    plot_variance(result, "variance.png")       # feature-map variance vs normalised depth
    sweep = frequency_noise_sweep(model, loader)  # accuracy drop per noise frequency

Command line: ``alterops analyze MODEL --images DIR`` (see :mod:`alterops.analysis.cli`).
Plotting needs matplotlib; the rest only torch (tqdm for progress bars).
"""
from .hooks import AnalysisResult, FeatureRecorder, analyze, default_blocks, to_feature_map
from .plots import plot_fourier, plot_high_frequency, plot_variance, save_all
from .robustness import DEFAULT_FREQUENCIES, frequency_noise_sweep, plot_noise_sweep

__all__ = [
    "AnalysisResult", "FeatureRecorder", "analyze", "default_blocks", "to_feature_map",
    "plot_fourier", "plot_high_frequency", "plot_variance", "save_all",
    "frequency_noise_sweep", "plot_noise_sweep", "DEFAULT_FREQUENCIES",
]
