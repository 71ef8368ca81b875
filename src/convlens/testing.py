"""Test helpers for plugin authors; an opt-in pytest plugin.

Enable it in a ``conftest.py`` with ``pytest_plugins = ["convlens.testing"]``. It provides:

- the fixture ``convlens_registry``: a fresh registry (built-ins plus installed plugins), made the
  process-wide default for the test and discarded afterwards;
- the fixture ``register_plugin``: ``register_plugin(obj)`` adds a plugin object (a module, class or instance
  with ``@convlens.hookimpl`` functions) to that registry for one test;
- :func:`check_component`: creates a component with its default parameters and checks what it returns
  against the contract of its kind.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import convlens.core.component_registry as _registry_module
from convlens.core.component_registry import Registry, default_registry, normalize_kind, set_default_registry
from convlens.core.contracts import ActivationFilter, FilterContext, ModelBundle, Visualizer, VisualTarget
from convlens.core.errors import ContractError


@pytest.fixture
def convlens_registry() -> Iterator[Registry]:
    previous = _registry_module._default
    registry = Registry()
    set_default_registry(registry)
    try:
        yield registry
    finally:
        set_default_registry(previous)


@pytest.fixture
def register_plugin(convlens_registry: Registry):
    added: list[Any] = []

    def register(plugin: Any, dist: str = "test-plugin") -> Registry:
        convlens_registry.add_plugin(plugin, dist=dist)
        added.append(plugin)
        return convlens_registry

    yield register
    for plugin in added:
        convlens_registry.remove_plugin(plugin)


def check_component(kind: str, name: str, registry: Registry | None = None, **params: Any) -> Any:
    """Create ``name`` (default parameters, or ``params``) and check its output; returns the object.

    Raises :class:`~convlens.core.errors.ContractError` describing the first broken promise.
    """
    registry = registry or default_registry()
    kind = normalize_kind(kind)
    obj = registry.create(kind, name, **params)
    checks = {"model": _check_model, "filter": _check_filter, "sae": _check_sae, "visualizer": _check_visualizer}
    checks[kind](name, obj)
    return obj


def _check_filter(name: str, obj: Any) -> None:
    import torch

    if not isinstance(obj, ActivationFilter):
        raise ContractError(f"filter '{name}' must be an ActivationFilter, got {type(obj).__name__}")
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(3, 16, 5, 6, generator=generator)

    def context(rows: slice) -> FilterContext:
        return FilterContext()

    if obj.needs_gradients:  # a gradient filter gets a small model, its images and the layer, as extraction gives
        from convlens.models.layers import activations_at

        bundle = _small_model()
        images = torch.randn(3, 3, *bundle.input_size, generator=generator)
        activations = activations_at(bundle.module, images, bundle.default_layer).activations[bundle.default_layer]

        def context(rows: slice) -> FilterContext:
            return FilterContext(model=bundle, images=images[rows], layer=bundle.default_layer)

    weights = obj(activations, context(slice(None)))
    if not weights.is_floating_point():
        raise ContractError(f"filter '{name}' must return floating-point weights, got {weights.dtype}")
    if not torch.equal(weights, obj(activations, context(slice(None)))):
        raise ContractError(f"filter '{name}' is not deterministic")
    one_by_one = torch.cat([obj(activations[i : i + 1], context(slice(i, i + 1))) for i in range(3)])
    scale = float(weights.nan_to_num().abs().max()) or 1.0  # float rounding differs between batch sizes
    if not torch.allclose(weights, one_by_one, rtol=1e-5, atol=1e-5 * scale, equal_nan=True):
        raise ContractError(f"filter '{name}' gives an image different weights depending on its batch")


def _check_model(name: str, obj: Any) -> None:
    import torch

    if not isinstance(obj, ModelBundle):
        raise ContractError(f"model '{name}' must be a ModelBundle, got {type(obj).__name__}")
    if obj.default_layer not in obj.named_layers():
        raise ContractError(f"model '{name}': default layer '{obj.default_layer}' is not a named module")
    with torch.no_grad():
        logits = obj.module.eval()(torch.zeros(2, 3, *obj.input_size))
    if logits.ndim != 2 or logits.shape[0] != 2:
        raise ContractError(f"model '{name}' must return logits [N, classes], got {tuple(logits.shape)}")


def _check_sae(name: str, obj: Any) -> None:
    import torch

    from convlens.sae.base import SparseAutoencoder

    if not isinstance(obj, SparseAutoencoder):
        raise ContractError(f"sae '{name}' must subclass SparseAutoencoder, got {type(obj).__name__}")
    x = torch.randn(4, obj.input_dim, 3, 3, generator=torch.Generator().manual_seed(0))
    output = obj(x)
    if output.reconstruction.shape != x.shape:
        raise ContractError(
            f"sae '{name}': reconstruction {tuple(output.reconstruction.shape)} != input {tuple(x.shape)}"
        )
    if output.latents.shape != (4, obj.latent_dim, 3, 3):
        raise ContractError(f"sae '{name}': latents have shape {tuple(output.latents.shape)}")
    loss = output.loss
    if loss.ndim != 0 or not bool(torch.isfinite(loss)):
        raise ContractError(f"sae '{name}': loss must be a finite scalar, got {loss}")
    loss.backward()


def _small_model() -> ModelBundle:
    """Two conv layers and a classifier of 4 classes on 32 px images; layer "2" is the second conv."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        ).eval()
    return ModelBundle(module, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), default_layer="2")


def _check_visualizer(name: str, obj: Any) -> None:
    import numpy as np
    from PIL import Image

    if not isinstance(obj, Visualizer):
        raise ContractError(f"visualizer '{name}' must be a Visualizer, got {type(obj).__name__}")
    bundle = _small_model()
    with tempfile.TemporaryDirectory() as folder:
        images, out = Path(folder) / "images", Path(folder) / "out"
        images.mkdir()
        out.mkdir()
        noise = np.random.default_rng(0).integers(0, 256, size=(2, 40, 48, 3), dtype=np.uint8)
        for number, pixels in enumerate(noise):
            Image.fromarray(pixels, "RGB").save(images / f"image{number}.png")
        record = obj.run(VisualTarget(bundle, "2", units=(0, 1), data=images), out)
        json.dumps(record)
        pictures = list(out.rglob("*.png"))
        if not pictures or not list(out.rglob("*.json")):
            raise ContractError(f"visualizer '{name}' must write PNG images and a JSON record")
        for picture in pictures:
            with Image.open(picture) as image:
                image.verify()
