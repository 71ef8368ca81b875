"""Bring your own model: ``path/to/file.py:build_fn`` or ``package.module:build_fn`` returning an nn.Module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from convlens import ModelSpec, Params, hookimpl, param


@dataclass(frozen=True)
class PythonModelParams(Params):
    target: str = param("", help="'path/to/file.py:build_fn' or 'package.module:build_fn'; called with no arguments")
    checkpoint: Optional[str] = param(None, help="local weights (.safetensors, or .pt read with weights_only=True)")
    input_size: int = param(224, help="square input size in pixels", min=8)
    mean: tuple[float, float, float] = param((0.485, 0.456, 0.406), help="per-channel mean for normalisation")
    std: tuple[float, float, float] = param((0.229, 0.224, 0.225), help="per-channel std for normalisation")
    default_layer: Optional[str] = param(None, help="layer to analyse by default (default: the last Conv2d)")
    partial_weights: bool = param(
        False,
        help="load the tensors of the checkpoint whose names and shapes match and warn listing the missing and "
        "unexpected keys (e.g. a features-only checkpoint); shape mismatches are still refused",
    )


def build_python_model(params: PythonModelParams):
    import importlib
    import importlib.util
    from pathlib import Path

    from torch import nn

    from convlens import ConvlensError, ModelBundle, class_names_of, load_weights, resolve_layer

    location, _, attr = params.target.rpartition(":")
    if not location or not attr:
        raise ConvlensError("model 'python' needs target='path/to/file.py:build_fn' or 'package.module:build_fn'")
    try:
        if location.endswith(".py"):
            path = Path(location).expanduser()
            if not path.is_file():
                looked = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
                raise ConvlensError(f"model file not found: {path}{looked}")
            spec = importlib.util.spec_from_file_location(f"convlens_user_model_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(location)
        build = getattr(module, attr)
    except ConvlensError:
        raise
    except Exception as exc:
        raise ConvlensError(f"cannot load model builder '{params.target}': {type(exc).__name__}: {exc}") from None
    built = build()
    if isinstance(built, ModelBundle):
        bundle = built
    elif isinstance(built, nn.Module):
        convs = [name for name, m in built.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs and params.default_layer is None:
            raise ConvlensError(f"{params.target} has no Conv2d layer; pass default_layer")
        bundle = ModelBundle(
            built, (params.input_size,) * 2, params.mean, params.std, params.default_layer or convs[-1]
        )
    else:
        raise ConvlensError(f"{params.target} returned {type(built).__name__}, expected an nn.Module")
    if params.default_layer:
        resolve_layer(bundle.module, params.default_layer, params.target)
        bundle.default_layer = params.default_layer
    if params.checkpoint:
        load_weights(bundle.module, params.checkpoint, partial=params.partial_weights)
        bundle.class_names = class_names_of(params.checkpoint) or bundle.class_names
    bundle.module.eval()
    return bundle


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="python",
            factory="convlens.plugins.models.python_model:build_python_model",
            params=PythonModelParams,
            summary="your own model from a Python builder function, with optional checkpoint and preprocessing",
            aliases=("custom",),
            runs_code=True,
        )
    )
