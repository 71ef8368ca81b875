"""What other visualizers may use of feature visualisation (the activation grid, atlas and factorisation render
directions with it); the package's other modules are its own. Importing this module does not import torch: the
renderer's names load on first use.
"""

from __future__ import annotations

from convlens import lazy_attributes
from convlens.plugins.visualizers.feature_viz import PRESETS, FeatureVizParams
from convlens.plugins.visualizers.feature_viz.directions import (
    DirectionImageParams,
    channel_directions,
    direction_objectives,
    per_image_run,
    render_images,
)

_LAZY = {
    **dict.fromkeys(
        ("Objective", "interpolation", "parse_objective", "unit_objectives"),
        "convlens.plugins.visualizers.feature_viz.objectives",
    ),
    **dict.fromkeys(
        ("RenderSettings", "Rendered", "image_activations", "render", "to_pil"),
        "convlens.plugins.visualizers.feature_viz.render",
    ),
}

__all__ = [
    "PRESETS",
    "FeatureVizParams",
    "DirectionImageParams",
    "channel_directions",
    "direction_objectives",
    "per_image_run",
    "render_images",
    *_LAZY,
]

__getattr__ = lazy_attributes(globals(), _LAZY)
