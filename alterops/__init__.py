"""alterops: fused kernels for local attention, spatial smoothing and feature statistics.

Ops (all take ``backend=None`` or one of ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``)::

    import alterops as ao
    y = ao.neighborhood_attention2d(q, k, v, kernel_size=7)
    y = ao.window_attention2d(q, k, v, window_size=7, shift=3, rel_pos_bias=table)
    y = ao.box_blur2d(x)                    # the paper's AvgPool2d(2, 1, 1)
    y = ao.tanh_blur2d(x, tau=10.0)         # TanhBlurBlock in one pass
    d = ao.delta_log_amplitude(feature_map) # Δ log amplitude per frequency

See the README and ``docs/semantics.md`` for the exact semantics.
"""
from __future__ import annotations

from ._version import __version__
from ._dispatch import BackendUnavailableError, get_backend, set_backend
from . import _ext

__all__ = ["__version__", "BackendUnavailableError", "get_backend", "set_backend", "cpu_isa"]


def cpu_isa() -> str | None:
    """The instruction-set level of the CPU kernels in use: ``"generic"``, ``"avx2"`` (AVX2+FMA)
    or ``"avx512"`` (F/BW/VL/DQ); ``None`` when the compiled kernels are not available.
    ``ALTEROPS_CPU_ISA`` forces a level; ``alterops info`` lists the levels available."""
    return _ext.cpu_isa()

# --- op families ---------------------------------------------------------------------------
from .blur import box_blur2d, tanh_blur2d  # noqa: E402
from .neighborhood_attention_nd import (  # noqa: E402
    merge_attentions,
    neighborhood_attention1d,
    neighborhood_attention2d,
    neighborhood_attention3d,
)
from . import _na_unfused  # noqa: E402,F401  (compat.natten's qk / av kernels: the natten_qk_av table)
from .window_attention import window_attention2d  # noqa: E402
from .statistics import (  # noqa: E402
    delta_log_amplitude,
    feature_statistics,
    feature_variance,
    frequency_noise,
    log_amplitude_spectrum,
    radial_log_amplitude,
)
from . import models, nn  # noqa: E402
from .swap import swap  # noqa: E402
from .memory import empty_cache  # noqa: E402
from . import memory  # noqa: E402

__all__ += [
    "box_blur2d", "tanh_blur2d",
    "neighborhood_attention1d", "neighborhood_attention2d", "neighborhood_attention3d", "merge_attentions",
    "window_attention2d",
    "delta_log_amplitude", "log_amplitude_spectrum", "radial_log_amplitude", "feature_variance",
    "frequency_noise", "feature_statistics",
    "nn", "models", "swap", "memory", "empty_cache",
]
