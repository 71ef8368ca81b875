"""The real-data workflow: recipes that write photos or Fashion-MNIST, the predictions and sanity-check steps on
the ImageNet EfficientNet-Lite0, and the one page over both runs, opened in Chromium."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from convlens.cli import cli
from convlens.report.combined import write_combined_index
from convlens.workflow.recipes import RecipeError, load_recipe
from test_report_browser import ARGS, BROKEN_IMAGES, CHROMIUM, watched_page

pytest.importorskip("efficientnet_lite_pytorch", reason='the real demo needs pip install -e ".[real]"')
FASHION = Path("/usr/share/datasets/fashion-mnist")
requires_fashion = pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST comes with Debian's dataset-fashion-mnist (.ci/run installs it)"
)

PHOTOS_RECIPE = """
title = "photos <small>"
[data]
photos = {}
[model]
name = "efficientnet-lite0"
layer = "_blocks.10"
[predictions]
enabled = true
max_images = 20
[sanity]
enabled = true
max_images = 2
[extract]
filters = ["magnitude"]
per_image = 2
batch_size = 16
[evaluate]
enabled = false
[visualize]
units = 0
latents = 0
visualizers = ["dataset-examples"]
"""

FASHION_RECIPE = """
title = "fashion <small>"
[data]
fashion-mnist = { n = 120, split = "test", seed = 1 }
[model]
name = "tiny-cnn"
params = { num_classes = 10, input_size = 32, blocks = 4, width = 8 }
layer = "block3"
train = { epochs = 1, batch_size = 32 }
[extract]
filters = ["magnitude"]
compare = ["magnitude", "uniform"]
per_image = 4
[[sae]]
name = "topk"
params = { k = 4, expansion = 2 }
train = { epochs = 2, batch_size = 64 }
[evaluate]
max_images = 60
ablate = 1
[visualize]
units = 2
latents = 2
examples = 2
visualizers = ["dataset-examples"]
"""


def run_recipe(folder: Path, name: str, text: str) -> Path:
    recipe = folder / f"{name}.toml"
    recipe.write_text(text)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(folder / name)])
    assert result.exit_code == 0, result.output
    return folder / name


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> Path:
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST comes with Debian's dataset-fashion-mnist (.ci/run installs it)")
    folder = tmp_path_factory.mktemp("real-demo")
    runs = [run_recipe(folder, "photos", PHOTOS_RECIPE), run_recipe(folder, "fashion", FASHION_RECIPE)]
    write_combined_index(folder, "real <demo>", runs)
    return folder


def test_the_packaged_real_recipes_are_valid():
    for name in ("real-photos.toml", "real-fashion-mnist.toml"):
        recipe = load_recipe(Path(name), text=files("convlens.recipes").joinpath(name).read_text())
        assert recipe.generated is not None and recipe.data_path is None
    assert recipe.generated.kind == "fashion-mnist" and recipe.generated.section.n == 2000


def test_data_sources_and_attribution_sections_are_checked(tmp_path):
    def check(text: str) -> None:
        (tmp_path / "r.toml").write_text(text)
        load_recipe(tmp_path / "r.toml")

    with pytest.raises(RecipeError, match=r"\[data\] needs exactly one of"):
        check(PHOTOS_RECIPE.replace("photos = {}", "photos = {}\nshapes = { n = 10 }"))
    with pytest.raises(RecipeError, match=r"split"):
        check(FASHION_RECIPE.replace('split = "test"', 'split = "val"'))
    with pytest.raises(RecipeError, match=r"\[sanity\] method 'dataset-examples' is not an attribution method"):
        check(PHOTOS_RECIPE.replace("[sanity]", "[sanity]\nmethod = 'dataset-examples'"))
    with pytest.raises(RecipeError, match=r"\[predictions\] layer"):
        check(PHOTOS_RECIPE.replace("[predictions]", "[predictions]\nlayer = '_blocks.99'"))


@pytest.mark.slow
def test_predictions_and_sanity_check_on_efficientnet(real_runs, efficientnet_lite0, imagenet_batch):
    record = json.loads((real_runs / "photos" / "predictions" / "predictions.json").read_text())
    images, labels = imagenet_batch
    with torch.no_grad():
        expected = efficientnet_lite0.module(images).softmax(dim=1).topk(5)
    foolbox_rows = [row for row in record["rows"] if row["image"].startswith("foolbox_")]
    assert [row["label"] for row in foolbox_rows] == labels
    assert [[entry["class"] for entry in row["top"]] for row in foolbox_rows] == expected.indices.tolist()
    assert record["labelled"] == 20 and record["top5_hits"] >= 18 and record["top1_hits"] >= 16
    assert all((real_runs / "photos" / "predictions" / row["overlay"]).is_file() for row in record["rows"])

    sanity = json.loads((real_runs / "photos" / "sanity" / "sanity_check.json").read_text())
    assert sanity["fully_randomised"]["gradcam"] < 0.5
    assert sanity["fully_randomised"]["edge-detector"] == pytest.approx(1.0)


@pytest.mark.slow
@requires_fashion
def test_the_fashion_run_scores_filters_on_item_masks(real_runs):
    comparison = json.loads((real_runs / "fashion" / "filters" / "comparison.json").read_text())
    precision = comparison["foreground_precision"]
    assert set(precision["filters"]) == {"magnitude", "uniform"}
    evaluation = json.loads((real_runs / "fashion" / "evaluation" / "topk.json").read_text())
    assert 0.0 <= evaluation["top1"]["sae"] <= 1.0 and evaluation["top1_drop"] == pytest.approx(
        evaluation["top1"]["model"] - evaluation["top1"]["sae"]
    )


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_the_combined_page_and_both_reports_open_cleanly_in_chromium(real_runs):
    from playwright.sync_api import sync_playwright

    index = (real_runs / "index.html").read_text()
    assert "real &lt;demo&gt;" in index and "photos &lt;small&gt;" in index and "<small>" not in index
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = watched_page(browser, problems, requests)
            for path in ("index.html", "photos/report/index.html", "fashion/report/index.html"):
                page.goto((real_runs / path).as_uri())
                page.wait_for_load_state("load")
                assert page.evaluate(BROKEN_IMAGES) == [], path
            page.goto((real_runs / "photos" / "report" / "index.html").as_uri())
            assert page.locator("#predictions-table tbody tr").count() == 20
            assert page.locator("#sanity-table tbody tr").count() >= 3
        finally:
            browser.close()
    assert problems == []
    assert all(url.startswith("file:") for url in requests), [u for u in requests if not u.startswith("file:")]
