"""Shared test helpers: README plugin extraction and plugin packages built in temporary folders."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib  # noqa: F401  (tests import it from here)
else:  # Python 3.10: the same parser from PyPI (a dependency there)
    import tomli as tomllib  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def readme_plugin_files() -> dict[str, str]:
    """The files the README's 'Writing a plugin' section shows, by their ``<!-- file: ... -->`` marker."""
    section = readme_section("Writing a plugin")
    pattern = re.compile(r"<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```", re.S)
    return {m["path"]: m["body"] for m in pattern.finditer(section)}


def write_package(root: Path, dist: str, module: str, body: str) -> Path:
    """A minimal installable package ``dist`` whose module ``module`` holds ``body``."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "1.2.3"

            [project.entry-points.convlens]
            {dist} = "{module}"
            """
        )
    )
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    return root


def child_environment(path: Path) -> Path:
    """A virtual environment layered on the test interpreter's packages; installs land in it alone.

    Returns its python. Its site-packages processes the parent's site-packages (so convlens, torch, pip and
    the parent's .pth files are visible), while pip installs and uninstalls inside the child.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    child_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    parent_site = sysconfig.get_paths()["purelib"]
    Path(child_site, "_convlens_parent.pth").write_text(f"import site; site.addsitedir({parent_site!r})\n")
    return python


def require_installed(dist: str, folder: Path) -> None:
    """Fail (not skip) with the install instruction when the example package ``dist`` is not installed: the
    README's install command installs it."""
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise AssertionError(
            f"{dist} is not installed; run the README install command (pip install -e {folder})"
        ) from None


def rescaled(maps):
    """Each map of ``[N, H, W]`` (torch) scaled to [0, 1] once more, as pytorch-grad-cam scales each layer's map and
    then their aggregate."""
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    return maps / (maps.amax(dim=(1, 2), keepdim=True) + 1e-7)


def assert_clean(module) -> None:
    """No hook left behind, every parameter still trainable, and no weight gradient computed."""
    from convlens.models.layers import count_hooks

    assert count_hooks(module) == 0
    assert all(p.requires_grad for p in module.parameters())
    assert all(p.grad is None for p in module.parameters())


def train_tiny_cnn(root: Path, model: str, *, images: int, size: int, epochs: int) -> Path:
    """``root/shapes`` with ``images`` generated images of ``size`` px and a tiny-cnn (width 8, 4 blocks) trained on
    them for ``epochs`` through ``convlens train-model`` into ``root/model``; returns ``root``."""
    from click.testing import CliRunner

    from convlens.cli import cli
    from convlens.data.shapes import write_shapes

    write_shapes(root / "shapes", n=images, size=size, seed=0)
    result = CliRunner().invoke(
        cli,
        [
            "train-model",
            "tiny-cnn",
            "--data",
            str(root / "shapes"),
            "--out",
            str(root / model),
            "--input-size",
            str(size),
            "--width",
            "8",
            "--blocks",
            "4",
            "--epochs",
            str(epochs),
            "--batch-size",
            "32",
            "--lr",
            "0.005",
            "--no-augment",
            "--seed",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    return root
