"""`convlens install / uninstall` end to end, in a throw-away environment layered on the test one."""

import json
import os
import subprocess

import pytest

from helpers import child_environment, readme_plugin_files, write_package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    python = child_environment(tmp_path_factory.mktemp("env") / "venv")

    def run(*args, env=None, check=True):
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CONVLENS_")}
        environment.update(env or {})
        result = subprocess.run([str(python), *args], capture_output=True, text=True, env=environment)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run


def convlens(child, *args, **kwargs):
    return child("-m", "convlens", *args, **kwargs)


def plugin_rows(child, **kwargs):
    """`plugins --json` rows by distribution, without the import time (it differs run to run)."""
    rows = json.loads(convlens(child, "plugins", "--json", **kwargs).stdout)
    return {row["dist"]: {key: value for key, value in row.items() if key != "load_seconds"} for row in rows}


def test_readme_plugin_installs_lists_creates_and_uninstalls(child, tmp_path):
    files = readme_plugin_files()
    assert set(files) == {"pyproject.toml", "convlens_energy/__init__.py"}
    package = tmp_path / "convlens-energy"
    for relative, body in files.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(body)

    installed = convlens(child, "install", str(package))
    assert "installed plugin convlens-energy 0.1.0: ok (1 filter)" in installed.stdout

    rows = plugin_rows(child)
    assert rows["convlens-energy"]["status"] == "ok"
    assert rows["convlens-energy"]["components"]["filter"] == 1
    table = convlens(child, "plugins").stdout
    assert "convlens-energy" in table and "convlens " not in table  # built-ins only with --all
    listing = convlens(child, "list", "filter").stdout
    assert any(line.split()[:3] == ["filter", "energy", "convlens-energy"] for line in listing.splitlines())
    info = json.loads(convlens(child, "info", "filter", "energy", "--json").stdout)
    assert info["params"][0]["name"] == "power" and info["params"][0]["default"] == 2.0
    created = child(
        "-c",
        (
            "import torch, convlens\n"
            "f = convlens.registry.create('filter', 'energy', power=3)\n"
            "a = torch.tensor([[[[1.0]], [[-2.0]]]])\n"
            "print(f(a).item())\n"
        ),
    )
    assert created.stdout.strip() == "9.0"

    removed = convlens(child, "uninstall", "convlens-energy", "-y")
    assert "removed plugin convlens-energy 0.1.0" in removed.stdout
    assert "convlens-energy" not in plugin_rows(child)
    assert "energy" not in convlens(child, "list", "filter").stdout


def test_broken_and_conflicting_plugins(child, tmp_path):
    already = plugin_rows(child)  # plugins the parent environment has (e.g. the gated SAE example)
    broken = write_package(
        tmp_path / "broken",
        "convlens-broken",
        "convlens_broken",
        "raise ImportError('this plugin is broken on purpose')\n",
    )
    conflict = """
        import convlens
        from convlens.plugins.filters.maximum import MaximumFilter

        @convlens.hookimpl
        def register_filters(register):
            register(convlens.FilterSpec(name="peak", factory=MaximumFilter))
        """
    first = write_package(tmp_path / "one", "convlens-peak-one", "convlens_peak_one", conflict)
    second = write_package(tmp_path / "two", "convlens-peak-two", "convlens_peak_two", conflict)
    installed = convlens(child, "install", str(broken), str(second), "-e", str(first))
    assert "installed plugin convlens-peak-one 1.2.3: ok (1 filter)" in installed.stdout
    assert "installed plugin convlens-broken 1.2.3: error" in installed.stdout

    result = convlens(child, "plugins")
    assert result.returncode == 0
    assert "errors:\n  convlens-broken: convlens_broken: ImportError: this plugin is broken on purpose" in result.stdout
    rows = plugin_rows(child)
    assert rows["convlens-broken"]["status"] == "error"
    with_requirements = convlens(child, "plugins", "--all", "--requirements").stdout
    assert with_requirements.splitlines()[0].split()[-1] == "REQUIREMENTS"
    assert "torch>=" in with_requirements
    listing = convlens(child, "list", "filter").stdout
    for name in ("magnitude", "active-count", "median", "max", "uniform"):
        assert f"filter  {name}" in listing

    strict = {"CONVLENS_STRICT_PLUGINS": "1"}
    for args in (("plugins",), ("list",)):
        failed = convlens(child, *args, env=strict, check=False)
        assert failed.returncode == 1
        assert "this plugin is broken on purpose" in failed.stderr and "Traceback" not in failed.stderr
    assert convlens(child, "--help", env=strict).returncode == 0
    assert convlens(child, "--version", env=strict).stdout.startswith("convlens, version")

    ambiguous = convlens(child, "info", "filter", "peak", check=False)
    assert ambiguous.returncode == 1
    assert "'convlens-peak-one:peak'" in ambiguous.stderr and "'convlens-peak-two:peak'" in ambiguous.stderr
    assert (
        json.loads(convlens(child, "info", "filter", "convlens-peak-two:peak", "--json").stdout)["dist"]
        == "convlens-peak-two"
    )

    allow = convlens(child, "plugins", "--json", env={"CONVLENS_LOAD_PLUGINS": "convlens-peak-one"})
    status = {row["dist"]: row["status"] for row in json.loads(allow.stdout) if row["dist"] not in already}
    assert status == {"convlens-broken": "disabled", "convlens-peak-one": "ok", "convlens-peak-two": "disabled"}

    removed = convlens(
        child, "uninstall", "-y", "convlens-broken", "convlens-peak-one", "convlens-peak-two", env=strict
    )
    assert removed.stdout.count("removed plugin") == 3
    assert plugin_rows(child) == already
