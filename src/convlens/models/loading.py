"""A model named by a plugin or by a ``train-model`` run folder, built through the registry, and its run record."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from convlens.core.component_registry import default_registry
from convlens.core.errors import ConvlensError
from convlens.core.params import coerce, parameter_specs


def resolve_model_argument(value: str | Path, *, trust_code: bool = False) -> tuple[str, dict[str, Any]]:
    """A model plugin name, or a `train-model` run folder (its model with the trained weights).

    A run folder is data: one whose model runs code named by its parameters (the `python` model's file) is
    refused unless ``trust_code`` says the caller vouches for that code.
    """
    run = Path(value)
    if run.is_dir():
        config_file, weights = run / "config.json", run / "model.safetensors"
        if not (config_file.is_file() and weights.is_file()):
            raise ConvlensError(f"{run} is not a finished train-model run (needs config.json and model.safetensors)")
        model = _recorded_model(config_file)
        params = dict(model.get("params", {}))
        component = default_registry().get("model", model["name"])
        fields = {spec.name for spec in parameter_specs(component.spec.params)}
        params["checkpoint" if "checkpoint" in fields and "weights" not in fields else "weights"] = str(weights)
        if component.spec.runs_code and not trust_code:
            raise ConvlensError(_untrusted_code_message(run, component.name, params))
        return model["name"], params
    return str(value), {}


def _recorded_model(config_file: Path) -> dict[str, Any]:
    try:
        model = json.loads(config_file.read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConvlensError(f"cannot read the model record of {config_file}: {type(exc).__name__}: {exc}") from None
    if not (
        isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("params", {}), dict)
    ):
        raise ConvlensError(f'{config_file}: \'model\' must be {{"name": ..., "params": {{...}}}}')
    return model


def _untrusted_code_message(run: Path, name: str, params: dict[str, Any]) -> str:
    options = " ".join(
        f"--model-{key.replace('_', '-')} "
        + shlex.quote(",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
        for key, value in params.items()
    )
    return (
        f"{run} records the model '{name}', which runs Python code named in {run / 'config.json'}; a run folder "
        f"is data, so convlens does not run code from it. If you trust that code, name it yourself: "
        f"--model {name} {options} (in Python: load_model({str(run)!r}, trust_code=True); in a recipe: "
        f'[model] name = "{name}" with these params)'
    )


def load_model(
    model_argument: str | Path, params: dict[str, Any] | None = None, *, trust_code: bool = False
) -> tuple[Any, dict[str, Any]]:
    """The model bundle for a plugin name or run folder with extra ``params``, and the record runs keep of it
    (registry name and the parameters given, typed). ``trust_code``: see :func:`resolve_model_argument`."""
    registry = default_registry()
    name, model_params = resolve_model_argument(model_argument, trust_code=trust_code)
    model_params.update(params or {})
    bundle = registry.create("model", name, **model_params)
    spec = registry.get("model", name)
    given = {key.replace("-", "_") for key in model_params}
    typed = {key: value for key, value in coerce(spec.spec.params, model_params).to_dict().items() if key in given}
    return bundle, {"name": spec.qualified_name, "params": typed}
