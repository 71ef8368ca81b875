"""Occlusion (Zeiler and Fergus 2014): a ``window x window`` square of every colour channel, moved by ``stride``,
is replaced by the baseline; each pixel's attribution is the mean drop of the target's score over the windows
that cover it. The last window of a row or column is cut at the image's edge; every pixel is covered. This is
captum's ``Occlusion`` with ``sliding_window_shapes=(C, window, window)`` and ``strides=(C, stride, stride)``.

Cost: one forward pass plus one per window position and image, ``(ceil((H - window) / stride) + 1) x
(ceil((W - window) / stride) + 1)`` per image, ``perturbation_batch`` at a time; each pass scores every target
(several classes, or units of one layer) at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from convlens import (
    BASELINES,
    ConvlensError,
    InputAttribution,
    InputAttributionParams,
    PerturbationAttribution,
    VisualizerSpec,
    baseline_images,
    chunked_scores,
    hookimpl,
    param,
    reduce_channels,
    shared_scorer,
    with_classes,
)

NAME = "occlusion"


@dataclass(frozen=True)
class OcclusionParams(InputAttributionParams):
    window: int = param(16, min=1, help="side of the occluded square, in input pixels")
    stride: int = param(8, min=1, help="step between window positions, in input pixels (at most the window)")
    baseline: str = param("zero", choices=BASELINES, help="what the window is filled with: zero (mean colour), black")
    perturbation_batch: int = param(64, min=1, help="occluded images per forward pass")


def window_starts(length, window, stride):
    """The first pixel of each window position along one side."""
    if window > length:
        raise ConvlensError(f"the occlusion window ({window} px) is larger than the image ({length} px)")
    if stride > window and window < length:
        raise ConvlensError(f"the stride ({stride}) must not exceed the window ({window}): pixels would be skipped")
    return [step * stride for step in range(math.ceil((length - window) / stride) + 1)]


def inside(starts, window, length):
    """``[len(starts), length]``: whether each pixel along one side lies in the window starting at each start."""
    import torch

    pixels = torch.arange(length, device=starts.device)
    return (pixels[None] >= starts[:, None]) & (pixels[None] < starts[:, None] + window)


def window_masks(ys, xs, window, size):
    """Masks ``[B, 1, H, W]``: 1 inside the windows starting at ``(ys[b], xs[b])``."""
    return (inside(ys, window, size[0])[:, :, None] & inside(xs, window, size[1])[:, None, :])[:, None].float()


def occlusion(model, images, scorer, *, window=16, stride=8, baseline="zero", batch_size=64):
    """Attributions ``[N, T, C, H, W]`` of the targets ``scorer`` scores: per pixel, the mean score drop over the
    windows covering it."""
    import torch

    count, size = images.shape[0], tuple(images.shape[2:])
    fill = baseline_images(model, images, baseline)
    starts_y = torch.tensor(window_starts(size[0], window, stride), device=images.device)
    starts_x = torch.tensor(window_starts(size[1], window, stride), device=images.device)
    ys, xs = (grid.flatten() for grid in torch.meshgrid(starts_y, starts_x, indexing="ij"))
    positions = len(ys)
    original = scorer(images, torch.arange(count, device=images.device)).float()  # [N, T]
    drops = torch.zeros(count, original.shape[1], *size, device=images.device)
    chunk_masks = {}

    def occluded(indices):
        rows, where = indices // positions, indices % positions
        masks = chunk_masks[0] = window_masks(ys[where], xs[where], window, size)
        return images[rows] * (1 - masks.to(images.dtype)) + fill[rows] * masks.to(images.dtype), rows

    def scored(copies, rows):
        scores = scorer(copies, rows)
        drops.index_add_(0, rows, (original[rows] - scores.float())[:, :, None, None] * chunk_masks[0])
        return scores

    chunked_scores(scored, count * positions, occluded, batch_size, images.device)
    coverage = inside(starts_y, window, size[0]).sum(dim=0)[:, None] * inside(starts_x, window, size[1]).sum(dim=0)
    return (drops / coverage)[:, :, None].expand(-1, -1, images.shape[1], -1, -1).contiguous()


class Occlusion(PerturbationAttribution, InputAttribution):
    name = NAME
    cost = "1 forward, then window positions x images forwards (shared by all targets)"

    def __init__(self, params: OcclusionParams | None = None):
        super().__init__(params or OcclusionParams())

    def occlusion(self, model, images, scorer):
        p = self.params
        batch = p.perturbation_batch
        return occlusion(model, images, scorer, window=p.window, stride=p.stride, baseline=p.baseline, batch_size=batch)

    def input_attribution(self, model, images, layer, target):
        target = with_classes(model, images, target.read_at(layer))
        return self.occlusion(model, images, shared_scorer(model, [target]))[:, 0]

    def attribute_shared(self, model, images, layer, targets, scorer):
        attributions = self.occlusion(model, images, scorer)  # [N, T, C, H, W]
        maps = reduce_channels(attributions.flatten(0, 1), self.params.reduction)
        return maps.view(*attributions.shape[:2], *maps.shape[1:])


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=Occlusion,
            params=OcclusionParams,
            summary="Occlusion: the target's drop when a sliding window of the image is replaced by a baseline "
            "(Zeiler and Fergus 2014)",
            aliases=("occlusion-sensitivity",),
        )
    )
