"""A visualizer run from names and objects, as ``convlens visualize`` and notebooks ask for one.

:func:`visual_target` turns a model (a plugin name, a ``train-model`` run folder, a :class:`ModelBundle`, or what
:func:`convlens.load_model` returns), a layer, units (text such as ``"0-7"`` or numbers) and an SAE (a checkpoint
or the object) into a :class:`VisualTarget`, as ``convlens visualize`` and ``convlens circuit`` do. :func:`visualize`
(``convlens.visualize``) runs a visualizer of the registry on it and returns its results in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from convlens.core.component_registry import default_registry
from convlens.core.contracts import ModelBundle, Visualization, VisualTarget
from convlens.core.errors import ConvlensError

if TYPE_CHECKING:
    import torch

    from convlens.sae.base import SparseAutoencoder

MAX_UNKNOWN_RANGE = 65_536  # the longest range accepted while the number of units is not known

#: A model plugin name or ``train-model`` run folder, a bundle, or the (bundle, record) pair load_model returns.
ModelArgument = Union[str, os.PathLike, ModelBundle, tuple]


def parse_units(text: str | None, available: int | None) -> tuple[int, ...]:
    """``0,5,9``, ranges ``0-7`` and ``all`` (every unit of the layer, or every SAE latent); a range is checked
    against ``available`` before it is expanded (single numbers are checked where the units are used)."""
    if not text:
        return ()
    units: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        if part == "all":
            if available is None:
                raise ConvlensError("--units all: the number of units is not known")
            units += range(available)
        elif "-" in part:
            low, _, high = part.partition("-")
            if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
                raise ConvlensError(f"--units: '{part}' is not a range like 0-7")
            _check_unit(part, int(high), available)
            if available is None and int(high) - int(low) >= MAX_UNKNOWN_RANGE:
                raise ConvlensError(f"--units: '{part}' is longer than {MAX_UNKNOWN_RANGE} units")
            units += range(int(low), int(high) + 1)
        elif part.isdigit():
            units.append(int(part))
        else:
            raise ConvlensError(f"--units: '{part}' is not a unit number, a range like 0-7, or 'all'")
    return tuple(dict.fromkeys(units))


def _check_unit(part: str, highest: int, available: int | None) -> None:
    if available is not None and highest >= available:
        raise ConvlensError(f"--units: '{part}' is out of range: there are units 0..{available - 1}")


def visual_target(
    model: ModelArgument,
    layer: str | None = None,
    *,
    units: str | int | Sequence[int] | None = None,
    sae: str | os.PathLike | SparseAutoencoder | None = None,
    data: Any = None,
    model_params: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    force: bool = False,
) -> tuple[VisualTarget, dict[str, Any] | None, torch.device]:
    """The :class:`VisualTarget` (the model on ``device`` in eval mode, channels-last on a GPU; the layer's units
    or the SAE's latents; the compute precision), the model's record (None for a bare bundle) and the device.

    ``layer`` defaults to the layer an SAE checkpoint was trained on, else the model's default layer. An SAE
    checkpoint trained on another model or layer is refused unless ``force``; with a bare bundle only its layer
    can be checked, and an SAE object is taken as the caller's choice.
    """
    import torch

    from convlens.models.layers import activations_at
    from convlens.runtime.device import resolve_device
    from convlens.runtime.precision import channels_last, check_compute_dtype
    from convlens.sae.provenance import trained_layer

    bundle, model_record = _model(model, model_params)
    sae_path = Path(sae) if isinstance(sae, (str, os.PathLike)) else None
    layer = layer or (trained_layer(sae_path) if sae_path else None) or bundle.default_layer
    target_device = resolve_device(device) if not isinstance(device, torch.device) else device
    check_compute_dtype(dtype, target_device)
    channels_last(bundle.module.to(target_device).eval(), target_device)
    probe = activations_at(
        bundle.module,
        torch.zeros(1, 3, *bundle.input_size, device=target_device),
        layer,
        model_name=model_record["name"] if model_record else "model",
    ).activations[layer]
    chosen_sae: SparseAutoencoder | None
    if isinstance(sae, (str, os.PathLike)):
        chosen_sae = _sae_from_file(Path(sae), probe.shape[1], target_device, model_record, layer, force)
    else:
        chosen_sae = _sae_object(sae, probe.shape[1], target_device, layer)
    available = chosen_sae.latent_dim if chosen_sae is not None else probe.shape[1]
    target = VisualTarget(bundle, layer, _units(units, available), chosen_sae, data, dtype)
    return target, model_record, target_device


def _model(model: ModelArgument, params: Mapping[str, Any] | None) -> tuple[ModelBundle, dict[str, Any] | None]:
    from convlens.models.loading import load_model

    if isinstance(model, (str, os.PathLike)):
        return load_model(model if isinstance(model, str) else Path(model), dict(params or {}))
    if params:
        raise ConvlensError("model_params go with a model plugin name or run folder, not with a loaded model")
    if isinstance(model, ModelBundle):
        return model, None
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], ModelBundle):
        return model[0], model[1]
    raise ConvlensError(
        "model must be a model plugin name, a train-model run folder, a ModelBundle or what load_model returns; "
        f"got {type(model).__name__}"
    )


def _sae_from_file(
    path: Path, channels: int, device: torch.device, model_record: dict[str, Any] | None, layer: str, force: bool
) -> SparseAutoencoder:
    from convlens.sae.base import load_sae, read_sae_metadata
    from convlens.sae.provenance import check_sae_target

    sae = load_sae(path, input_dim=channels, device=device).eval()
    # a bare bundle has no record: compare the SAE's model with itself, so that only the layer is checked
    record = model_record if model_record is not None else read_sae_metadata(path).get("model") or {}
    check_sae_target(path, record, layer, force=force)
    return sae


def _sae_object(
    sae: SparseAutoencoder | None, channels: int, device: torch.device, layer: str
) -> SparseAutoencoder | None:
    if sae is None:
        return None
    if sae.input_dim != channels:
        raise ConvlensError(f"the SAE reads {sae.input_dim} channels but layer '{layer}' gives {channels}")
    return sae.to(device).eval()


def _units(units: str | int | Sequence[int] | None, available: int) -> tuple[int, ...]:
    if units is None or isinstance(units, str):
        return parse_units(units, available)
    if isinstance(units, int):
        return (units,)
    return tuple(dict.fromkeys(int(unit) for unit in units))


def visualize(
    name: str,
    model: ModelArgument,
    layer: str | None = None,
    *,
    units: str | int | Sequence[int] | None = None,
    data: Any = None,
    sae: str | os.PathLike | SparseAutoencoder | None = None,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    force: bool = False,
    model_params: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    **params: Any,
) -> Visualization:
    """Run the visualizer ``name`` (see ``convlens list visualizer``; its parameters as ``params``) on ``units`` of
    ``layer``, as ``convlens visualize NAME`` does with the same arguments, and return its record, pictures and
    tensors in memory (:class:`Visualization`), equal to the files the command writes.

    ``model``: see :func:`visual_target` (``model_params``: the model plugin's parameters); ``units``: ``"0-7,9"``,
    ``"all"``, a number or numbers (SAE latents with ``sae``); ``data``: an image file or folder, or a list of
    image files. Without ``out`` the files go to a temporary folder, removed before this returns; with ``out``
    they stay there (the command's ``config.json`` is not written), and the folder is locked while they are written.
    ``progress``: None shows progress bars where the output is a terminal, False never.
    """
    from convlens.runtime.locks import output_lock

    visualizer = default_registry().create("visualizer", name, **params)
    if visualizer.needs_data and data is None:
        raise ConvlensError(f"visualizer '{visualizer.name}' looks at images: pass data= (an image file or folder)")
    target, _, _ = visual_target(
        model,
        layer,
        units=units,
        sae=sae,
        data=data,
        model_params=model_params,
        device=device,
        dtype=dtype,
        force=force,
    )
    visualizer.progress = progress
    if out is None:
        return visualizer.visualize(target)
    with output_lock(Path(out), command="visualize"):
        return visualizer.visualize(target, Path(out))
