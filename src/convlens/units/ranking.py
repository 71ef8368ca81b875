"""Ranking a layer's units, or an SAE's latents, for one image (paper 001 sec. 9.2.4).

A unit's magnitude is the sum over the map's positions of |activation|. Beside the top and least units, the
number of units active at all (|activation| above a threshold somewhere) states the paper's CNN vs CNN+SAE
comparison (sec. 9.3.2: every CNN unit fires a little, most SAE latents are exactly zero) as numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from convlens.core.contracts import ModelBundle
from convlens.core.errors import ConvlensError
from convlens.models.layers import activations_at


def unit_magnitudes(maps: torch.Tensor) -> torch.Tensor:
    """``[C]`` float64: sum over positions of |activation| for one image's maps ``[C, H, W]`` (or vectors ``[C]``)."""
    return maps.double().abs().reshape(maps.shape[0], -1).sum(dim=1)


def ranking(magnitudes: torch.Tensor, maps: torch.Tensor, top: int, threshold: float) -> dict[str, Any]:
    """Top-``top`` and least-``top`` units (ties: the lower unit first), shares of the total, and the active count."""
    order = torch.sort(-magnitudes, stable=True).indices
    least = torch.sort(magnitudes, stable=True).indices
    total = float(magnitudes.sum())
    active = (maps.abs().reshape(maps.shape[0], -1) > threshold).any(dim=1)

    def rows(indices: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {
                "unit": int(u),
                "magnitude": float(magnitudes[u]),
                "share": float(magnitudes[u]) / total if total > 0 else 0.0,
            }
            for u in indices[:top]
        ]

    chosen = order[:top]
    return {
        "units": int(magnitudes.numel()),
        "active": int(active.sum()),
        "active_share": float(active.double().mean()),
        "total_magnitude": total,
        "top_share": float(magnitudes[chosen].sum()) / total if total > 0 else 0.0,
        "top": rows(order),
        "least": rows(least),
    }


def rank_units(
    model: ModelBundle, image: torch.Tensor, layer: str, *, sae: Any = None, top: int = 10, threshold: float = 0.0
) -> dict[str, Any]:
    """The ranking of ``layer``'s channels for one normalised ``image [3, H, W]``; with ``sae``, also of its latents."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise ConvlensError(f"rank_units takes one image [3, H, W], got {tuple(image.shape)}")
    activations = activations_at(model.module, image, layer).activations[layer][0]
    if not bool(torch.isfinite(activations).all()):
        raise ConvlensError(f"layer '{layer}' gives NaN or infinite values for this image")
    result = {
        "layer": layer,
        "threshold": threshold,
        "channels": ranking(unit_magnitudes(activations), activations, top, threshold),
    }
    if sae is not None:
        if activations.shape[0] != sae.input_dim:
            raise ConvlensError(
                f"the SAE reads {sae.input_dim} channels but layer '{layer}' has {activations.shape[0]}"
            )
        with torch.no_grad():
            latents = sae.encode(activations[None])[0]
        result["latents"] = ranking(unit_magnitudes(latents), latents, top, threshold)
    return result
