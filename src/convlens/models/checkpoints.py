"""Model weights from files: safetensors, or ``.pt`` read with ``weights_only=True``. Nothing is unpickled.

Checkpoints written by trainers are read too: the weights entry of a training checkpoint (Lightning's
``state_dict``, a script's ``model`` or ``model_state_dict``) is taken, and :func:`load_weights` removes a name
prefix that wraps the model's tensor names (a LightningModule attribute such as ``model.``, DDP's ``module.``,
torch.compile's ``_orig_mod.``) when the names then match the model, saying so in an
:class:`UnwrappedCheckpointWarning`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from convlens.core.errors import ConvlensError
from convlens.runtime.tensor_files import save_tensors_atomic

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar")
# where training checkpoints keep the model's weights, in the order they are looked for
WEIGHTS_ENTRIES = ("state_dict", "model_state_dict", "model", "module")


class PartialWeightsWarning(UserWarning):
    """A partial load left some of the model's tensors at their initial values, or skipped some of the file's."""


class UnwrappedCheckpointWarning(UserWarning):
    """The weights were taken out of a training checkpoint: an entry of it, or names under a wrapper's prefix."""


@dataclass
class _Checkpoint:
    """A checkpoint's tensors, and how they were taken out of a training checkpoint."""

    path: Path
    state: dict[str, torch.Tensor]
    entries: list[str] = field(default_factory=list)  # the nested entries the weights were found under
    prefix: str = ""  # removed from the names of the tensors that were kept
    outside: list[str] = field(default_factory=list)  # tensors without the prefix, left out

    @property
    def unwrapped(self) -> bool:
        return bool(self.entries or self.prefix)

    def described(self) -> str:
        """'checkpoint PATH', with how its weights were unwrapped: '('state_dict' entry, names without 'model.')'."""
        parts = []
        if self.entries:
            parts.append(" > ".join(f"'{entry}'" for entry in self.entries) + " entry")
        if self.prefix:
            parts.append(f"names without '{self.prefix}'")
        return f"checkpoint {self.path}" + (f" ({', '.join(parts)})" if parts else "")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state dict from ``path``; anything else is refused with a clear message.

    A training checkpoint (a mapping holding the weights under one of ``WEIGHTS_ENTRIES``, as Lightning and most
    training scripts save them) gives the state dict of that entry.
    """
    return _read_checkpoint(Path(path)).state


def _read_checkpoint(path: Path) -> _Checkpoint:
    if not path.is_file():
        raise ConvlensError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _Checkpoint(path, load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise ConvlensError(f"cannot read checkpoint {path} as safetensors: {exc}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ConvlensError(_unreadable_checkpoint(path, exc)) from None
    entries = []
    while isinstance(loaded, Mapping) and not _holds_only_tensors(loaded):
        entry = next((key for key in WEIGHTS_ENTRIES if isinstance(loaded.get(key), Mapping)), None)
        if entry is None:
            break
        entries.append(entry)
        loaded = loaded[entry]
    if not (isinstance(loaded, Mapping) and _holds_only_tensors(loaded)):
        raise ConvlensError(_not_a_state_dict(path, loaded))
    return _Checkpoint(path, dict(loaded), entries)


def _holds_only_tensors(mapping: Mapping) -> bool:
    return all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in mapping.items())


def _not_a_state_dict(path: Path, loaded: object) -> str:
    if isinstance(loaded, Mapping):
        keys = ", ".join(map(str, list(loaded)[:8])) + (" ..." if len(loaded) > 8 else "")
        found = f"a mapping of other values (keys: {keys})"
    else:
        found = type(loaded).__name__
    entries = ", ".join(f"'{entry}'" for entry in WEIGHTS_ENTRIES)
    return (
        f"refusing to load {path}: expected a state dict mapping names to tensors, got {found}; a training "
        f"checkpoint is read when it keeps its weights under one of {entries}"
    )


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


def is_checkpoint_path(weights: str) -> bool:
    """Whether a ``weights`` value names a local file rather than a named set of weights."""
    return weights.endswith(STATE_DICT_SUFFIXES) or os.sep in weights or os.path.exists(weights)


def load_weights(
    module: nn.Module, path: str | Path, partial: bool = False, *, num_classes_param: str | None = None
) -> None:
    """Load ``path`` into ``module``; missing, unexpected or mis-shaped keys are one error naming them.

    A training checkpoint's weights entry is taken, and a prefix wrapping every tensor name (``model.``,
    ``module.``, ``_orig_mod.``, or several) is removed when the names under it then match the module better;
    either is said in one :class:`UnwrappedCheckpointWarning`.

    ``partial``: load the tensors whose names and shapes match and warn about the missing and unexpected keys;
    mis-shaped tensors are still an error, and so is a file of which nothing matches.

    ``num_classes_param``: the model plugin's parameter that sets the number of classes, suggested when only the
    classifier head differs in shape.
    """
    checkpoint = _read_checkpoint(Path(path))
    own = module.state_dict()
    _remove_wrapper_prefix(checkpoint, set(own))
    state = checkpoint.state
    missing, unexpected = _check_fit(module, checkpoint, own, partial, num_classes_param)
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=not partial)
    if checkpoint.unwrapped:
        warnings.warn(_unwrapped_message(checkpoint), UnwrappedCheckpointWarning, stacklevel=2)
    if missing or unexpected:
        loaded = f"loaded {len(state) - len(unexpected)} of the model's {len(own)} tensors"
        skipped = {
            f"{len(missing)} missing, left as initialised": missing,
            f"{len(unexpected)} unexpected, ignored": unexpected,
        }
        warnings.warn(f"partial weights {path}: {loaded} ({_listed(skipped)})", PartialWeightsWarning, stacklevel=2)


def _check_fit(
    module: nn.Module,
    checkpoint: _Checkpoint,
    own: Mapping[str, torch.Tensor],
    partial: bool,
    num_classes_param: str | None,
) -> tuple[list[str], list[str]]:
    """The model's tensors missing from the checkpoint and the checkpoint's unexpected ones; an error when the
    checkpoint does not fit (see :func:`load_weights`)."""
    state, where = checkpoint.state, checkpoint.described()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    head = _head_mismatch(module, state, mis_shaped, num_classes_param) if mis_shaped else ""
    if head:
        raise ConvlensError(f"{where} does not fit the model: {head}")
    if mis_shaped or not partial and (missing or unexpected):
        hint = "" if mis_shaped else "; partial_weights=true loads just the tensors that match"
        problems = {"missing": missing, "unexpected": unexpected} if not partial else {}
        shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in mis_shaped]
        raise ConvlensError(f"{where} does not fit the model ({_listed({**problems, 'shape mismatch': shapes})}){hint}")
    if partial and len(unexpected) == len(state):
        raise ConvlensError(
            f"{where} shares no tensor name with the model, so it holds no weights for it "
            f"({_listed({'the model has': list(own), 'the file has': unexpected})})"
        )
    return missing, unexpected


def _remove_wrapper_prefix(checkpoint: _Checkpoint, own: set[str]) -> None:
    """Keep only the tensors under the name prefix that matches the most of ``own`` (when it matches more than
    the names as they are), without that prefix; several prefixes matching as many is an error."""
    state = checkpoint.state
    matching_as_is = sum(key in own for key in state)
    if matching_as_is == len(own):
        return
    matches: Counter[str] = Counter()
    for key in state:
        for cut in (position + 1 for position, char in enumerate(key) if char == "."):
            if key[cut:] in own:
                matches[key[:cut]] += 1
    best = max(matches.values(), default=0)
    if best <= matching_as_is:
        return
    prefixes = sorted(prefix for prefix, count in matches.items() if count == best)
    if len(prefixes) > 1:
        raise ConvlensError(_several_copies_message(checkpoint.path, prefixes))
    prefix = prefixes[0]
    checkpoint.state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    checkpoint.outside = [key for key in state if not key.startswith(prefix)]
    checkpoint.prefix = prefix


def _several_copies_message(path: Path, prefixes: list[str]) -> str:
    named = ", ".join(f"'{prefix}'" for prefix in prefixes)
    return (
        f"checkpoint {path} holds the model's tensors under several prefixes ({named}), e.g. a model and its EMA "
        "copy; save the one you want as its own file, safetensors.torch.save_file({k[len(p):]: v for k, v in "
        "state.items() if k.startswith(p)}, 'model.safetensors') with p one of the prefixes, and pass that file"
    )


def _unwrapped_message(checkpoint: _Checkpoint) -> str:
    actions = []
    if checkpoint.entries:
        actions.append(f"took the weights from its {' > '.join(repr(e) for e in checkpoint.entries)} entry")
    if checkpoint.prefix:
        actions.append(f"removed the prefix '{checkpoint.prefix}' from the tensor names")
    ignored = ""
    if checkpoint.outside:
        count = len(checkpoint.outside)
        ignored = f"; ignored {count} tensor{'s' * (count > 1)} outside that prefix ({_few(checkpoint.outside)})"
    return (
        f"checkpoint {checkpoint.path} is a training checkpoint: {' and '.join(actions)} "
        f"({len(checkpoint.state)} tensors){ignored}"
    )


def _head_mismatch(
    module: nn.Module, state: dict[str, torch.Tensor], mis_shaped: list[str], num_classes_param: str | None
) -> str:
    """The message when the only mis-shaped tensors are the classifier head's (the last ``nn.Linear``) and they
    differ in the number of classes alone; empty otherwise."""
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return ""
    name, head = linears[-1]
    weight_key = f"{name}.weight" if name else "weight"
    head_keys = {weight_key, f"{name}.bias" if name else "bias"}
    theirs = state.get(weight_key)
    if not set(mis_shaped) <= head_keys or theirs is None or theirs.ndim != 2 or theirs.shape[1] != head.in_features:
        return ""
    classes = int(theirs.shape[0])
    message = (
        f"its classifier head '{name}' has {classes} classes ({weight_key} {list(theirs.shape)}), the model's "
        f"{head.out_features}"
    )
    if num_classes_param is None:
        return f"{message}; build the model with a {classes}-class head"
    flag = num_classes_param.replace("_", "-")
    return (
        f"{message}; build it with {classes} classes: --model-{flag} {classes} on the command line "
        f"(--{flag} {classes} after `convlens train-model MODEL` or `convlens layers MODEL`), "
        f"params = {{ {num_classes_param} = {classes} }} under a recipe's [model], {num_classes_param}={classes} "
        "in Python"
    )


def _listed(keys_by_label: dict[str, list[str]]) -> str:
    """'label: a, b and 3 more; label: ...' for each label with keys."""
    return "; ".join(f"{label}: {_few(keys)}" for label, keys in keys_by_label.items() if keys)


def _few(keys: list[str], shown: int = 5) -> str:
    """'a, b, c, d, e and 3 more'."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``module``'s state dict as safetensors (atomically; shared tensors are stored once each)."""
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    save_tensors_atomic(state, Path(path), metadata)
