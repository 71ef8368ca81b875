"""Whether an SAE checkpoint is used on the model and layer it was trained on (its metadata records both).

An SAE of the right width fits any layer of that width, so a mix-up would otherwise pass silently.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from convlens.core.errors import ConvlensError


class SAETargetWarning(UserWarning):
    """An SAE used, with --force, on another model or layer than the one it was trained on."""


def check_sae_target(path: str | Path, model_record: dict[str, Any], layer: str, *, force: bool = False) -> None:
    """Refuse the SAE at ``path`` on another model or layer than its metadata records (a warning with ``force``)."""
    from convlens.sae.base import read_sae_metadata

    differences = sae_target_differences(read_sae_metadata(path), model_record, layer)
    if not differences:
        return
    message = f"the SAE {path} was trained on {' and on '.join(differences)}"
    if not force:
        raise ConvlensError(f"{message}; pass --force to use it anyway")
    warnings.warn(f"{message}; used anyway (--force)", SAETargetWarning, stacklevel=2)


def trained_layer(path: str | Path) -> str | None:
    """The layer the SAE at ``path`` was trained on, when its metadata records one."""
    from convlens.sae.base import read_sae_metadata

    layer = read_sae_metadata(path).get("layer")
    return layer if isinstance(layer, str) and layer else None


def sae_target_differences(metadata: dict[str, Any], model_record: dict[str, Any], layer: str) -> list[str]:
    """What differs between the model and layer an SAE was trained on and the ones given, in words."""
    differences = []
    model = metadata.get("model")
    if isinstance(model, dict) and model.get("name") and _identity(model) != _identity(model_record):
        differences.append(f"model {_describe(model)}, not {_describe(model_record)}")
    recorded_layer = metadata.get("layer")
    if isinstance(recorded_layer, str) and recorded_layer and recorded_layer != layer:
        differences.append(f"layer '{recorded_layer}', not '{layer}'")
    return differences


def _identity(record: dict[str, Any]) -> tuple[str, str]:
    """A model's name and every parameter (defaults filled in, paths resolved), comparable across runs."""
    import json

    from convlens.core.component_registry import default_registry
    from convlens.core.params import coerce

    name, params = str(record.get("name")), dict(record.get("params") or {})
    try:
        component = default_registry().get("model", name)
        name, params = component.qualified_name, coerce(component.spec.params, params).to_dict()
    except ConvlensError:
        pass  # a plugin no longer installed: compare what was recorded
    resolved = {key: _resolved_path(value) for key, value in params.items()}
    return name, json.dumps(resolved, sort_keys=True, default=str)


def _resolved_path(value: Any) -> Any:
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _describe(record: dict[str, Any]) -> str:
    params = record.get("params") or {}
    given = ", ".join(f"{key}={value}" for key, value in sorted(params.items()))
    return f"'{record.get('name')}'" + (f" ({given})" if given else "")
