"""Grad-CAM as a visualizer (Selvaraju et al. 2017; course notes 002 sec. 6.2; paper 001 sec. 7.2.5).

Heat maps on a layer's grid for a class per image (default: the predicted one) or for a unit: a channel of a
layer, or an SAE latent, summed over that layer's positions, with the maps taken at the same or an earlier layer
(``map_layer``). The formula is the Grad-CAM filter's (:func:`convlens.plugins.gradcam.gradcam_maps`);
only the gradients from the target back to the map layer are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens import AttributionParams, AttributionVisualizer, ExplainTarget, VisualizerSpec, hookimpl, target_gradients

from . import gradcam_maps


@dataclass(frozen=True)
class GradCAMVisualizerParams(AttributionParams):
    pass


class GradCAMVisualizer(AttributionVisualizer):
    name = "gradcam"
    cost = "1 forward, 1 backward from the target to the layer"

    def __init__(self, params: GradCAMVisualizerParams | None = None):
        super().__init__(params or GradCAMVisualizerParams())

    def attribute(self, model, images, layer: str, target: ExplainTarget):
        captured = target_gradients(model, images, layer, target)
        return gradcam_maps(captured.activations[layer], captured.gradients[layer])


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="gradcam",
            factory=GradCAMVisualizer,
            params=GradCAMVisualizerParams,
            summary="Grad-CAM heat maps for the predicted (or a chosen) class, a unit or an SAE latent, "
            "at any conv layer",
            aliases=("grad-cam",),
        )
    )
