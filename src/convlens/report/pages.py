"""HTML building blocks of ``convlens report``: escaping, number formatting, metric cells, tables, figures and the
page frame.

The style sheet and the script (sorting and filtering of the units index) are package data, ``assets/report.css``
and ``assets/report.js``; :func:`page` inlines them, so every page carries its own CSS, the only script is inline
vanilla JavaScript, and nothing refers to a network address: the site works from ``file://`` with no server, and
the Content-Security-Policy of the pages allows nothing but their own inline style and script. Every text that
comes from a run folder goes through :func:`esc`.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import importlib.resources
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

STYLE_SHEET = "report.css"
SCRIPT = "report.js"

# Nothing but this page's own inline style and script, and pictures next to it: no network request can leave a page.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


@dataclasses.dataclass
class Content:
    """What one page shows, before the frame: title, body (HTML), subtitle, and whether it needs the script."""

    title: str
    body: str
    subtitle: str = ""
    script: bool = False


@functools.cache
def asset(name: str) -> str:
    """The text of ``assets/NAME`` (package data), checked to be safe to inline in a ``<style>`` or ``<script>``."""
    text = (importlib.resources.files("convlens.report") / "assets" / name).read_text(encoding="utf-8")
    for closing in ("</style", "</script"):
        if closing in text.lower():
            raise ValueError(f"assets/{name} contains {closing!r}, which would end its inline element early")
    return text


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML element content and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def attrs(values: dict[str, Any]) -> str:
    """`` key="value"`` pairs (escaped, in the given order); None values are left out, True is a bare flag."""
    parts = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        parts.append(f" {key}" if value is True else f' {key}="{esc(value)}"')
    return "".join(parts)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any, style: str = "num") -> str:
    """A number for reading: ``num`` (4 significant digits), ``int``, ``pct`` (a share as per cent), ``signed``
    (4 significant digits with a sign), ``sec`` (seconds); None, NaN and non-numbers as given or 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not is_number(value):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if style == "int":
        return f"{value:,.0f}".replace(",", " ")
    if style == "pct":
        return f"{100 * value:.1f} %"
    if style == "signed":
        return f"{value:+.4g}"
    if style == "sec":
        return f"{value:.1f} s"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def raw(value: Any) -> str:
    """The exact value for a ``data-value`` attribute: JSON (round-trips floats; NaN as ``NaN``, None as ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return json.dumps(value)


def metric(value: Any, name: str, style: str = "num", *, tag: str = "td", **data: Any) -> str:
    """An element showing ``value`` formatted, with ``data-metric=name``, ``data-value`` (exact) and the other
    ``data-*`` attributes given as keyword arguments (``sae="main"`` becomes ``data-sae="main"``)."""
    extra = {f"data-{key.replace('_', '-')}": item for key, item in data.items()}
    classes = "num" if tag in ("td", "th") else None
    return (
        f"<{tag}{attrs({'class': classes, 'data-metric': name, **extra, 'data-value': raw(value)})}>"
        f"{esc(fmt(value, style))}</{tag}>"
    )


def cell(value: Any, style: str = "num", *, sort: Any = None) -> str:
    """A ``<td>`` for a plain value (numbers right-aligned); ``sort`` becomes ``data-sort``."""
    numeric = is_number(value)
    sort_value = sort if sort is not None else (raw(value) if numeric else None)
    return f"<td{attrs({'class': 'num' if numeric else None, 'data-sort': sort_value})}>{esc(fmt(value, style))}</td>"


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Sequence[int] = (), **attributes: Any
) -> str:
    """A table of pre-rendered ``<td>`` strings; ``numeric`` header positions are right-aligned."""
    head = "".join(
        f"<th{attrs({'class': 'num' if i in numeric else None})}>{esc(h)}</th>" for i, h in enumerate(headers)
    )
    body = "\n".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f"<table{attrs(attributes)}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def facts(items: Iterable[tuple[str, str]]) -> str:
    """A definition list of (label, pre-rendered HTML value) pairs."""
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def figure(
    src: str,
    caption: str = "",
    *,
    kind: str = "",
    css: str = "",
    alt: str = "",
    width: int | None = None,
    link: str | None = None,
    vector: str | None = None,
) -> str:
    """An ``<img>`` in a ``<figure>`` with its caption (and its kind above the caption); ``src`` is a URL, and
    ``vector`` the URL of the same chart as SVG, linked after the caption."""
    image = f"<img{attrs({'src': src, 'alt': alt or caption or kind, 'width': width})}>"
    if link:
        image = f'<a href="{esc(link)}">{image}</a>'
    label = f'<div class="kind">{esc(kind)}</div>' if kind else ""
    svg = f' <a class="svg" href="{esc(vector)}">SVG</a>' if vector else ""
    text = f"<figcaption>{label}{esc(caption)}{svg}</figcaption>" if (caption or kind or vector) else ""
    return f"<figure{attrs({'class': css or None})}>{image}{text}</figure>"


def page(
    title: str, body: str, *, nav: Sequence[tuple[str, str]], subtitle: str = "", footer: str = "", script: bool = False
) -> str:
    """A whole HTML document: the inlined style sheet, a navigation bar of (URL, label) pairs, ``body`` (HTML), and
    the inlined script when ``script``. No external resource of any kind."""
    links = "".join(f'<a href="{esc(url)}">{esc(label)}</a>' for url, label in nav)
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    tail = f"<script>\n{asset(SCRIPT)}</script>\n" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CONTENT_SECURITY_POLICY)}">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>\n{asset(STYLE_SHEET)}</style>\n</head>\n<body>\n"
        f"<header><nav>{links}</nav><h1>{esc(title)}</h1>{sub}</header>\n"
        f"<main>\n{body}\n</main>\n"
        f"<footer>{esc(footer)}</footer>\n{tail}</body>\n</html>\n"
    )
