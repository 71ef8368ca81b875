"""What other SAE plugins may use of ``topk``: its parameters, the module to derive from, and the sparse path (kept
pairs in bags, the encoder gather and the sparse decode with backward passes that touch only the kept latents, the
latents of ragged pairs). BatchTopK and Matryoshka build on it; the package's other modules are its own.
Importing this module does not import torch: the model's names load on first use.
"""

from __future__ import annotations

from convlens import lazy_attributes
from convlens.plugins.saes.topk import TopKParams

_LAZY = dict.fromkeys(
    ("TopKSAE", "LatentBags", "GatheredLinear", "SparseDecode", "RaggedLatents", "kept_latents"),
    "convlens.plugins.saes.topk.model",
)

__all__ = ["TopKParams", *_LAZY]

__getattr__ = lazy_attributes(globals(), _LAZY)
