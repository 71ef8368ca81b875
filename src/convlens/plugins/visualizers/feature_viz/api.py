"""What other visualizers may use of feature visualisation (the activation grid, atlas and factorisation render
directions with it); the package's other modules are its own. Importing this module does not import torch: the
renderer's names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from convlens.plugins.visualizers.feature_viz import PRESETS, FeatureVizParams
from convlens.plugins.visualizers.feature_viz.directions import (
    DirectionImageParams,
    channel_directions,
    direction_objectives,
    per_image_run,
    render_images,
)

_LAZY = {
    **dict.fromkeys(("Objective", "unit_objectives"), "convlens.plugins.visualizers.feature_viz.objectives"),
    **dict.fromkeys(
        ("RenderSettings", "Rendered", "render", "to_pil"), "convlens.plugins.visualizers.feature_viz.render"
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:
    pass
