"""`convlens run`: recipes checked before any work, steps skipped when done, interrupted runs resumed to the
same end."""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from convlens.cli import cli
from convlens.workflow.recipes import RecipeError, load_recipe

# a tiny-cnn on 160 generated shapes, its block 3 studied: the start of the recipes of the pipeline tests
SHAPES_TINY_CNN = """
seed = 3

[data]
shapes = { n = 160, size = 32, seed = 1 }

[model]
name = "tiny-cnn"
params = { input_size = 32, width = 8, blocks = 4 }
layer = "block3"
"""
TINY_RECIPE = (
    '\ntitle = "tiny"'
    + SHAPES_TINY_CNN
    + """train = { epochs = 3, batch_size = 32 }

[extract]
filters = ["magnitude", "median"]
compare = ["magnitude", "median", "uniform"]
per_image = 4
images_per_shard = 64

[[sae]]
name = "topk"
params = { k = 4, expansion = 2 }
train = { epochs = 2, batch_size = 64, log_every = 5 }

[evaluate]
max_images = 64
ablate = 2

[visualize]
units = 2
latents = 2
selective = 1
frequent = 1
examples = 2
visualizers = ["feature-viz", "dataset-examples", "gradcam"]

[visualize.feature-viz]
steps = 8
preset = "naive"

[visualize.dataset-examples]
k = 2

[visualize.gradcam]
map_layer = "block2"
"""
)


def write_recipe(folder: Path, text: str = TINY_RECIPE, name: str = "recipe.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (('"median"', '"medain"'), "unknown filter 'medain'; did you mean 'median'?"),
        (("k = 4,", "kk = 4,"), "has no parameter 'kk'; did you mean 'k'?"),
        (('layer = "block3"', 'layer = "blok3"'), "has no layer 'blok3'"),
        (('map_layer = "block2"', 'map_layer = "block7"'), "[visualize.gradcam] map_layer"),
        (("steps = 8", "steps = -1"), "parameter 'steps' must be >= 1"),
        (('"gradcam"]', '"gradcam", "grad-cam-xx"]'), "unknown visualizer 'grad-cam-xx'"),
        (("[evaluate]", "[evalute]"), "the recipe has no key 'evalute'; did you mean 'evaluate'?"),
        (("epochs = 3,", "epochs = 'three',"), "[model.train]: parameter 'epochs' must be"),
        (('name = "topk"', 'name = "topk"\nstore = "uniform"'), "store 'uniform' is not one of the filters"),
    ],
)
def test_a_bad_recipe_fails_before_any_work_with_one_message(tmp_path, change, message):
    recipe = write_recipe(tmp_path, TINY_RECIPE.replace(*change))
    assert TINY_RECIPE.replace(*change) != TINY_RECIPE
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: recipe.toml:"), result.output
    assert message in lines[0]
    assert not out.exists()


def test_recipe_validation_in_python_names_the_place(tmp_path):
    with pytest.raises(RecipeError, match=r"\[data\] needs exactly one of"):
        load_recipe(write_recipe(tmp_path, TINY_RECIPE.replace("[data]", "[data]\npath = 'x'")))
    with pytest.raises(RecipeError, match="is not valid TOML"):
        load_recipe(write_recipe(tmp_path, "title = "))
    recipe = load_recipe(write_recipe(tmp_path))
    assert recipe.layer == "block3" and recipe.channels == 32
    assert [f.label for f in recipe.filters] == ["magnitude", "median"]
    assert recipe.saes[0].store == "magnitude" and recipe.saes[0].component.name == "convlens:topk"


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["run", str(write_recipe(tmp_path)), "--out", str(out)])
    assert result.exit_code == 1 and "holds other files and no pipeline.json" in result.output
    assert (out / "notes.txt").read_text() == "mine"


def tensors_of(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        str(path.relative_to(root)): load_file(str(path))
        for path in sorted(root.rglob("*.safetensors"))
        if "checkpoints" not in path.parts
    }


def pictures_of(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for folder in ("units", "latents")
        for path in sorted((root / folder).rglob("*.png"))
    }


