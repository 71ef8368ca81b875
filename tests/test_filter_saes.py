"""[filter_saes]: one SAE per filter's store, all validated on the magnitude store (paper 001 Figures 10-11), the
figure, and the report's check of the paper's claim."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convlens.activations.store import ActivationStore
from convlens.cli import cli
from convlens.sae.filter_stores import filtered_beat_baseline, gaussian_smooth, share_below
from convlens.sae.training import split_count
from convlens.workflow.recipes import load_recipe
from test_pipeline import SHAPES_TINY_CNN, run_cli, write_recipe

FILTERS = ["magnitude", "median", "uniform"]
RECIPE = (
    '\ntitle = "filter saes"'
    + SHAPES_TINY_CNN
    + """
[extract]
filters = ["magnitude", "median", "uniform"]
compare = false
per_image = 4
images_per_shard = 64

[filter_saes]
sae = { name = "topk", params = { k = 4, expansion = 2 }, train = { epochs = 2, batch_size = 64, log_every = 3 } }
sigma = 1.0

[evaluate]
enabled = false

[visualize]
units = 0
latents = 0
selective = 0
frequent = 0
"""
)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 7.0])
@pytest.mark.parametrize("length", [2, 5, 30])
def test_the_smoothing_is_scipys_1d_gaussian_filter(sigma, length):
    ndimage = pytest.importorskip("scipy.ndimage")
    values = np.random.default_rng(length).normal(size=length)
    expected = ndimage.gaussian_filter1d(values, sigma, mode="reflect", truncate=4.0)
    assert np.allclose(gaussian_smooth(values.tolist(), sigma), expected, rtol=0, atol=1e-12)
    assert gaussian_smooth(values.tolist(), 0.0) == values.tolist()


def test_the_claim_holds_only_when_every_filtered_sae_ends_below_the_baseline():
    assert filtered_beat_baseline({"magnitude": 1.0, "median": 1.5, "uniform": 2.0}, "uniform") == {
        "holds": True,
        "baseline": "uniform",
        "not_lower": [],
    }
    tied = filtered_beat_baseline({"magnitude": 1.0, "median": 2.0, "uniform": 2.0}, "uniform")
    assert not tied["holds"] and tied["not_lower"] == ["median"]
    assert filtered_beat_baseline({"median": math.nan, "uniform": 2.0}, "uniform")["not_lower"] == ["median"]
    assert not filtered_beat_baseline({"uniform": 2.0}, "uniform")["holds"]


def test_the_share_below_counts_the_steps_both_curves_have():
    assert share_below([1.0, 3.0, 1.0], [10, 20, 30], [2.0, 2.0], [20, 30]) == 0.5
    assert share_below([1.0], [10], [2.0], [20]) is None


def test_the_sae_defaults_to_the_first_sae_entry_and_the_filters_to_every_store(tmp_path):
    saes = "[[sae]]\nname = 'relu-l1'\n\n[[sae]]\nname = 'topk'\n\n[filter_saes]\nvalidate_on = 'median'\n\n"
    text = RECIPE.split("[filter_saes]")[0] + saes + "[evaluate]" + RECIPE.split("[evaluate]")[1]
    recipe = load_recipe(write_recipe(tmp_path, text))
    section = recipe.filter_saes
    assert section is not None and section.sae == recipe.saes[0].component and section.training == {}
    assert section.filters == tuple(FILTERS) and section.section.validate_on == "median"
    assert section.section.baseline == "uniform" and section.section.sigma == 2.0


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("sigma = 1.0", "validate_on = 'magnitud'"),
            "[filter_saes] validate_on 'magnitud' is not one of [extract] filters (magnitude, median, uniform); "
            "did you mean 'magnitude'?",
        ),
        (
            ('filters = ["magnitude", "median", "uniform"]', 'filters = ["magnitude", "median"]'),
            "[filter_saes] baseline 'uniform' is not one of [extract] filters (magnitude, median): every SAE needs "
            'its store, so add "uniform" to [extract] filters',
        ),
        (("sigma = 1.0", "filters = ['median', 'magnitude']"), "[filter_saes] filters must include the baseline"),
        (("sae = {", "x = {"), "[filter_saes] has no key 'x' (keys: sae, filters, validate_on, baseline, sigma)"),
        (("sae = {", "#"), "[filter_saes] needs an 'sae' table (name, params, train) when the recipe has no [[sae]]"),
    ],
)
def test_a_recipe_the_study_cannot_run_fails_before_any_work(tmp_path, change, message):
    text = RECIPE.replace(*change)
    assert text != RECIPE
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(write_recipe(tmp_path, text)), "--out", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("filter-saes")
    recipe = write_recipe(folder, RECIPE)
    out = folder / "run"
    result = run_cli("run", str(recipe), "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    return recipe, out, json.loads((out / "filter-saes" / "summary.json").read_text())


def metric_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_every_filter_store_trains_an_sae_validated_on_the_magnitude_store(study_run):
    _, out, summary = study_run
    assert json.loads((out / "pipeline.json").read_text())["filter_saes"] == "filter-saes"
    assert [row["filter"] for row in summary["filters"]] == FILTERS
    validation_samples = set()
    for row in summary["filters"]:
        run = out / "filter-saes" / row["run"]
        config = json.loads((run / "config.json").read_text())
        assert config["store"]["path"] == str(out / "activations" / row["filter"])
        assert config["validation"]["path"] == str(out / "activations" / "magnitude")
        assert config["validation"]["split"] == "val"
        rows = metric_rows(run)
        validation_samples |= {r["val"]["samples"] for r in rows}
        assert row["final_val_mse"] == rows[-1]["val"]["mse"] and row["final_train_mse"] == rows[-1]["train"]["mse"]
    magnitude_val = split_count(ActivationStore(out / "activations" / "magnitude"), "val")
    assert validation_samples == {row["validation_samples"] for row in summary["filters"]} == {magnitude_val}
    assert len({row["train_samples"] for row in summary["filters"]}) == 1
    finals = {row["filter"]: row["final_val_mse"] for row in summary["filters"]}
    expected = all(finals[label] < finals["uniform"] for label in ("magnitude", "median"))
    assert summary["claim"]["holds"] is expected


def test_the_figure_has_both_panels_with_smoothed_and_faint_raw_curves(study_run):
    _, out, _ = study_run
    svg = (out / "filter-saes" / "errors.svg").read_text()
    assert (out / "filter-saes" / "errors.png").stat().st_size > 0
    for panel in ("train", "validation"):
        for label in FILTERS:
            assert f'id="chart-{panel}-series-{label}"' in svg
            raw = re.search(rf'<g id="chart-{panel}-series-{label}-raw">\s*<path [^>]*style="([^"]*)"', svg)
            assert raw and "stroke-opacity: 0.3" in raw[1]
    assert "(raw)" not in svg  # the raw curves have no legend entry
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "training error on each filter's store (Figure 10)" in texts
    assert "validation error on the magnitude store (Figure 11)" in texts
    assert texts.count("step (Gaussian smoothing, sigma = 1 logged points)") == 2


def test_the_report_shows_the_finals_of_the_json_and_whether_the_claim_holds(study_run):
    _, out, summary = study_run
    index = (out / "report" / "index.html").read_text()
    section = index.split('<section id="filter-saes">')[1].split("</section>")[0]
    assert index.index('id="saes"') < index.index('id="filter-saes"') < index.index('id="sweep"')
    for row in summary["filters"]:
        for name, key in (("filter-sae-train-mse", "final_train_mse"), ("filter-sae-val-mse", "final_val_mse")):
            shown = re.search(rf'data-metric="{name}" data-filter="{row["filter"]}" data-value="([^"]+)"', section)
            assert shown and json.loads(shown[1]) == row[key]
    verdict = re.search(r'id="filter-saes-claim" data-claim="([^"]+)">([^<]+)<', section)
    assert verdict[1] == ("holds" if summary["claim"]["holds"] else "does-not-hold")
    assert ("does not hold" in verdict[2]) is not summary["claim"]["holds"]
    assert 'src="../filter-saes/errors.png"' in section and 'href="../filter-saes/errors.svg"' in section


def test_a_rerun_skips_the_study_and_a_new_sigma_only_redraws_it(study_run, tmp_path):
    recipe, out, summary = study_run
    again = run_cli("run", str(recipe), "--out", str(out), "--device", "cpu")
    assert again.exit_code == 0 and "ran 0 of" in again.output
    steps = json.loads((out / "pipeline.json").read_text())["steps"]
    study = [s for s in steps if s["name"].startswith("filter-sae")]
    assert [s["name"] for s in study] == [*(f"filter-sae:{label}" for label in FILTERS), "filter-saes"]
    assert {s["status"] for s in study} == {"skipped"}
    changed = write_recipe(tmp_path, recipe.read_text().replace("sigma = 1.0", "sigma = 2.0"))
    plan = json.loads(run_cli("run", str(changed), "--out", str(out), "--check", "--json").output)["steps"]
    assert [row["name"] for row in plan if row["status"] != "done"] == ["filter-saes"]
