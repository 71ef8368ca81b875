"""HTML building blocks of ``convlens report``: escaping, number formatting, metric cells, tables, figures, the page
frame, and the inline CSS and JavaScript (sorting and filtering of the units index).

Everything here is plain string work (no torch, no templates, no external files): every page carries its own
CSS, the only script is inline vanilla JavaScript, and nothing refers to a network address, so the site works
from ``file://`` with no server. Every text that comes from a run folder goes through :func:`esc`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
:root { --fg: #1d2327; --muted: #5f6b73; --line: #d8dee3; --bg: #fff; --soft: #f4f6f8; --accent: #2457a6;
        --ok: #1e7a3c; --bad: #b3261e; --warn: #8a5a00; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: var(--soft); border-bottom: 1px solid var(--line); padding: 0.6rem 1.5rem 0.8rem; }
header nav { display: flex; flex-wrap: wrap; gap: 1.2rem; font-size: 0.92rem; margin-bottom: 0.3rem; }
header h1 { margin: 0.2rem 0 0; font-size: 1.45rem; }
header .sub { color: var(--muted); margin: 0.15rem 0 0; }
main { padding: 0.5rem 1.5rem 2rem; max-width: 1400px; }
footer { color: var(--muted); font-size: 0.85rem; padding: 0.8rem 1.5rem; border-top: 1px solid var(--line); }
h2 { font-size: 1.2rem; margin: 1.8rem 0 0.5rem; padding-bottom: 0.2rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.02rem; margin: 1.2rem 0 0.4rem; }
a { color: var(--accent); }
code { font-size: 0.9em; background: var(--soft); padding: 0 0.2em; border-radius: 3px; }
table { border-collapse: collapse; margin: 0.4rem 0 0.8rem; font-size: 0.9rem; }
th, td { border: 1px solid var(--line); padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer; color: inherit; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
.note { color: var(--warn); background: #fff8e6; border-left: 3px solid #e0b04a; padding: 0.3rem 0.6rem;
        margin: 0.4rem 0; }
.muted { color: var(--muted); }
.status-done { color: var(--ok); font-weight: 600; }
.status-failed { color: var(--bad); font-weight: 600; }
.status-skipped, .status-pending { color: var(--muted); font-weight: 600; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.15rem 1rem; margin: 0.4rem 0; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; }
.figures { display: flex; flex-wrap: wrap; gap: 0.8rem; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); image-rendering: auto; }
figure.small img { width: 160px; image-rendering: pixelated; }
figure.wide img { max-width: min(100%, 900px); }
figure.overlay img { max-width: min(100%, 560px); }
figcaption { font-size: 0.82rem; color: var(--muted); max-width: 420px; margin-top: 0.2rem; }
figure.small figcaption { max-width: 160px; }
.kind { font-size: 0.75rem; color: var(--muted); text-transform: uppercase; letter-spacing: 0.03em; }
.controls { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; margin: 0.6rem 0; }
.controls input[type=search] { padding: 0.25rem 0.4rem; min-width: 16rem; }
#unit-table td:first-child { white-space: nowrap; }
img.thumb { width: 48px; height: 48px; object-fit: cover; image-rendering: pixelated; border: 1px solid var(--line);
            display: block; }
.side td { min-width: 12rem; }
.side img { width: 96px; height: 96px; object-fit: cover; image-rendering: pixelated; border: 1px solid var(--line); }
.side .examples img { width: 48px; height: 48px; }
.pager { display: flex; gap: 1.2rem; margin: 0.6rem 0; }
.statement { font-size: 1.02rem; background: var(--soft); padding: 0.5rem 0.8rem; border-radius: 4px; }
ul.compact { margin: 0.3rem 0; padding-left: 1.3rem; }
"""

SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("unit-table");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var heads = table.tHead.rows[0].cells;
  function key(row, index, numeric) {
    var cell = row.cells[index];
    var value = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
    if (!numeric) { return value.trim().toLowerCase(); }
    var number = parseFloat(value);
    return isNaN(number) ? null : number;
  }
  Array.prototype.forEach.call(heads, function (head, index) {
    var button = head.querySelector("button");
    if (!button) { return; }
    button.addEventListener("click", function () {
      var numeric = head.getAttribute("data-type") === "number";
      var ascending = head.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (other) { other.removeAttribute("aria-sort"); });
      head.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var keyed = rows.map(function (row, position) { return [key(row, index, numeric), position, row]; });
      keyed.sort(function (a, b) {
        if (a[0] === null || b[0] === null) {
          if (a[0] === b[0]) { return a[1] - b[1]; }
          return a[0] === null ? 1 : -1;
        }
        if (a[0] < b[0]) { return ascending ? -1 : 1; }
        if (a[0] > b[0]) { return ascending ? 1 : -1; }
        return a[1] - b[1];
      });
      keyed.forEach(function (item) { body.appendChild(item[2]); });
    });
  });
  var text = document.getElementById("unit-filter");
  var dead = document.getElementById("hide-dead");
  var group = document.getElementById("group-filter");
  var visualised = document.getElementById("visualised-only");
  var count = document.getElementById("unit-count");
  function apply() {
    var words = text.value.trim().toLowerCase().split(/\\s+/).filter(function (w) { return w.length > 0; });
    var shown = 0;
    rows.forEach(function (row) {
      var haystack = row.getAttribute("data-search");
      var visible = (!dead.checked || row.getAttribute("data-dead") !== "true") &&
        (!visualised.checked || row.getAttribute("data-visualised") === "true") &&
        (group.value === "" || row.getAttribute("data-group") === group.value) &&
        words.every(function (word) { return haystack.indexOf(word) !== -1; });
      row.hidden = !visible;
      if (visible) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " shown";
  }
  [text, dead, group, visualised].forEach(function (control) {
    control.addEventListener("input", apply);
    control.addEventListener("change", apply);
  });
  apply();
}());
"""


# Nothing but this page's own inline style and script, and pictures next to it: no network request can leave a page.
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
                           "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")


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
    ``data-*`` attributes given as keyword arguments (``sae="topk"`` becomes ``data-sae="topk"``)."""
    extra = {f"data-{key.replace('_', '-')}": item for key, item in data.items()}
    classes = "num" if tag in ("td", "th") else None
    return (f"<{tag}{attrs({'class': classes, 'data-metric': name, **extra, 'data-value': raw(value)})}>"
            f"{esc(fmt(value, style))}</{tag}>")


def cell(value: Any, style: str = "num", *, sort: Any = None) -> str:
    """A ``<td>`` for a plain value (numbers right-aligned); ``sort`` becomes ``data-sort``."""
    numeric = is_number(value)
    sort_value = sort if sort is not None else (raw(value) if numeric else None)
    return f"<td{attrs({'class': 'num' if numeric else None, 'data-sort': sort_value})}>{esc(fmt(value, style))}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Sequence[int] = (),
          **attributes: Any) -> str:
    """A table of pre-rendered ``<td>`` strings; ``numeric`` header positions are right-aligned."""
    head = "".join(f"<th{attrs({'class': 'num' if i in numeric else None})}>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = "\n".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f"<table{attrs(attributes)}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def facts(items: Iterable[tuple[str, str]]) -> str:
    """A definition list of (label, pre-rendered HTML value) pairs."""
    return "<dl class=\"facts\">" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def figure(src: str, caption: str = "", *, kind: str = "", css: str = "", alt: str = "", width: int | None = None,
           link: str | None = None) -> str:
    """An ``<img>`` in a ``<figure>`` with its caption (and its kind above the caption); ``src`` is a URL."""
    image = f"<img{attrs({'src': src, 'alt': alt or caption or kind, 'width': width})}>"
    if link:
        image = f'<a href="{esc(link)}">{image}</a>'
    label = f'<div class="kind">{esc(kind)}</div>' if kind else ""
    text = f"<figcaption>{label}{esc(caption)}</figcaption>" if (caption or kind) else ""
    return f"<figure{attrs({'class': css or None})}>{image}{text}</figure>"


def page(title: str, body: str, *, nav: Sequence[tuple[str, str]], subtitle: str = "", footer: str = "",
         script: bool = False) -> str:
    """A whole HTML document: inline CSS, a navigation bar of (URL, label) pairs, ``body`` (HTML), and the inline
    script when ``script``. No external resource of any kind."""
    links = "".join(f'<a href="{esc(url)}">{esc(label)}</a>' for url, label in nav)
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    tail = f"<script>{SCRIPT}</script>\n" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CONTENT_SECURITY_POLICY)}">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><nav>{links}</nav><h1>{esc(title)}</h1>{sub}</header>\n"
        f"<main>\n{body}\n</main>\n"
        f"<footer>{esc(footer)}</footer>\n{tail}</body>\n</html>\n"
    )
