"""Trust boundaries: data folders never run code; only named code and plugins do, and plugin loading is visible."""

import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import convlens
from convlens.activations.store import store_from_tensors
from convlens.cli import cli
from convlens.core.errors import ConvlensError
from convlens.data.shapes import write_shapes
from convlens.models.checkpoints import save_weights
from convlens.models.loading import load_model
from convlens.workflow.recipes import load_recipe


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


MODEL_SOURCE = """\
from pathlib import Path

from torch import nn

Path({marker!r}).write_text("ran")


def build():
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)]
    return nn.Sequential(*layers)
"""


def python_run_folder(tmp_path):
    """A train-model run folder whose recorded model is the `python` plugin with a file inside the folder."""
    run, marker = tmp_path / "run", tmp_path / "model-code-ran"
    run.mkdir()
    (run / "model.py").write_text(MODEL_SOURCE.format(marker=str(marker)))
    save_file(small_net().state_dict(), str(run / "model.safetensors"))
    params = {"target": f"{run / 'model.py'}:build", "input_size": 32}
    (run / "config.json").write_text(json.dumps({"model": {"name": "convlens:python", "params": params}}))
    return run, marker


@pytest.fixture
def shapes(tmp_path):
    write_shapes(tmp_path / "shapes", n=4, size=32, seed=0)
    return tmp_path / "shapes"


def test_extract_refuses_a_run_folder_whose_model_is_python_code(tmp_path, shapes):
    run, marker = python_run_folder(tmp_path)
    store = tmp_path / "store"
    args = ["extract", "--model", str(run), "--data", str(shapes), "--out", str(store), "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    assert str(run) in result.output and "model.py" in result.output
    assert "--model python --model-target" in result.output and "--model-checkpoint" in result.output
    assert not marker.exists() and not store.exists()
    named = ["--model", "python", "--model-target", f"{run / 'model.py'}:build", "--model-input-size", "32"]
    named += ["--model-checkpoint", str(run / "model.safetensors")]
    result = CliRunner().invoke(cli, [*args[:1], *named, *args[3:]])
    assert result.exit_code == 0, result.output
    assert marker.exists() and store.is_dir()


def test_load_model_refuses_a_python_run_folder_unless_the_call_trusts_it(tmp_path):
    run, marker = python_run_folder(tmp_path)
    with pytest.raises(ConvlensError, match="runs Python code.*trust_code=True"):
        load_model(run)
    assert not marker.exists()
    bundle, record = load_model(run, trust_code=True)
    assert marker.exists() and record["name"] == "convlens:python"
    marker.unlink()
    explicit = {"target": f"{run / 'model.py'}:build", "checkpoint": str(run / "model.safetensors"), "input_size": 32}
    again, _ = load_model("python", explicit)
    assert marker.exists()
    assert torch.equal(again.module[0].weight, bundle.module[0].weight)


def test_a_recipe_naming_a_python_run_folder_is_refused(tmp_path):
    run, marker = python_run_folder(tmp_path)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        textwrap.dedent(
            """\
            [data]
            shapes = { n = 4, size = 32 }

            [model]
            name = "run"

            [extract]
            filters = ["magnitude"]
            """
        )
    )
    with pytest.raises(ConvlensError, match="runs Python code"):
        load_recipe(recipe)
    assert not marker.exists()


