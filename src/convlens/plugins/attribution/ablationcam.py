"""Ablation-CAM (Desai and Ramaswamy 2020): the weight of a channel is the relative drop of the target's score
when that channel of the layer is set to zero, ``w_k = (y - y_k) / y``, and the map ``ReLU(sum_k w_k A_k)``,
scaled per image to [0, 1]. The target is scored by its logit (or a unit by its summed value). No gradients.

pytorch-grad-cam ablates by the same zero when the layer's smallest activation is 0 (after a ReLU) and otherwise
writes ``min - 1e7``; convlens always writes the paper's zero, so on layers with negative activations (such as
EfficientNet's linear block outputs) the two differ by design.

Cost: one forward pass, then ``N x C`` forward passes with one channel ablated each, ``perturbation_batch`` at a
time, scoring every target (several classes, or units of one layer) at once; the layers before the ablated one run
again in each (a generic module cannot be resumed halfway).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from convlens import (
    AttributionParams,
    PerturbationAttribution,
    VisualizerSpec,
    chunked_scores,
    hookimpl,
    param,
    scaled_to_unit,
)

NAME = "ablationcam"


@dataclass(frozen=True)
class AblationCAMParams(AttributionParams):
    perturbation_batch: int = param(64, min=1, help="ablated copies per forward pass")


@contextlib.contextmanager
def replaced_output(module, layer, outputs):
    """Within the block, ``layer`` of ``module`` returns ``outputs[0]`` instead of what it computes."""
    handle = module.get_submodule(layer).register_forward_hook(lambda _m, _i, _o: outputs[0])
    try:
        yield
    finally:
        handle.remove()


def ablation_weights(model, images, layer, activations, scorer, batch_size):
    """The channel weights ``[N, T, C]``: each target's relative drop with each channel set to zero."""
    import torch

    count, channels = images.shape[0], activations.shape[1]
    original = scorer(images, torch.arange(count, device=images.device)).float()  # [N, T]
    ablated_output = [None]

    def ablated(indices):
        rows, channel = indices // channels, indices % channels
        copy = activations[rows].clone()
        copy[torch.arange(len(rows), device=copy.device), channel] = 0
        ablated_output[0] = copy
        return images[rows], rows

    with replaced_output(model.module, layer, ablated_output):
        scores = chunked_scores(scorer, count * channels, ablated, batch_size, images.device)
    scores = scores.view(count, channels, -1).transpose(1, 2)  # [N, T, C]
    return (original[:, :, None] - scores) / original[:, :, None]


def ablationcam_maps(model, images, layer, scorer, batch_size=64):
    """Ablation-CAM maps ``[N, T, h, w]`` in [0, 1] at ``layer`` of the targets ``scorer`` scores."""
    import torch

    from convlens import activations_at

    with torch.no_grad():
        activations = activations_at(model.module, images, layer).activations[layer]
        weights = ablation_weights(model, images, layer, activations, scorer, batch_size)
    cams = torch.einsum("ntc,nchw->nthw", weights, activations.float()).clamp_min(0)
    return scaled_to_unit(cams.flatten(0, 1)).view_as(cams)


class AblationCAM(PerturbationAttribution):
    name = NAME
    cost = "1 forward, then channels x images forwards with one channel ablated (shared by all targets)"

    def __init__(self, params: AblationCAMParams | None = None):
        super().__init__(params or AblationCAMParams())

    def attribute_shared(self, model, images, layer, targets, scorer):
        return ablationcam_maps(model, images, layer, scorer, self.params.perturbation_batch)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=AblationCAM,
            params=AblationCAMParams,
            summary="Ablation-CAM: channels weighted by the target's relative drop when each is zeroed "
            "(gradient-free; Desai and Ramaswamy 2020)",
            aliases=("ablation-cam",),
        )
    )
