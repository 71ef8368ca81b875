"""Input x Gradient (Shrikumar et al. 2016): the input times the target's gradient to it, ``x * dy/dx``; for a
piecewise-linear network with zero biases it is the exact contribution of each input value. Equals captum's
``InputXGradient``. Cost: one forward and one backward pass."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import InputAttribution, InputAttributionParams, VisualizerSpec, hookimpl, input_gradients

NAME = "input-x-gradient"


@dataclass(frozen=True)
class InputXGradientParams(InputAttributionParams):
    pass


class InputXGradient(InputAttribution):
    name = NAME
    cost = "1 forward, 1 backward to the input"

    def __init__(self, params: InputXGradientParams | None = None):
        super().__init__(params or InputXGradientParams())

    def input_attribution(self, model, images, layer, target):
        return images.float() * input_gradients(model, images, layer, target).float()


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=InputXGradient,
            params=InputXGradientParams,
            summary="Input x Gradient: each input value times the target's gradient to it (Shrikumar et al. 2016)",
            aliases=("inputxgradient", "gradient-x-input"),
        )
    )
