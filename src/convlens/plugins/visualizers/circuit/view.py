"""Views of an extracted circuit (VISCNN, 004 sec. 3): a static HTML page to explore it and a summary PNG.

Both read the JSON-ready circuit record (title, target, criterion, graph ``layers`` in data-flow order, the
subgraph's ``nodes`` with their top incoming edges, the kept ``edges``) and nothing else: no torch, no model.

- :func:`write_view` writes one self-contained HTML file (the CSS and JavaScript of ``assets/view.css`` and
  ``assets/view.js`` inlined, the record embedded as JSON, no network address anywhere), so it opens from
  ``file://``. Nodes stand in one column per graph layer (input on the
  left, the target on the right), the best-scored at the top; edges are curves whose width follows |score| and whose
  colour follows the kernel's sign balance ``sum(w) / sum(|w|)``: red above :data:`SIGN_THRESHOLD` (mostly
  excitatory), blue below its negative (mostly inhibitory), grey between (mixed); identity branches into additions
  are dashed. Clicking a node shows its feature visualisation and its top incoming edges (kernel, source picture,
  whether the subgraph kept it), as VISCNN's node panel does. Node pictures are paths relative to the page's folder.
- :func:`draw_subgraph` draws the same columns as a PNG, deterministic for a given record and width.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from convlens import INK, save_png

SIGN_THRESHOLD = 0.3
EXCITATORY = (214, 39, 40)
INHIBITORY = (31, 119, 180)
MIXED = (150, 150, 150)
TARGET_RING = (255, 140, 0)
NODE_FILL = (223, 230, 238)
NODE_OUTLINE = (70, 80, 95)
INPUT_COLOURS = ((235, 95, 95), (95, 190, 95), (95, 125, 235))


def sign_colour(sign: Any) -> tuple[int, int, int]:
    """Red for a mostly excitatory kernel, blue for a mostly inhibitory one, grey for mixed or unknown."""
    value = _number(sign, math.nan)
    if value > SIGN_THRESHOLD:
        return EXCITATORY
    if value < -SIGN_THRESHOLD:
        return INHIBITORY
    return MIXED


def _number(value: Any, default: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, so that the browser's JSON.parse accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def target_ids(record: dict) -> set[str]:
    """The ids of the target node(s): those named by ``record["target"]["nodes"]`` and those flagged ``target``."""
    named = (record.get("target") or {}).get("nodes") or []
    return {str(node) for node in named} | {node["id"] for node in record.get("nodes") or [] if node.get("target")}


def node_columns(record: dict) -> list[tuple[str, list[dict]]]:
    """The subgraph's nodes grouped by layer, layers in the record's data-flow order (layers missing from it last,
    in order of appearance), each column best score first (ties: lower channel first). Empty layers are left out."""
    groups: dict[str, list[dict]] = {}
    for node in record.get("nodes") or []:
        groups.setdefault(str(node.get("layer", str(node["id"]).rsplit(":", 1)[0])), []).append(node)
    order = [str(layer.get("name")) for layer in record.get("layers") or []]
    order += [name for name in groups if name not in order]
    return [
        (name, sorted(groups[name], key=lambda n: (-_number(n.get("score")), _number(n.get("channel")), str(n["id"]))))
        for name in order
        if name in groups
    ]


def size_text(record: dict) -> str:
    """The subgraph's size in words, e.g. ``120 of 2,400 edges (5%)``."""
    subgraph = record.get("subgraph") or {}
    kept = subgraph.get("edges_kept")
    total = subgraph.get("feature_edges")
    shown = len(record.get("edges") or [])
    if not isinstance(kept, (int, float)):
        kept = shown
    text = f"{int(kept):,} edges"
    if isinstance(total, (int, float)) and total > 0:
        fraction = subgraph.get("fraction")
        fraction = _number(fraction, kept / total) if fraction is not None else kept / total
        text = f"{int(kept):,} of {int(total):,} edges ({_percent(fraction)})"
    if shown < kept:
        text += f", {shown:,} strongest drawn"
    return text


def _percent(fraction: float) -> str:
    value = 100 * fraction
    if value == 0:
        return "0%"
    return f"{value:.0f}%" if abs(value) >= 10 else f"{value:.2g}%"


@dataclass(frozen=True)
class SubgraphLayout:
    """Pixel positions of a record's nodes: ``columns`` holds (layer, node ids top to bottom) left to right."""

    width: int
    height: int
    columns: list[tuple[str, list[str]]]
    column_x: list[float]
    pitches: list[float]
    positions: dict[str, tuple[float, float]]
    radii: dict[str, float]


