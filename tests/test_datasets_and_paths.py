"""Datasets without readable images, file names of any bytes, paths that leave their folders, resume by path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from convlens.cli import cli
from convlens.core.errors import ConvlensError
from convlens.data.concepts import load_concepts
from convlens.data.images import EmptyClassWarning, scan_images
from convlens.data.shapes import write_shapes
from convlens.models.fine_tuning import TrainingParams, prepare_data

NON_UTF8_IMAGE = b"bad\xff.png"
NON_UTF8_BROKEN = b"broken\xfe.jpg"


def write_images(folder, count, size=24, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{number:02d}.png")


def write_unreadable(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"" if name.startswith("empty") else b"not an image")


def write_bytes_named(folder, name: bytes, content: bytes):
    with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
        handle.write(content)


def png_bytes(size=24, colour=(200, 30, 30)):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def train_command(data, out, *extra):
    return [
        "train-model",
        "tiny-cnn",
        "--data",
        str(data),
        "--out",
        str(out),
        "--input-size",
        "24",
        "--width",
        "4",
        "--blocks",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


def extract_command(data, out, *extra):
    return [
        "extract",
        "--model",
        "tiny-cnn",
        "--model-input-size",
        "24",
        "--model-width",
        "4",
        "--model-blocks",
        "2",
        "--layer",
        "block2",
        "--data",
        str(data),
        "--out",
        str(out),
        "--per-image",
        "4",
        "--images-per-shard",
        "4",
        "--device",
        "cpu",
        "--json",
        *extra,
    ]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- 5: folders without a readable image ------------------------------------------------------------------------


def test_train_model_refuses_a_folder_without_a_readable_image_before_writing(tmp_path):
    data = tmp_path / "data"
    write_unreadable(data / "cat", "a.png", "empty.jpg")
    write_unreadable(data / "dog", "b.png")
    result = invoke(train_command(data, tmp_path / "run"))
    assert result.exit_code == 1, result.output
    assert f"Error: no readable image in {data}: 3 image files could not be read" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_extract_refuses_a_folder_without_a_readable_image_before_writing(tmp_path):
    data = tmp_path / "flat"
    write_unreadable(data, "a.png", "b.jpg")
    result = invoke(extract_command(data, tmp_path / "store"))
    assert result.exit_code == 1, result.output
    assert f"Error: no readable image in {data}: 2 image files could not be read" in result.output
    assert not (tmp_path / "store").exists()


def test_a_class_without_readable_images_is_dropped_with_a_warning(tmp_path):
    data = tmp_path / "data"
    write_images(data / "circle", 4, seed=1)
    write_unreadable(data / "ghost", "a.png", "empty.jpg")
    write_images(data / "square", 4, seed=2)
    with pytest.warns(EmptyClassWarning, match=r"class 'ghost'.*2 image files could not be read"):
        index = scan_images(data)
    assert index.class_names == ("circle", "square")
    assert [(p.parent.name, label) for p, label in zip(index.paths, index.labels)] == [("circle", 0)] * 4 + [
        ("square", 1)
    ] * 4

    result = invoke(train_command(data, tmp_path / "run", "--val-fraction", "0.25"))
    assert result.exit_code == 0, result.output
    assert "class 'ghost'" in result.output and "left out" in result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["classes"] == ["circle", "square"]


def test_a_class_dropped_in_the_validation_folder_is_named(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        write_images(data / split / "circle", 3, seed=1)
        write_images(data / split / "square", 3, seed=2)
    for path in (data / "val" / "square").iterdir():
        path.write_bytes(b"")
    with pytest.warns(EmptyClassWarning), pytest.raises(ConvlensError, match="square"):
        prepare_data(data, TrainingParams())


# -- 6: file names that are not UTF-8 --------------------------------------------------------------------------


@pytest.fixture
def non_utf8_data(tmp_path):
    data = tmp_path / "data"
    write_images(data / "a", 4, seed=1)
    write_images(data / "b", 4, seed=2)
    write_bytes_named(data / "a", NON_UTF8_IMAGE, png_bytes())
    write_bytes_named(data / "b", NON_UTF8_BROKEN, b"not an image")
    return data


def test_train_model_reads_a_non_utf8_file_name_and_shows_it_escaped(non_utf8_data, tmp_path):
    index = scan_images(non_utf8_data)
    assert len(index) == 10 and len(index.fingerprint()) == 16
    result = invoke(train_command(non_utf8_data, tmp_path / "run", "--val-fraction", "0.25", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_images"] + summary["val_images"] == 10
    assert summary["skipped"] == [{"path": "b/broken\\xfe.jpg", "reason": "not an image"}]
    assert "broken\\xfe.jpg" in result.output


def test_extract_reads_a_non_utf8_file_name_and_shows_it_escaped(non_utf8_data, tmp_path):
    result = invoke(extract_command(non_utf8_data, tmp_path / "store"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 9 and summary["skipped_files"] == [
        {"path": "b/broken\\xfe.jpg", "reason": "not an image"}
    ]
    assert "a/bad\\xff.png" in json.loads((tmp_path / "store" / "images.json").read_text())


def test_a_non_utf8_name_in_an_error_message_is_escaped(tmp_path):
    data = tmp_path / "flat"
    data.mkdir()
    write_bytes_named(data, NON_UTF8_BROKEN, b"")
    result = invoke(extract_command(data, tmp_path / "store"))
    assert result.exit_code == 1, result.output
    assert "Error: no readable image in" in result.output and "broken\\xfe.jpg: empty file" in result.output


# -- 9: paths that leave their folders -------------------------------------------------------------------------


def write_run(run, outside):
    """A run folder with a model run, a visualizer run and a pipeline.json; ``outside`` holds a secret picture."""
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(png_bytes(colour=(1, 2, 3)))
    (outside / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 0.123456}) + "\n")
    (outside / "curves.png").write_bytes(png_bytes(colour=(4, 5, 6)))
    viz = run / "units" / "viz"
    viz.mkdir(parents=True)
    (viz / "unit-0.png").write_bytes(png_bytes())
    (viz / "unit-1.png").symlink_to(outside / "secret.png")
    record = {
        "visualizer": "viz",
        "figures": [
            {"unit": 0, "path": "unit-0.png", "kind": "map"},
            {"unit": 1, "path": "unit-1.png", "kind": "map"},
            {"unit": 2, "path": str(outside / "secret.png"), "kind": "map"},
        ],
    }
    (viz / "record.json").write_text(json.dumps(record))
    pipeline = {
        "title": "paths",
        "model": {"name": "tiny-cnn", "run": str(outside)},
        "sweep": "../outside",
        "visualizations": {"cnn": {"units": [0, 1, 2], "runs": {"viz": "units/viz"}}},
    }
    (run / "pipeline.json").write_text(json.dumps(pipeline))


def test_report_copies_nothing_from_outside_the_run_folder(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    write_run(run, outside)
    site = tmp_path / "site"
    result = invoke(["report", run, "--out", site, "--copy-images", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    copied = [p for p in site.rglob("*") if p.is_file() and p.suffix == ".png"]
    assert [p.relative_to(site).as_posix() for p in copied] == ["assets/units/viz/unit-0.png"]
    secret = (outside / "secret.png").read_bytes()
    assert all(p.read_bytes() != secret for p in site.rglob("*") if p.is_file())
    notes = "\n".join(summary["notes"])
    assert "units/viz/unit-1.png lies outside the run folder" in notes
    assert f"{outside / 'secret.png'} lies outside the run folder" in notes
    assert f"{outside} lies outside the run folder" in notes
    assert "../outside lies outside the run folder" in notes
    assert "12.3" not in (site / "index.html").read_text()  # the outside metrics are not read


def test_a_symlinked_folder_in_the_run_folder_is_not_followed_out(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    write_run(run, outside)
    (run / "model").symlink_to(outside, target_is_directory=True)
    pipeline = json.loads((run / "pipeline.json").read_text())
    pipeline["model"]["run"] = "model"
    (run / "pipeline.json").write_text(json.dumps(pipeline))
    result = invoke(["report", run, "--copy-images", "--json"])
    assert result.exit_code == 0, result.output
    assert "model lies outside the run folder" in "\n".join(json.loads(result.stdout)["notes"])
    assert not (run / "report" / "assets" / "model").exists()


def test_concepts_json_paths_outside_the_dataset_are_refused(tmp_path):
    data = tmp_path / "shapes"
    write_shapes(data, n=4, size=16, seed=0)
    dataset_file = data / "concepts.json"
    original = json.loads(dataset_file.read_text())
    outside = tmp_path / "outside"
    write_images(outside / "cls", 2)

    for key, value in (("image_root", "../outside"), ("image_root", str(outside)), ("mask_root", "../outside")):
        dataset_file.write_text(json.dumps({**original, key: value}))
        with pytest.raises(ConvlensError, match=f"{key} '{value}' lies outside {data}"):
            load_concepts(data)
        if key == "image_root":
            with pytest.raises(ConvlensError, match=f"{key} '{value}' lies outside {data}"):
                scan_images(data)

    images = [dict(record) for record in original["images"]]
    images[1]["mask"] = "../../outside/cls/00.png"
    dataset_file.write_text(json.dumps({**original, "images": images}))
    with pytest.raises(ConvlensError, match=r"mask '../../outside/cls/00.png' of image 1 lies outside"):
        load_concepts(data)

    dataset_file.write_text(json.dumps(original))
    mask = data / original.get("mask_root", "masks") / original["images"][0]["mask"]
    mask.unlink()
    mask.symlink_to(outside / "cls" / "00.png")
    concepts = load_concepts(data)
    with pytest.raises(ConvlensError, match="lies outside"):
        concepts.foreground(0)


# -- 10: resume with the same input spelled differently --------------------------------------------------------


@pytest.fixture
def small_tree(tmp_path):
    data = tmp_path / "data"
    write_images(data / "circle", 4, seed=1)
    write_images(data / "square", 4, seed=2)
    return data


def test_extract_resumes_when_the_same_data_is_spelled_absolute(small_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = invoke(extract_command("data", "store"))
    assert first.exit_code == 0, first.output
    again = invoke(extract_command(small_tree, tmp_path / "store"))
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["chunks_reused"] == 2

    changed = invoke(extract_command(small_tree, "store", "--seed", "3"))
    assert changed.exit_code == 1
    assert "(seed differ)" in changed.output and "write to a new --out" in changed.output
    assert "delete" not in changed.output


def test_train_model_resumes_when_the_same_data_is_spelled_absolute(small_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = invoke(train_command("data", "run", "--val-fraction", "0.25"))
    assert first.exit_code == 0, first.output
    again = invoke(train_command(small_tree, tmp_path / "run", "--val-fraction", "0.25", "--resume"))
    assert again.exit_code == 0, again.output

    changed = invoke(train_command(small_tree, "run", "--val-fraction", "0.5", "--resume"))
    assert changed.exit_code == 1
    assert "training.val_fraction" in changed.output and "write to a new --out" in changed.output
    assert "delete" not in changed.output
