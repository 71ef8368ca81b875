"""The default output folders of the commands: ``runs/NAME``, under a ``runs/`` that git ignores."""

from __future__ import annotations

from pathlib import Path

RUNS = Path("runs")
RUNS_GITIGNORE = "# created by convlens: run folders stay out of git\n*\n"


def default_run_folder(name: str) -> Path:
    """``runs/NAME``. A ``runs/`` created here gets a ``.gitignore`` ignoring everything in it (as a virtual
    environment does), so that runs do not show up in the user's repository; an existing ``runs/`` is left as
    it is."""
    try:
        RUNS.mkdir()
    except FileExistsError:
        return RUNS / name
    (RUNS / ".gitignore").write_text(RUNS_GITIGNORE)
    return RUNS / name
