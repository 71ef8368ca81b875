"""Deprecated: moved to :mod:`convlens.activations.store`; import :class:`~convlens.ActivationStore` and its neighbours
from :mod:`convlens`.
"""

from convlens.core.moved import moved_module

__getattr__ = moved_module(__name__, "convlens.activations.store")
