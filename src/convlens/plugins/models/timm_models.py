"""Any timm architecture by name, with timm's own preprocessing for it, random or local weights. No model hub is
used: pretrained weights come as a local file saved where the hub is reachable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from convlens import ConvlensError, ModelSpec, Params, did_you_mean, hookimpl, param

INSTALL_HINT = 'pip install -e ".[real]" (or pip install timm)'
HUB_PREFIXES = ("hf-hub:", "hf_hub:")


@dataclass(frozen=True)
class TimmParams(Params):
    arch: str = param(
        "resnet18",
        help="timm architecture name, e.g. resnet18, efficientnet_b0, mobilenetv3_small_100; a pretrained tag "
        "such as resnet18.a1_in1k picks that tag's preprocessing",
    )
    weights: str = param(
        "none",
        help="'none' (random init) or a local checkpoint (.safetensors, or .pt read with weights_only=True); "
        "no model hub is used",
    )
    num_classes: Optional[int] = param(None, help="classifier head with this many classes (default: timm's)", min=1)
    input_size: Optional[int] = param(None, help="square input size in pixels (default: timm's for the arch)", min=8)
    seed: int = param(0, help="seed for randomly initialised weights")
    partial_weights: bool = param(
        False,
        help="load the tensors of the checkpoint whose names and shapes match and warn listing the missing and "
        "unexpected keys (e.g. a features-only checkpoint); shape mismatches are still refused",
    )


def build_timm(params: TimmParams):
    import torch

    from convlens import ModelBundle, class_names_of, load_weights

    timm = _import_timm()
    _check_arch(timm, params.arch)
    local = _local_weights(params.arch, params.weights)
    torch.manual_seed(params.seed)
    classes = {"num_classes": params.num_classes} if params.num_classes else {}
    module = timm.create_model(params.arch, pretrained=False, **classes)
    if local:
        load_weights(module, local, partial=params.partial_weights, num_classes_param="num_classes")
    config = timm.data.resolve_data_config({}, model=module)
    size = (params.input_size,) * 2 if params.input_size else tuple(config["input_size"][1:])
    return ModelBundle(
        module.eval(),
        size,
        tuple(config["mean"]),
        tuple(config["std"]),
        default_layer(module),
        class_names=class_names_of(local) if local else None,
        crop_fraction=float(config["crop_pct"]),
    )


def _import_timm():
    try:
        import timm
        import timm.data
    except ImportError:
        raise ConvlensError(f"model timm needs the timm package: {INSTALL_HINT}") from None
    return timm


def _check_arch(timm, arch: str) -> None:
    if arch.startswith(HUB_PREFIXES):
        name = arch.rpartition("/")[2]
        raise ConvlensError(
            f"arch '{arch}' names a model hub, which convlens does not use: pass arch={name} and "
            f"{_local_file_hint(name)}"
        )
    base, _, tag = arch.partition(".")
    if not timm.is_model(base):
        raise ConvlensError(f"unknown timm architecture '{base}'{did_you_mean(base, timm.list_models())}")
    tagged = timm.list_pretrained(f"{base}.*")
    if tag and arch not in tagged:
        raise ConvlensError(f"timm has no pretrained tag '{arch}'{did_you_mean(arch, tagged)}")


def _local_weights(arch: str, weights: str) -> Optional[str]:
    """The checkpoint file ``weights`` names, None for random init; anything else would need the model hub."""
    from convlens import is_checkpoint_path

    if weights.lower() == "none":
        return None
    if is_checkpoint_path(weights):
        return weights
    raise ConvlensError(
        f"model timm downloads no weights ('{weights}' for {arch}): convlens uses no model hub; pass "
        f"{_local_file_hint(arch)}"
    )


def _local_file_hint(arch: str) -> str:
    return (
        f"weights=PATH.safetensors, a file saved on a machine with internet with safetensors.torch.save_file("
        f"timm.create_model('{arch}', pretrained=True).state_dict(), '{arch}.safetensors'); or weights=none for "
        "random init"
    )


def default_layer(module) -> str:
    """The module producing the final feature map: timm's last ``feature_info`` entry, else the last Conv2d."""
    from torch import nn

    names = dict(module.named_modules())
    info = getattr(module, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and info[-1].get("module") in names:
        return info[-1]["module"]
    convs = [name for name, m in names.items() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConvlensError(f"timm model {type(module).__name__} has no Conv2d layer to analyse by default")
    return convs[-1]


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="timm",
            factory="convlens.plugins.models.timm_models:build_timm",
            params=TimmParams,
            summary="any timm architecture with timm's preprocessing for it, random init or a local checkpoint",
        )
    )
