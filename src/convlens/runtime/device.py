"""Choosing the torch device for ``--device``."""

from __future__ import annotations

from convlens.core.errors import ConvlensError


def resolve_device(name: str | None = None):
    """``None`` or ``"auto"``: cuda when available, else cpu. An unavailable device is one clear error."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConvlensError(f"invalid device '{name}': {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConvlensError(f"device '{name}' requested but CUDA is not available here; use --device cpu")
    return device
