"""Views of an extracted circuit (VISCNN, 004 sec. 3): a static HTML page to explore it and a summary PNG.

Both read the JSON-ready circuit record (title, target, criterion, graph ``layers`` in data-flow order, the
subgraph's ``nodes`` with their top incoming edges, the kept ``edges``) and nothing else: no torch, no model.

- :func:`write_view` writes one self-contained HTML file (inline CSS and JavaScript, the record embedded as JSON, no
  network address anywhere), so it opens from ``file://``. Nodes stand in one column per graph layer (input on the
  left, the target on the right), the best-scored at the top; edges are curves whose width follows |score| and whose
  colour follows the kernel's sign balance ``sum(w) / sum(|w|)``: red above :data:`SIGN_THRESHOLD` (mostly
  excitatory), blue below its negative (mostly inhibitory), grey between (mixed); identity branches into additions
  are dashed. Clicking a node shows its feature visualisation and its top incoming edges (kernel, source picture,
  whether the subgraph kept it), as VISCNN's node panel does. Node pictures are paths relative to the page's folder.
- :func:`draw_subgraph` draws the same columns as a PNG, deterministic for a given record and width.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from convlens.core.charts import INK
from convlens.core.images import save_png

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
    return [(name, sorted(groups[name], key=lambda n: (-_number(n.get("score")), _number(n.get("channel")),
                                                        str(n["id"]))))
            for name in order if name in groups]


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


def subgraph_layout(record: dict, width: int = 1200, *, top: int = 72, bottom: int = 48, margin: int = 60,
                    min_pitch: float = 16.0, max_pitch: float = 48.0, max_band: int = 2400) -> SubgraphLayout:
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
    return SubgraphLayout(width=width, height=height, columns=[(name, [n["id"] for n in nodes]) for name, nodes in
                                                               columns],
                          column_x=column_x, pitches=pitches, positions=positions, radii=radii)


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
    title = " · ".join(part for part in (str(record.get("title") or "circuit"),
                                         f"target {target['label']}" if target.get("label") else "",
                                         str(record.get("criterion") or ""), size_text(record)) if part)
    draw.text((layout.width / 2, 10), _fit(draw, title, title_font, layout.width - 20), fill=INK, font=title_font,
              anchor="mt")

    gap = (layout.column_x[1] - layout.column_x[0]) if len(layout.column_x) > 1 else layout.width
    stagger = any(draw.textlength(name, font=label_font) > gap - 6 for name, _ in layout.columns)
    for index, ((name, ids), x) in enumerate(zip(layout.columns, layout.column_x)):
        row = index % 2 if stagger else 0
        room = (2 * gap if stagger else gap) - 8
        draw.text((x, 34 + 15 * row), _fit(draw, name, label_font, room), fill=INK, font=label_font, anchor="mt")

    nodes = {node["id"]: node for node in record.get("nodes") or []}
    edges = [edge for edge in record.get("edges") or []
             if edge.get("source") in layout.positions and edge.get("target") in layout.positions]
    largest = max((abs(_number(edge.get("score"))) for edge in edges), default=0.0) or 1.0
    for edge in sorted(edges, key=lambda e: (abs(_number(e.get("score"))), str(e["source"]), str(e["target"]))):
        share = min(abs(_number(edge.get("score"))) / largest, 1.0)
        draw.line([layout.positions[edge["source"]], layout.positions[edge["target"]]],
                  fill=sign_colour(edge.get("sign")), width=1 + round(4 * share))

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
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=_input_colour(node, kinds) or NODE_FILL,
                         outline=NODE_OUTLINE)
            if pitch >= 13 and node.get("channel") is not None:
                draw.text((x + radius + 3, y), str(node["channel"]), fill=INK, font=small_font, anchor="lm")

    legend = [(EXCITATORY, "mostly excitatory"), (INHIBITORY, "mostly inhibitory"), (MIXED, "mixed"),
              (TARGET_RING, "target")]
    x, y = 20, layout.height - 20
    for colour, label in legend:
        draw.line([(x, y), (x + 24, y)], fill=colour, width=3)
        draw.text((x + 30, y), label, fill=INK, font=small_font, anchor="lm")
        x += 40 + draw.textlength(label, font=small_font) + 16
    if not layout.columns:
        draw.text((layout.width / 2, layout.height / 2), "empty subgraph", fill=INK, font=label_font, anchor="mm")
    save_png(image, path)
    return path


def write_view(record: dict, out_dir: Path, name: str = "view.html") -> Path:
    """Write ``out_dir/name``: the interactive circuit page. Node pictures are read relative to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(_finite(record), ensure_ascii=False, separators=(",", ":"))
    data = data.replace("</", "<\\/").replace("<!--", "<\\u0021--")
    target = record.get("target") or {}
    facts = [("criterion", record.get("criterion")), ("target", target.get("label")), ("subgraph", size_text(record))]
    sub = " · ".join(f"{label}: {html.escape(str(value))}" for label, value in facts if value not in (None, ""))
    parts = {"TITLE": html.escape(str(record.get("title") or "circuit")), "SUB": sub, "CSS": CSS, "SCRIPT": SCRIPT,
             "DATA": data}
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
<style>%CSS%</style>
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
<script>%SCRIPT%</script>
</body>
</html>
"""

CSS = """
:root { --fg: #1d2327; --muted: #5f6b73; --line: #d8dee3; --soft: #f4f6f8; --accent: #2457a6;
        --exc: rgb(214, 39, 40); --inh: rgb(31, 119, 180); --mix: rgb(150, 150, 150); --ring: rgb(255, 140, 0); }
