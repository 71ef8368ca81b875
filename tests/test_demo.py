"""`convlens demo` end to end: it runs the embedded recipe, prints the report's path, and the report states the
run's numbers and opens in headless Chromium with every picture and no console error (skipped only when Chromium
is not installed). Screenshots go to $CONVLENS_TEST_ARTIFACTS (default: the test's tmp_path)."""

from __future__ import annotations

import html
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_report import _close, _metric, _metrics
from test_report_browser import ARGS, BROKEN_IMAGES, CHROMIUM, requires_chromium, watched_page

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """The demo, run once per session: its output is kept beside the run, since a pytest-xdist worker that runs
    out of queued tests tears its fixtures down before the next batch arrives."""
    root = tmp_path_factory.getbasetemp() / "demo"
    out, printed = root / "run", root / "stdout.txt"
    if not printed.is_file():
        root.mkdir(exist_ok=True)
        finished = subprocess.run(
            [sys.executable, "-m", "convlens", "demo", "--out", str(out)], capture_output=True, text=True
        )
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        printed.write_text(finished.stdout)
    return out, printed.read_text()


def test_the_demo_runs_the_whole_recipe_and_prints_the_report_path(demo):
    out, output = demo
    last = output.strip().splitlines()[-1]
    assert last.endswith(f"report: {out / 'report' / 'index.html'}") and "0 done before" in last
    state = json.loads((out / "pipeline.json").read_text())
    assert {step["status"] for step in state["steps"]} == {"done"}
    assert set(state["visualizations"]) == {"cnn", "topk", "relu-l1"}
    for group in state["visualizations"].values():
        assert len(group["units"]) >= 8 and set(group["runs"]) == {"feature-viz", "dataset-examples", "gradcam"}
    printed = subprocess.run(
        [sys.executable, "-m", "convlens", "demo", "--print-recipe"], capture_output=True, text=True, check=True
    ).stdout
    assert (out / "recipe.toml").read_text() == printed


def test_the_demo_report_states_the_numbers_of_the_run(demo):
    out, _ = demo
    metrics = _metrics(out / "report")
    comparison = json.loads((out / "filters" / "comparison.json").read_text())["foreground_precision"]
    assert set(comparison["filters"]) == {"magnitude", "active-count", "median", "max", "gradcam"}
    for name, row in comparison["filters"].items():
        _close(_metric(metrics, "foreground-precision", filter=name), row["sampled"])
    _close(_metric(metrics, "foreground-precision-uniform"), comparison["uniform"])
    for label in ("topk", "relu-l1"):
        final = json.loads((out / "saes" / label / "metrics.jsonl").read_text().splitlines()[-1])["val"]
        assert final["compression"] > 1
        _close(_metric(metrics, "compression", sae=label), final["compression"])
        evaluation = json.loads((out / "evaluation" / f"{label}.json").read_text())
        _close(_metric(metrics, "top1-sae", sae=label), evaluation["top1"]["sae"])
        _close(_metric(metrics, "top1-model", sae=label), evaluation["top1"]["model"])
    groups = json.loads((out / "statistics" / "statistics.json").read_text())["groups"]
    assert groups["cnn"]["summary"]["units"] == 64 and groups["topk"]["summary"]["units"] == 512
    for label, group in groups.items():
        _close(_metric(metrics, "selective", group=label, attribute="any"), group["summary"]["selective"])
    statement = (out / "report" / "index.html").read_text().split('id="selectivity-statement"')[1].split("</p>")[0]
    assert "CNN" in statement and "topk" in statement and "relu-l1" in statement


def test_the_demo_overview_pictures_the_top_and_the_most_selective_units_of_every_group(demo):
    out, _ = demo
    groups = json.loads((out / "statistics" / "statistics.json").read_text())["groups"]
    index = (out / "report" / "index.html").read_text()
    gallery = index.split('<section id="gallery">')[1].split("</section>")[0]
    for label, group in groups.items():
        cards = gallery.split(f'data-group="{label}">')[1].split("</div>")[0]
        pictured = [int(part.split('"')[0]) for part in cards.split('data-unit="')[1:]]
        assert len(pictured) >= 8 and cards.count("<img ") == len(pictured)
        assert cards.count(" at the start, ") == len(pictured)  # every feature-viz thumbnail shows its score
        flags = [card.startswith("small flagged") for card in cards.split('<figure class="')[1:]]
        assert flags == sorted(flags)  # flagged renders come last
        alive = [u for u in group["units"] if not u["dead"] and u["best_concept"]]
        selective = sorted(alive, key=lambda u: (-u["best_concept"]["auroc"], u["rank"]))[:3]
        assert {u["unit"] for u in selective} <= set(pictured), label


def test_a_demo_unit_page_without_pictures_gives_commands_that_render_the_unit(demo, tmp_path):
    out, _ = demo
    state = json.loads((out / "pipeline.json").read_text())
    pictured = state["visualizations"]["cnn"]["units"]
    unit = next(u for u in range(64) if u not in pictured and (out / "report" / "units" / f"cnn-{u}.html").is_file())
    page = (out / "report" / "units" / f"cnn-{unit}.html").read_text()
    commands = html.unescape(page.split('id="render-command"><code>')[1].split("</code>")[0]).splitlines()
    assert len(commands) == 2
    for command in commands:
        words = shlex.split(command)
        finished = subprocess.run(
            [sys.executable, "-m", *words, "--json"], capture_output=True, text=True, cwd=tmp_path
        )
        assert finished.returncode == 0, finished.stderr[-2000:]
        record = json.loads(finished.stdout)
        figures = [f for f in record["figures"] if f["unit"] == unit]
        assert figures and all((Path(record["out"]) / f["path"]).is_file() for f in figures)


@requires_chromium
def test_the_demo_report_opens_in_chromium_with_every_picture_and_no_error(demo, tmp_path):
    from playwright.sync_api import sync_playwright

    out, _ = demo
    site = out / "report"
    state = json.loads((out / "pipeline.json").read_text())
    unit, latent = state["visualizations"]["cnn"]["units"][0], state["visualizations"]["topk"]["units"][0]
    artifacts = Path(os.environ.get("CONVLENS_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = watched_page(browser, problems, requests)
            for name, shot in (
                ("units.html", "demo-index"),
                (f"units/cnn-{unit}.html", f"demo-cnn-{unit}"),
                (f"units/topk-{latent}.html", f"demo-topk-{latent}"),
                ("index.html", "demo-overview"),
            ):
                page.goto((site / name).as_uri())
                page.wait_for_load_state("load")
                images = page.locator("img").count()
                assert images > 0 and page.evaluate(BROKEN_IMAGES) == [], name
                if name.startswith("units/"):
                    assert page.locator("figure img").count() >= 1 + 1 + 6  # feature viz, montage, top examples
                path = artifacts / f"{shot}.png"
                page.screenshot(path=str(path), full_page=True)
                assert path.stat().st_size > 10_000
                print(f"screenshot: {path}")
        finally:
            browser.close()
    assert problems == []
    assert [url for url in requests if not url.startswith(("file://", "data:"))] == []
