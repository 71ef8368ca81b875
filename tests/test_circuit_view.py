"""The circuit views (VISCNN node panel, 004 sec. 3): the static HTML page, in a real browser too, and the PNG."""

from __future__ import annotations

import json
import os
import re
from importlib.resources import files
from pathlib import Path

import pytest
from PIL import Image

from convlens.plugins.visualizers.circuit.view import (
    EXCITATORY,
    INHIBITORY,
    MIXED,
    draw_subgraph,
    node_columns,
    size_text,
    subgraph_layout,
    write_view,
)
from helpers import tomllib
from test_report_browser import ARGS, BROKEN_IMAGES, CHROMIUM, requires_chromium, watched_page

POSITIVE = [[0.2, 0.5, 0.1], [0.3, 0.9, 0.2], [0.0, 0.4, -0.1]]
NEGATIVE = [[-0.4, -0.6, 0.1], [-0.2, -0.8, -0.3], [0.0, -0.1, -0.2]]
MIXED_KERNEL = [[0.5, -0.5, 0.4], [-0.4, 0.3, -0.3], [0.1, -0.1, 0.0]]


def _input(source: str, score: float, kernel, kept: bool) -> dict:
    return {"source": source, "score": score, "kernel": kernel, "kept": kept}


def make_record() -> dict:
    """input (3) -> block1.0 (4 conv channels) -> layer1.add (2 of 4 kept) -> block2.0:1, the target."""
    first, second = "nodes/block1.0-0.png", "nodes/block1.0-1.png"
    nodes = [
        {"id": f"input:{c}", "layer": "input", "channel": c, "score": s, "target": False, "image": None, "inputs": []}
        for c, s in enumerate((0.05, 0.03, 0.02))
    ]
    nodes += [
        {
            "id": "block1.0:0",
            "layer": "block1.0",
            "channel": 0,
            "score": 0.2,
            "target": False,
            "image": first,
            "inputs": [_input("input:2", 0.02, MIXED_KERNEL, True)],
        },
        {
            "id": "block1.0:1",
            "layer": "block1.0",
            "channel": 1,
            "score": 0.5,
            "target": False,
            "image": second,
            "inputs": [
                _input("input:0", 0.3, POSITIVE, True),
                _input("input:1", 0.2, NEGATIVE, True),
                _input("input:2", 0.01, MIXED_KERNEL, False),
            ],
        },
        {
            "id": "block1.0:3",
            "layer": "block1.0",
            "channel": 3,
            "score": -0.05,
            "target": False,
            "image": first,
            "inputs": [_input("input:0", 0.04, NEGATIVE, True)],
        },
        {
            "id": "layer1.add:0",
            "layer": "layer1.add",
            "channel": 0,
            "score": 0.3,
            "target": False,
            "image": None,
            "inputs": [_input("block1.0:0", 0.2, None, True), _input("block1.0:2", 0.01, None, False)],
        },
        {
            "id": "layer1.add:1",
            "layer": "layer1.add",
            "channel": 1,
            "score": 0.6,
            "target": False,
            "image": second,
            "inputs": [_input("block1.0:1", 0.45, None, True), _input("block1.0:3", 0.05, None, True)],
        },
        {
            "id": "block2.0:1",
            "layer": "block2.0",
            "channel": 1,
            "score": 1.0,
            "target": True,
            "image": second,
            "inputs": [
                _input("layer1.add:1", 0.8, POSITIVE, True),
                _input("layer1.add:0", 0.3, MIXED_KERNEL, True),
                _input("layer1.add:3", 0.02, NEGATIVE, False),
            ],
        },
    ]
    edges = [
        {"source": "input:0", "target": "block1.0:1", "kind": "kernel", "score": 0.3, "sign": 0.8},
        {"source": "input:1", "target": "block1.0:1", "kind": "kernel", "score": 0.2, "sign": -0.7},
        {"source": "input:2", "target": "block1.0:0", "kind": "kernel", "score": 0.02, "sign": 0.1},
        {"source": "input:0", "target": "block1.0:3", "kind": "kernel", "score": 0.04, "sign": -0.9},
        {"source": "block1.0:0", "target": "layer1.add:0", "kind": "branch", "score": 0.2, "sign": 1.0},
        {"source": "block1.0:1", "target": "layer1.add:1", "kind": "branch", "score": 0.45, "sign": 1.0},
        {"source": "block1.0:3", "target": "layer1.add:1", "kind": "branch", "score": -0.05, "sign": 1.0},
        {"source": "layer1.add:1", "target": "block2.0:1", "kind": "kernel", "score": 0.8, "sign": 0.6},
        {"source": "layer1.add:0", "target": "block2.0:1", "kind": "kernel", "score": 0.3, "sign": 0.05},
    ]
    return {
        "title": "tiny </script><b>cnn</b> & block2 unit 1",
        "target": {"label": "block2 unit 1", "kind": "channel", "layer": "block2", "unit": 1, "nodes": ["block2.0:1"]},
        "criterion": "taylor",
        "layers": [
            {"name": "input", "kind": "input", "channels": 3},
            {"name": "block1.0", "kind": "conv", "channels": 4},
            {"name": "layer1.add", "kind": "add", "channels": 4},
            {"name": "block2.0", "kind": "conv", "channels": 2},
        ],
        "subgraph": {"edges_kept": 9, "feature_edges": 180, "fraction": 0.05, "mode": "fraction"},
        "nodes": nodes,
        "edges": edges,
        "extra": {"ignored": True},
    }


