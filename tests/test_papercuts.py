"""Papercuts of issue 23: broken --plugin files, device checks before work, device spelling, table width, run
folders kept out of git."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from convlens.cli import cli
from convlens.cli.output import echo_table
from convlens.cli.run_folders import default_run_folder
from convlens.core.errors import ConvlensError
from convlens.runtime.device import resolve_device
from convlens.workflow.pipeline import PipelineRun
from helpers import ROOT, readme_section

BROKEN_PLUGIN_FILES = {
    "syntax": ("def broken(:\n", "SyntaxError: invalid syntax"),
    "raises": ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    "missing_module": ("import convlens_no_such_module\n", "No module named 'convlens_no_such_module'"),
    "no_hook": ("VALUE = 1\n", "implements no hook: define one of register_models"),
    "undecorated": ("def register_filters(register):\n    pass\n", "register_filters lacks the @convlens.hookimpl"),
    "misspelled": (
        "import convlens\n@convlens.hookimpl\ndef register_filterz(register):\n    pass\n",
        "unknown hook 'register_filterz'; did you mean 'register_filters'",
    ),
}


@pytest.mark.parametrize("name", BROKEN_PLUGIN_FILES)
def test_a_broken_plugin_file_stops_the_command_with_one_message(tmp_path, name):
    body, error = BROKEN_PLUGIN_FILES[name]
    plugin = tmp_path / f"{name}.py"
    plugin.write_text(body)
    result = CliRunner().invoke(cli, ["--plugin", str(plugin), "list", "filter"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: cannot load --plugin {plugin}: ")
    assert error in result.stderr and result.stderr.count("\n") == 1


def test_a_working_plugin_file_beside_a_broken_one_does_not_hide_the_failure(tmp_path):
    working = tmp_path / "working.py"
    working.write_text(
        "import convlens\n"
        "from convlens.plugins.filters.uniform import UniformFilter\n"
        "@convlens.hookimpl\n"
        "def register_filters(register):\n"
        "    register(convlens.FilterSpec(name='flat', factory=UniformFilter))\n"
    )
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    assert "flat" in CliRunner().invoke(cli, ["--plugin", str(working), "list", "filter"]).stdout
    result = CliRunner().invoke(cli, ["--plugin", str(working), "--plugin", str(broken), "list", "filter"])
    assert result.exit_code == 1
    assert "working.py" not in result.stderr and f"{broken}: RuntimeError: boom at import" in result.stderr


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def demo_recipe(tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text(CliRunner().invoke(cli, ["demo", "--print-recipe"]).stdout)
    return recipe


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "cuda"], "device 'cuda' requested but CUDA is not available here; use --device cpu"),
        (["--device", "cpu", "--dtype", "float16"], "--dtype float16 needs a GPU"),
        (["--device", "gpu"], "unknown device 'gpu': did you mean 'cuda'?"),
    ],
)
def test_demo_and_run_check_the_device_before_any_work(tmp_path, monkeypatch, no_cuda, demo_recipe, options, message):
    monkeypatch.chdir(tmp_path)
    for command in (["demo"], ["run", str(demo_recipe)]):
        for out in ([], ["--out", str(tmp_path / "run")]):
            result = CliRunner().invoke(cli, [*command, *options, *out])
            assert result.exit_code == 1, result.output
            assert result.stderr.startswith(f"Error: {message}")
            assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.toml"]  # no data, no run folder


def test_run_check_plans_without_looking_at_the_device(tmp_path, monkeypatch, no_cuda, demo_recipe):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(demo_recipe), "--device", "cuda", "--check"])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.stdout and not (tmp_path / "runs").exists()


ACCEPTED = "Accepted: auto (cuda when available, else cpu), cpu, cuda, cuda:N (the GPU numbered N), mps"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpu", f"unknown device 'gpu': did you mean 'cuda'? {ACCEPTED}"),
        ("GPU:1", f"unknown device 'GPU:1': did you mean 'cuda:1'? {ACCEPTED}"),
        ("cdua", f"unknown device 'cdua': did you mean 'cuda'? {ACCEPTED}"),
        ("meta", f"unknown device 'meta'. {ACCEPTED}"),
        ("cpu:0", f"invalid device 'cpu:0': only cuda takes a GPU number. {ACCEPTED}"),
        ("cuda:x", "invalid device 'cuda:x': after 'cuda:' comes a GPU number, as in cuda:0 or cuda:1"),
    ],
)
def test_an_unknown_device_says_what_is_accepted(name, message):
    with pytest.raises(ConvlensError) as caught:
        resolve_device(name)
    assert str(caught.value) == message  # not torch's list of 20 device types


def test_accepted_device_spellings(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_device("CPU") == resolve_device(" cpu ") == resolve_device(cpu) == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConvlensError, match=r"'cuda:2' requested but this machine has 2 GPU\(s\): .* cuda:0 to cuda:1"):
        resolve_device("cuda:2")


SUMMARY = "a summary of one hundred and twenty characters, " * 3


def printed_table(capsys):
    echo_table(["NAME", "SUMMARY"], [("first", SUMMARY), ("second", "short")])
    return capsys.readouterr().out.splitlines()


def test_tables_fit_the_terminal_width(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert printed_table(capsys)[1] == f"first   {SUMMARY.strip()}"
    monkeypatch.setenv("COLUMNS", "60")
    header, first, second = printed_table(capsys)
    assert len(first) == 60 and first == f"first   {SUMMARY[:49]}..."
    assert second == "second  short" and header == "NAME    SUMMARY"
    monkeypatch.delenv("COLUMNS")  # and the output is not a terminal: nothing is cut
    assert printed_table(capsys)[1] == f"first   {SUMMARY.strip()}"


def test_the_component_list_uses_the_width_it_is_given():
    wide = CliRunner().invoke(cli, ["list", "filter"], env={"COLUMNS": "200"}).stdout
    summary = "Grad-CAM map of the true (or predicted) class at the layer (paper sec. 7.2.5)"
    assert summary in wide
    narrow = CliRunner().invoke(cli, ["list", "filter", "magnitude"], env={"COLUMNS": "60"}).stdout.splitlines()
    assert len(narrow[1]) == 60 and narrow[1].endswith("...")


def git(folder, *args):
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout


def test_a_runs_folder_convlens_creates_is_ignored_by_git(tmp_path, monkeypatch, demo_recipe):
    git(tmp_path, "init", "-q")
    monkeypatch.chdir(tmp_path)

    def pretend_to_run(pipeline):
        (pipeline.run_dir / "report.html").write_text("done")
        return {"out": str(pipeline.run_dir)}

    monkeypatch.setattr(PipelineRun, "run", pretend_to_run)
    result = CliRunner().invoke(cli, ["run", str(demo_recipe), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"out": "runs/mine"}
    assert (tmp_path / "runs" / "mine" / "report.html").is_file()
    assert (tmp_path / "runs" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert git(tmp_path, "status", "--porcelain", "--untracked-files=all") == "?? mine.toml\n"


def test_a_runs_folder_that_exists_is_left_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert default_run_folder("demo") == Path("runs/demo")
    assert list((tmp_path / "runs").iterdir()) == []


def test_the_repository_ignores_runs():
    assert git(ROOT, "check-ignore", "runs/demo/report/index.html").strip() == "runs/demo/report/index.html"


def test_the_readme_says_how_to_install_without_cuda_libraries():
    install = readme_section("Install")
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in install
