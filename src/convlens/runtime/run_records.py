"""Run-folder helpers shared by every command that writes one: atomic JSON and the versions record."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens.core.errors import ConvlensError

if TYPE_CHECKING:
    import torch


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with naming_the_file(path):
        temporary.write_text(json.dumps(value, indent=1) + "\n")
        os.replace(temporary, path)


@contextlib.contextmanager
def naming_the_file(path: Path) -> Iterator[None]:
    """An OSError raised inside (a full disk fails a write, which names no file) names ``path``."""
    try:
        yield
    except OSError as exc:
        exc.filename = str(path)
        raise


def versions() -> dict[str, str]:
    """The versions a run's results depend on."""
    import torch
    import torchvision

    from convlens._version import __version__

    return {
        "convlens": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def save_optimizer_state(
    path: Path, optimizer: torch.optim.Optimizer, metadata: dict[str, Any], extra: dict[str, torch.Tensor] | None = None
) -> None:
    """The optimizer state as safetensors: tensors by ``state.<param>.<key>``, the rest as JSON metadata;
    ``extra`` tensors (e.g. the weights) go into the same file, so one atomic write holds a whole checkpoint."""
    import torch

    from convlens.runtime.tensor_files import save_tensors_atomic

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().cpu().clone()
            else:
                scalars[f"{param_id}.{key}"] = value
    tensors.update({f"extra.{key}": value.detach().cpu().contiguous() for key, value in (extra or {}).items()})
    text = {key: json.dumps(value) for key, value in metadata.items()}
    text["param_groups"] = json.dumps(state["param_groups"])
    text["scalars"] = json.dumps(scalars)
    save_tensors_atomic(tensors, path, text)


def load_optimizer_state(
    path: Path, extra: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state dict, metadata) written by :func:`save_optimizer_state`; its ``extra`` tensors are put
    into ``extra`` when given."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConvlensError(f"cannot read training state {path}: {exc}") from None
    for key in [key for key in tensors if key.startswith("extra.")]:
        value = tensors.pop(key)
        if extra is not None:
            extra[key.removeprefix("extra.")] = value
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = tensor
    for key, value in json.loads(metadata.pop("scalars")).items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer_state = {"state": state, "param_groups": json.loads(metadata.pop("param_groups"))}
    return optimizer_state, {key: json.loads(value) for key, value in metadata.items()}


def write_lines_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with naming_the_file(path):
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(temporary, path)