def write_pictures(out: Path) -> None:
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 120, 40)).save(out / "nodes" / "block1.0-0.png")
    Image.new("RGB", (16, 16), (40, 120, 200)).save(out / "nodes" / "block1.0-1.png")


@pytest.fixture
def view(tmp_path) -> tuple[dict, Path]:
    record = make_record()
    write_pictures(tmp_path)
    return record, write_view(record, tmp_path)


def test_view_embeds_the_record_and_stays_offline(view):
    record, path = view
    assert path.name == "view.html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', text, re.S)
    assert match and "</" not in match.group(1)
    assert json.loads(match.group(1)) == record
    assert re.search(r"https?://", text) is None
    assert text.count("</script>") == 2
    assert "<b>cnn</b>" not in text.replace(match.group(1), "")
    assert "9 of 180 edges (5%)" in text


def test_view_inlines_its_style_sheet_and_script_from_package_data(view, tmp_path):
    _, path = view
    assets = files("convlens.plugins.visualizers.circuit") / "assets"
    css, js = ((assets / name).read_text(encoding="utf-8") for name in ("view.css", "view.js"))
    text = path.read_text(encoding="utf-8")
    assert f"<style>\n{css}</style>" in text
    assert "%THRESHOLD%" in js and "%THRESHOLD%" not in text and "%INPUT_COLOURS%" not in text
    assert "const THRESHOLD = 0.3;" in text and 'const INPUT_COLOURS = ["rgb(235, 95, 95)", ' in text
    assert not re.search(r"<link |<script src|@import|url\(", text)
    assert write_view(make_record(), tmp_path, "again.html").read_bytes() == path.read_bytes()
    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert "assets/*" in config["tool"]["setuptools"]["package-data"]["convlens.plugins.visualizers.circuit"]


def test_layout_orders_columns_by_data_flow_and_nodes_by_score():
    record = make_record()
    columns = node_columns(record)
    assert [name for name, _ in columns] == ["input", "block1.0", "layer1.add", "block2.0"]
    assert [n["id"] for n in columns[1][1]] == ["block1.0:1", "block1.0:0", "block1.0:3"]
    layout = subgraph_layout(record, 800)
    assert layout.width == 800 and set(layout.positions) == {n["id"] for n in record["nodes"]}
    xs = [layout.positions[ids[0]][0] for _, ids in layout.columns]
    assert xs == sorted(xs) and len(set(xs)) == 4
    first, second = layout.positions["block1.0:1"], layout.positions["block1.0:0"]
    assert first[0] == second[0] and first[1] < second[1]
    assert layout.radii["block1.0:1"] > layout.radii["block1.0:0"] > 0 and layout.radii["block1.0:3"] > 0
    assert size_text({"edges": [{}] * 3}) == "3 edges"
    assert (
        size_text({"subgraph": {"edges_kept": 300, "feature_edges": 2400}, "edges": [{}] * 200})
        == "300 of 2,400 edges (12%), 200 strongest drawn"
    )


