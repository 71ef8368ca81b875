"""Deprecated: moved to :mod:`convlens.attribution.base`; import :class:`~convlens.AttributionVisualizer` and its
neighbours from :mod:`convlens`.
"""

from convlens.core.moved import moved_module

__getattr__ = moved_module(__name__, "convlens.attribution.base")
