"""What other SAE plugins may use of ``batchtopk`` (Matryoshka derives from it). Importing this module does not import
torch: the model's names load on first use."""

from __future__ import annotations

from convlens import lazy_attributes
from convlens.plugins.saes.batchtopk import BatchTopKParams

_LAZY = dict.fromkeys(("BatchTopKSAE", "batch_largest"), "convlens.plugins.saes.batchtopk.model")

__all__ = ["BatchTopKParams", *_LAZY]

__getattr__ = lazy_attributes(globals(), _LAZY)
