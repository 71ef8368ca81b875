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
