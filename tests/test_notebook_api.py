"""The notebook API: the README's notebook section runs, and what it holds in memory equals what the CLI writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import convlens
from convlens.cli import cli
from helpers import ROOT, readme_section, tomllib

# a `convlens demo` in small: the folders the README's notebook section reads, in seconds
QUICK_DEMO = """
title = "quick demo"

[data]
shapes = { n = 64, size = 32 }

[model]
name = "tiny-cnn"
params = { input_size = 32, width = 8, blocks = 4 }
layer = "block3"
train = { epochs = 1, batch_size = 32 }

[extract]
filters = ["magnitude"]
per_image = 4

[[sae]]
name = "topk"
params = { k = 4, expansion = 2 }
train = { epochs = 1, batch_size = 64 }

[statistics]
max_images = 64

[visualize]
visualizers = []
"""
DEMO_MODEL = "runs/demo/model"


def invoke(*args: str) -> None:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def readme_notebook_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme_section("In a notebook"), re.S)
    assert len(blocks) == 1, "the notebook section shows one python block"
    return blocks[0]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notebook")
    (folder / "demo.toml").write_text(QUICK_DEMO)
    invoke("run", str(folder / "demo.toml"), "--out", str(folder / "runs" / "demo"))
    return folder


@pytest.fixture(scope="module")
def notebook(quick_demo) -> tuple[dict, list]:
    """The README's notebook code run in the quick demo's folder: its variables, and each convlens.visualize call
    with its result."""
    calls = []
    original = convlens.visualize

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(quick_demo)
        patch.setattr(convlens, "visualize", recording)
        variables: dict = {}
        exec(compile(readme_notebook_code(), "README.md", "exec"), variables)
    return variables, calls


def command_of(model, args: tuple, kwargs: dict) -> list[str]:
    """The `convlens visualize` words for the same arguments as a convlens.visualize call on the demo's model."""
    name, passed_model, *rest = args
    assert passed_model is model
    words = ["visualize", name, "--model", DEMO_MODEL]
    if rest:
        words += ["--layer", rest[0]]
    for key, value in kwargs.items():
        if key == "units" and not isinstance(value, str):
            value = ",".join(map(str, value))
        words += [f"--{key.replace('_', '-')}", str(value)]
    return words


def assert_equal_to_folder(result: convlens.Visualization, folder: Path) -> None:
    pictures = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*.png")}
    assert list(result.images) and set(result.images) == set(pictures)
    for relative, picture in result.images.items():
        with Image.open(pictures[relative]) as written:
            assert picture.mode == written.mode and picture.size == written.size, relative
            assert np.array_equal(np.asarray(picture), np.asarray(written)), relative
    tensor_files = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*.safetensors")}
    assert set(result.tensors) == set(tensor_files)
    for relative, tensors in result.tensors.items():
        written = load_file(str(tensor_files[relative]))
        assert tensors.keys() == written.keys()
        assert all(torch.equal(tensors[key], written[key]) for key in tensors), relative
    records = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*.json")}
    assert records.pop("config.json") and set(result.records) == set(records)
    assert all(result.records[relative] == json.loads(path.read_text()) for relative, path in records.items())
    assert result.record in result.records.values()


@pytest.mark.slow
def test_the_readme_notebook_holds_in_memory_what_the_cli_writes(quick_demo, notebook, monkeypatch):
    variables, calls = notebook
    assert [args[0] for args, _, _ in calls] == ["gradcam", "feature-viz", "dataset-examples"]
    monkeypatch.chdir(quick_demo)
    for number, (args, kwargs, result) in enumerate(calls):
        out = f"cli-{number}"
        invoke(*command_of(variables["model"], args, kwargs), "--out", out)
        assert result.out_dir is None and result.name == args[0]
        assert_equal_to_folder(result, quick_demo / out)

    gradcam, features, examples = (result for _, _, result in calls)
    assert tuple(variables["maps"].shape) == (8, 1, 4, 4)  # images, targets, block3 grid
    assert variables["overlay"] is gradcam.images["overlays/00000-00000.png"]
    assert gradcam.summary.startswith("explained 8 images")
    assert sorted(features.images) == ["grid.png", *(f"images/{u:03d}-channel_{u}.png" for u in range(4))]
    assert [unit["unit"] for unit in examples.record["units"]] == [0, 1, 2, 3]
    assert len(variables["top_images"]) == 4 and all(name.endswith(".png") for name in variables["top_images"])
    assert variables["codes"].shape == (len(variables["vectors"]), 64) and len(variables["vectors"]) > 0
    run = variables["run"]
    assert isinstance(run, convlens.RunFolder) and run.title == "quick demo"
    assert [sae.label for sae in run.saes] == ["topk"] and run.saes[0].evaluation is not None


