"""convlens: a plugin-based toolkit for mechanistic interpretability of convolutional networks."""

from __future__ import annotations

__version__ = "0.1.0"

from . import registry
from .core.contracts import ActivationFilter, FilterContext, ModelBundle, Visualizer, VisualTarget
from .core.errors import (
    AmbiguousComponentError,
    ContractError,
    ConvlensError,
    ParameterError,
    PluginLoadError,
    UnknownComponentError,
)
from .core.hookspecs import hookimpl
from .core.params import Params, param
from .core.registry import Component, FilterSpec, ModelSpec, SAESpec, VisualizerSpec

__all__ = [
    "__version__",
    "registry",
    "hookimpl",
    "Params",
    "param",
    "ModelSpec",
    "FilterSpec",
    "SAESpec",
    "VisualizerSpec",
    "Component",
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
]
