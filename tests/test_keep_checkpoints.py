"""train-model keeps only the last ``keep_checkpoints`` epoch checkpoints; resuming and weights=PATH still work."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import convlens
from convlens.cli import cli
from convlens.data.shapes import write_shapes
from convlens.models.fine_tuning import TrainingParams, prepare_data, train_model
from convlens.workflow.recipes import RecipeError, load_recipe

TINY = {"width": 4, "blocks": 3, "input_size": 24}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "small"
    write_shapes(root, n=48, size=24, seed=1)
    return root


def epoch_files(run):
    return sorted(path.name for path in (run / "checkpoints").glob("epoch-*.safetensors"))


def train(data, out, resume=False, on_epoch_end=None, **overrides):
    params = TrainingParams(epochs=3, batch_size=8, seed=5, **overrides)
    bundle = convlens.registry.create("model", "tiny-cnn", seed=5, **TINY)
    train_model(
        bundle,
        prepare_data(data, params),
        out,
        params,
        model={"name": "tiny-cnn", "params": TINY},
        device="cpu",
        resume=resume,
        progress=False,
        on_epoch_end=on_epoch_end,
    )


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Stop(Exception):
    pass


def stop_after_second(row):
    if row["epoch"] == 2:
        raise Stop


def test_keep_one_leaves_the_last_epoch_and_resume_reaches_the_same_weights(shapes, tmp_path):
    train(shapes, tmp_path / "every", keep_checkpoints=None)
    assert epoch_files(tmp_path / "every") == [
        "epoch-001.safetensors",
        "epoch-002.safetensors",
        "epoch-003.safetensors",
    ]

    run = tmp_path / "kept"
    with pytest.raises(Stop):
        train(shapes, run, keep_checkpoints=1, on_epoch_end=stop_after_second)
    assert epoch_files(run) == ["epoch-002.safetensors"]
    assert same_tensors(
        load_file(run / "checkpoints" / "epoch-002.safetensors"),
        load_file(tmp_path / "every" / "checkpoints" / "epoch-002.safetensors"),
    )
    train(shapes, run, resume=True, keep_checkpoints=1)
    assert epoch_files(run) == ["epoch-003.safetensors"]
    assert (run / "checkpoints" / "train-state.safetensors").is_file()
    final = load_file(run / "model.safetensors")
    assert same_tensors(final, load_file(tmp_path / "every" / "model.safetensors"))
    assert same_tensors(final, load_file(run / "checkpoints" / "epoch-003.safetensors"))
    kept = convlens.registry.create(
        "model", "tiny-cnn", weights=str(run / "checkpoints" / "epoch-003.safetensors"), **TINY
    )
    assert same_tensors(kept.module.state_dict(), final)


def test_resume_accepts_another_keep_count(shapes, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(shapes, run, keep_checkpoints=None, on_epoch_end=stop_after_second)
    assert epoch_files(run) == ["epoch-001.safetensors", "epoch-002.safetensors"]
    train(shapes, run, resume=True, keep_checkpoints=2)
    assert epoch_files(run) == ["epoch-002.safetensors", "epoch-003.safetensors"]


def test_the_command_line_option_and_the_recipe_field(shapes, tmp_path):
    args = ["train-model", "tiny-cnn", "--data", str(shapes), "--out", str(tmp_path / "run"), "--epochs", "3"]
    args += ["--batch-size", "16", "--width", "4", "--blocks", "3", "--input-size", "24", "--json"]
    result = CliRunner().invoke(cli, [*args, "--keep-checkpoints", "2"])
    assert result.exit_code == 0, result.output
    assert epoch_files(tmp_path / "run") == ["epoch-002.safetensors", "epoch-003.safetensors"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["training"]["keep_checkpoints"] == 2
    again = CliRunner().invoke(cli, [*args, "--keep-checkpoints", "1", "--resume"])
    assert again.exit_code == 0, again.output
    refused = CliRunner().invoke(cli, [*args, "--keep-checkpoints", "0", "--out", str(tmp_path / "zero")])
    assert refused.exit_code != 0 and "keep_checkpoints' must be >= 1 (got 0)" in refused.output

    recipe = tmp_path / "recipe.toml"
    body = (
        '[data]\npath = "{data}"\n[model]\nname = "tiny-cnn"\n'
        "params = {{ width = 4, blocks = 3, input_size = 24 }}\ntrain = {{ epochs = 2, keep_checkpoints = {keep} }}\n"
        '[extract]\nfilters = ["magnitude"]\n'
    )
    recipe.write_text(body.format(data=shapes, keep=3))
    assert load_recipe(recipe).training["keep_checkpoints"] == 3
    recipe.write_text(body.format(data=shapes, keep=0))
    with pytest.raises(RecipeError, match=r"\[model.train\]: parameter 'keep_checkpoints' must be >= 1"):
        load_recipe(recipe)