def assert_same_results(first: Path, second: Path) -> None:
    tensors_a, tensors_b = tensors_of(first), tensors_of(second)
    assert tensors_a.keys() == tensors_b.keys()
    assert any(name.startswith("saes/") for name in tensors_a) and "model/model.safetensors" in tensors_a
    for name, tensors in tensors_a.items():
        assert tensors.keys() == tensors_b[name].keys(), name
        for key, value in tensors.items():
            assert torch.equal(value, tensors_b[name][key]), f"{name}: {key} differs"
    pictures_a = pictures_of(first)
    assert pictures_a and pictures_a == pictures_of(second)
    statistics = [
        json.loads((root / "statistics" / "statistics.json").read_text())["groups"] for root in (first, second)
    ]
    assert statistics[0] == statistics[1]
    for root in (first, second):
        assert (root / "report" / "index.html").is_file()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    recipe = write_recipe(folder)
    out = folder / "run"
    result = run_cli("run", str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    return recipe, out, result.output


def test_a_run_writes_the_layout_the_report_reads(finished_run):
    _, out, output = finished_run
    state = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in state["steps"]] == ["done"] * len(state["steps"])
    assert state["layer"] == "block3" and state["model"]["run"] == "model"
    assert state["data"] == {"path": "data", "images": 160, "concepts": True}
    assert state["filters"]["stores"] == {"magnitude": "activations/magnitude", "median": "activations/median"}
    assert (out / "filters" / "comparison.json").is_file()
    assert (out / "saes" / "topk" / "sae.safetensors").is_file()
    evaluation = json.loads((out / "evaluation" / "topk.json").read_text())
    assert 0 <= evaluation["top1"]["sae"] <= 1
    statistics = json.loads((out / "statistics" / "statistics.json").read_text())
    cnn, latents = state["visualizations"]["cnn"], state["visualizations"]["topk"]
    for label, group in (("cnn", cnn), ("topk", latents)):
        records = statistics["groups"][label]["units"]
        ranked = sorted((u for u in records if not u["dead"]), key=lambda u: u["rank"])
        assert group["units"][:2] == [u["unit"] for u in ranked[:2]]
        assert all(group["reasons"][str(u["unit"])][0] == "share" for u in ranked[:2])
        alive = [u for u in records if not u["dead"] and u["best_concept"]]
        most_selective = max(alive, key=lambda u: (u["best_concept"]["auroc"], -u["rank"]))["unit"]
        assert "selective" in group["reasons"][str(most_selective)]
        assert [reasons for reasons in group["reasons"].values()].count(["frequent"]) == 1
        assert len(group["units"]) == len(group["reasons"]) <= 4
    for group in (cnn, latents):
        assert set(group["runs"]) == {"feature-viz", "dataset-examples", "gradcam"}
        for folder in group["runs"].values():
            record = json.loads((out / folder / "record.json").read_text())
            assert {f["unit"] for f in record["figures"]} == set(group["units"])
            assert all((out / folder / f["path"]).is_file() for f in record["figures"])
    gradcam = json.loads((out / cnn["runs"]["gradcam"] / "record.json").read_text())
    unit = cnn["units"][0]
    explained = json.loads((out / cnn["runs"]["gradcam"] / gradcam["runs"][str(unit)] / "attribution.json").read_text())
    maxima = load_file(str(out / "statistics" / "maxima.safetensors"))
    top = maxima["maxima.cnn"][:, unit].argsort(descending=True, stable=True)[:2]
    paths = json.loads((out / "activations" / "magnitude" / "images.json").read_text())
    assert [entry["image"].split("/")[-1] for entry in explained["images"]] == [
        paths[int(maxima["positions"][i])].split("/")[-1] for i in top
    ]
    assert "report:" in output and output.strip().splitlines()[-1].startswith("ran ")