def test_subgraph_png(tmp_path):
    record = make_record()
    path = draw_subgraph(record, tmp_path / "circuit.png", width=900)
    image = Image.open(path).convert("RGB")
    assert image.width == 900 and image.height > 200
    counts = {colour: count for count, colour in image.getcolors(image.width * image.height)}
    assert counts.get(EXCITATORY, 0) > 50 and counts.get(INHIBITORY, 0) > 50 and counts.get(MIXED, 0) > 50
    assert counts.get((255, 255, 255), 0) < image.width * image.height
    again = draw_subgraph(record, tmp_path / "again.png", width=900)
    assert again.read_bytes() == path.read_bytes()
    empty = draw_subgraph({"title": "nothing", "nodes": [], "edges": []}, tmp_path / "empty.png", width=400)
    assert Image.open(empty).width == 400


NODE_IMAGE = "(() => { const i = document.getElementById('node-image'); return i ? i.naturalWidth : -1; })()"


@requires_chromium
def test_view_in_chromium(view, tmp_path):
    from playwright.sync_api import sync_playwright

    record, path = view
    artifacts = Path(os.environ.get("CONVLENS_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    requests: list[str] = []
    shot = artifacts / "circuit-view.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = watched_page(browser, problems, requests)
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("svg#graph .node").count() == len(record["nodes"])
            assert page.locator("svg#graph .edge").count() == len(record["edges"])
            assert page.locator("svg#graph .edge.excitatory").count() == 5
            assert page.locator("svg#graph .edge.inhibitory").count() == 2
            assert page.locator("svg#graph .edge.branch").count() == 3
            assert page.locator("h1").inner_text() == record["title"] and page.locator("b").count() == 0

            assert page.locator("#panel h2").inner_text() == "block2.0:1"
            assert page.locator('[data-node="block2.0:1"]').get_attribute("class") == "node target selected"
            assert page.evaluate(NODE_IMAGE) > 0
            assert page.locator("#panel .edge-entry").count() == 3
            assert page.locator("#panel .edge-entry .source-link:disabled").count() == 1

            page.click('[data-node="block1.0:1"]')
            assert "block1.0:1" in page.inner_text("#panel")
            assert page.locator("#panel h2").inner_text() == "block1.0:1"
            assert page.evaluate(NODE_IMAGE) > 0
            entries = page.locator("#panel .edge-entry")
            assert entries.count() == 3
            assert all(entries.nth(i).locator(".kernel rect").count() == 9 for i in range(3))
            assert page.locator("#panel .edge-entry .badge.kept").count() == 2
            assert page.locator("svg#graph .edge.incident").count() == 3
            assert page.evaluate(BROKEN_IMAGES) == []
            page.screenshot(path=str(shot), full_page=True)

            page.click('#panel .edge-entry[data-source="input:0"] .source-link')
            assert page.locator("#panel h2").inner_text() == "input:0"
            assert "selected" in page.get_attribute('[data-node="input:0"]', "class")
            assert "selected" not in page.get_attribute('[data-node="block1.0:1"]', "class")
            assert page.evaluate(NODE_IMAGE) == -1 and page.locator("#panel .colour-swatch").count() == 1
            assert page.locator("#panel .edge-entry").count() == 0

            page.click('[data-node="layer1.add:0"]')
            assert [page.locator("#panel .edge-entry .kernel").nth(i).inner_text() for i in range(2)] == [
                "identity",
                "identity",
            ]
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    assert problems == []
    assert [url for url in requests if not url.startswith("file://")] == []
    assert shot.is_file() and shot.stat().st_size > 1000
