import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torchvision.transforms import functional as F

import convlens
from convlens.cli import cli
from convlens.core.errors import ConvlensError
from convlens.data.images import Preprocessing, SkipLog, open_rgb, scan_images
from convlens.data.loading import ImageDataset, image_batches
from convlens.data.shapes import write_shapes
from convlens.models.fine_tuning import (
    TrainAugmentation,
    TrainingParams,
    cosine_lr,
    error_analysis,
    prepare_data,
    split_index,
    train_model,
)
from test_data import write_bad_files


@pytest.fixture(scope="module")
def shapes_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "small"
    write_shapes(root, n=48, size=24, seed=1)
    return root


def tiny(**params):
    return convlens.registry.create("model", "tiny-cnn", width=4, blocks=3, input_size=24, **params)


def run_training(data, out, epochs=2, resume=False, on_epoch_end=None, **overrides):
    params = TrainingParams(epochs=epochs, batch_size=8, seed=5, **overrides)
    bundle = tiny(seed=5)
    return bundle, train_model(
        bundle,
        prepare_data(data, params),
        out,
        params,
        model={"name": "tiny-cnn"},
        device="cpu",
        resume=resume,
        progress=False,
        on_epoch_end=on_epoch_end,
    )


@pytest.mark.slow
def test_training_learns_shapes_well_above_chance(tmp_path):
    data = tmp_path / "shapes"
    write_shapes(data, n=960, size=32, seed=0)
    result = CliRunner().invoke(
        cli,
        [
            "train-model",
            "tiny-cnn",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--input-size",
            "32",
            "--width",
            "8",
            "--epochs",
            "8",
            "--batch-size",
            "32",
            "--lr",
            "0.005",
            "--no-augment",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["train_images"] == 864 and summary["val_images"] == 96 and summary["classes"] == 8
    assert summary["final"]["val_top1"] >= 0.5  # chance is 1/8; the benchmark trains to >= 90 %
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == list(range(1, 9))
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


@pytest.mark.slow
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(shapes_small, tmp_path):
    straight, _ = run_training(shapes_small, tmp_path / "straight", epochs=3)

    class Stop(Exception):
        pass

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run_training(shapes_small, tmp_path / "resumed", epochs=3, on_epoch_end=stop_after_first)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "epoch-001.safetensors").exists()
    with pytest.raises(ConvlensError, match="already holds a training run"):
        run_training(shapes_small, tmp_path / "resumed", epochs=3)
    changed = r"settings differ from the saved run \(training.lr: 0.003 saved, 0.01 now\)"
    with pytest.raises(ConvlensError, match=changed):
        run_training(shapes_small, tmp_path / "resumed", epochs=3, resume=True, lr=0.01)
    resumed, _ = run_training(shapes_small, tmp_path / "resumed", epochs=3, resume=True)

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [
        [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("straight", "resumed")
    ]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 3


def test_run_folder_holds_checkpoints_curves_and_error_analysis(shapes_small, tmp_path):
    bundle, summary = run_training(shapes_small, tmp_path / "run", epochs=2, keep_checkpoints=None)
    run = tmp_path / "run"
    for name in (
        "config.json",
        "metrics.jsonl",
        "curves.png",
        "error-analysis.json",
        "error-analysis.png",
        "model.safetensors",
        "summary.json",
        "checkpoints/epoch-001.safetensors",
        "checkpoints/epoch-002.safetensors",
        "checkpoints/train-state.safetensors",
    ):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["training"]["epochs"] == 2 and config["data"]["classes"][0] == "circle"
    assert "torch" in config["versions"]
    analysis = json.loads((run / "error-analysis.json").read_text())
    assert sum(map(sum, analysis["confusion_matrix"])) == summary["val_images"]
    final = summary["final"]
    diagonal = sum(analysis["confusion_matrix"][i][i] for i in range(8))
    assert math.isclose(diagonal / summary["val_images"], final["val_top1"])
    # the checkpoint reloads through the model plugin, with the class names
    reloaded = tiny(weights=str(run / "model.safetensors"))
    assert reloaded.class_names == tuple(config["data"]["classes"])
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(reloaded.module(images), bundle.module(images))


def test_augmentation_is_per_image_and_independent_of_workers(shapes_small):
    index = scan_images(shapes_small)
    pre = Preprocessing.of(tiny())
    augmentation = TrainAugmentation(pre, TrainingParams(seed=3))
    dataset = ImageDataset(index, augmentation)
    order = list(range(len(index)))[::-1]

    def images(workers, batch_size):
        batches = image_batches(dataset, batch_size=batch_size, skip_log=SkipLog(), order=order, workers=workers)
        return torch.cat([b.images for b in batches])

    single = images(0, 5)
    assert torch.equal(single, images(2, 16))
    augmentation.epoch = 1
    assert not torch.equal(single, images(0, 5))


def test_augmentation_reduces_to_a_flip_when_everything_else_is_off(shapes_small):
    image = open_rgb(scan_images(shapes_small).paths[0])
    pre = Preprocessing.of(tiny())
    params = TrainingParams(crop_scale=1.0, flip=1.0, jitter=0.0, hue=0.0, erase=0.0)
    augmented = TrainAugmentation(pre, params)(image, 0)
    assert torch.allclose(augmented, pre.eval_transform(F.hflip(image)), atol=1e-6)
    erased = TrainAugmentation(pre, TrainingParams(crop_scale=1.0, flip=0.0, jitter=0.0, hue=0.0, erase=1.0))
    changed = (erased(image, 0) != pre.eval_transform(image)).any(dim=0)
    assert 0.02 <= changed.float().mean() <= 0.34  # one box of 2-33 % of the area


def test_split_is_stratified_seeded_and_disjoint(shapes_small):
    index = scan_images(shapes_small)
    train, val = split_index(index, 0.25, seed=0)
    assert sorted(train + val) == list(range(len(index))) and not set(train) & set(val)
    per_class = [sum(1 for i in val if index.labels[i] == c) for c in range(8)]
    assert per_class == [round(6 * 0.25)] * 8
    assert split_index(index, 0.25, seed=1)[1] != val
    assert split_index(index, 0.25, seed=0)[1] == val


def test_cosine_schedule_and_error_analysis_numbers():
    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0)
    confusion = torch.tensor([[8, 2, 0], [0, 5, 5], [1, 0, 9]])
    analysis = error_analysis(confusion, ("a", "b", "c"), top=2)
    assert [c["accuracy"] for c in analysis["classes"]] == [0.8, 0.5, 0.9]
    assert [c["name"] for c in analysis["best"]] == ["c", "a"]
    assert [c["name"] for c in analysis["worst"]] == ["b", "a"]
    assert analysis["confused_pairs"] == [
        {"true": "b", "predicted": "c", "count": 5, "share_of_true": 0.5},
        {"true": "a", "predicted": "b", "count": 2, "share_of_true": 0.2},
    ]


def test_train_model_cli_skips_bad_files_and_names_them(shapes_small, tmp_path):
    data = tmp_path / "data"
    for split_dir in ("circle", "ring"):
        (data / split_dir).mkdir(parents=True)
        for path in sorted((shapes_small / "images" / split_dir).iterdir())[:4]:
            (data / split_dir / path.name).write_bytes(path.read_bytes())
    write_bad_files(data / "ring")
    result = CliRunner().invoke(
        cli,
        [
            "train-model",
            "tiny-cnn",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
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
            "--val-fraction",
            "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "trained tiny-cnn for 1 epochs" in result.output
    assert (
        "skipped 3 unreadable files: ring/empty.jpg (empty file), ring/text.jpg (not an image), "
        "ring/truncated.jpg (truncated image)"
    ) in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {s["path"] for s in summary["skipped"]} == {"ring/empty.jpg", "ring/text.jpg", "ring/truncated.jpg"}


def test_train_model_cli_errors(shapes_small, tmp_path):
    runner = CliRunner()
    base = [
        "train-model",
        "tiny-cnn",
        "--data",
        str(shapes_small),
        "--input-size",
        "24",
        "--width",
        "4",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    result = runner.invoke(cli, [*base, "--num-classes", "5"])
    assert result.exit_code == 1 and "the model has 5 outputs but the data has 8 classes" in result.output
    result = runner.invoke(cli, [*base, "--optimizer", "lion"])
    assert result.exit_code == 1 and "optimizer" in result.output and "adamw" in result.output
    result = runner.invoke(cli, [*base, "--resume"])
    assert result.exit_code == 1 and "nothing to resume" in result.output
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((shapes_small / "images" / "circle" / "00000.png").read_bytes())
    result = runner.invoke(cli, ["train-model", "tiny-cnn", "--data", str(flat), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "training needs one sub-folder per class" in result.output


def test_a_diverging_run_stops_with_one_message(shapes_small, tmp_path):
    with pytest.raises(ConvlensError, match="the training loss became (nan|inf)"):
        run_training(shapes_small, tmp_path / "run", epochs=1, optimizer="sgd", lr=1e30, momentum=0.0, weight_decay=0.0)


def test_train_and_val_sub_folders_are_used_as_the_split(shapes_small, tmp_path):
    data = tmp_path / "data"
    for split, files in (("train", slice(0, 4)), ("val", slice(4, 6))):
        for name in ("circle", "star"):
            (data / split / name).mkdir(parents=True)
            for path in sorted((shapes_small / "images" / name).iterdir())[files]:
                (data / split / name / path.name).write_bytes(path.read_bytes())
    prepared = prepare_data(data, TrainingParams())
    assert prepared.index.root == data / "train" and prepared.val_index.root == data / "val"
    assert (len(prepared.train), len(prepared.val), prepared.class_names) == (8, 4, ("circle", "star"))
    (data / "val" / "star").rename(data / "val" / "heart")
    with pytest.raises(ConvlensError, match="validation classes"):
        prepare_data(data, TrainingParams())