def test_a_unit_page_without_pictures_shows_the_commands_that_render_that_unit(finished_run, tmp_path, monkeypatch):
    _, out, _ = finished_run
    state = json.loads((out / "pipeline.json").read_text())
    statistics = json.loads((out / "statistics" / "statistics.json").read_text())["groups"]["topk"]["units"]
    unit = next(
        u["unit"] for u in statistics if not u["dead"] and u["unit"] not in state["visualizations"]["topk"]["units"]
    )
    page = (out / "report" / "units" / f"topk-{unit}.html").read_text()
    assert "gradcam explained each unit on the images it responds to most" in page
    text = html.unescape(page.split('id="render-command"><code>')[1].split("</code>")[0])
    commands = [shlex.split(line) for line in text.splitlines()]
    assert [words[2] for words in commands] == ["feature-viz", "dataset-examples"]
    monkeypatch.chdir(tmp_path)  # the command holds absolute paths: it runs from anywhere
    for words in commands:
        assert words[:2] == ["convlens", "visualize"] and words[words.index("--units") + 1] == str(unit)
        result = run_cli(*words[1:], "--json")
        assert result.exit_code == 0, result.output
        record = json.loads(result.output)
        figures = [f for f in record["figures"] if f["unit"] == unit]
        assert figures and all((Path(record["out"]) / f["path"]).is_file() for f in figures)
        assert Path(record["out"]).is_relative_to(out / "extra" / "topk")
    settings = json.loads((out / "extra" / "topk" / "feature-viz" / f"unit-{unit}" / "config.json").read_text())
    assert settings["visualizer"]["params"]["steps"] == 8 and settings["visualizer"]["params"]["preset"] == "naive"


CHANCE_RECIPE = """
title = "shuffled labels"
seed = 0

[data]
path = "folder"

[model]
name = "tiny-cnn"
params = { input_size = 32, width = 8, blocks = 4 }
layer = "block3"
train = { epochs = 2, batch_size = 32 }

[extract]
filters = ["magnitude"]
per_image = 2

[visualize]
units = 3
selective = 0
frequent = 0
visualizers = ["feature-viz"]

[visualize.feature-viz]
steps = 1
preset = "naive"
"""


def shuffled_label_folder(root: Path) -> Path:
    """A 3-class ImageFolder of shapes pictures whose classes are drawn at random: nothing to learn."""
    from convlens.data.shapes import write_shapes

    write_shapes(root / "shapes", n=150, size=32, seed=5)
    images = sorted((root / "shapes").rglob("*.png"))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
    for position, image in zip(order, images):
        folder = root / "folder" / "abc"[position % 3]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image.name).write_bytes(image.read_bytes())
    return root / "folder"


