"""LayerCAM (Jiang et al. 2021): each position's activations weighted by the positive part of the target's
gradient there, ``ReLU(sum_k ReLU(dy/dA_k) * A_k)``: a map at the layer's own resolution that stays reliable at
shallow layers, where Grad-CAM's averaged weights blur. Scaled per image to [0, 1]. Cost: one forward and one
backward pass down to the layer."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import (
    AttributionParams,
    FilterSpec,
    GradientCAMVisualizer,
    GradientMapFilter,
    GradientMapFilterParams,
    VisualizerSpec,
    hookimpl,
    scaled_to_unit,
)

NAME = "layercam"


def layercam_maps(activations, gradients):
    """LayerCAM maps ``[N, H, W]`` in [0, 1] from activations and gradients ``[N, C, H, W]``."""
    return scaled_to_unit((gradients.float().clamp_min(0) * activations.float()).sum(dim=1).clamp_min(0))


@dataclass(frozen=True)
class LayerCAMParams(AttributionParams):
    pass


class LayerCAM(GradientCAMVisualizer):
    name = NAME
    cost = "1 forward, 1 backward from the target to the layer"

    def __init__(self, params: LayerCAMParams | None = None):
        super().__init__(params or LayerCAMParams())

    def maps(self, activations, gradients):
        return layercam_maps(activations, gradients)


class LayerCAMFilter(GradientMapFilter):
    name = NAME

    def maps(self, activations, gradients):
        return layercam_maps(activations, gradients)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=LayerCAM,
            params=LayerCAMParams,
            summary="LayerCAM: ReLU(sum over channels of ReLU(gradient) x activation) at a layer, for a "
            "class, a unit or an SAE latent (Jiang et al. 2021)",
            aliases=("layer-cam",),
        )
    )


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name=NAME,
            factory=LayerCAMFilter,
            params=GradientMapFilterParams,
            summary="LayerCAM map of the true (or predicted) class at the layer",
            aliases=("layer-cam",),
        )
    )
