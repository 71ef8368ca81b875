"""convlens: a plugin-based toolkit for mechanistic interpretability of convolutional networks."""

from __future__ import annotations

__version__ = "0.1.0"

from . import registry
from .core.contracts import ActivationFilter, FilterContext, ModelBundle, SAEParams, Visualizer, VisualTarget
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
    "SAEParams",
    "load_sae",
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


def load_sae(path, *, input_dim=None, device=None):
    """Rebuild the SAE saved at ``path`` (see :func:`convlens.core.sae.load_sae`)."""
    from .core.sae import load_sae as load

    return load(path, input_dim=input_dim, device=device)
