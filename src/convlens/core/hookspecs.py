"""The pluggy hook specifications of convlens: the whole contract between the core and a plugin.

A plugin is a module (or any object) with functions marked ``@convlens.hookimpl`` whose names match the
specs below; a distribution exposes it through an entry point in the group ``convlens``. Each
``register_<kind>s`` hook receives a ``register`` callable and calls it once per component with a spec
record (:class:`~convlens.core.component_registry.ModelSpec`, ``FilterSpec``, ``SAESpec``, ``VisualizerSpec`` or
``MetricSpec``).
A spec's ``factory`` is called as ``factory(params)`` with the validated parameter dataclass and may be a
lazy ``"module:attr"`` string, so that listing plugins and ``--help`` never import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "convlens"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_models(register: Callable[[Any], None]) -> None:
    """Register model components by calling ``register(ModelSpec(...))``.

    Contract: ``factory(params)`` returns a :class:`convlens.core.contracts.ModelBundle`: the ``nn.Module``
    (in eval mode), its preprocessing (``input_size`` as (H, W), per-channel ``mean`` and ``std``) and the
    name of its ``default_layer``, a named module of the network. The module maps a float batch
    ``[N, 3, H, W]`` to class logits ``[N, num_classes]``.
    """


@hookspec
def register_filters(register: Callable[[Any], None]) -> None:
    """Register activation filters by calling ``register(FilterSpec(...))``.

    Contract: ``factory(params)`` returns a :class:`convlens.core.contracts.ActivationFilter`. Called as
    ``filter(activations, context)``, it maps activations ``A[N, C, H, W]`` to patch weights ``W[N, H, W]``
    on the same device, non-negative where finite; NaN marks a patch that must never be sampled. The
    optional :class:`~convlens.core.contracts.FilterContext` carries the model, the preprocessed images,
    the labels and the layer name, for filters that need more than the activations (Grad-CAM).
    """


@hookspec
def register_saes(register: Callable[[Any], None]) -> None:
    """Register sparse-autoencoder architectures by calling ``register(SAESpec(...))``.

    Contract: ``factory(params)`` returns a subclass of :class:`convlens.sae.base.SparseAutoencoder`
    (an ``nn.Module``) with ``input_dim``, ``latent_dim`` and ``axis`` (1: the channel axis of ``[N, C]``
    vectors or ``[N, C, H, W]`` maps), ``encode(x) -> latents``, ``decode(latents) -> reconstruction`` and
    ``forward(x) -> SAEOutput(reconstruction, latents, losses)`` where ``losses`` maps names to scalar
    tensors whose sum is the training loss.
    """


@hookspec
def register_visualizers(register: Callable[[Any], None]) -> None:
    """Register visualizers by calling ``register(VisualizerSpec(...))``.

    Contract: ``factory(params)`` returns a :class:`convlens.core.contracts.Visualizer`;
    ``visualizer.run(target, out_dir)`` takes a :class:`~convlens.core.contracts.VisualTarget` (model
    bundle, layer, units, optionally an SAE) and writes PNG images plus a JSON record into ``out_dir``,
    returning that record as a dict.
    """


@hookspec
def register_metrics(register: Callable[[Any], None]) -> None:
    """Register attribution metrics by calling ``register(MetricSpec(...))``.

    Contract: ``factory(params)`` returns a :class:`convlens.core.contracts.AttributionMetric`. Called as
    ``metric.score(case)`` with a :class:`~convlens.core.contracts.MetricCase` (the model, the images, one
    attribution method and its maps of them, the explained classes; foreground masks and a model trained on shuffled
    labels when the data gives them), it returns one value per image ``[N]``, NaN where the image has none. It
    declares whether higher is better and whether it needs the masks or the shuffled-label model.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add subcommands to the ``convlens`` click group: ``cli.add_command(...)`` or ``@cli.command()``."""
