"""Triton kernels of alterops (installed as ``alterops.kernels``).

Importing a submodule imports Triton; callers go through ``alterops`` ops, which check that
Triton is available first. Each submodule lists its compiled configurations in ``AOT_CONFIGS``
for the ahead-of-time compile test (``tests/test_aot_compile.py``).
"""
