"""Compute precision for ``--dtype``: float32, or autocast to bfloat16 / float16, and channels-last memory.

Autocast leaves parameters and stored results in float32 and runs matmuls and convolutions in the chosen type;
it applies on CUDA and, for bfloat16, on CPU too (so the same code path is tested without a GPU). float16 on
CPU is refused: it is slower than float32 there and not what anyone means.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from convlens.core.errors import ConvlensError

if TYPE_CHECKING:
    import torch

ComputeDtype = Literal["float32", "bfloat16", "float16"]
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def check_compute_dtype(name: str, device: torch.device) -> None:
    """One clear error for a precision the device cannot run."""
    import torch

    if name not in COMPUTE_DTYPES:
        raise ConvlensError(f"unknown --dtype '{name}'; use one of {', '.join(COMPUTE_DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise ConvlensError("--dtype float16 needs a GPU; on CPU use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConvlensError(f"{device} does not support bfloat16; use --dtype float16")


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: str = "float32") -> Iterator[None]:
    """Run the block with autocast to ``dtype`` on ``device``; float32 runs it unchanged."""
    import torch

    device = torch.device(device)
    if dtype == "float32":
        yield
        return
    check_compute_dtype(dtype, device)
    with torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)):
        yield


def channels_last(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``module`` in channels-last memory format on CUDA (faster convolutions there); unchanged on CPU, where
    it rarely helps. Inputs need not follow: convolutions convert them."""
    import torch

    if torch.device(device).type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
        module.to(memory_format=torch.channels_last)
    return module
