"""A small CNN that trains in seconds on CPU (the paper's own-CNN baseline, 001 sec. 6.2); used by demo and tests."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import ModelSpec, Params, hookimpl, param


@dataclass(frozen=True)
class TinyCNNParams(Params):
    num_classes: int = param(8, help="number of classes (shapes has 8)", min=1)
    width: int = param(16, help="channels of the first block; each block doubles them", min=1)
    blocks: int = param(5, help="conv blocks; all but the last halve the resolution", min=1, max=8)
    input_size: int = param(64, help="square input size in pixels", min=8)
    smooth: bool = param(False, help="average pooling and LeakyReLU instead of max pooling and ReLU")
    slope: float = param(0.01, help="LeakyReLU negative slope when smooth", min=0.0, max=1.0)
    weights: str = param("none", help="'none' or a local checkpoint (.safetensors or .pt)")
    seed: int = param(0, help="seed for the random initialisation")


def build_tiny_cnn(params: TinyCNNParams):
    from collections import OrderedDict

    import torch
    from torch import nn

    from convlens import ModelBundle, class_names_of, load_weights

    torch.manual_seed(params.seed)
    layers: dict[str, nn.Module] = {}
    channels_in = 3
    for index in range(params.blocks):
        channels = params.width * 2**index
        layers[f"block{index + 1}"] = nn.Sequential(
            nn.Conv2d(channels_in, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2) if index < params.blocks - 1 else nn.Identity(),
        )
        channels_in = channels
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels_in, params.num_classes)
    module = nn.Sequential(OrderedDict(layers))
    if params.smooth:
        from convlens import smooth_network

        smooth_network(module, params.slope)
    class_names = None
    if params.weights.lower() != "none":
        load_weights(module, params.weights, num_classes_param="num_classes")
        class_names = class_names_of(params.weights)
    return ModelBundle(
        module.eval(),
        (params.input_size,) * 2,
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
        f"block{params.blocks}",
        class_names=class_names,
    )


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="tiny-cnn",
            factory="convlens.plugins.models.tiny_cnn:build_tiny_cnn",
            params=TinyCNNParams,
            summary="small CNN that trains in seconds on CPU (paper sec. 6.2 baseline); demo and tests",
        )
    )
