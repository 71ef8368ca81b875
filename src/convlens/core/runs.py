"""Run-folder helpers shared by every command that writes one: atomic JSON and the versions record."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(temporary, path)


def versions() -> dict[str, str]:
    """The versions a run's results depend on."""
    import torch
    import torchvision

    from convlens import __version__

    return {"convlens": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}
