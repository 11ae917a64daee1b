"""The old name of :mod:`edlm.ar` (AR decoding), kept so that existing imports work."""

from edlm.ar import ar_generate, iter_ar

__all__ = ["ar_generate", "iter_ar"]
