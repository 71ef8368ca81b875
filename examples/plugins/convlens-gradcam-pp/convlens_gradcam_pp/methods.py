"""Grad-CAM++ (Chattopadhay et al. 2018, arXiv:1710.11063) as a convlens visualizer and activation filter.

The registry imports this module only when a ``gradcam++`` component is created; torch is imported inside the
functions.

With activations ``A[N, K, H, W]`` of a layer and gradients ``g = d S^c / d A`` of the class logit ``S^c``, the
paper weights each channel by a weighted sum of its positive gradients (sec. 3),

    w_k = sum_ij alpha_k,ij * ReLU(g_k,ij),        L^c = ReLU(sum_k w_k A_k),

and for the exponential score ``Y^c = exp(S^c)`` the higher derivatives are powers of the first, which gives
the closed form for ``alpha`` of eq. 19 (the equation pytorch-grad-cam's ``GradCAMPlusPlus`` cites):

    alpha_k,ij = g_k,ij^2 / (2 g_k,ij^2 + sum_ab A_k,ab * g_k,ij^3).

As in pytorch-grad-cam (which this matches to float32 rounding), the denominator gets ``+ 1e-6`` and ``alpha``
is 0 where the gradient is 0. Each map is then scaled per image to [0, 1] as ``(L - min) / (max(L - min) +
1e-7)``, like convlens's Grad-CAM filter.
"""

from __future__ import annotations

from convlens import AttributionVisualizer, ExplainTarget, GradientMapFilter, scaled_to_unit, target_gradients

#: Added to the denominator of alpha, as pytorch-grad-cam does.
ALPHA_EPSILON = 1e-6


def gradcam_pp_weights(activations, gradients):
    """Grad-CAM++ channel weights ``w[N, K]`` from activations and gradients ``[N, K, H, W]`` (eqs. 9 and 19)."""
    import torch

    squared = gradients.pow(2)
    cubed = squared * gradients
    summed = activations.sum(dim=(2, 3), keepdim=True)
    alpha = squared / (2 * squared + summed * cubed + ALPHA_EPSILON)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    return (gradients.clamp_min(0) * alpha).sum(dim=(2, 3))


def gradcam_pp_maps(activations, gradients):
    """Grad-CAM++ maps ``[N, H, W]`` in [0, 1] from activations and gradients ``[N, K, H, W]``."""
    weights = gradcam_pp_weights(activations, gradients)
    cam = (weights[:, :, None, None] * activations).sum(dim=1).clamp_min(0)
    return scaled_to_unit(cam)


class GradCAMPlusPlusVisualizer(AttributionVisualizer):
    name = "gradcam++"
    cost = "1 forward, 1 backward from the target to the layer"

    def __init__(self, params=None):
        from convlens_gradcam_pp import GradCAMPlusPlusVisualizerParams

        super().__init__(params or GradCAMPlusPlusVisualizerParams())

    def attribute(self, model, images, layer: str, target: ExplainTarget):
        captured = target_gradients(model, images, layer, target)
        return gradcam_pp_maps(captured.activations[layer], captured.gradients[layer])


class GradCAMPlusPlusFilter(GradientMapFilter):
    name = "gradcam++"

    def __init__(self, params=None):
        from convlens_gradcam_pp import GradCAMPlusPlusFilterParams

        super().__init__(params or GradCAMPlusPlusFilterParams())

    def maps(self, activations, gradients):
        return gradcam_pp_maps(activations, gradients)
