"""Which units a picture shows, and the maps of a layer's units (channels, or SAE latents) for some images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from convlens.core.errors import ConvlensError


def layer_maps(model: Any, images: Any, layer: str, sae: Any = None) -> Any:
    """The layer's activations ``[N, C, H, W]`` for ``images``, or with ``sae`` its latents ``[N, latents, H, W]``."""
    import torch

    from convlens.models.layers import activations_at

    activations = activations_at(model.module, images, layer).activations[layer]
    if activations.ndim != 4:
        raise ConvlensError(
            f"activation maps need a layer with an output [N, C, H, W]; layer '{layer}' gives "
            f"{tuple(activations.shape)}"
        )
    if sae is None:
        return activations
    if activations.shape[1] != sae.input_dim:
        raise ConvlensError(f"the SAE reads {sae.input_dim} channels but layer '{layer}' gives {activations.shape[1]}")
    with torch.no_grad():
        return sae.encode(activations)


def chosen_units(units: Sequence[int], available: int, kind: str) -> tuple[int, ...]:
    """``units``, or all of ``range(available)`` when none are given; one clear error for a unit out of range."""
    wrong = [unit for unit in units if not 0 <= unit < available]
    if wrong:
        raise ConvlensError(f"{kind} {', '.join(map(str, wrong))} out of range: there are {kind} 0..{available - 1}")
    return tuple(units) if units else tuple(range(available))
