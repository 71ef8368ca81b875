"""Gradient saliency (Simonyan et al. 2014; course notes 002 sec. 6.1): |d target / d input|, by default the
largest over the colour channels, per input pixel. One of the two methods that pass the sanity checks of Adebayo et al.
(002 sec. 6.3). The target is a class logit, or a unit (a channel, or an SAE latent) summed over its layer's
positions; the forward pass then stops at that layer."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import (
    REDUCTIONS,
    ExplainTarget,
    InputAttribution,
    InputAttributionParams,
    VisualizerSpec,
    hookimpl,
    param,
)
from convlens import input_gradients as target_input_gradients


@dataclass(frozen=True)
class SaliencyParams(InputAttributionParams):
    reduction: str = param(
        "abs-max",
        choices=REDUCTIONS,
        help="map per pixel from its colour channels' |gradient|: abs-max (the largest, Simonyan et al.), "
        "abs-sum, sum or positive (their sum)",
    )


class SaliencyVisualizer(InputAttribution):
    name = "saliency"
    cost = "1 forward, 1 backward to the input"

    def __init__(self, params: SaliencyParams | None = None):
        super().__init__(params or SaliencyParams())

    def input_attribution(self, model, images, layer: str, target: ExplainTarget):
        """|d target / d input| per input value, captum's ``Saliency`` (``abs=True``)."""
        return target_input_gradients(model, images, layer, target).abs()


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
