"""Plain-text tables and JSON for the CLI."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import click

MIN_LAST_COLUMN = 20  # on a narrow terminal the last column keeps this much and the line wraps


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Left-aligned columns; the last column is cut so that lines fit the terminal (see :func:`line_width`)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    available = line_width()
    if available is not None and cells:
        last = max(available - sum(widths[:-1]) - 2 * (len(widths) - 1), MIN_LAST_COLUMN)
        cells = [row[:-1] + [_shorten(row[-1], last)] for row in cells]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    click.echo(line.rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def line_width() -> int | None:
    """Characters a line may take: ``$COLUMNS``, else the terminal's width; None (no limit) when the output is not
    a terminal, so that piped and redirected tables keep every character."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
