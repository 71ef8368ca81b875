"""Integrated Gradients (Sundararajan et al. 2017, eq. 1): ``(x - x') * integral_0^1 dy/dx(x' + a (x - x')) da``,
the integral approximated by a quadrature over ``steps`` points of the straight path from the baseline ``x'`` to
the image: Gauss-Legendre by default, or a left, right, middle or trapezoid Riemann sum (captum's nodes and
weights, so the result equals captum's ``IntegratedGradients``). The attributions of an image sum to about
``y(x) - y(x')`` (completeness).

Cost: ``steps`` forward and backward passes per image, run as batches of ``internal_batch_size`` path points of
several images at once; no weight gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens import (
    BASELINES,
    InputAttribution,
    InputAttributionParams,
    VisualizerSpec,
    baseline_images,
    for_rows,
    hookimpl,
    index_chunks,
    input_gradients,
    param,
    with_classes,
)

NAME = "integrated-gradients"
METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


@dataclass(frozen=True)
class IntegratedGradientsParams(InputAttributionParams):
    steps: int = param(32, min=2, help="points of the path from the baseline to the image")
    method: str = param("gausslegendre", choices=METHODS, help="quadrature rule of the path integral")
    baseline: str = param("zero", choices=BASELINES, help="the path's start: zero (the mean colour) or black")
    internal_batch_size: int = param(64, min=1, help="path points (of all images) per forward and backward pass")


def quadrature(method: str, steps: int):
    """Nodes ``a_i`` in [0, 1] and weights ``w_i`` of the path integral (float64 lists)."""
    import numpy as np

    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * (nodes + 1)).tolist(), (0.5 * weights).tolist()
    weights = [1 / steps] * steps
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return np.linspace(0, 1, steps).tolist(), weights
    start, stop = {
        "riemann_left": (0, 1 - 1 / steps),
        "riemann_right": (1 / steps, 1),
        "riemann_middle": (1 / (2 * steps), 1 - 1 / (2 * steps)),
    }[method]
    return np.linspace(start, stop, steps).tolist(), weights


def integrated_gradients(
    model, images, layer, target, *, steps=32, method="gausslegendre", baseline="zero", internal_batch_size=64
):
    """Attributions ``[N, C, H, W]``: the path integral of the target's input gradient times ``x - x'``."""
    import torch

    target = with_classes(model, images, target.read_at(layer))
    start = baseline_images(model, images, baseline)
    nodes, weights = quadrature(method, steps)
    nodes_t = torch.tensor(nodes, dtype=images.dtype, device=images.device)
    weights_t = torch.tensor(weights, dtype=torch.float32, device=images.device)
    count = images.shape[0]
    total = torch.zeros(images.shape, dtype=torch.float32, device=images.device)
    for indices in index_chunks(count * steps, internal_batch_size, images.device):
        rows, node = indices // steps, indices % steps  # path point p: image p // steps at node p % steps
        alpha = nodes_t[node].view(-1, 1, 1, 1)
        points = start[rows] + alpha * (images[rows] - start[rows])
        gradients = input_gradients(model, points, layer, for_rows(target, rows))
        total.index_add_(0, rows, gradients.float() * weights_t[node].view(-1, 1, 1, 1))
    return (images - start).float() * total


class IntegratedGradients(InputAttribution):
    name = NAME
    cost = "steps forwards and backwards to the input per image"

    def __init__(self, params: IntegratedGradientsParams | None = None):
        super().__init__(params or IntegratedGradientsParams())

    def input_attribution(self, model, images, layer, target):
        p = self.params
        return integrated_gradients(
            model,
            images,
            layer,
            target,
            steps=p.steps,
            method=p.method,
            baseline=p.baseline,
            internal_batch_size=p.internal_batch_size,
        )


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory=IntegratedGradients,
            params=IntegratedGradientsParams,
            summary="Integrated Gradients: input gradients integrated along the path from a baseline, times the "
            "input's difference from it (Sundararajan et al. 2017)",
            aliases=("ig", "integrated-gradient"),
        )
    )
