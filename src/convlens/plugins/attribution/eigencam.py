"""EigenCAM (Muhammad and Yeasin 2020): the activations at each position projected on their first principal
component, ``ReLU((A - mean) v_1)`` with ``v_1`` the first right singular vector of the centred ``[positions,
channels]`` matrix, scaled per image to [0, 1]. It needs neither gradients nor a target: the map shows what the
layer responds to most, whatever class is asked for.

A singular vector's sign is arbitrary (pytorch-grad-cam takes LAPACK's); convlens fixes it so that the projection
correlates positively with the channels' summed activation (equivalently, ``v_1`` sums to a positive value), so the
map marks where the layer is most active rather than least. The SVD runs in float64. Cost: one forward pass up to
the layer and one small SVD per image.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens import (
    ActivationFilter,
    AttributionParams,
    AttributionVisualizer,
    FilterSpec,
    VisualizerSpec,
    hookimpl,
    scaled_to_unit,
)

NAME = "eigencam"


def principal_projections(activations):
    """Per image, the centred activations ``[N, C, H, W]`` projected on their first principal component, signed
    to correlate positively with the summed activation: ``[N, H, W]`` (float32; computed in float64)."""
    import torch

    positions = activations.double().nan_to_num(0.0).flatten(2).transpose(1, 2)  # [N, HW, C]
    centred = positions - positions.mean(dim=1, keepdim=True)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    component = right[:, 0, :]  # [N, C]
    sign = torch.where(component.sum(dim=1) < 0, -1.0, 1.0).to(component)
    projection = (centred @ component[:, :, None]).squeeze(2) * sign[:, None]
    return projection.view(activations.shape[0], *activations.shape[2:]).float()


def eigencam_maps(activations):
    """EigenCAM maps ``[N, H, W]`` in [0, 1] from activations ``[N, C, H, W]``."""
    return scaled_to_unit(principal_projections(activations).clamp_min(0))


@dataclass(frozen=True)
class EigenCAMParams(AttributionParams):
    pass


class EigenCAM(AttributionVisualizer):
    name = NAME
    cost = "1 forward to the layer, 1 SVD per image"

    def __init__(self, params: EigenCAMParams | None = None):
        super().__init__(params or EigenCAMParams())

    def attribute(self, model, images, layer, target):
        from convlens import activations_at

        return eigencam_maps(activations_at(model.module, images, layer).activations[layer])


class EigenCAMFilter(ActivationFilter):
    name = NAME

    def weights(self, activations, context):
        return eigencam_maps(activations)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=EigenCAM,
            params=EigenCAMParams,
            summary="EigenCAM: the layer's activations projected on their first principal component (no gradients, "
            "class-agnostic; Muhammad and Yeasin 2020)",
            aliases=("eigen-cam",),
        )
    )


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name=NAME,
            factory=EigenCAMFilter,
            summary="EigenCAM: each patch's activations projected on the layer's first principal component",
            aliases=("eigen-cam",),
        )
    )
