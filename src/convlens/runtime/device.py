"""Choosing the torch device for ``--device``, and checking ``--dtype`` against it before any work."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from convlens.core.errors import ConvlensError, suggest

if TYPE_CHECKING:
    import torch

DEVICE_TYPES = ("auto", "cpu", "cuda", "mps")
ACCEPTED = "auto (cuda when available, else cpu), cpu, cuda, cuda:N (the GPU numbered N), mps"
SYNONYMS = {"gpu": "cuda", "nvidia": "cuda", "metal": "mps", "apple": "mps"}
INDEXED = re.compile(r"(?P<type>[a-z]+):(?P<index>\S*)")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: cuda when available, else cpu. An unknown or unavailable device is one clear error.

    ``name`` is a string (see :data:`ACCEPTED`) or a ``torch.device``."""
    import torch

    if name is None or isinstance(name, str) and name.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = name if isinstance(name, torch.device) else torch.device(_checked_spelling(str(name)))
    if device.type == "cuda":
        _check_cuda(name, device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConvlensError(f"device '{name}' requested but MPS (Apple GPU) is not available here; use --device cpu")
    return device


def check_machine(device: str | None, dtype: str) -> None:
    """Fail now, before any step runs, when ``device`` is unknown or unavailable or cannot compute in ``dtype``."""
    from convlens.runtime.precision import check_compute_dtype

    check_compute_dtype(dtype, resolve_device(device))


def _checked_spelling(name: str) -> str:
    """``name`` lower-cased when it is one of the accepted forms; otherwise one error saying what is accepted."""
    text = name.strip().lower()
    indexed = INDEXED.fullmatch(text)
    device_type = indexed["type"] if indexed else text
    if device_type not in DEVICE_TYPES:
        closest = _closest(text)
        hint = f": did you mean '{closest}'?" if closest else "."
        raise ConvlensError(f"unknown device '{name}'{hint} Accepted: {ACCEPTED}")
    if indexed and device_type != "cuda":
        raise ConvlensError(f"invalid device '{name}': only cuda takes a GPU number. Accepted: {ACCEPTED}")
    if indexed and not indexed["index"].isdigit():
        raise ConvlensError(f"invalid device '{name}': after 'cuda:' comes a GPU number, as in cuda:0 or cuda:1")
    return text


def _closest(text: str) -> str | None:
    """The accepted spelling closest to ``text``, keeping its GPU number: 'gpu:1' -> 'cuda:1'."""
    device_type, colon, index = text.partition(":")
    close = [SYNONYMS[device_type]] if device_type in SYNONYMS else suggest(device_type, DEVICE_TYPES, n=1)
    if not close:
        return None
    return close[0] + colon + index if close[0] == "cuda" else close[0]


def _check_cuda(name: str | torch.device, device: torch.device) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConvlensError(f"device '{name}' requested but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        numbers = "its only GPU is cuda:0" if count == 1 else f"its GPUs are cuda:0 to cuda:{count - 1}"
        raise ConvlensError(f"device '{name}' requested but this machine has {count} GPU(s): {numbers}")