def subgraph_layout(
    record: dict,
    width: int = 1200,
    *,
    top: int = 72,
    bottom: int = 48,
    margin: int = 60,
    min_pitch: float = 16.0,
    max_pitch: float = 48.0,
    max_band: int = 2400,
) -> SubgraphLayout:
    """One column per layer with nodes, spread evenly over ``width``; in a column the nodes are ``pitch`` apart
    (at most ``max_pitch``; the tallest column fits a band of ``min_pitch`` per node, at most ``max_band`` pixels)
    and centred in the band. Node radii grow with the square root of |score| relative to the largest."""
    columns = node_columns(record)
    count = len(columns)
    tallest = max((len(nodes) for _, nodes in columns), default=1)
    band = min(max(240.0, tallest * min_pitch), float(max_band))
    height = int(top + band + bottom)
    span = max(width - 2 * margin, 1)
    column_x = [width / 2] if count == 1 else [margin + span * index / (count - 1) for index in range(count)]
    gap = span / (count - 1) if count > 1 else span
    largest = max((abs(_number(n.get("score"))) for _, nodes in columns for n in nodes), default=0.0) or 1.0
    pitches = [min(max_pitch, band / len(nodes)) for _, nodes in columns]
    max_radius = max(2.5, min(14.0, min(pitches, default=max_pitch) / 2 - 1, gap / 5))
    positions: dict[str, tuple[float, float]] = {}
    radii: dict[str, float] = {}
    for x, pitch, (_, nodes) in zip(column_x, pitches, columns):
        offset = top + (band - pitch * len(nodes)) / 2
        for row, node in enumerate(nodes):
            positions[node["id"]] = (x, offset + (row + 0.5) * pitch)
            share = math.sqrt(min(abs(_number(node.get("score"))) / largest, 1.0))
            radii[node["id"]] = max_radius * (0.4 + 0.6 * share)
    return SubgraphLayout(
        width=width,
        height=height,
        columns=[(name, [n["id"] for n in nodes]) for name, nodes in columns],
        column_x=column_x,
        pitches=pitches,
        positions=positions,
        radii=radii,
    )


def _input_colour(node: dict, kinds: dict[str, Any]) -> tuple[int, int, int] | None:
    """The R, G or B swatch of an input-layer node, else None."""
    layer = str(node.get("layer"))
    channel = node.get("channel")
    if kinds.get(layer, "input" if layer == "input" else None) != "input" or not isinstance(channel, int):
        return None
    return INPUT_COLOURS[channel] if 0 <= channel < len(INPUT_COLOURS) else None


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def draw_subgraph(record: dict, path: Path, width: int = 1200) -> Path:
    """A PNG of the subgraph: columns of nodes by layer (inputs as R/G/B swatches, targets ringed in orange), kept
    edges as lines coloured by sign and as wide as their |score| allows, layer labels and a title line."""
    path = Path(path)
    layout = subgraph_layout(record, width)
    image = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(image)
    title_font, label_font, small_font = (ImageFont.load_default(size) for size in (14, 12, 10))

    target = record.get("target") or {}
    title = " · ".join(
        part
        for part in (
            str(record.get("title") or "circuit"),
            f"target {target['label']}" if target.get("label") else "",
            str(record.get("criterion") or ""),
            size_text(record),
        )
        if part
    )
    draw.text(
        (layout.width / 2, 10), _fit(draw, title, title_font, layout.width - 20), fill=INK, font=title_font, anchor="mt"
    )

    gap = (layout.column_x[1] - layout.column_x[0]) if len(layout.column_x) > 1 else layout.width
    stagger = any(draw.textlength(name, font=label_font) > gap - 6 for name, _ in layout.columns)
    for index, ((name, _), x) in enumerate(zip(layout.columns, layout.column_x)):
        row = index % 2 if stagger else 0
        room = (2 * gap if stagger else gap) - 8
        draw.text((x, 34 + 15 * row), _fit(draw, name, label_font, room), fill=INK, font=label_font, anchor="mt")

    nodes = {node["id"]: node for node in record.get("nodes") or []}
    edges = [
        edge
        for edge in record.get("edges") or []
        if edge.get("source") in layout.positions and edge.get("target") in layout.positions
    ]
    largest = max((abs(_number(edge.get("score"))) for edge in edges), default=0.0) or 1.0
    for edge in sorted(edges, key=lambda e: (abs(_number(e.get("score"))), str(e["source"]), str(e["target"]))):
        share = min(abs(_number(edge.get("score"))) / largest, 1.0)
        draw.line(
            [layout.positions[edge["source"]], layout.positions[edge["target"]]],
            fill=sign_colour(edge.get("sign")),
            width=1 + round(4 * share),
        )

    targets = target_ids(record)
    kinds = {str(layer.get("name")): layer.get("kind") for layer in record.get("layers") or []}
    for (_, ids), pitch in zip(layout.columns, layout.pitches):
        for node_id in ids:
            node = nodes[node_id]
            x, y = layout.positions[node_id]
            radius = layout.radii[node_id]
            if node_id in targets:
                ring = radius + 3
                draw.ellipse([x - ring, y - ring, x + ring, y + ring], fill=TARGET_RING)
            draw.ellipse(
                [x - radius, y - radius, x + radius, y + radius],
                fill=_input_colour(node, kinds) or NODE_FILL,
                outline=NODE_OUTLINE,
            )
            if pitch >= 13 and node.get("channel") is not None:
                draw.text((x + radius + 3, y), str(node["channel"]), fill=INK, font=small_font, anchor="lm")

    legend = [
        (EXCITATORY, "mostly excitatory"),
        (INHIBITORY, "mostly inhibitory"),
        (MIXED, "mixed"),
        (TARGET_RING, "target"),
    ]
    x, y = 20, layout.height - 20
    for colour, label in legend:
        draw.line([(x, y), (x + 24, y)], fill=colour, width=3)
        draw.text((x + 30, y), label, fill=INK, font=small_font, anchor="lm")
        x += 40 + draw.textlength(label, font=small_font) + 16
    if not layout.columns:
        draw.text((layout.width / 2, layout.height / 2), "empty subgraph", fill=INK, font=label_font, anchor="mm")
    save_png(image, path)
    return path


