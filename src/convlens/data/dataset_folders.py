"""Folders that the ``convlens data`` commands write: claiming one, copying files in, clearing out stale files.

Each such folder holds a JSON record naming the command that wrote it (``{"generator": {"name": ...}}``). A
later run of the same command may write over it; a folder holding anything else is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from convlens.core.errors import ConvlensError
from convlens.data.images import resolves_inside, shown
from convlens.runtime.locks import holds_files


def claim_folder(out: Path, record_file: str, generator: str) -> dict[str, Any]:
    """The record an earlier ``convlens data <generator>`` left in ``out`` ({} for a new or empty folder); a
    folder that holds files written by anything else is refused."""
    if not holds_files(out):
        return {}
    path = out / record_file
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    name = record.get("generator", {}).get("name") if isinstance(record, dict) else None
    if name != generator:
        raise ConvlensError(
            f"{shown(out)} exists and holds files not written by `convlens data {generator}`; choose an empty or "
            "new folder"
        )
    return record


def recorded_files(record: dict[str, Any], folders: dict[str, str]) -> set[str]:
    """The files (relative to the dataset root) that the image records of ``record`` name: ``folders`` maps each
    record key (``file``, ``mask``) to the folder its names are relative to."""
    names = set()
    for image in record.get("images", []):
        for key, folder in folders.items():
            name = image.get(key) if isinstance(image, dict) else None
            if isinstance(name, str):
                names.add(os.path.normpath(os.path.join(folder, name)))
    return names


def remove_stale(out: Path, previous: Iterable[str], current: Iterable[str]) -> int:
    """Delete the files an earlier run wrote that this run does not (only inside ``out``); returns how many."""
    removed = 0
    for name in sorted(set(previous) - set(current)):
        path = out / name
        if path.is_file() and resolves_inside(path, out):
            path.unlink()
            removed += 1
    return removed


def copy_exact(source: Path, target: Path) -> None:
    """Copy the bytes of ``source`` to ``target`` through a temporary file and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, temporary)
    except OSError as exc:
        raise ConvlensError(f"cannot copy {shown(source)} to {shown(target)}: {exc.strerror or exc}") from None
    os.replace(temporary, target)