def test_the_quick_demo_has_the_folders_of_the_demo_the_readme_reads():
    demo = tomllib.loads((ROOT / "src" / "convlens" / "recipes" / "demo.toml").read_text())
    quick = tomllib.loads(QUICK_DEMO)
    for recipe in (demo, quick):
        assert recipe["model"]["name"] == "tiny-cnn" and recipe["model"]["layer"] == "block3"
        assert recipe["extract"]["filters"][0] == "magnitude" and recipe["sae"][0]["name"] == "topk"


def test_capture_outputs_reads_back_what_the_block_writes_whoever_writes_it(tmp_path):
    untouched, rewritten = tmp_path / "old.png", tmp_path / "again.png"
    for path in (untouched, rewritten):
        convlens.save_png(Image.new("RGB", (4, 3), "red"), path)
    deep = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    with convlens.capture_outputs(tmp_path) as outputs:
        convlens.save_png(Image.new("RGB", (4, 3), "blue"), rewritten)
        (tmp_path / "sub").mkdir()
        Image.fromarray(deep).save(tmp_path / "sub" / "deep.png")  # a 16-bit picture, written by PIL itself
        convlens.save_tensors_atomic({"x": torch.arange(6.0).reshape(2, 3)}, tmp_path / "sub" / "t.safetensors")
        convlens.write_json_atomic(tmp_path / "record.json", {"size": (2, 3)})
        (tmp_path / ".hidden.png").write_bytes(b"not read")
    assert list(outputs.images) == ["again.png", "sub/deep.png"]
    assert outputs.images["again.png"].getpixel((0, 0)) == (0, 0, 255)
    assert np.array_equal(np.asarray(outputs.images["sub/deep.png"]), deep)
    assert torch.equal(outputs.tensors["sub/t.safetensors"]["x"], torch.arange(6.0).reshape(2, 3))
    assert outputs.records == {"record.json": {"size": [2, 3]}}


def test_analyses_return_their_results_and_a_capture_keeps_their_pictures_and_tensors(quick_demo, tmp_path):
    data = quick_demo / "runs" / "demo" / "data"
    model, _ = convlens.load_model(quick_demo / DEMO_MODEL)
    index, concepts = convlens.scan_images(data), convlens.load_concepts(data)
    with convlens.capture_outputs(tmp_path / "statistics") as statistics:
        record = convlens.unit_statistics(model, "block3", index, tmp_path / "statistics", concepts=concepts)
    maxima = statistics.tensors["maxima.safetensors"]["maxima.cnn"]
    assert maxima.shape == (64, 32) and statistics.records["statistics.json"] == record
    largest = [unit["max"] for unit in record["groups"]["cnn"]["units"]]
    assert torch.allclose(maxima.amax(dim=0).double(), torch.tensor(largest, dtype=torch.float64), rtol=1e-6)

    filters = {name: convlens.registry.create("filter", name) for name in ("magnitude", "median")}
    settings = convlens.ComparisonSettings(layer="block3", max_images=16)
    with convlens.capture_outputs(tmp_path / "filters") as comparison:
        record = convlens.compare_filters(model, filters, index, tmp_path / "filters", settings, concepts=concepts)
    cosine = record["cosine"]["mean"]
    assert cosine[0][0] == 1.0 and 0.0 < cosine[0][1] <= 1.0 and record["cosine"]["images"][0][1] == 16
    assert {"cosine.png", "spearman.png", "foreground-precision.png"} <= set(comparison.images)
    assert len([name for name in comparison.images if name.startswith("overlays/")]) == settings.overlays
    with Image.open(tmp_path / "filters" / "cosine.png") as written:
        assert np.array_equal(np.asarray(comparison.images["cosine.png"]), np.asarray(written))


