"""HiResCAM (Draelos and Carin 2020): the element-wise product of the activations and the target's gradient,
summed over channels, ``ReLU(sum_k dy/dA_k * A_k)``; unlike Grad-CAM it does not average the gradient over
positions, so the map is exactly the contribution of each position to a first-order expansion of the target.
Scaled per image to [0, 1] like Grad-CAM. Cost: one forward and one backward pass down to the layer."""

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

NAME = "hirescam"


def hirescam_maps(activations, gradients):
    """HiResCAM maps ``[N, H, W]`` in [0, 1] from activations and gradients ``[N, C, H, W]``."""
    return scaled_to_unit((gradients.float() * activations.float()).sum(dim=1).clamp_min(0))


@dataclass(frozen=True)
class HiResCAMParams(AttributionParams):
    pass


class HiResCAM(GradientCAMVisualizer):
    name = NAME
    cost = "1 forward, 1 backward from the target to the layer"

    def __init__(self, params: HiResCAMParams | None = None):
        super().__init__(params or HiResCAMParams())

    def maps(self, activations, gradients):
        return hirescam_maps(activations, gradients)


class HiResCAMFilter(GradientMapFilter):
    name = NAME

    def maps(self, activations, gradients):
        return hirescam_maps(activations, gradients)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=HiResCAM,
            params=HiResCAMParams,
            summary="HiResCAM: ReLU(sum over channels of gradient x activation) at a layer, for a class, a unit or "
            "an SAE latent (Draelos and Carin 2020)",
            aliases=("hires-cam",),
        )
    )


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name=NAME,
            factory=HiResCAMFilter,
            params=GradientMapFilterParams,
            summary="HiResCAM map of the true (or predicted) class at the layer",
            aliases=("hires-cam",),
        )
    )
