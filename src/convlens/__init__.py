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
from convlens.core.component_registry import Component, FilterSpec, MetricSpec, ModelSpec, SAESpec, VisualizerSpec
from convlens.core.contracts import (
    ActivationFilter,
    AttributionMetric,
    FilterContext,
    MetricCase,
    ModelBundle,
    Outputs,
    SAEParams,
    Visualization,
    Visualizer,
    VisualTarget,
    capture_outputs,
)
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
from convlens.core.loader import lazy_attributes
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
            "enlarge",
            "grid",
            "heat_colours",
            "heat_overlay",
            "heatmap",
            "side_by_side",
            "titled",
        ),
        "convlens.drawing.charts",
    ),
    **dict.fromkeys(
        ("BarPanel", "LinePanel", "bar_chart", "chart_image", "line_chart", "save_chart"), "convlens.drawing.plots"
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
            "UnwrappedCheckpointWarning",
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
    # activations: the store reader, filter comparison
    "ActivationStore": "convlens.activations.store",
    **dict.fromkeys(("ComparisonSettings", "compare_filters"), "convlens.activations.filter_comparison"),
    # SAEs
    **dict.fromkeys(
        (
            "SAEOutput",
            "SparseAutoencoder",
            "SparseLatents",
            "data_directions",
            "load_sae",
            "save_sae",
            "squared_error",
            "unit_rows",
        ),
        "convlens.sae.base",
    ),
    "evaluate_splice": "convlens.sae.evaluation",
    # attribution
    **dict.fromkeys(
        (
            "AttributionParams",
            "AttributionVisualizer",
            "ExplainTarget",
            "GradientCAMVisualizer",
            "GradientMapFilter",
            "GradientMapFilterParams",
            "scaled_to_unit",
            "target_gradients",
        ),
        "convlens.attribution.base",
    ),
    **dict.fromkeys(
        (
            "BASELINES",
            "InputAttribution",
            "baseline_images",
            "InputAttributionParams",
            "REDUCTIONS",
            "guided_input_gradients",
            "guided_relus",
            "input_gradients",
            "reduce_channels",
        ),
        "convlens.attribution.input_maps",
    ),
    **dict.fromkeys(
        (
            "PerturbationAttribution",
            "Scorer",
            "chunked_scores",
            "for_rows",
            "index_chunks",
            "shared_scorer",
            "target_scorer",
            "with_classes",
        ),
        "convlens.attribution.scores",
    ),
    **dict.fromkeys(
        ("CascadeResult", "cascading_randomisation", "independent_randomisation"), "convlens.attribution.sanity_checks"
    ),
    **dict.fromkeys(
        (
            "deletion_insertion",
            "mask_energy",
            "maps_at_input",
            "mean_interval",
            "relevance_rank_accuracy",
            "road",
        ),
        "convlens.attribution.metrics",
    ),
    "explained_predictions": "convlens.attribution.predictions",
    "input_peaks": "convlens.attribution.base",
    "rowwise_spearman": "convlens.runtime.rank_statistics",
    # units
    **dict.fromkeys(("chosen_units", "layer_maps"), "convlens.units.maps"),
    "unit_statistics": "convlens.units.statistics",
    # report: a run folder as records
    "read_run": "convlens.report.reader",
    "RunFolder": "convlens.report.run_folder",
    # workflow: a visualizer run from names, results in memory
    **dict.fromkeys(("visual_target", "visualize"), "convlens.workflow.visualizing"),
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
    "MetricSpec",
    "SAEParams",
    "ModelBundle",
    "ActivationFilter",
    "FilterContext",
    "AttributionMetric",
    "MetricCase",
    "Visualizer",
    "VisualTarget",
    "Visualization",
    "Outputs",
    "capture_outputs",
    "ConvlensError",
    "UnknownComponentError",
    "AmbiguousComponentError",
    "ParameterError",
    "PluginLoadError",
    "ContractError",
    "did_you_mean",
    "lazy_attributes",
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
    from convlens.activations.filter_comparison import ComparisonSettings, compare_filters
    from convlens.activations.store import ActivationStore
    from convlens.attribution.base import (
        AttributionParams,
        AttributionVisualizer,
        ExplainTarget,
        GradientCAMVisualizer,
        GradientMapFilter,
        GradientMapFilterParams,
        input_peaks,
        scaled_to_unit,
        target_gradients,
    )
    from convlens.attribution.input_maps import (
        BASELINES,
        REDUCTIONS,
        InputAttribution,
        InputAttributionParams,
        baseline_images,
        guided_input_gradients,
        guided_relus,
        input_gradients,
        reduce_channels,
    )
    from convlens.attribution.metrics import (
        deletion_insertion,
        maps_at_input,
        mask_energy,
        mean_interval,
        relevance_rank_accuracy,
        road,
    )
    from convlens.attribution.predictions import explained_predictions
    from convlens.attribution.sanity_checks import CascadeResult, cascading_randomisation, independent_randomisation
    from convlens.attribution.scores import (
        PerturbationAttribution,
        Scorer,
        chunked_scores,
        for_rows,
        index_chunks,
        shared_scorer,
        target_scorer,
        with_classes,
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
        enlarge,
        grid,
        heat_colours,
        heat_overlay,
        heatmap,
        side_by_side,
        titled,
    )
    from convlens.drawing.plots import BarPanel, LinePanel, bar_chart, chart_image, line_chart, save_chart
    from convlens.drawing.tiles import TILE_GAP, labelled_grid, shifted, tile_size, titled_to_fit
    from convlens.models.checkpoints import (
        STATE_DICT_SUFFIXES,
        PartialWeightsWarning,
        UnwrappedCheckpointWarning,
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
    from convlens.report.reader import read_run
    from convlens.report.run_folder import RunFolder
    from convlens.runtime.device import resolve_device
    from convlens.runtime.precision import COMPUTE_DTYPES, autocast, channels_last
    from convlens.runtime.rank_statistics import rowwise_spearman
    from convlens.runtime.run_records import write_json_atomic
    from convlens.runtime.seeding import derive_seed, torch_generator
    from convlens.runtime.tensor_files import save_tensors_atomic
    from convlens.sae.base import (
        SAEOutput,
        SparseAutoencoder,
        SparseLatents,
        data_directions,
        load_sae,
        save_sae,
        squared_error,
        unit_rows,
    )
    from convlens.sae.evaluation import evaluate_splice
    from convlens.units.maps import chosen_units, layer_maps
    from convlens.units.statistics import unit_statistics
    from convlens.workflow.visualizing import visual_target, visualize