class WritesMarker:
    """A pickle payload: unpickling it creates the file at ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_code(folder, marker):
    """Python files and pickles in ``folder`` that create ``marker`` if anything imports or unpickles them."""
    source = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    for name in ("__init__.py", "model.py", "sae.py", "store.py", "plugin.py", "conftest.py"):
        (folder / name).write_text(source)
    payload = pickle.dumps({"weight": WritesMarker(marker)})
    for name in ("model.pt", "sae.pt", "payload.pkl", "checkpoint.pth"):
        (folder / name).write_bytes(payload)


def invoke(*args):
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result


def test_stores_sae_files_and_run_folders_are_only_read(tmp_path, shapes):
    marker = tmp_path / "planted-code-ran"
    store = store_from_tensors(tmp_path / "store", torch.randn(64, 8)).path
    plant_code(store, marker)
    sae = tmp_path / "sae"
    invoke("train-sae", "--store", store, "--sae", "topk", "--k", "2", "--expansion", "2", "--steps", "3",
           "--batch-size", "16", "--out", sae, "--device", "cpu")  # fmt: skip
    plant_code(sae, marker)
    invoke("sae-info", sae / "sae.safetensors")

    run = tmp_path / "tiny-run"
    run.mkdir()
    params = {"input_size": 32, "width": 4}
    save_weights(convlens.registry.create("model", "tiny-cnn", **params).module, run / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"model": {"name": "convlens:tiny-cnn", "params": params}}))
    plant_code(run, marker)
    plant_code(shapes, marker)
    invoke("extract", "--model", run, "--data", shapes, "--out", tmp_path / "extracted", "--device", "cpu")

    pipeline_run = tmp_path / "pipeline-run"
    pipeline_run.mkdir()
    (pipeline_run / "pipeline.json").write_text(json.dumps({"title": "planted", "steps": {}}))
    plant_code(pipeline_run, marker)
    invoke("report", pipeline_run)
    assert not marker.exists()


def test_importing_the_cli_loads_no_plugin():
    code = "import convlens.cli, convlens.core.component_registry as r; print(not (r._default and r._default._loaded))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def plugin_file(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_slow_plugin_is_reported_with_its_load_time(tmp_path, monkeypatch):
    slow = plugin_file(
        tmp_path,
        "sleepy",
        "import time, convlens\ntime.sleep(0.3)\n@convlens.hookimpl\ndef register_filters(register):\n    pass\n",
    )
    monkeypatch.setenv("CONVLENS_PLUGIN_BUDGET", "0.2")
    result = CliRunner().invoke(cli, ["--plugin", str(slow), "plugins", "--json"])
    assert result.exit_code == 0, result.output
    (info,) = [row for row in json.loads(result.stdout) if row["dist"] == "sleepy"]
    assert info["status"] == "slow" and info["load_seconds"] >= 0.3
    table = CliRunner().invoke(cli, ["--plugin", str(slow), "plugins"])
    assert table.exit_code == 0, table.output
    assert "sleepy" in table.output and "slow" in table.output and "CONVLENS_PLUGIN_BUDGET" in table.output
    monkeypatch.setenv("CONVLENS_PLUGIN_BUDGET", "5")
    result = CliRunner().invoke(cli, ["--plugin", str(slow), "plugins", "--json"])
    assert [row["status"] for row in json.loads(result.stdout) if row["dist"] == "sleepy"] == ["ok"]


def test_a_bad_plugin_budget_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLENS_PLUGIN_BUDGET", "soon")
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "CONVLENS_PLUGIN_BUDGET" in result.output and "soon" in result.output


def test_a_missing_plugin_file_stops_with_one_message(tmp_path):
    missing = tmp_path / "nowhere.py"
    result = CliRunner().invoke(cli, ["--plugin", str(missing), "list", "filter"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "nowhere.py" in result.stderr and "does not exist" in result.stderr


def test_a_plugin_file_that_raises_stops_the_command_also_under_strict(tmp_path, monkeypatch):
    broken = plugin_file(tmp_path, "broken", "raise RuntimeError('boom at import')\n")
    result = CliRunner().invoke(cli, ["--plugin", str(broken), "list", "filter"])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "broken.py" in result.stderr and "RuntimeError: boom at import" in result.stderr
    assert result.stderr.count("\n") == 1
    monkeypatch.setenv("CONVLENS_STRICT_PLUGINS", "1")
    strict = CliRunner().invoke(cli, ["--plugin", str(broken), "list", "filter"])
    assert strict.exit_code == 1 and "Traceback" not in strict.output
    assert "broken.py" in strict.stderr and "RuntimeError: boom at import" in strict.stderr
