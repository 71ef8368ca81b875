"""How often gradient ascent on a single neuron cannot start: the input gradient is exactly zero.

The measurement behind the paper's smooth ResNet (001, sec. 5.1): max pooling and ReLU pass no gradient for
non-maximal or negative inputs, so for some (unit, start image) pairs a neuron objective has zero gradient
everywhere on the input.
"""

from __future__ import annotations

import torch
from torch import nn

from convlens.models.layers import hooked_outputs


def zero_gradient_fraction(
    module: nn.Module, layer: str, images: torch.Tensor, units: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Fraction of images whose input gradient of ``A[i, units[i], centre]`` is exactly zero, and the norms.

    Each image gets its own unit; the model must be in eval mode so that images do not interact.
    """
    images = images.clone().requires_grad_(True)
    with hooked_outputs(module, [layer]) as outputs, torch.enable_grad():
        module(images)
        activation = outputs[layer]
        h, w = activation.shape[2] // 2, activation.shape[3] // 2
        objective = activation[torch.arange(len(units)), units, h, w].sum()
        (gradient,) = torch.autograd.grad(objective, images)
    norms = gradient.flatten(1).norm(dim=1)
    return float((norms == 0).float().mean()), norms
