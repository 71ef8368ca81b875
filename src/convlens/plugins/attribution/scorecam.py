"""Score-CAM (Wang et al. 2020): each channel of the layer, upsampled to the input (bilinear, corners aligned) and
scaled to [0, 1], masks the image; the target's score on each masked image, softmaxed over the channels, weights
the channels: ``ReLU(sum_k softmax_k(y(x * M_k)) A_k)``, scaled per image to [0, 1]. The target is scored by its
logit (or a unit by its summed value), as pytorch-grad-cam does. No gradients.

Cost: one forward pass to the layer, then ``N x C`` forward passes of masked images, ``perturbation_batch`` at a
time (``C`` the layer's channels): about ``N x C / perturbation_batch`` batched forwards, which score every target
(several classes, or units of one layer) at once.
"""

from __future__ import annotations

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

NAME = "scorecam"
#: Added to each upsampled channel's range before scaling it to [0, 1], as pytorch-grad-cam does.
RANGE_EPSILON = 1e-8


@dataclass(frozen=True)
class ScoreCAMParams(AttributionParams):
    perturbation_batch: int = param(64, min=1, help="masked images per forward pass")


def channel_masks(activations, rows, channels, size):
    """The masks of ``(row, channel)`` pairs: each channel upsampled to ``size`` (bilinear, corners aligned) and
    scaled to [0, 1] over its own range: ``[len(rows), 1, H, W]``."""
    import torch.nn.functional as F

    picked = activations[rows, channels][:, None].float()
    upsampled = F.interpolate(picked, size=size, mode="bilinear", align_corners=True)
    low = upsampled.amin(dim=(2, 3), keepdim=True)
    high = upsampled.amax(dim=(2, 3), keepdim=True)
    return (upsampled - low) / (high - low + RANGE_EPSILON)


def scorecam_weights(images, activations, scorer, batch_size):
    """The channel weights ``[N, T, C]``: per target, the softmax over channels of its score on each masked image."""
    channels = activations.shape[1]

    def masked(indices):
        rows, picked = indices // channels, indices % channels
        return images[rows] * channel_masks(activations, rows, picked, images.shape[2:]).to(images.dtype), rows

    count = images.shape[0] * channels
    scores = chunked_scores(scorer, count, masked, batch_size, images.device)  # [N x C, T]
    return scores.view(images.shape[0], channels, -1).transpose(1, 2).softmax(dim=2)


def scorecam_maps(model, images, layer, scorer, batch_size=64):
    """Score-CAM maps ``[N, T, h, w]`` in [0, 1] at ``layer`` of the targets ``scorer`` scores."""
    import torch

    from convlens import activations_at

    with torch.no_grad():
        activations = activations_at(model.module, images, layer).activations[layer].float()
        weights = scorecam_weights(images, activations, scorer, batch_size)
    cams = torch.einsum("ntc,nchw->nthw", weights, activations).clamp_min(0)
    return scaled_to_unit(cams.flatten(0, 1)).view_as(cams)


class ScoreCAM(PerturbationAttribution):
    name = NAME
    cost = "1 forward to the layer, then channels x images forwards of masked images (shared by all targets)"

    def __init__(self, params: ScoreCAMParams | None = None):
        super().__init__(params or ScoreCAMParams())

    def attribute_shared(self, model, images, layer, targets, scorer):
        return scorecam_maps(model, images, layer, scorer, self.params.perturbation_batch)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=ScoreCAM,
            params=ScoreCAMParams,
            summary="Score-CAM: channels weighted by the target's score on the image masked by each channel "
            "(gradient-free; Wang et al. 2020)",
            aliases=("score-cam",),
        )
    )
