"""Compatibility layers for code written against other libraries' APIs.

:mod:`alterops.compat.natten`: NATTEN's unfused neighbourhood-attention ops and modules of
versions 0.14 to 0.17 (removed in NATTEN 0.20), and :func:`alterops.compat.natten.enable_transformers`
for Hugging Face's DiNAT / NAT models. See ``docs/compat_natten.md``.
"""
