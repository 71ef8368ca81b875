"""Deprecated: moved to :mod:`convlens.sae.base`; import :class:`~convlens.SparseAutoencoder` and its neighbours from
:mod:`convlens`.
"""

from convlens.core.moved import moved_module

__getattr__ = moved_module(__name__, "convlens.sae.base")
