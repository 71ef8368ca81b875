"""What a model, a filter and a visualizer object must provide (the SAE base is :class:`convlens.SparseAutoencoder`,
in the sae stage).

This module imports no torch at load time, so plugin modules can subclass these bases and still be listed
without importing torch.
"""

from __future__ import annotations

import abc
import dataclasses
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from convlens.core.errors import ContractError
from convlens.core.params import Params, param

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclasses.dataclass
class ModelBundle:
    """A network plus everything needed to feed it images."""

    module: nn.Module
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_layer: str
    class_names: tuple[str, ...] | None = None
    crop_fraction: float = 1.0  # eval transform: resize the shorter side to size / crop_fraction, crop the centre

    def named_layers(self) -> dict[str, nn.Module]:
        """Every named sub-module, by its dotted name."""
        return {name: module for name, module in self.module.named_modules() if name}


@dataclasses.dataclass
class FilterContext:
    """What a filter may need beyond the activations. Every field is optional."""

    model: ModelBundle | None = None
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    layer: str | None = None
    gradients: torch.Tensor | None = None  # d target / d activations, when the filter needs_gradients


class ActivationFilter(abc.ABC):
    """Maps activations ``A[N, C, H, W]`` to non-negative patch weights ``W[N, H, W]``.

    Subclasses implement :meth:`weights`; calling the filter checks the input and the output shape and
    sign, so a broken third-party filter fails with its name rather than corrupting a sampling run.
    """

    name: str = "filter"
    #: A filter that needs the gradient of a target with respect to the activations sets this and implements
    #: :meth:`gradient_target`; the extraction pipeline then computes both in one pass and passes
    #: ``context.gradients``.
    needs_gradients: bool = False

    def __init__(self, params: Any = None):
        self.params = params

    def gradient_target(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Per image, the value whose gradient the filter needs (only when :attr:`needs_gradients`)."""
        raise ContractError(f"filter '{self.name}' sets needs_gradients but does not define gradient_target")

    @abc.abstractmethod
    def weights(self, activations: torch.Tensor, context: FilterContext) -> torch.Tensor:
        """Patch weights ``W[N, H, W]`` for activations ``A[N, C, H, W]``."""

    def __call__(self, activations: torch.Tensor, context: FilterContext | None = None) -> torch.Tensor:
        if activations.ndim != 4:
            raise ContractError(
                f"filter '{self.name}' expects activations of shape [N, C, H, W], got {tuple(activations.shape)}"
            )
        result = self.weights(activations, context or FilterContext())
        expected = (activations.shape[0], activations.shape[2], activations.shape[3])
        if tuple(result.shape) != expected:
            raise ContractError(
                f"filter '{self.name}' returned weights of shape {tuple(result.shape)}, expected {expected}"
            )
        if bool((result < 0).any()):
            raise ContractError(f"filter '{self.name}' returned negative weights")
        return result


@dataclasses.dataclass
class VisualTarget:
    """What a visualizer looks at: units of one layer of a model, optionally through an SAE, and images.

    ``data`` is an image file or folder, or a list of image files (see :func:`convlens.images_at`); visualizers
    that read images set :attr:`Visualizer.needs_data`.
    """

    model: ModelBundle
    layer: str
    units: tuple[int, ...] = ()
    sae: Any = None
    data: str | Path | Sequence[str | Path] | None = None
    #: The compute precision (``--dtype``): "float32", or "bfloat16" / "float16" run under
    #: :func:`convlens.autocast`; results are written in float32 either way.
    dtype: str = "float32"


class Visualizer(abc.ABC):
    """Writes PNG images and a JSON record about a :class:`VisualTarget` into a folder."""

    name: str = "visualizer"
    #: Set when :meth:`run` reads images from ``target.data``; the CLI then requires ``--data``
    #: (:class:`convlens.ImageVisualizer` sets it and adds the image batching).
    needs_data: bool = False
    #: Set when the visualizer explains one unit at a time on images it is given (an attribution map); the
    #: workflow then runs it once per top unit, on that unit's own top images.
    explains_units_on_images: bool = False
    #: Parameters that take the output folder of another visualizer, by that visualizer's registry name; the
    #: workflow fills each one it was not given with that visualizer's folder in the same run, when it ran first.
    reads_outputs_of: Mapping[str, str] = types.MappingProxyType({})

    def __init__(self, params: Any = None):
        self.params = params
        #: ``None``: a progress bar when the output is a terminal; ``False``: never (set by the CLI for --json).
        self.progress: bool | None = None

    @abc.abstractmethod
    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        """Write the artifacts into ``out_dir`` and return the JSON record that was written.

        A record may carry a one-line ``"summary"``, which ``convlens visualize`` prints at the end.
        """


@dataclasses.dataclass(frozen=True)
class SAEParams(Params):
    """Dimensions every SAE plugin's parameters start with; plugins subclass this and add their own."""

    input_dim: int = param(512, min=1, help="channels of the activations (the trainer sets it from the store)")
    latent_dim: Optional[int] = param(None, min=1, help="latent dimension (default: expansion x input_dim)")
    expansion: float = param(
        8.0,
        min=0.001,
        help="latent dimension as a multiple of input_dim, when latent_dim "
        "is not given (x8 in the paper's runs, sec. 8.3)",
    )
    seed: int = param(0, help="seed of the random initialisation")

    @property
    def latents(self) -> int:
        return self.latent_dim if self.latent_dim is not None else max(1, round(self.expansion * self.input_dim))