* { box-sizing: border-box; }
html, body { height: 100%; }
body { margin: 0; display: flex; flex-direction: column; color: var(--fg);
       font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { background: var(--soft); border-bottom: 1px solid var(--line); padding: 0.5rem 1rem; }
header h1 { margin: 0; font-size: 1.3rem; overflow-wrap: anywhere; }
header p { margin: 0.15rem 0 0; }
.sub, .legend, .muted { color: var(--muted); }
.legend { font-size: 0.82rem; }
.swatch { display: inline-block; width: 22px; height: 0; border-top: 3px solid; vertical-align: middle;
          margin: 0 0.3rem 0 0.6rem; }
.swatch.excitatory { border-color: var(--exc); }
.swatch.inhibitory { border-color: var(--inh); }
.swatch.mixed { border-color: var(--mix); }
.swatch.branch { border-top-style: dashed; border-color: var(--exc); }
.ring { display: inline-block; width: 11px; height: 11px; border: 3px solid var(--ring); border-radius: 50%;
        vertical-align: middle; margin: 0 0.3rem 0 0.6rem; }
#layout { flex: 1; display: flex; min-height: 0; }
#graph-wrap { flex: 1; overflow: auto; min-width: 0; }
#panel { width: 380px; flex: none; overflow-y: auto; border-left: 1px solid var(--line); padding: 0.6rem 0.9rem; }
#graph .edge { fill: none; stroke-opacity: 0.55; stroke-linecap: round; }
#graph .edge.excitatory { stroke: var(--exc); }
#graph .edge.inhibitory { stroke: var(--inh); }
#graph .edge.mixed { stroke: var(--mix); }
#graph .edge.branch { stroke-dasharray: 6 3; }
#graph.has-selection .edge { stroke-opacity: 0.15; }
#graph.has-selection .edge.incident { stroke-opacity: 0.95; }
#graph .node { cursor: pointer; }
#graph .node circle { fill: rgb(223, 230, 238); stroke: rgb(70, 80, 95); stroke-width: 1; }
#graph .node.target circle { stroke: var(--ring); stroke-width: 4; }
#graph .node.neighbour circle { stroke: #000; stroke-width: 2; }
#graph .node.selected circle { stroke: #000; stroke-width: 4; }
#graph .node:focus { outline: none; }
#graph .node:focus-visible circle { stroke: var(--accent); stroke-width: 4; }
#graph .node text { font-size: 10px; fill: var(--muted); pointer-events: none; }
#graph .column-label { font-size: 12px; fill: var(--fg); }
#panel h2 { font-size: 1.1rem; margin: 0 0 0.3rem; overflow-wrap: anywhere; }
#panel h3 { font-size: 0.95rem; margin: 0.9rem 0 0.3rem; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.1rem 0.8rem; margin: 0; font-size: 0.88rem; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; }
#node-image { display: block; width: 180px; height: auto; border: 1px solid var(--line); margin-top: 0.5rem; }
.colour-swatch { display: inline-block; width: 56px; height: 56px; border: 1px solid var(--line); }
.big.colour-swatch { width: 120px; height: 120px; display: block; margin-top: 0.5rem; }
ol.inputs { list-style: none; margin: 0; padding: 0; }
.edge-entry { border: 1px solid var(--line); border-left: 5px solid var(--mix); border-radius: 3px;
              padding: 0.3rem 0.45rem; margin-bottom: 0.45rem; }
.edge-entry.excitatory { border-left-color: var(--exc); }
.edge-entry.inhibitory { border-left-color: var(--inh); }
.entry-head { display: flex; gap: 0.5rem; align-items: baseline; flex-wrap: wrap; font-size: 0.86rem; }
.entry-body { display: flex; gap: 0.6rem; align-items: center; margin-top: 0.3rem; }
.source-link, .out-link { font: inherit; font-weight: 600; color: var(--accent); background: none; border: 0;
                          padding: 0; cursor: pointer; text-decoration: underline; }
.source-link:disabled { color: var(--fg); text-decoration: none; cursor: default; }
.badge { font-size: 0.75rem; border-radius: 3px; padding: 0 0.3rem; background: var(--soft); color: var(--muted); }
.badge.kept { background: #e3f1e6; color: #1e7a3c; }
svg.kernel { border: 1px solid var(--line); flex: none; }
div.kernel { font-size: 0.78rem; color: var(--muted); border: 1px dashed var(--line); padding: 0.4rem; flex: none; }
.source-image { width: 64px; height: 64px; border: 1px solid var(--line); flex: none; }
.outputs { display: flex; flex-wrap: wrap; gap: 0.2rem 0.7rem; font-size: 0.86rem; }
"""

SCRIPT = r"""
"use strict";
(function () {
  const record = JSON.parse(document.getElementById("circuit-data").textContent);
  const graph = document.getElementById("graph");
  const panel = document.getElementById("panel");
  const NS = graph.namespaceURI;
  const THRESHOLD = %THRESHOLD%;
  const INPUT_COLOURS = %INPUT_COLOURS%;

  const num = (value) => (typeof value === "number" && Number.isFinite(value) ? value : 0);
  const fmt = (value) => {
    if (typeof value !== "number" || !Number.isFinite(value)) return "n/a";
    if (value !== 0 && (Math.abs(value) >= 1e4 || Math.abs(value) < 1e-3)) return value.toExponential(2);
    return String(Number(value.toPrecision(3)));
  };
  const signClass = (sign) => (typeof sign !== "number" ? "mixed"
    : sign > THRESHOLD ? "excitatory" : sign < -THRESHOLD ? "inhibitory" : "mixed");
  const svg = (tag, attrs) => {
    const node = document.createElementNS(NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    return node;
  };
  const html = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  };
  const titled = (node, text) => {
    const title = svg("title");
    title.textContent = text;
    node.append(title);
    return node;
  };

  const nodes = Array.isArray(record.nodes) ? record.nodes : [];
  const edges = Array.isArray(record.edges) ? record.edges : [];
  const byId = new Map(nodes.map((node) => [String(node.id), node]));
  const layerOf = (node) => String(node.layer ?? String(node.id).replace(/:[^:]*$/, ""));
  const layerKinds = new Map((record.layers || []).map((layer) => [String(layer.name), layer.kind]));
  const targets = new Set(((record.target || {}).nodes || []).map(String));
  for (const node of nodes) if (node.target) targets.add(String(node.id));

  const groups = new Map();
  for (const node of nodes) {
    if (!groups.has(layerOf(node))) groups.set(layerOf(node), []);
    groups.get(layerOf(node)).push(node);
  }
  const order = (record.layers || []).map((layer) => String(layer.name)).filter((name) => groups.has(name));
  for (const name of groups.keys()) if (!order.includes(name)) order.push(name);
  const columns = order.map((name) => [name, groups.get(name).sort((a, b) =>
    num(b.score) - num(a.score) || num(a.channel) - num(b.channel) || (String(a.id) < String(b.id) ? -1 : 1))]);

  const inputColour = (node) => {
    const kind = layerKinds.get(layerOf(node)) ?? (layerOf(node) === "input" ? "input" : "");
    const channel = node.channel;
    return kind === "input" && Number.isInteger(channel) && channel >= 0 && channel < INPUT_COLOURS.length
      ? INPUT_COLOURS[channel] : null;
  };

  const GAP = 170, LEFT = 50, RIGHT = 170, TOP = 130, BOTTOM = 30, MIN_PITCH = 22, MAX_PITCH = 56, VIEW = 700;
  const tallest = Math.max(1, ...columns.map(([, list]) => list.length));
  const band = Math.max(240, tallest * MIN_PITCH);
  const visible = Math.min(band, VIEW);
  const width = LEFT + Math.max(columns.length - 1, 0) * GAP + RIGHT;
  const height = TOP + band + BOTTOM;
  graph.setAttribute("width", width);
  graph.setAttribute("height", height);
  graph.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const largestNode = Math.max(0, ...nodes.map((node) => Math.abs(num(node.score)))) || 1;
  const position = new Map();
  const labels = svg("g", {class: "column-labels"});
  columns.forEach(([name, list], index) => {
    const x = LEFT + index * GAP;
    const pitch = Math.min(MAX_PITCH, band / list.length);
    const span = pitch * list.length;
    const offset = span <= visible ? (visible - span) / 2 : 0;
    list.forEach((node, row) => position.set(String(node.id), [x, TOP + offset + (row + 0.5) * pitch]));
    const [lx, ly] = [x - 6, TOP - 14];
    const label = svg("text", {class: "column-label", x: lx, y: ly, transform: `rotate(-30 ${lx} ${ly})`});
    label.textContent = `${name} (${list.length})`;
    labels.append(titled(label, `${name}: ${layerKinds.get(name) ?? "layer"}, ${list.length} node(s) in the subgraph`));
  });

  const edgeLayer = svg("g", {class: "edges"});
  const incident = new Map();
  const largestEdge = Math.max(0, ...edges.map((edge) => Math.abs(num(edge.score)))) || 1;
  const drawn = edges.map((edge, index) => [edge, index])
    .filter(([edge]) => position.has(String(edge.source)) && position.has(String(edge.target)))
    .sort((a, b) => Math.abs(num(a[0].score)) - Math.abs(num(b[0].score)) || a[1] - b[1]);
  for (const [edge] of drawn) {
    const source = String(edge.source), target = String(edge.target);
    const [x1, y1] = position.get(source), [x2, y2] = position.get(target);
    const bend = Math.max((x2 - x1) / 2, 30);
    const classes = ["edge", signClass(edge.sign)];
    if (edge.kind === "branch") classes.push("branch");
    const path = svg("path", {
      class: classes.join(" "), "data-source": source, "data-target": target,
      d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`,
      "stroke-width": (0.6 + 5 * Math.min(Math.abs(num(edge.score)) / largestEdge, 1)).toFixed(2)});
    titled(path, `${source} → ${target} (${edge.kind || "edge"}), score ${fmt(edge.score)}, sign ${fmt(edge.sign)}`);
    edgeLayer.append(path);
    for (const id of [source, target]) {
      if (!incident.has(id)) incident.set(id, []);
      incident.get(id).push(path);
    }
  }

  const nodeLayer = svg("g", {class: "nodes"});
  const nodeElements = new Map();
  for (const [, list] of columns) {
    for (const node of list) {
      const id = String(node.id);
      const [x, y] = position.get(id);
      const radius = 3 + 8 * Math.sqrt(Math.min(Math.abs(num(node.score)) / largestNode, 1));
      const group = svg("g", {class: targets.has(id) ? "node target" : "node", "data-node": id, tabindex: "0",
                              transform: `translate(${x},${y})`, role: "button"});
      const circle = svg("circle", {r: radius.toFixed(2)});
      const colour = inputColour(node);
      if (colour) circle.style.fill = colour;
      group.append(circle);
      const text = svg("text", {x: (radius + 4).toFixed(1), y: 3.5});
      text.textContent = node.channel ?? "";
      group.append(text);
      titled(group, `${id}, score ${fmt(node.score)}${targets.has(id) ? " (target)" : ""}`);
      nodeLayer.append(group);
      nodeElements.set(id, group);
    }
  }
  graph.append(edgeLayer, nodeLayer, labels);

  const kernelView = (kernel) => {
    const rows = Array.isArray(kernel) ? kernel.filter(Array.isArray) : [];
    const cols = Math.max(0, ...rows.map((row) => row.length));
    if (!rows.length || !cols) return html("div", {class: "kernel", text: kernel == null ? "identity" : "no kernel"});
    const largest = Math.max(0, ...rows.flat().map((value) => Math.abs(num(value)))) || 1;
    const cell = Math.max(5, Math.min(16, Math.floor(72 / Math.max(rows.length, cols))));
    const view = svg("svg", {class: "kernel", width: cols * cell, height: rows.length * cell,
                             viewBox: `0 0 ${cols * cell} ${rows.length * cell}`});
    titled(view, `kernel ${rows.length}×${cols}, colour scale ±${fmt(largest)}`);
    rows.forEach((row, r) => row.forEach((value, c) => {
      const t = Math.max(-1, Math.min(1, num(value) / largest));
      const end = t >= 0 ? [178, 24, 43] : [33, 102, 172];
      const mix = end.map((channel) => Math.round(255 + (channel - 255) * Math.abs(t)));
      const rect = svg("rect", {x: c * cell, y: r * cell, width: cell, height: cell, fill: `rgb(${mix.join(",")})`});
      view.append(titled(rect, `[${r}, ${c}] = ${fmt(value)}`));
    }));
    return view;
  };
  const kernelSign = (kernel) => {
    const values = Array.isArray(kernel) ? kernel.flat(Infinity).map(num) : [];
    const total = values.reduce((sum, value) => sum + Math.abs(value), 0);
    return total ? values.reduce((sum, value) => sum + value, 0) / total : null;
  };
  const picture = (node, big, id) => {
    if (!node) return null;
    const colour = inputColour(node);
    if (node.image) {
      const attrs = {src: node.image, alt: `feature visualisation of ${node.id}`, class: big ? "" : "source-image"};
      if (id) attrs.id = id;
      return html("img", attrs);
    }
    if (colour) {
      const swatch = html("span", {class: big ? "big colour-swatch" : "colour-swatch",
                                   title: `input colour channel ${node.channel}`});
      swatch.style.background = colour;
      return swatch;
    }
    return big ? html("p", {class: "muted", text: "no feature visualisation"}) : null;
  };

  let selected = null;
  const select = (id, reveal) => {
    const node = byId.get(id);
    if (!node) return;
    if (selected !== null) {
      nodeElements.get(selected)?.classList.remove("selected");
      for (const path of incident.get(selected) || []) path.classList.remove("incident");
      for (const element of graph.querySelectorAll(".node.neighbour")) element.classList.remove("neighbour");
    }
    selected = id;
    graph.classList.add("has-selection");
    const element = nodeElements.get(id);
    element?.classList.add("selected");
    for (const path of incident.get(id) || []) {
      path.classList.add("incident");
      const other = path.dataset.source === id ? path.dataset.target : path.dataset.source;
      nodeElements.get(other)?.classList.add("neighbour");
    }
    if (reveal && element) element.scrollIntoView({block: "nearest", inline: "nearest"});
    renderPanel(node);
  };

  const renderPanel = (node) => {
    const id = String(node.id);
    const facts = html("dl", {class: "facts"});
    const role = targets.has(id) ? "target" : "subgraph node";
    for (const [label, value] of [["layer", layerOf(node)], ["channel", node.channel ?? "n/a"],
                                  ["score", fmt(node.score)], ["role", role]]) {
      facts.append(html("dt", {text: label}), html("dd", {text: String(value)}));
    }
    const children = [html("h2", {text: id}), facts, picture(node, true, "node-image")];
    const inputs = Array.isArray(node.inputs) ? node.inputs : [];
    const heading = inputs.length ? `Top incoming edges (${inputs.length})` : "No incoming edges listed";
    children.push(html("h3", {text: heading}));
    const list = html("ol", {class: "inputs"});
    for (const input of inputs) {
      const source = String(input.source);
      const sourceNode = byId.get(source);
      const sign = kernelSign(input.kernel);
      const link = html("button", {class: "source-link", type: "button", text: source,
                                   title: sourceNode ? `select ${source}` : "not in the subgraph"});
      if (sourceNode) link.addEventListener("click", () => select(source, true));
      else link.disabled = true;
      const head = html("div", {class: "entry-head"}, link, html("span", {text: `score ${fmt(input.score)}`}),
        html("span", {class: input.kept ? "badge kept" : "badge", text: input.kept ? "kept" : "not kept"}),
        sign === null ? null : html("span", {class: "muted", text: `sign ${fmt(sign)}`}));
      const body = html("div", {class: "entry-body"}, kernelView(input.kernel), picture(sourceNode, false));
      const entry = html("li", {class: `edge-entry ${input.kernel == null ? "excitatory" : signClass(sign)}`,
                                "data-source": source}, head, body);
      list.append(entry);
    }
    children.push(list);
    const outputs = edges.filter((edge) => String(edge.source) === id && byId.has(String(edge.target)));
    if (outputs.length) {
      children.push(html("h3", {text: `Feeds in the subgraph (${outputs.length})`}));
      const box = html("div", {class: "outputs"});
      for (const edge of outputs) {
        const link = html("button", {class: "out-link", type: "button", text: String(edge.target)});
        link.addEventListener("click", () => select(String(edge.target), true));
        box.append(link);
      }
      children.push(box);
    }
    panel.replaceChildren(...children.filter(Boolean));
    panel.scrollTop = 0;
  };

  graph.addEventListener("click", (event) => {
    const group = event.target.closest(".node");
    if (group) select(group.dataset.node, false);
  });
  graph.addEventListener("keydown", (event) => {
    const group = event.target.closest(".node");
    if (group && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      select(group.dataset.node, false);
    }
  });

  let fromHash = "";
  try {
    fromHash = decodeURIComponent(location.hash.slice(1));
  } catch (error) {
    fromHash = "";
  }
  const first = byId.has(fromHash) ? fromHash
    : [...targets].find((id) => byId.has(id)) ?? (columns.length ? String(columns[columns.length - 1][1][0].id) : null);
  if (first !== null) select(first, true);
  else panel.replaceChildren(html("p", {class: "muted", text: "The subgraph has no nodes."}));
})();
""".replace("%THRESHOLD%", repr(SIGN_THRESHOLD)).replace(
    "%INPUT_COLOURS%", json.dumps([f"rgb({r}, {g}, {b})" for r, g, b in INPUT_COLOURS]))
