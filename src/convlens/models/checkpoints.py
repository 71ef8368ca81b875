"""Model weights from files: safetensors, or ``.pt`` read with ``weights_only=True``. Nothing is unpickled."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from convlens.core.errors import ConvlensError
from convlens.runtime.tensor_files import save_tensors_atomic

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state dict from ``path``; anything else is refused with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise ConvlensError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ConvlensError(f"cannot read checkpoint {path} as safetensors: {exc}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ConvlensError(_unreadable_checkpoint(path, exc)) from None
    if isinstance(loaded, Mapping) and set(loaded) == {"state_dict"}:
        loaded = loaded["state_dict"]
    if not (isinstance(loaded, Mapping) and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise ConvlensError(
            f"refusing to load {path}: expected a state dict mapping names to tensors, got {type(loaded).__name__}"
        )
    return dict(loaded)


def _unreadable_checkpoint(path: Path, exc: Exception) -> str:
    if "weights only load failed" in str(exc).lower():
        return (
            f"refusing to load {path}: it is a pickle, not a plain state dict of tensors, and convlens never "
            "unpickles (that can run any code in the file); where you trust the file, convert it: load the model "
            "and save its weights as safetensors, safetensors.torch.save_file(model.state_dict(), "
            "'model.safetensors'), then pass that file"
        )
    return (
        f"cannot load {path}: it is neither a safetensors file nor a PyTorch state dict "
        f"({type(exc).__name__}); pass a .safetensors file or a .pt file saved with torch.save(model.state_dict())"
    )


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors checkpoint (empty for other formats or unreadable files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def class_names_of(path: str | Path) -> tuple[str, ...] | None:
    """The class names a training run stored in a checkpoint's metadata, if any."""
    import json

    names = checkpoint_metadata(path).get("class_names")
    try:
        return tuple(json.loads(names)) if names else None
    except (ValueError, TypeError):
        return None


class PartialWeightsWarning(UserWarning):
    """A partial load left some of the model's tensors at their initial values, or skipped some of the file's."""


def is_checkpoint_path(weights: str) -> bool:
    """Whether a ``weights`` value names a local file rather than a named set of weights."""
    return weights.endswith(STATE_DICT_SUFFIXES) or os.sep in weights or os.path.exists(weights)


def load_weights(module: nn.Module, path: str | Path, partial: bool = False) -> None:
    """Load ``path`` into ``module``; missing, unexpected or mis-shaped keys are one error naming them.

    ``partial``: load the tensors whose names and shapes match and warn about the missing and unexpected keys;
    mis-shaped tensors are still an error, and so is a file of which nothing matches.
    """
    state = load_state_dict(path)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if mis_shaped or not partial and (missing or unexpected):
        hint = "" if mis_shaped else "; partial_weights=true loads just the tensors that match"
        problems = {"missing": missing, "unexpected": unexpected} if not partial else {}
        raise ConvlensError(
            f"checkpoint {path} does not fit the model ({_listed({**problems, 'shape mismatch': mis_shaped})}){hint}"
        )
    if partial and len(unexpected) == len(state):
        raise ConvlensError(
            f"checkpoint {path} shares no tensor name with the model, so it holds no weights for it "
            f"({_listed({'the model has': list(own), 'the file has': unexpected})})"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=not partial)
    if missing or unexpected:
        loaded = f"loaded {len(state) - len(unexpected)} of the model's {len(own)} tensors"
        skipped = {
            f"{len(missing)} missing, left as initialised": missing,
            f"{len(unexpected)} unexpected, ignored": unexpected,
        }
        warnings.warn(f"partial weights {path}: {loaded} ({_listed(skipped)})", PartialWeightsWarning, stacklevel=2)


def _listed(keys_by_label: dict[str, list[str]], shown: int = 5) -> str:
    """'label: a, b and 3 more; label: ...' for each label with keys."""
    parts = []
    for label, keys in keys_by_label.items():
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{label}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``module``'s state dict as safetensors (atomically; shared tensors are stored once each)."""
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    save_tensors_atomic(state, Path(path), metadata)
