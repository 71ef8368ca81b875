"""Reading and writing tensors as safetensors files: atomic writes, one clear message on bad input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from convlens.core.contracts import ActivationFilter, FilterContext
from convlens.core.errors import ConvlensError
from convlens.runtime.device import resolve_device


def load_tensor(path: Path, key: str | None = None):
    """One tensor from a safetensors file: ``key``, or the file's only tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if key is None:
                if len(keys) != 1:
                    raise ConvlensError(f"{path} holds {len(keys)} tensors ({', '.join(keys)}); choose one with --key")
                key = keys[0]
            if key not in keys:
                raise ConvlensError(f"{path} has no tensor '{key}'; it holds: {', '.join(keys) or '(none)'}")
            return handle.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise ConvlensError(f"cannot read {path} as safetensors: {exc}") from None


def save_tensors_atomic(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary file and a rename, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            exc.filename = str(path)  # a full disk fails a write, which names no file
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_filter_to_file(
    filter_: ActivationFilter, source: Path, out: Path, *, key: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """Weights of ``filter_`` for the activations ``[N, C, H, W]`` in ``source``, written to ``out``."""
    import torch

    activations = load_tensor(source, key)
    if activations.ndim != 4:
        raise ConvlensError(f"activations must have shape [N, C, H, W], got {list(activations.shape)} in {source}")
    if not activations.is_floating_point():
        activations = activations.float()
    if not bool(torch.isfinite(activations).all()):
        raise ConvlensError(f"activations in {source} contain NaN or infinite values")
    weights = filter_(activations.to(resolve_device(device)), FilterContext()).cpu()
    flat = weights.flatten(1)
    all_nan = flat.isnan().all(dim=1)
    all_zero = (flat.nan_to_num(0.0) == 0).all(dim=1) & ~all_nan
    save_tensors_atomic({"weights": weights}, out, metadata={"filter": filter_.name, "source": str(source)})
    return {
        "out": str(out),
        "shape": list(weights.shape),
        "all_zero_maps": int(all_zero.sum()),
        "all_nan_maps": int(all_nan.sum()),
    }
