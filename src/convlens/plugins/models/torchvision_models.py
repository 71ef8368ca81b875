"""Any torchvision classification architecture, with torchvision weights or a local checkpoint; and the paper's
modified ResNet18 (001, sec. 5.1 and 6.1: average pooling and LeakyReLU, weights carried over)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from convlens import ConvlensError, ModelSpec, Params, did_you_mean, hookimpl, param

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PARTIAL_WEIGHTS_HELP = (
    "load the tensors of a local checkpoint whose names and shapes match and warn listing the missing and "
    "unexpected keys (e.g. a features-only checkpoint); shape mismatches are still refused"
)
_WEIGHTS_HELP = (
    "'none' (random init), a torchvision weights name such as IMAGENET1K_V1 or DEFAULT (read from "
    "torchvision's cache), or a local checkpoint (.safetensors, or .pt read with weights_only=True)"
)


@dataclass(frozen=True)
class TorchvisionParams(Params):
    arch: str = param("resnet18", help="torchvision architecture name, e.g. resnet18, vgg11, alexnet, googlenet")
    weights: str = param("none", help=_WEIGHTS_HELP)
    num_classes: Optional[int] = param(None, help="replace the classifier head with this many classes", min=1)
    smooth: bool = param(False, help="max pooling -> average pooling, ReLU -> LeakyReLU (paper sec. 5.1)")
    slope: float = param(0.01, help="LeakyReLU negative slope when smooth", min=0.0, max=1.0)
    input_size: int = param(224, help="square input size in pixels", min=8)
    seed: int = param(0, help="seed for randomly initialised weights")
    partial_weights: bool = param(False, help=PARTIAL_WEIGHTS_HELP)


def torchvision_state_dict(arch: str, name: str):
    """torchvision's weights ``name`` for ``arch`` from its cache (or a download when online)."""
    import torch
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise ConvlensError(f"unknown torchvision architecture '{arch}'") from None
    try:
        weights = enum.DEFAULT if name.upper() == "DEFAULT" else enum[name]
    except KeyError:
        valid = ", ".join(w.name for w in enum)
        raise ConvlensError(f"{arch} has no torchvision weights '{name}' (valid: {valid}, DEFAULT)") from None
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    if not os.path.exists(cache):
        try:
            torch.hub.download_url_to_file(weights.url, cache, progress=False)
        except Exception:
            raise ConvlensError(
                f"weights {arch} {weights.name} are not cached and could not be downloaded; expected the file "
                f"{cache} (set TORCH_HOME to use another cache), or pass a local checkpoint with weights=PATH"
            ) from None
    from convlens import load_state_dict

    return load_state_dict(cache), weights


def build_torchvision(params: TorchvisionParams):
    import torch
    import torchvision
    from torch import nn

    from convlens import ModelBundle, class_names_of, is_checkpoint_path, load_weights

    architectures = torchvision.models.list_models(module=torchvision.models)
    if params.arch not in architectures:
        raise ConvlensError(
            f"unknown torchvision classification architecture '{params.arch}'{did_you_mean(params.arch, architectures)}"
        )
    extra = {"aux_logits": False, "init_weights": True} if params.arch in ("googlenet", "inception_v3") else {}
    torch.manual_seed(params.seed)
    local = params.weights.lower() != "none" and is_checkpoint_path(params.weights)
    classes = {"num_classes": params.num_classes} if params.num_classes and local else {}
    module = torchvision.models.get_model(params.arch, weights=None, **extra, **classes)
    if local:
        load_weights(module, params.weights, partial=params.partial_weights, num_classes_param="num_classes")
    elif params.weights.lower() != "none":
        state, _ = torchvision_state_dict(params.arch, params.weights)
        state = {k: v for k, v in state.items() if not k.startswith("aux")} if extra else state
        module.load_state_dict(state)
    if params.num_classes and not local:
        replace_head(module, params.num_classes)
    if params.smooth:
        from convlens import smooth_network

        smooth_network(module, params.slope)
    convs = [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    default_layer = "layer4" if hasattr(module, "layer4") else convs[-1]
    class_names = class_names_of(params.weights) if local else None
    return ModelBundle(
        module.eval(),
        (params.input_size,) * 2,
        IMAGENET_MEAN,
        IMAGENET_STD,
        default_layer,
        class_names=class_names,
        crop_fraction=0.875,
    )


def replace_head(module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` for a new one with ``num_classes`` outputs."""
    from torch import nn

    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConvlensError("cannot set num_classes: the model has no nn.Linear classifier")
    name, last = linears[-1]
    parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))


@dataclass(frozen=True)
class SmoothResnetParams(Params):
    weights: str = param("none", help=_WEIGHTS_HELP)
    slope: float = param(0.01, help="LeakyReLU negative slope", min=0.0, max=1.0)
    num_classes: Optional[int] = param(None, help="replace the classifier head with this many classes", min=1)
    input_size: int = param(224, help="square input size in pixels", min=8)
    seed: int = param(0, help="seed for randomly initialised weights")
    partial_weights: bool = param(False, help=PARTIAL_WEIGHTS_HELP)


def build_smooth_resnet18(params: SmoothResnetParams):
    return build_torchvision(
        TorchvisionParams(
            arch="resnet18",
            smooth=True,
            **{
                k: getattr(params, k)
                for k in ("weights", "slope", "num_classes", "input_size", "seed", "partial_weights")
            },
        )
    )


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="torchvision",
            factory="convlens.plugins.models.torchvision_models:build_torchvision",
            params=TorchvisionParams,
            summary="any torchvision classification architecture, torchvision weights or a local checkpoint",
            aliases=("tv",),
        )
    )
    register(
        ModelSpec(
            name="resnet18-smooth",
            factory="convlens.plugins.models.torchvision_models:build_smooth_resnet18",
            params=SmoothResnetParams,
            summary="ResNet18 with average pooling and LeakyReLU for better gradient flow (paper sec. 5.1)",
        )
    )
