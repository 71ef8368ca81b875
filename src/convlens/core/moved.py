"""Old module paths kept for one release: importing one warns and forwards every name to its new home."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """Warn that ``old`` moved to ``new`` and return a module ``__getattr__`` reading names from ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in convlens 0.2: import from 'convlens' (the public API; "
        f"the code now lives in {new})",
        DeprecationWarning,
        stacklevel=3,
    )

    def forward(name: str) -> Any:
        return getattr(importlib.import_module(new), name)

    return forward
