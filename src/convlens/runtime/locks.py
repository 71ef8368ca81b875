"""One writer per output folder: :func:`output_lock` holds ``FOLDER/.convlens.lock`` while a command writes there.

The lock file names its holder (pid, host, command, start time) and is held with ``flock`` as long as the holder
runs, so the kernel releases it when the holder dies however it dies; a later writer then takes the stale lock
over. Where ``flock`` is missing, whether the holder's pid still exists decides.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from convlens.core.errors import ConvlensError

LOCK_FILE = ".convlens.lock"
HOLDER_WRITE_WAIT_S = 0.5

_held: set[Path] = set()  # folders this process holds: writing below one of them is this process's own business


class OutputLockedError(ConvlensError):
    """Another running process writes into the folder."""


def holds_files(folder: Path) -> bool:
    """Whether ``folder`` exists and holds anything besides a lock file."""
    return folder.is_dir() and any(path.name != LOCK_FILE for path in folder.iterdir())


@contextmanager
def output_lock(folder: str | Path, *, command: str, announce: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Create ``folder`` if needed and hold its lock while the block runs.

    Raises :class:`OutputLockedError`, touching nothing, when a running process holds the lock of ``folder`` or
    of a folder above it. Takes over the lock a dead process left, saying so through ``announce`` (default:
    stderr). Under torchrun only rank 0 locks; the other ranks write after it, between its barriers.
    """
    folder = Path(folder)
    if _is_secondary_rank():
        yield folder
        return
    _refuse_inside_a_locked_folder(folder)
    _make_folder(folder)
    path = folder / LOCK_FILE
    handle = _acquire(path, folder, command, announce or _to_stderr)
    key = folder.resolve()
    _held.add(key)
    try:
        yield folder
    finally:
        _held.discard(key)
        _release(path, handle)


def _is_secondary_rank() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConvlensError(f"--out {folder} is a file; pass a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvlensError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None


def _refuse_inside_a_locked_folder(folder: Path) -> None:
    for parent in folder.resolve().parents:
        path = parent / LOCK_FILE
        if parent in _held or not path.is_file():
            continue
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _try_lock(handle) is False:
                raise OutputLockedError(
                    f"{folder} is inside {parent}, which {_describe(_read_holder(handle))} is writing into; wait "
                    "for it to finish or choose an --out outside it"
                )
        finally:
            os.close(handle)


def _acquire(path: Path, folder: Path, command: str, announce: Callable[[str], None]) -> int:
    """The open, locked lock file of ``folder``, holding this process's record."""
    while True:
        try:
            handle, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                handle, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:  # its holder removed it meanwhile
                continue
        except OSError as exc:
            raise ConvlensError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            locked = _try_lock(handle)
            if locked is False:
                raise OutputLockedError(_in_use(folder, _read_holder(handle, wait=True)))
            if not _is_current(handle, path):  # a holder finished and removed this file before we locked it
                os.close(handle)
                continue
            if not created:
                _take_over(handle, folder, locked, announce)
            _write_holder(handle, command)
            return handle
        except BaseException:
            os.close(handle)
            raise


def _take_over(handle: int, folder: Path, locked: bool | None, announce: Callable[[str], None]) -> None:
    """Check that the holder recorded in an existing lock file is gone, and say that its lock is taken over."""
    holder = _read_holder(handle)
    if not holder:  # an empty record: its writer died between creating and filling it
        return
    if holder.get("host") != socket.gethostname() or (locked is None and _is_running(holder.get("pid"))):
        raise OutputLockedError(
            _in_use(folder, holder) + f"; if no such process is running, delete {folder / LOCK_FILE}"
        )
    announce(f"warning: taking over the stale lock of {folder}: {_describe(holder)} is no longer running")


def _in_use(folder: Path, holder: dict[str, Any]) -> str:
    return f"{folder} is in use: {_describe(holder)} is writing into it; wait for it to finish or choose another --out"


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    return (
        f"'{holder.get('command', '?')}' (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('started', '?')})"
    )


def _try_lock(handle: int) -> bool | None:
    """Lock ``handle`` exclusively without waiting: True when locked, False when another process holds it,
    None where the platform or file system has no ``flock``."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _is_current(handle: int, path: Path) -> bool:
    """Whether ``handle`` is still the file at ``path`` (and not one its holder removed)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle)
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)


def _is_running(pid: Any) -> bool:
    if not isinstance(pid, int) or os.name == "nt":  # on Windows os.kill(pid, 0) would stop the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(handle: int, *, wait: bool = False) -> dict[str, Any]:
    """The record in the lock file; with ``wait``, give a holder that just created it a moment to fill it."""
    deadline = time.monotonic() + (HOLDER_WRITE_WAIT_S if wait else 0)
    while True:
        try:
            os.lseek(handle, 0, os.SEEK_SET)
            holder = json.loads(os.read(handle, 4096) or b"{}")
        except (OSError, ValueError):
            holder = {}
        if holder or time.monotonic() >= deadline:
            return holder if isinstance(holder, dict) else {}
        time.sleep(0.02)


def _write_holder(handle: int, command: str) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(handle, 0)
    os.lseek(handle, 0, os.SEEK_SET)
    os.write(handle, (json.dumps(record) + "\n").encode())


def _release(path: Path, handle: int) -> None:
    try:
        if _is_current(handle, path):
            path.unlink()
    except OSError:
        # the folder went away, or the file cannot be removed: closing the handle ends the flock, so the next
        # writer takes the file over as stale; never mask the command's own outcome here
        pass
    finally:
        os.close(handle)
