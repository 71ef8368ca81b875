import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import convlens
from convlens.cli import cli


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    return invoke


def test_version_and_help(run):
    assert run("--version").output.strip() == f"convlens, version {convlens.__version__}"
    for args in ([], ["list"], ["info"], ["plugins"], ["install"], ["uninstall"], ["apply-filter"]):
        result = run(*args, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_list_filters_with_distribution(run):
    result = run("list", "filter")
    assert result.exit_code == 0
    rows = [line.split()[:3] for line in result.output.splitlines()[1:]]
    names = ("active-count", "eigencam", "gradcam", "hirescam", "layercam", "magnitude", "max", "median", "uniform")
    names = (*names, "xgradcam")
    # the Grad-CAM++ example package, installed by the README's install command, adds its own filter
    assert [row for row in rows if row[2] == "convlens"] == [["filter", n, "convlens"] for n in names]
    assert [row for row in rows if row[2] != "convlens"] == [["filter", "gradcam++", "convlens-gradcam-pp"]]
    data = json.loads(run("list", "--json").output)
    assert {d["name"] for d in data if d["kind"] == "filter" and d["dist"] == "convlens"} == set(names)
    assert {d["name"] for d in data if d["kind"] == "model"} == {
        "torchvision",
        "resnet18-smooth",
        "efficientnet-lite0",
        "timm",
        "tiny-cnn",
        "python",
    }


def test_info_shows_parameters(run):
    result = run("info", "filter", "active-count")
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if line.startswith("epsilon"))
    assert row.split()[:4] == ["epsilon", "float", "0.1", ">="]
    assert "threshold" in row or "active where" in row
    assert json.loads(run("info", "filter", "neurons", "--json").output)["name"] == "active-count"


def test_misspelled_names_exit_nonzero_with_a_suggestion(run):
    result = run("info", "filter", "magnitud")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: unknown filter 'magnitud'; did you mean 'magnitude'? (run 'convlens list filter' to see all)"
    )
    result = run("list", "filtre")
    assert result.exit_code == 1 and "did you mean 'filter'" in result.output


@pytest.fixture
def activations_file(tmp_path):
    a = torch.randn(4, 16, 5, 5, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "acts.safetensors"
    save_file({"layer4": a}, str(path))
    return path, a


def test_apply_filter_writes_the_filter_output(run, activations_file, tmp_path):
    path, a = activations_file
    out = tmp_path / "w.safetensors"
    result = run(
        "apply-filter", "active-count", str(path), "--out", str(out), "--epsilon", "0.5", "--device", "cpu", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["shape"] == [4, 5, 5] and summary["filter"] == "convlens:active-count"
    np.testing.assert_array_equal(load_file(str(out))["weights"].numpy(), (a.abs() > 0.5).sum(1).float().numpy())


def test_apply_filter_plugin_options_in_help(run):
    result = run("apply-filter", "median", "--help")
    assert "--even [lower|mean]" in result.output and "default: lower" in result.output
    assert "--epsilon" in run("apply-filter", "active-count", "--help").output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epsilon", "-1"], "Error: filter 'active-count': parameter 'epsilon' must be >= 0.0 (got -1.0)"),
        (["--epsilon", "lots"], "Error: filter 'active-count': parameter 'epsilon' must be a number (got 'lots')"),
        (["--key", "nope"], "has no tensor 'nope'; it holds: layer4"),
    ],
)
def test_bad_parameters_give_one_message_and_no_output(run, activations_file, tmp_path, extra, message):
    path, _ = activations_file
    out = tmp_path / "w.safetensors"
    result = run("apply-filter", "active-count", str(path), "--out", str(out), *extra)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_unknown_option_and_bad_files(run, activations_file, tmp_path):
    path, _ = activations_file
    result = run("apply-filter", "magnitude", str(path), "--out", str(tmp_path / "w"), "--epsilon", "1")
    assert result.exit_code == 2 and "No such option" in result.output and "--epsilon" in result.output
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    result = run("apply-filter", "max", str(garbage), "--out", str(tmp_path / "w"))
    assert result.exit_code == 1 and "cannot read" in result.output
    nan = tmp_path / "nan.safetensors"
    save_file({"a": torch.full((1, 2, 2, 2), float("nan"))}, str(nan))
    result = run("apply-filter", "max", str(nan), "--out", str(tmp_path / "w"))
    assert result.exit_code == 1 and "contain NaN or infinite values" in result.output


def test_existing_output_survives_a_failed_run(run, activations_file, tmp_path):
    path, _ = activations_file
    out = tmp_path / "w.safetensors"
    assert run("apply-filter", "magnitude", str(path), "--out", str(out)).exit_code == 0
    before = out.read_bytes()
    assert run("apply-filter", "active-count", str(path), "--out", str(out), "--epsilon", "-2").exit_code == 1
    assert out.read_bytes() == before


def test_local_plugin_option_and_plugin_commands(run, tmp_path):
    path = tmp_path / "extra_plugin.py"
    path.write_text(
        "import click, convlens\n"
        "from convlens.plugins.filters.uniform import UniformFilter\n"
        "@convlens.hookimpl\n"
        "def register_filters(register):\n"
        "    register(convlens.FilterSpec(name='flat', factory=UniformFilter, summary='flat weights'))\n"
        "@convlens.hookimpl\n"
        "def register_commands(cli):\n"
        "    @cli.command()\n"
        "    def hello():\n"
        "        '''Say hello.'''\n"
        "        click.echo('hello from a plugin')\n"
    )
    result = run("--plugin", str(path), "list", "filter", "flat")
    assert result.output.splitlines()[1].split()[:3] == ["filter", "flat", "extra_plugin"]
    assert run("--plugin", str(path), "hello").output == "hello from a plugin\n"
    assert "hello" in run("--plugin", str(path), "--help").output
    result = run("--plugin", str(path), "plugins", "--json")
    assert "extra_plugin" in [row["dist"] for row in json.loads(result.output)]


def test_unexpected_errors_are_one_line_unless_debug(run, tmp_path):
    path = tmp_path / "crash.py"
    path.write_text(
        "import convlens\n"
        "@convlens.hookimpl\n"
        "def register_commands(cli):\n"
        "    @cli.command()\n"
        "    def crash():\n"
        "        raise ZeroDivisionError('oops')\n"
    )
    result = run("--plugin", str(path), "crash")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: convlens crash: unexpected ZeroDivisionError: oops (rerun with --debug for the traceback)"
    )
    with pytest.raises(ZeroDivisionError):
        run("--plugin", str(path), "--debug", "crash")


def test_listing_and_help_do_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from convlens.cli import cli\n"
        "for args in (['list'], ['list', 'filter'], ['info', 'filter', 'active-count'], ['plugins', '--all'],\n"
        "             ['--help'], ['apply-filter', 'median', '--help']):\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "import convlens\n"
        "convlens.registry.describe('filter', 'median')\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
