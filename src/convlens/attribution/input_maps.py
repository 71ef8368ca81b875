"""Attributions to the input pixels (course notes 002 sec. 6.1): the base of the gradient and perturbation
methods, whose raw result has the input's shape ``[N, C, H, W]`` (what captum returns) and whose map sums or
takes the magnitude over the colour channels; and the guided backward pass (Springenberg et al. 2015, 002 sec. 6.2)
that Guided Backprop and Guided Grad-CAM share.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from convlens.attribution.base import AttributionParams, AttributionVisualizer, ExplainTarget
from convlens.core.contracts import ModelBundle
from convlens.core.errors import ContractError
from convlens.core.params import param

if TYPE_CHECKING:
    import torch
    from torch import nn

REDUCTIONS = ("abs-sum", "sum", "positive", "abs-max")


@dataclasses.dataclass(frozen=True)
class InputAttributionParams(AttributionParams):
    reduction: str = param(
        "abs-sum",
        choices=REDUCTIONS,
        help="map per pixel from the attribution of its colour channels: abs-sum |sum over channels| (captum's "
        "absolute_value view), sum (signed), positive (max(sum, 0)), abs-max (largest magnitude, as saliency)",
    )


def reduce_channels(attributions: torch.Tensor, reduction: str) -> torch.Tensor:
    """Maps ``[N, H, W]`` from attributions ``[N, C, H, W]`` (see :data:`REDUCTIONS`)."""
    if reduction == "abs-max":
        return attributions.abs().amax(dim=1)
    summed = attributions.sum(dim=1)
    if reduction == "abs-sum":
        return summed.abs()
    if reduction == "positive":
        return summed.clamp_min(0)
    if reduction == "sum":
        return summed
    raise ContractError(f"unknown reduction '{reduction}'; choose one of {', '.join(REDUCTIONS)}")


class InputAttribution(AttributionVisualizer):
    """An attribution to the input: subclasses implement :meth:`input_attribution`; the map reduces it over the
    colour channels by the ``reduction`` parameter. ``layer`` is the layer a unit target is read at; methods that
    also use a layer (Guided Grad-CAM) take their maps there."""

    @abc.abstractmethod
    def input_attribution(
        self, model: ModelBundle, images: torch.Tensor, layer: str, target: ExplainTarget
    ) -> torch.Tensor:
        """Attributions ``[N, C, H, W]``, one per input value, for normalised ``images``."""

    def attribute(self, model: ModelBundle, images: torch.Tensor, layer: str, target: ExplainTarget) -> torch.Tensor:
        reduction = getattr(self.params, "reduction", "abs-sum")
        return reduce_channels(self.input_attribution(model, images, layer, target), reduction)


@functools.cache
def _guided_gradient():
    """An autograd function: identity forward, a backward that passes only the positive part of the gradient.
    Built on first use so that importing this module does not import torch."""
    import torch

    class GuidedGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad.clamp_min(0)

    return GuidedGradient


@contextlib.contextmanager
def guided_relus(module: nn.Module) -> Iterator[None]:
    """Within the block, the backward pass through every ``nn.ReLU`` and ``nn.ReLU6`` module of ``module`` passes
    a gradient only where both the unit is active and the gradient arriving from above is positive (guided
    backpropagation); the forward pass is unchanged. ReLUs called as functions keep their gradient, as in captum."""
    from torch import nn

    guided = _guided_gradient()

    def guide(_module: nn.Module, _inputs, output):
        return guided.apply(output)

    handles = [sub.register_forward_hook(guide) for sub in module.modules() if isinstance(sub, (nn.ReLU, nn.ReLU6))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def input_gradients(model: ModelBundle, images: torch.Tensor, layer: str, target: ExplainTarget) -> torch.Tensor:
    """The gradient ``[N, C, H, W]`` of the target (a unit read at ``layer`` when it names none) to the input."""
    from convlens.attribution.base import target_gradients
    from convlens.models.layers import INPUT

    return target_gradients(model, images, None, target.read_at(layer)).gradients[INPUT]


BASELINES = ("zero", "black")


def baseline_images(model: ModelBundle, images: torch.Tensor, baseline: str) -> torch.Tensor:
    """The reference input of a path or occlusion method: ``zero`` (zeros after normalisation: the dataset's mean
    colour, captum's default) or ``black`` (pixel value 0 before normalisation, ``-mean / std``)."""
    import torch

    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "black":
        mean = torch.tensor(model.mean, device=images.device, dtype=images.dtype)
        std = torch.tensor(model.std, device=images.device, dtype=images.dtype)
        return (-mean / std).view(1, -1, 1, 1).expand_as(images).clone()
    raise ContractError(f"unknown baseline '{baseline}'; choose one of {', '.join(BASELINES)}")


def guided_input_gradients(model: ModelBundle, images: torch.Tensor, layer: str, target: ExplainTarget) -> torch.Tensor:
    """:func:`input_gradients` through the guided backward pass (:func:`guided_relus`), in float32."""
    with guided_relus(model.module):
        return input_gradients(model, images, layer, target).float()
