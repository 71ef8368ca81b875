"""Grad-CAM++ plugin for convlens (Chattopadhay et al. 2018, "Grad-CAM++: Generalized Gradient-Based Visual
Explanations for Deep Convolutional Networks", WACV 2018).

This module is what the ``convlens`` entry point loads: it only declares the parameters and registers a
visualizer and an activation filter, both under the name ``gradcam++``. It must not import torch, so that
``convlens list`` and ``--help`` stay fast; the implementation lives in :mod:`convlens_gradcam_pp.methods` and
is imported by the registry only when one of the two is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from convlens import AttributionParams, FilterSpec, Params, VisualizerSpec, hookimpl, param

__version__ = "0.1.0"

NAME = "gradcam++"
ALIASES = ("gradcam-pp", "grad-cam++", "gradcampp")


@dataclass(frozen=True)
class GradCAMPlusPlusVisualizerParams(AttributionParams):
    """The shared attribution parameters (class_index, max_images, batch_size, alpha, map_layer); Grad-CAM++ adds
    none."""


@dataclass(frozen=True)
class GradCAMPlusPlusFilterParams(Params):
    class_index: Optional[int] = param(
        None, help="explain this class for every image (default: the label, or the predicted class)", min=0
    )


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name=NAME,
            factory="convlens_gradcam_pp.methods:GradCAMPlusPlusVisualizer",
            params=GradCAMPlusPlusVisualizerParams,
            summary="Grad-CAM++ heat maps for the predicted (or a chosen) class, or for an SAE latent, at any conv "
            "layer (Chattopadhay et al. 2018)",
            aliases=ALIASES,
        )
    )


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name=NAME,
            factory="convlens_gradcam_pp.methods:GradCAMPlusPlusFilter",
            params=GradCAMPlusPlusFilterParams,
            summary="Grad-CAM++ map of the true (or predicted) class at the layer (Chattopadhay et al. 2018)",
            aliases=ALIASES,
        )
    )
