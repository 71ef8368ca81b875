"""What other SAE plugins may use of ``batchtopk`` (Matryoshka derives from it). Importing this module does not import
torch: the model's names load on first use."""

from __future__ import annotations

import importlib
from typing import Any

from convlens.plugins.saes.batchtopk import BatchTopKParams

_LAZY = dict.fromkeys(("BatchTopKSAE", "batch_largest"), "convlens.plugins.saes.batchtopk.model")

__all__ = ["BatchTopKParams", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
