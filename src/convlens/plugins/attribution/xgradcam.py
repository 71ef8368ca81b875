"""XGradCAM (Fu et al. 2020, "Axiom-based Grad-CAM", eq. 8): channel weights that satisfy the sensitivity and
conservation axioms, ``w_k = sum_ij (dy/dA_k,ij * A_k,ij) / (sum_ij A_k,ij + 1e-7)``, and the map
``ReLU(sum_k w_k A_k)`` scaled per image to [0, 1]. The ``1e-7`` is pytorch-grad-cam's. Cost: one forward and one
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

NAME = "xgradcam"


#: Added to each channel's summed activation, as pytorch-grad-cam does.
SUM_EPSILON = 1e-7


def xgradcam_maps(activations, gradients):
    """XGradCAM maps ``[N, H, W]`` in [0, 1] from activations and gradients ``[N, C, H, W]``."""
    activations, gradients = activations.float(), gradients.float()
    summed = activations.sum(dim=(2, 3), keepdim=True)
    weights = (gradients * activations / (summed + SUM_EPSILON)).sum(dim=(2, 3), keepdim=True)
    return scaled_to_unit((weights * activations).sum(dim=1).clamp_min(0))


@dataclass(frozen=True)
class XGradCAMParams(AttributionParams):
    pass


class XGradCAM(GradientCAMVisualizer):
    name = NAME
    cost = "1 forward, 1 backward from the target to the layer"

    def __init__(self, params: XGradCAMParams | None = None):
        super().__init__(params or XGradCAMParams())

    def maps(self, activations, gradients):
        return xgradcam_maps(activations, gradients)


class XGradCAMFilter(GradientMapFilter):
    name = NAME

    def maps(self, activations, gradients):
        return xgradcam_maps(activations, gradients)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=XGradCAM,
            params=XGradCAMParams,
            summary="XGradCAM: channels weighted by sum(gradient x activation) / sum(activation) at a layer, for a "
            "class, a unit or an SAE latent (Fu et al. 2020)",
            aliases=("xgrad-cam",),
        )
    )


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name=NAME,
            factory=XGradCAMFilter,
            params=GradientMapFilterParams,
            summary="XGradCAM map of the true (or predicted) class at the layer",
            aliases=("xgrad-cam",),
        )
    )
