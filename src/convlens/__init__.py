"""convlens: a plugin-based toolkit for mechanistic interpretability of convolutional networks.

This module is the public API: users and plugin authors (built-in and third-party) import from here and from
:mod:`convlens.registry` and :mod:`convlens.testing`, never from the stage packages. The kernel's names (specs,
parameters, bases, errors) are imported at once and need no torch, so a plugin's registration module stays cheap
to list; everything else is imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from convlens import registry
from convlens._version import __version__
from convlens.core.component_registry import Component, FilterSpec, ModelSpec, SAESpec, VisualizerSpec
from convlens.core.contracts import ActivationFilter, FilterContext, ModelBundle, SAEParams, Visualizer, VisualTarget
from convlens.core.errors import (
    AmbiguousComponentError,
    ContractError,
    ConvlensError,
    ParameterError,
    PluginLoadError,
    UnknownComponentError,
    did_you_mean,
    suggest,
)
from convlens.core.hookspecs import hookimpl
from convlens.core.params import Params, param

# name -> the module it is defined in, by stage of the data flow (see ARCHITECTURE.md)
_LAZY: dict[str, str] = {
    # runtime: seeds, devices, atomic files
    **dict.fromkeys(("derive_seed", "torch_generator"), "convlens.runtime.seeding"),
    "resolve_device": "convlens.runtime.device",
    **dict.fromkeys(("COMPUTE_DTYPES", "autocast", "channels_last"), "convlens.runtime.precision"),
    "save_tensors_atomic": "convlens.runtime.tensor_files",
    "write_json_atomic": "convlens.runtime.run_records",
    # drawing: charts and tiles
    **dict.fromkeys(
        (
            "GRID",
            "INK",
            "PALETTE",
            "bar_chart",
            "enlarge",
            "grid",
            "heat_colours",
            "heat_overlay",
            "heatmap",
            "line_chart",
            "side_by_side",
            "titled",
        ),
        "convlens.drawing.charts",
    ),
    **dict.fromkeys(("TILE_GAP", "labelled_grid", "shifted", "tile_size", "titled_to_fit"), "convlens.drawing.tiles"),
    # data: images
    **dict.fromkeys(
        (
            "ImageIndex",
            "Preprocessing",
            "SkipLog",
            "UnreadableImageError",
            "images_at",
            "open_rgb",
            "save_png",
            "scan_images",
        ),
        "convlens.data.images",
    ),
    "ImageVisualizer": "convlens.data.image_visualizer",
    **dict.fromkeys(("ConceptSet", "load_concepts"), "convlens.data.concepts"),
    # models: layers, checkpoints, loading
    **dict.fromkeys(
        (
            "INPUT",
            "activations_at",
            "first_tensor",
            "full_precision",
            "gradients_between",
            "receptive_field",
            "resolve_layer",
        ),
        "convlens.models.layers",
    ),
    **dict.fromkeys(
        (
            "STATE_DICT_SUFFIXES",
            "PartialWeightsWarning",
            "class_names_of",
            "is_checkpoint_path",
            "load_state_dict",
            "load_weights",
            "save_weights",
        ),
        "convlens.models.checkpoints",
    ),
    "smooth_network": "convlens.models.smoothing",
    "load_model": "convlens.models.loading",
    # activations: the store reader
    "ActivationStore": "convlens.activations.store",
    # SAEs
    **dict.fromkeys(
        ("SAEOutput", "SparseAutoencoder", "SparseLatents", "load_sae", "save_sae", "squared_error", "unit_rows"),
        "convlens.sae.base",
    ),
    # attribution
    **dict.fromkeys(
        (
            "AttributionParams",
            "AttributionVisualizer",
            "ExplainTarget",
            "GradientMapFilter",
            "scaled_to_unit",
            "target_gradients",
        ),
        "convlens.attribution.base",
    ),
    # units
    **dict.fromkeys(("chosen_units", "layer_maps"), "convlens.units.maps"),
}

__all__ = [
    "__version__",
    "registry",
    "hookimpl",
    "Params",
    "param",
    "Component",
    "ModelSpec",
    "FilterSpec",
    "SAESpec",
    "VisualizerSpec",
    "SAEParams",
    "ModelBundle",
    "ActivationFilter",
    "FilterContext",
    "Visualizer",
    "VisualTarget",
    "ConvlensError",
    "UnknownComponentError",
    "AmbiguousComponentError",
    "ParameterError",
    "PluginLoadError",
    "ContractError",
    "did_you_mean",
    "suggest",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'convlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # the lazy names, for type checkers and editors
    from convlens.activations.store import ActivationStore
    from convlens.attribution.base import (
        AttributionParams,
        AttributionVisualizer,
        ExplainTarget,
        GradientMapFilter,
        scaled_to_unit,
        target_gradients,
    )
    from convlens.data.concepts import ConceptSet, load_concepts
    from convlens.data.image_visualizer import ImageVisualizer
    from convlens.data.images import (
        ImageIndex,
        Preprocessing,
        SkipLog,
        UnreadableImageError,
        images_at,
        open_rgb,
        save_png,
        scan_images,
    )
    from convlens.drawing.charts import (
        GRID,
        INK,
        PALETTE,
        bar_chart,
        enlarge,
        grid,
        heat_colours,
        heat_overlay,
        heatmap,
        line_chart,
        side_by_side,
        titled,
    )
    from convlens.drawing.tiles import TILE_GAP, labelled_grid, shifted, tile_size, titled_to_fit
    from convlens.models.checkpoints import (
        STATE_DICT_SUFFIXES,
        PartialWeightsWarning,
        class_names_of,
        is_checkpoint_path,
        load_state_dict,
        load_weights,
        save_weights,
    )
    from convlens.models.layers import (
        INPUT,
        activations_at,
        first_tensor,
        full_precision,
        gradients_between,
        receptive_field,
        resolve_layer,
    )
    from convlens.models.loading import load_model
    from convlens.models.smoothing import smooth_network
    from convlens.runtime.device import resolve_device
    from convlens.runtime.precision import COMPUTE_DTYPES, autocast, channels_last
    from convlens.runtime.run_records import write_json_atomic
    from convlens.runtime.seeding import derive_seed, torch_generator
    from convlens.runtime.tensor_files import save_tensors_atomic
    from convlens.sae.base import (
        SAEOutput,
        SparseAutoencoder,
        SparseLatents,
        load_sae,
        save_sae,
        squared_error,
        unit_rows,
    )
    from convlens.units.maps import chosen_units, layer_maps
