"""The paper's modified ResNet18 (001, sec. 5.1 and 6.1): average pooling and LeakyReLU, weights carried over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from convlens import ModelSpec, Params, hookimpl, param

from .torchvision_models import _WEIGHTS_HELP


@dataclass(frozen=True)
class SmoothResnetParams(Params):
    weights: str = param("none", help=_WEIGHTS_HELP)
    slope: float = param(0.01, help="LeakyReLU negative slope", min=0.0, max=1.0)
    num_classes: Optional[int] = param(None, help="replace the classifier head with this many classes", min=1)
    input_size: int = param(224, help="square input size in pixels", min=8)
    seed: int = param(0, help="seed for randomly initialised weights")


def build_smooth_resnet18(params: SmoothResnetParams):
    from .torchvision_models import TorchvisionParams, build_torchvision

    return build_torchvision(
        TorchvisionParams(arch="resnet18", smooth=True, **{k: getattr(params, k) for k in
                          ("weights", "slope", "num_classes", "input_size", "seed")})
    )


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="resnet18-smooth",
            factory="convlens.plugins.models.resnet18_smooth:build_smooth_resnet18",
            params=SmoothResnetParams,
            summary="ResNet18 with average pooling and LeakyReLU for better gradient flow (paper sec. 5.1)",
        )
    )
