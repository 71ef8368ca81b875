"""Grad-CAM as an activation filter: patches weighted by the Grad-CAM map of a class (see the package docstring).

The target class c is the image's label, the predicted class when the image has no label, or one class chosen for
every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from convlens import FilterSpec, GradientMapFilter, Params, hookimpl, param

from . import gradcam_maps


@dataclass(frozen=True)
class GradCAMParams(Params):
    class_index: Optional[int] = param(
        None, help="explain this class for every image (default: the label, or the predicted class)", min=0
    )


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
