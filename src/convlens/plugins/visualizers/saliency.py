"""Gradient saliency (Simonyan et al. 2014; course notes 002 sec. 6.1): |d target / d input|, the largest over
the colour channels, per input pixel. One of the two methods that pass the sanity checks of Adebayo et al.
(002 sec. 6.3). The target is a class logit, or a unit (a channel, or an SAE latent) summed over its layer's
positions; the forward pass then stops at that layer."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import AttributionParams, AttributionVisualizer, ExplainTarget, VisualizerSpec, hookimpl, target_gradients


@dataclass(frozen=True)
class SaliencyParams(AttributionParams):
    pass


class SaliencyVisualizer(AttributionVisualizer):
    name = "saliency"

    def __init__(self, params: SaliencyParams | None = None):
        super().__init__(params or SaliencyParams())

    def attribute(self, model, images, layer: str, target: ExplainTarget):
        from convlens import INPUT

        captured = target_gradients(model, images, None, target.read_at(layer))
        return captured.gradients[INPUT].abs().amax(dim=1)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="saliency",
            factory=SaliencyVisualizer,
            params=SaliencyParams,
            summary="gradient saliency: |d class logit (or unit, or SAE latent) / d input pixel|, per pixel",
            aliases=("gradient", "vanilla-gradient"),
        )
    )
