"""A model named by a plugin or by a ``train-model`` run folder, built through the registry, and its run record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convlens.core.component_registry import default_registry
from convlens.core.errors import ConvlensError
from convlens.core.params import coerce, parameter_specs


def resolve_model_argument(value: str | Path) -> tuple[str, dict[str, Any]]:
    """A model plugin name, or a `train-model` run folder (its model with the trained weights)."""
    run = Path(value)
    if run.is_dir():
        config_file, weights = run / "config.json", run / "model.safetensors"
        if not (config_file.is_file() and weights.is_file()):
            raise ConvlensError(f"{run} is not a finished train-model run (needs config.json and model.safetensors)")
        model = json.loads(config_file.read_text())["model"]
        params = dict(model.get("params", {}))
        fields = {spec.name for spec in parameter_specs(default_registry().get("model", model["name"]).spec.params)}
        params["checkpoint" if "checkpoint" in fields and "weights" not in fields else "weights"] = str(weights)
        return model["name"], params
    return str(value), {}


def load_model(model_argument: str | Path, params: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The model bundle for a plugin name or run folder with extra ``params``, and the record runs keep of it
    (registry name and the parameters given, typed)."""
    registry = default_registry()
    name, model_params = resolve_model_argument(model_argument)
    model_params.update(params or {})
    bundle = registry.create("model", name, **model_params)
    spec = registry.get("model", name)
    given = {key.replace("-", "_") for key in model_params}
    typed = {key: value for key, value in coerce(spec.spec.params, model_params).to_dict().items() if key in given}
    return bundle, {"name": spec.qualified_name, "params": typed}