def test_attribution_and_splice_analyses_return_tensors_and_numbers(quick_demo):
    demo = quick_demo / "runs" / "demo"
    model, _ = convlens.load_model(demo / "model")
    paths = sorted((demo / "data" / "images").rglob("*.png"))[:4]
    preprocessing = convlens.Preprocessing(model.input_size, model.mean, model.std, model.crop_fraction)
    images = torch.stack([preprocessing.eval_transform(convlens.open_rgb(path)) for path in paths])
    gradcam = convlens.registry.create("visualizer", "gradcam")

    rows, maps = convlens.explained_predictions(model, gradcam, images, [p.name for p in paths], "block3", top=3)
    assert maps.shape == (4, 4, 4) and [len(row["top"]) for row in rows] == [3, 3, 3, 3]
    (cascade,) = convlens.cascading_randomisation(model, [gradcam], images, "block3")
    assert isinstance(cascade, convlens.CascadeResult) and cascade.maps.shape == (len(cascade.steps), 4, 4, 4)
    assert torch.equal(cascade.maps[0], maps) and torch.allclose(
        cascade.spearman[0].double(), torch.ones(4, dtype=torch.float64)
    )

    sae = convlens.load_sae(demo / "saes" / "topk" / "sae.safetensors")
    splice = convlens.evaluate_splice(model, sae, "block3", convlens.scan_images(demo / "data"), max_images=32)
    assert splice["images"] == 32 and splice["layer_l0"] == 4.0 and 0.0 <= splice["top1"]["sae"] <= 1.0


def test_visualize_takes_names_keeps_an_out_folder_and_names_mistakes(quick_demo):
    demo = quick_demo / "runs" / "demo"
    out = quick_demo / "kept"
    result = convlens.visualize(
        "gradcam",
        "tiny-cnn",
        "block2",
        data=demo / "data",
        out=out,
        max_images=2,
        model_params={"input_size": 32, "width": 8, "blocks": 4},
    )
    assert result.out_dir == out and sorted(result.images) == sorted(
        path.relative_to(out).as_posix() for path in out.rglob("*.png")
    )
    assert result.tensors["maps.safetensors"]["maps"].shape == (2, 1, 8, 8)
    with pytest.raises(convlens.UnknownComponentError, match="did you mean 'gradcam'"):
        convlens.visualize("gradcm", "tiny-cnn")
    with pytest.raises(convlens.ParameterError, match="did you mean 'max_images'"):
        convlens.visualize("gradcam", "tiny-cnn", data=demo / "data", max_imgs=2)
    with pytest.raises(convlens.ConvlensError, match="looks at images: pass data="):
        convlens.visualize("gradcam", "tiny-cnn")
    sae = demo / "saes" / "topk" / "sae.safetensors"
    bundle, record = convlens.load_model(demo / "model")
    with pytest.raises(convlens.ConvlensError, match=r"was trained on layer 'block3', not 'block3.0'; pass --force"):
        convlens.visualize("gradcam", bundle, "block3.0", data=demo / "data", sae=sae)
    with pytest.warns(UserWarning, match="used anyway"):
        convlens.visualize(
            "gradcam", bundle, "block3.0", data=demo / "data", sae=sae, force=True, units=0, max_images=1
        )
    explain = {"data": demo / "data", "units": [1], "max_images": 2}
    by_path = convlens.visualize("gradcam", (bundle, record), sae=sae, **explain)  # at the SAE's own layer
    by_object = convlens.visualize("gradcam", bundle, "block3", sae=convlens.load_sae(sae), **explain)
    assert by_path.record["layer"] == "block3" and by_path.record == by_object.record
    assert torch.equal(by_path.tensors["maps.safetensors"]["maps"], by_object.tensors["maps.safetensors"]["maps"])
    with pytest.raises(convlens.ConvlensError, match="was trained on model 'convlens:tiny-cnn'"):
        convlens.visualize("gradcam", "tiny-cnn", data=demo / "data", sae=sae, model_params={"width": 8, "blocks": 4})
