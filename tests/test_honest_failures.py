"""Failures that used to pass silently or show as 'unexpected <Exception>': each is one message naming the
file or argument, and a resumed SAE run writes the same metrics as an uninterrupted one."""

import errno
import json
import os

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import convlens
from convlens.activations.store import store_from_tensors
from convlens.cli import cli
from convlens.data.shapes import write_shapes
from convlens.models.checkpoints import load_state_dict
from convlens.sae.training import SAETrainingParams, train_sae

MODEL = ("--model", "tiny-cnn", "--model-input-size", "32")


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def assert_one_message(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: ") and result.output.count("Error:") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Shapes images and an SAE trained on tiny-cnn's layer block3 (64 channels, like block3.2)."""
    root = tmp_path_factory.mktemp("honest")
    write_shapes(root / "shapes", n=8, size=32, seed=0)
    extracted = invoke("extract", *MODEL, "--layer", "block3", "--data", root / "shapes", "--out", root / "store")
    assert extracted.exit_code == 0, extracted.output
    sae_run = root / "sae"
    trained = invoke(
        "train-sae", "--store", root / "store", "--sae", "topk", "--k", "4", "--latent-dim", "32",
        "--steps", "2", "--batch-size", "32", "--out", sae_run,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    return root, sae_run / "sae.safetensors"


def sae_uses(root, sae, layer, *extra):
    """evaluate-sae, visualize --sae and circuit --sae of ``sae`` at ``layer``."""
    data = root / "shapes"
    return {
        "evaluate-sae": invoke(
            "evaluate-sae", *MODEL, "--layer", layer, "--sae", sae, "--data", data, "--ablate", "1",
            "--ablation-images", "2", *extra,
        ),
        "visualize": invoke(
            "visualize", "activation-maps", *MODEL, "--layer", layer, "--sae", sae, "--units", "0", "--data", data,
            "--out", root / f"visualize-{layer}", *extra,
        ),
        "circuit": invoke(
            "circuit", *MODEL, "--layer", layer, "--sae", sae, "--units", "0", "--data", data,
            "--out", root / f"circuit-{layer}", "--sparsity", "0.5", *extra,
        ),
    }  # fmt: skip


def test_an_sae_of_the_same_width_at_another_layer_is_refused_unless_forced(trained):
    root, sae = trained
    for result in sae_uses(root, sae, "block3.2").values():
        assert_one_message(result, str(sae), "layer 'block3', not 'block3.2'", "--force")
    forced = sae_uses(root, sae, "block3.2", "--force")["evaluate-sae"]
    assert forced.exit_code == 0, forced.output
    assert "warning: " in forced.stderr and "layer 'block3', not 'block3.2'" in forced.stderr


def test_an_sae_of_the_same_width_on_another_model_is_refused(trained):
    root, sae = trained
    result = invoke(
        "evaluate-sae", *MODEL, "--model-seed", "1", "--layer", "block3", "--sae", sae, "--data", root / "shapes"
    )
    assert_one_message(result, str(sae), "model 'convlens:tiny-cnn' (input_size=32), not", "seed=1")


def test_an_sae_at_its_own_layer_and_model_is_used_without_a_word(trained):
    root, sae = trained
    result = sae_uses(root, sae, "block3")["evaluate-sae"]
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr


def test_a_binary_recipe_is_one_message_naming_it(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(b"\xff\xfe[model]\x00\x93 name = 'tiny-cnn'\n")
    assert_one_message(invoke("run", recipe), str(recipe), "not UTF-8 text")


def test_a_layer_named_with_a_slash_is_one_message(tmp_path):
    write_shapes(tmp_path / "shapes", n=2, size=32, seed=0)
    for command in (("extract",), ("visualize", "activation-maps")):
        result = invoke(*command, *MODEL, "--layer", "block3/0", "--data", tmp_path / "shapes", "--out", tmp_path / "o")
        assert_one_message(result, "no layer 'block3/0'", "separated by '.', not '/'", "'block3.0'")


def test_a_full_disk_names_the_file_and_keeps_what_was_written(tmp_path, monkeypatch):
    from convlens.sae import training

    features = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    store = store_from_tensors(tmp_path / "store", features, split=(torch.arange(256) % 8 == 0).to(torch.uint8))
    args = ["train-sae", "--store", store.path, "--sae", "topk", "--k", "2", "--latent-dim", "16"]
    args += ["--steps", "4", "--batch-size", "32", "--checkpoint-every", "2", "--out", tmp_path / "run"]
    real_write = safetensors.torch.save_file

    def full_at_the_end(tensors, filename, metadata=None):
        if ".sae.safetensors." in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a failed write names no file
        real_write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_at_the_end)
    sae_file = tmp_path / "run" / "sae.safetensors"
    assert_one_message(invoke(*args), "the disk is full", str(sae_file))
    state = tmp_path / "run" / "checkpoints" / "train-state.safetensors"
    kept = {name: (tmp_path / "run" / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    assert state.is_file() and not sae_file.exists()

    def full(path, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))  # no room to create the file

    monkeypatch.setattr(safetensors.torch, "save_file", real_write)
    monkeypatch.setattr(training, "write_json_atomic", full)
    result = invoke(*args, "--resume")
    assert_one_message(result, "the disk is full", str(tmp_path / "run" / "summary.json"))
    assert {name: (tmp_path / "run" / name).read_bytes() for name in kept} == kept
    monkeypatch.undo()
    assert invoke(*args, "--resume").exit_code == 0 and sae_file.is_file()


def test_a_pickled_checkpoint_is_refused_without_torchs_advice(tmp_path):
    whole_model = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), whole_model)
    with pytest.raises(convlens.ConvlensError) as caught:
        load_state_dict(whole_model)
    message = str(caught.value)
    assert "weights_only=False" not in message and "likely succeed" not in message
    assert str(whole_model) in message and "pickle" in message and "never unpickles" in message
    assert "safetensors" in message and "state_dict()" in message


def test_an_unexpected_exception_names_the_command_and_the_file(tmp_path):
    plugin = tmp_path / "crash.py"
    plugin.write_text(
        "import convlens\n"
        "@convlens.hookimpl\n"
        "def register_commands(cli):\n"
        "    @cli.command()\n"
        "    def crash():\n"
        "        raise IsADirectoryError(21, 'Is a directory', 'some/folder')\n"
    )
    result = invoke("--plugin", plugin, "crash")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: convlens crash: cannot access some/folder: Is a directory"


def metric_rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_sae_run_writes_the_metrics_of_an_uninterrupted_one(tmp_path):
    features = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0))
    store = store_from_tensors(tmp_path / "store", features, split=(torch.arange(1000) % 10 == 0).to(torch.uint8))
    # 15 steps an epoch: the epoch-end checkpoint at step 15 falls inside the metric row of steps 13-16
    settings = SAETrainingParams(epochs=2, batch_size=64, lr=3e-3, log_every=4, checkpoint_every=100, val_samples=64)
    record = {"name": "topk", "params": {"input_dim": 16, "latent_dim": 32, "k": 4}}

    def fresh():
        return convlens.registry.create("sae", "topk", **record["params"])

    def stop_at_17(step):
        if step == 17:
            raise KeyboardInterrupt

    straight = fresh()
    train_sae(straight, record, store, tmp_path / "straight", settings, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_sae(fresh(), record, store, tmp_path / "resumed", settings, progress=False, on_step=stop_at_17)
    resumed = fresh()
    train_sae(resumed, record, store, tmp_path / "resumed", settings, progress=False, resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert metric_rows(tmp_path / "resumed") == metric_rows(tmp_path / "straight")
