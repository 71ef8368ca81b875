"""Guided Grad-CAM (Selvaraju et al. 2017, sec. 3; course notes 002 sec. 6.2): Guided Backprop's input gradients
multiplied by the layer's Grad-CAM map, ``ReLU(sum_k mean(dy/dA_k) A_k)`` (not rescaled), upsampled to the input
by nearest neighbour: fine detail from the guided pass, class discrimination from the CAM. Equals captum's
``GuidedGradCam``. Cost: two forward and two backward passes (one to the layer, one guided to the input)."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import (
    InputAttribution,
    InputAttributionParams,
    VisualizerSpec,
    guided_input_gradients,
    hookimpl,
    target_gradients,
)

NAME = "guided-gradcam"


@dataclass(frozen=True)
class GuidedGradCAMParams(InputAttributionParams):
    pass


def raw_gradcam(model, images, layer, target):
    """Grad-CAM at ``layer`` before its rescaling: ``ReLU(sum_k mean(dy/dA_k) A_k)``, ``[N, 1, h, w]``."""
    captured = target_gradients(model, images, layer, target)
    activations, gradients = captured.activations[layer].float(), captured.gradients[layer].float()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return (weights * activations).sum(dim=1, keepdim=True).clamp_min(0)


def guided_gradcam(model, images, layer, target):
    """Guided Grad-CAM attributions ``[N, C, H, W]``."""
    import torch.nn.functional as F

    cam = F.interpolate(raw_gradcam(model, images, layer, target), size=images.shape[2:], mode="nearest")
    return guided_input_gradients(model, images, layer, target) * cam


class GuidedGradCAM(InputAttribution):
    name = NAME
    cost = "2 forwards, 1 backward to the layer and 1 guided backward to the input"

    def __init__(self, params: GuidedGradCAMParams | None = None):
        super().__init__(params or GuidedGradCAMParams())

    def input_attribution(self, model, images, layer, target):
        return guided_gradcam(model, images, layer, target)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=GuidedGradCAM,
            params=GuidedGradCAMParams,
            summary="Guided Grad-CAM: Guided Backprop's input gradients times the layer's Grad-CAM map "
            "(Selvaraju et al. 2017)",
            aliases=("guided-grad-cam",),
        )
    )
