"""Grad-CAM (Selvaraju et al. 2017; paper 001 sec. 7.2.5; course notes 002 sec. 6.2), as a filter and a visualizer.

alpha_k = spatial mean of d y_c / d A_k, map = ReLU(sum_k alpha_k A_k), scaled per image to [0, 1] as
(map - min) / (max + 1e-7). :mod:`.filter` samples activations with it, :mod:`.visualizer` draws it for a class or
a unit; both use :func:`gradcam_maps`.
"""

from __future__ import annotations


def gradcam_maps(activations, gradients):
    """Grad-CAM maps ``[N, H, W]`` in [0, 1] from activations and gradients ``[N, C, H, W]``, computed in float32
    whatever precision the model ran in."""
    from convlens import scaled_to_unit

    alpha = gradients.float().mean(dim=(2, 3), keepdim=True)
    return scaled_to_unit((alpha * activations.float()).sum(dim=1).clamp_min(0))
