"""Grad-CAM (Selvaraju et al. 2017; paper 001 sec. 7.2.5) as an activation filter.

alpha_k = spatial mean of d y_c / d A_k, map = ReLU(sum_k alpha_k A_k), scaled per image to [0, 1] as
(map - min) / (max + 1e-7). The target class c is the image's label, the predicted class when the image has
no label, or one class chosen for every image. The Grad-CAM visualizer reuses :func:`gradcam_maps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from convlens import FilterSpec, Params, hookimpl, param
from convlens.core.attribution import GradientMapFilter, scaled_to_unit


@dataclass(frozen=True)
class GradCAMParams(Params):
    class_index: Optional[int] = param(
        None, help="explain this class for every image (default: the label, or the predicted class)", min=0)


def gradcam_maps(activations, gradients):
    """Grad-CAM maps ``[N, H, W]`` in [0, 1] from activations and gradients ``[N, C, H, W]``."""
    alpha = gradients.mean(dim=(2, 3), keepdim=True)
    return scaled_to_unit((alpha * activations).sum(dim=1).clamp_min(0))


class GradCAMFilter(GradientMapFilter):
    name = "gradcam"

    def maps(self, activations, gradients):
        return gradcam_maps(activations, gradients)


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name="gradcam",
            factory=GradCAMFilter,
            params=GradCAMParams,
            summary="Grad-CAM map of the true (or predicted) class at the layer (paper sec. 7.2.5)",
            aliases=("grad-cam",),
        )
    )