def _asset(name: str) -> str:
    """The text of ``assets/NAME`` (package data), checked to be safe to inline in a ``<style>`` or ``<script>``."""
    text = (importlib.resources.files(__package__) / "assets" / name).read_text(encoding="utf-8")
    for closing in ("</style", "</script"):
        if closing in text.lower():
            raise ValueError(f"assets/{name} contains {closing!r}, which would end its inline element early")
    return text


@functools.cache
def view_style() -> str:
    """The view's style sheet, ``assets/view.css``."""
    return _asset("view.css")


@functools.cache
def view_script() -> str:
    """The view's script, ``assets/view.js``, with the sign threshold and the input colours of this module filled
    in for its ``%THRESHOLD%`` and ``%INPUT_COLOURS%``."""
    colours = json.dumps([f"rgb({r}, {g}, {b})" for r, g, b in INPUT_COLOURS])
    return _asset("view.js").replace("%THRESHOLD%", repr(SIGN_THRESHOLD)).replace("%INPUT_COLOURS%", colours)


def write_view(record: dict, out_dir: Path, name: str = "view.html") -> Path:
    """Write ``out_dir/name``: the interactive circuit page. Node pictures are read relative to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(_finite(record), ensure_ascii=False, separators=(",", ":"))
    data = data.replace("</", "<\\/").replace("<!--", "<\\u0021--")
    target = record.get("target") or {}
    facts = [("criterion", record.get("criterion")), ("target", target.get("label")), ("subgraph", size_text(record))]
    sub = " · ".join(f"{label}: {html.escape(str(value))}" for label, value in facts if value not in (None, ""))
    parts = {
        "TITLE": html.escape(str(record.get("title") or "circuit")),
        "SUB": sub,
        "CSS": view_style(),
        "SCRIPT": view_script(),
        "DATA": data,
    }
    page = re.sub(r"%(TITLE|SUB|CSS|SCRIPT|DATA)%", lambda match: parts[match.group(1)], PAGE)
    path = out_dir / name
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, path)
    return path


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
%CSS%</style>
</head>
<body>
<header>
<h1>%TITLE%</h1>
<p class="sub">%SUB%</p>
<p class="legend"><span class="swatch excitatory"></span>mostly excitatory
<span class="swatch inhibitory"></span>mostly inhibitory <span class="swatch mixed"></span>mixed
<span class="swatch branch"></span>identity branch <span class="ring"></span>target
· width: |score| · click a node for its feature visualisation and top inputs</p>
</header>
<div id="layout">
<div id="graph-wrap"><svg id="graph" role="img" aria-label="circuit graph"></svg></div>
<aside id="panel" aria-live="polite"><p class="muted">This view needs JavaScript.</p></aside>
</div>
<script type="application/json" id="circuit-data">%DATA%</script>
<script>
%SCRIPT%</script>
</body>
</html>
"""
