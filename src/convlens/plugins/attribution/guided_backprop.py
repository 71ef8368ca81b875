"""Guided Backpropagation (Springenberg et al. 2015; course notes 002 sec. 6.2): the target's gradient to the
input where the backward pass through every ReLU (and ReLU6) module passes only positive gradients of active
units. It is one of the methods the sanity checks of Adebayo et al. (002 sec. 6.3) show to be nearly independent
of the upper layers' weights. Equals captum's ``GuidedBackprop`` on networks whose ReLUs are modules. Cost: one
forward and one backward pass."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import InputAttribution, InputAttributionParams, VisualizerSpec, guided_input_gradients, hookimpl

NAME = "guided-backprop"


@dataclass(frozen=True)
class GuidedBackpropParams(InputAttributionParams):
    pass


class GuidedBackprop(InputAttribution):
    name = NAME
    cost = "1 forward, 1 guided backward to the input"

    def __init__(self, params: GuidedBackpropParams | None = None):
        super().__init__(params or GuidedBackpropParams())

    def input_attribution(self, model, images, layer, target):
        return guided_input_gradients(model, images, layer, target)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=GuidedBackprop,
            params=GuidedBackpropParams,
            summary="Guided Backprop: input gradients passing only positive gradients through ReLUs "
            "(Springenberg et al. 2015)",
            aliases=("guided-backpropagation", "guidedbackprop"),
        )
    )