def test_train_model_on_three_classes_prints_no_top5_and_warns_at_chance(tmp_path):
    data = shuffled_label_folder(tmp_path)
    result = CliRunner().invoke(
        cli,
        [
            "train-model",
            "tiny-cnn",
            "--data",
            str(data),
            "--epochs",
            "1",
            "--input-size",
            "32",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "3 classes" in result.output and "top-5" not in result.output
    assert "close to chance (33.3 % with 3 classes)" in result.output


def test_a_chance_level_model_and_failed_renders_end_with_warnings_and_flags(tmp_path):
    shuffled_label_folder(tmp_path)
    recipe = write_recipe(tmp_path, CHANCE_RECIPE)
    result = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    chance = [w for w in state["warnings"] if "close to chance" in w]
    assert len(chance) == 1 and "33.3 % with 3 classes" in chance[0] and f"warning: {chance[0]}" in result.output
    flagged = state["flags"]["cnn"]
    assert set(flagged) == {str(u) for u in state["visualizations"]["cnn"]["units"]}
    assert any("feature visualisation of 3 CNN channels did not reach" in w for w in state["warnings"])
    index = (tmp_path / "run" / "report" / "index.html").read_text()
    assert index.index('id="warnings"') < index.index('id="run"') and "close to chance" in index
    assert index.count('class="small flagged"') == 3
    unit = next(iter(flagged))
    assert (
        "Flagged: feature-viz: the render" in (tmp_path / "run" / "report" / "units" / f"cnn-{unit}.html").read_text()
    )


def test_a_second_run_skips_every_step_and_a_changed_setting_reruns_only_what_depends_on_it(finished_run, tmp_path):
    recipe, out, _ = finished_run
    warnings = json.loads((out / "pipeline.json").read_text())["warnings"]
    assert any("uniform" in line and "not distinguishable" in line for line in warnings)
    again = run_cli("run", str(recipe), "--out", str(out), "--workers", "2")  # the machine's settings change nothing
    assert again.exit_code == 0
    state = json.loads((out / "pipeline.json").read_text())
    assert "ran 0 of" in again.output and {s["status"] for s in state["steps"]} == {"skipped"}
    assert state["warnings"] == warnings
    changed = write_recipe(tmp_path, recipe.read_text().replace("steps = 8", "steps = 9"))
    plan = json.loads(run_cli("run", str(changed), "--out", str(out), "--check", "--json").output)["steps"]
    to_run = [row["name"] for row in plan if row["status"] != "done"]
    assert to_run == [
        "visualize:cnn:feature-viz",
        "visualize:cnn:dataset-examples",
        "visualize:cnn:gradcam",
        "visualize:topk:feature-viz",
        "visualize:topk:dataset-examples",
        "visualize:topk:gradcam",
    ]


@pytest.mark.slow
def test_killing_a_run_part_way_and_rerunning_it_ends_with_the_same_outputs(finished_run, tmp_path):
    recipe, reference, _ = finished_run
    out = tmp_path / "run"
    command = [sys.executable, "-m", "convlens", "run", str(recipe), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # kill it inside the model's training, after its first epoch's checkpoint
    deadline = time.monotonic() + 120
    while not (out / "model" / "checkpoints" / "epoch-001.safetensors").is_file():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    state = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in state["steps"][:3]] == ["done", "running", "pending"]
    assert not (out / "model" / "model.safetensors").exists()

    resumed = run_cli("run", str(recipe), "--out", str(out))
    assert resumed.exit_code == 0, resumed.output
    assert "[1/" in resumed.output and re.search(
        r"data: done before for the same inputs \(it took [\d.]+ s\), skipped", resumed.output
    )
    metrics = [json.loads(line) for line in (out / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in metrics] == [1, 2, 3]
    assert_same_results(reference, out)


DATASET_VIEWS = """
[visualize]
units = 2
latents = 2
visualizers = ["dissection", "activation-atlas", "factorise", "activation-grid"]

[visualize.dissection]
formula_length = 2

[visualize.activation-atlas]
grid = 3
steps = 4
size = 16
min_count = 1

[visualize.factorise]
groups = 2
steps = 4
size = 16

[visualize.activation-grid]
steps = 4
size = 16
"""


@pytest.mark.slow
def test_the_dataset_level_views_run_in_a_recipe_and_the_report_shows_them(tmp_path):
    recipe = write_recipe(tmp_path, TINY_RECIPE.split("[visualize]")[0] + DATASET_VIEWS)
    out = tmp_path / "run"
    result = run_cli("run", str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    state = json.loads((out / "pipeline.json").read_text())
    overview = (out / "report" / "index.html").read_text()
    for group in ("cnn", "topk"):
        runs = state["visualizations"][group]["runs"]
        assert set(runs) == {"dissection", "activation-atlas", "factorise", "activation-grid"}
        for folder in runs.values():
            figures = json.loads((out / folder / "record.json").read_text())["figures"]
            assert figures and all((out / folder / f["path"]).is_file() for f in figures)
            shown = [f for f in figures if f["unit"] is None]
            assert all(f"../{folder}/{f['path']}" in overview for f in shown[:3])
    dissection = json.loads((out / state["visualizations"]["cnn"]["runs"]["dissection"] / "record.json").read_text())
    unit = next(f["unit"] for f in dissection["figures"] if f["unit"] is not None)
    page = (out / "report" / "units" / f"cnn-{unit}.html").read_text()
    assert any(f"dissection/{f['path']}" in page for f in dissection["figures"] if f["unit"] == unit)
