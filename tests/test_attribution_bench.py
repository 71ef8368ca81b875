"""``convlens bench attribution``: every installed method (the Grad-CAM++ example included) on every metric, with
intervals, JSON, charts and a page that opens in Chromium; and the planted truths of shapes: object masks rank a
random map below every gradient method, and a network trained on shuffled labels changes Grad-CAM's maps but not
the Sobel baseline (those run in test_attribution.py, on its trained network)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from convlens.cli import cli
from test_report_browser import ARGS, BROKEN_IMAGES, CHROMIUM, requires_chromium, watched_page

NEW_METHODS = {
    "hirescam", "layercam", "xgradcam", "eigencam", "scorecam", "ablationcam", "integrated-gradients",
    "input-x-gradient", "smoothgrad", "guided-backprop", "guided-gradcam", "occlusion",
}  # fmt: skip
METRICS = {
    "deletion", "insertion", "road", "mask-energy", "relevance-rank", "pointing-game", "cascading-randomisation",
    "independent-randomisation", "data-randomisation",
}  # fmt: skip


def bench(*args):
    result = CliRunner().invoke(cli, ["bench", "attribution", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


@pytest.fixture(scope="module")
def small_bench(small_trained_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    record = bench("--model", small_trained_model.model, "--data", small_trained_model.data, "--max-images", 6,
                   "--layer", "block3", "--out", out)  # fmt: skip
    return record, out


@pytest.mark.slow
def test_bench_scores_every_installed_method_on_every_metric(small_bench):
    record, out = small_bench
    methods = {row["method"]: row for row in record["methods"]}
    assert NEW_METHODS | {"gradcam", "saliency", "gradcam++"} <= set(methods), sorted(methods)
    assert methods["gradcam++"]["dist"] == "convlens-gradcam-pp"
    assert all(row["error"] is None and row["forward_ratio"] > 0 for row in methods.values())
    assert record["masks"] and record["shuffled_model"] and len(record["images"]) == 6
    assert {m["name"] for m in record["metrics"] if m["applies"]} >= METRICS
    rows = {(row["method"], row["metric"]): row for row in record["results"]}
    for method in methods:
        for metric in METRICS:
            row = rows[(method, metric)]
            assert row["error"] is None, row
            finite = [v for v in row["values"] if math.isfinite(v)]
            if finite:  # a method whose maps are constant has no rank correlation
                assert row["low"] <= row["mean"] <= row["high"] and row["n"] == len(finite)
    assert rows[("edge-detector", "cascading-randomisation")]["mean"] == pytest.approx(1.0)
    assert {"bench.json", "bench.png", "bench.svg", "maps.png", "index.html"} <= {p.name for p in out.iterdir()}
    page = (out / "index.html").read_text()
    assert page.count('data-metric="mask-energy"') == len(methods) and "gradcam++" in page


@pytest.mark.slow
@requires_chromium
def test_bench_page_opens_in_chromium(small_bench, tmp_path):
    from playwright.sync_api import sync_playwright

    record, out = small_bench
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = watched_page(browser, problems, requests)
            page.goto((out / "index.html").as_uri())
            page.wait_for_load_state("load")
            assert page.evaluate(BROKEN_IMAGES) == []
            assert page.locator("#attribution-scores tbody tr").count() == len(record["methods"])
            assert page.locator("#attribution-scores td.best").count() >= len(METRICS)
        finally:
            browser.close()
    assert problems == [] and all(url.startswith("file://") for url in requests)


BENCH_RECIPE = """
title = "bench"
seed = 3

[data]
shapes = { n = 160, size = 32, seed = 1 }

[model]
name = "tiny-cnn"
params = { input_size = 32, width = 8, blocks = 4 }
layer = "block3"
train = { epochs = 3, batch_size = 32 }

[extract]
filters = ["magnitude"]
per_image = 2

[evaluate]
enabled = false

[visualize]
units = 0
latents = 0
visualizers = ["dataset-examples"]

[attribution_bench]
enabled = true
methods = "gradcam, saliency, random-map"
metrics = "mask-energy, deletion, data-randomisation"
max_images = 8
"""


@pytest.mark.slow
def test_a_recipe_step_runs_the_bench_and_the_report_shows_its_table(tmp_path):
    from convlens.workflow.recipes import RecipeError, load_recipe

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BENCH_RECIPE.replace('"mask-energy,', '"mask-energi,'))
    with pytest.raises(RecipeError, match=r"\[attribution_bench\] metrics: unknown metric 'mask-energi'"):
        load_recipe(recipe)
    recipe.write_text(BENCH_RECIPE)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "attribution-bench" / "bench.json").read_text())
    assert [row["method"] for row in record["methods"]] == ["gradcam", "saliency", "random-map"]
    assert record["shuffled_model"] and {row["metric"] for row in record["results"]} == {
        "mask-energy", "deletion", "data-randomisation"
    }  # fmt: skip
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert 'id="attribution-scores"' in page and page.count('data-metric="deletion"') == 3


@pytest.mark.parametrize(
    "option, message",
    [
        (("--method", "saliencyy"), "unknown visualizer 'saliencyy'; did you mean 'saliency'?"),
        (("--method", "dataset-examples"), "visualizer 'dataset-examples' is not an attribution method"),
        (("--metric", "roadd"), "unknown metric 'roadd'; did you mean 'road'?"),
        (("--layer", "blok3"), "has no layer 'blok3'"),
    ],
)
def test_bench_refuses_a_wrong_name_before_any_training(small_trained_model, tmp_path, option, message):
    out = tmp_path / "out"
    arguments = ["bench", "attribution", "--model", str(small_trained_model.model), "--data"]
    result = CliRunner().invoke(cli, [*arguments, str(small_trained_model.data), *option, "--out", str(out)])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (out / "shuffled-labels").exists()
