"""The house keeps its plan: a kernel-only core, plugins on the public API, no import circles, and a README plugin
(a filter, an SAE and an attribution visualizer) that works from the public API alone."""

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path

import grimp
import pytest

import convlens
from convlens.core.component_registry import Registry
from convlens.testing import check_component
from helpers import ROOT, readme_plugin_files, readme_section

SOURCE = ROOT / "src" / "convlens"
PUBLIC_MODULES = {"convlens", "convlens.registry", "convlens.testing"}
KERNEL = {"__init__", "hookspecs", "loader", "component_registry", "params", "contracts", "errors", "moved"}
DEPRECATED_SHIMS = {"store": "ActivationStore", "attribution": "AttributionVisualizer", "sae": "SparseAutoencoder"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``; relative imports keep their dots."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def plugin_unit(path: Path) -> str:
    """The method a built-in plugin file belongs to: its module, or its package under plugins/<kind>/."""
    parts = path.relative_to(SOURCE / "plugins").with_suffix("").parts
    depth = 1 if parts[0] == "gradcam" else 2
    return "convlens.plugins." + ".".join(parts[:depth])


def test_core_holds_only_the_kernel_and_names_no_method():
    assert {path.stem for path in (SOURCE / "core").glob("*.py")} == KERNEL | set(DEPRECATED_SHIMS)
    method = re.compile(r"dissection|circuit|gradcam|atlas|topk|feature.?viz", re.I)
    for path in (SOURCE / "core").glob("*.py"):
        text = path.read_text()
        if path.stem == "loader":  # the built-in fallback list, kept equal to the entry points by test_registry
            text = re.sub(r"BUILTIN_MODULES = \(.*?\n\)", "", text, flags=re.S)
        assert not method.search(text), f"core/{path.name} names a method: {method.search(text)[0]}"


def test_plugins_and_examples_import_only_the_public_api():
    files = [
        (path, plugin_unit(path))
        for path in (SOURCE / "plugins").rglob("*.py")
        if path.stem != "__init__" or path.parent != SOURCE / "plugins" and path.parent.parent != SOURCE / "plugins"
    ]
    files += [(path, path.parent.name) for path in (ROOT / "examples" / "plugins").rglob("*.py")]
    wrong = []
    for path, unit in files:
        for line, module in imported_modules(path):
            if not module.startswith("convlens") or module in PUBLIC_MODULES or module.startswith("."):
                continue
            if module.startswith(unit) or module.startswith("convlens.plugins.") and module.endswith(".api"):
                continue
            wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not wrong, "plugins must import the public API only:\n" + "\n".join(wrong)


def test_no_module_imports_a_module_that_imports_it_back():
    graph = grimp.build_graph("convlens")
    circles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            chain = graph.find_shortest_chain(importer=imported, imported=importer)
            if chain and importer != imported:
                circles.append(" -> ".join((importer, *chain)))
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("module, name", DEPRECATED_SHIMS.items())
def test_old_core_paths_warn_and_forward(module, name):
    sys.modules.pop(f"convlens.core.{module}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module(f"convlens.core.{module}")
    assert any(
        issubclass(w.category, DeprecationWarning) and "import from 'convlens'" in str(w.message) for w in caught
    )
    assert getattr(old, name) is getattr(convlens, name)


def test_every_public_name_resolves():
    for name in convlens.__all__:
        assert getattr(convlens, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        convlens.nonexistent  # noqa: B018


def readme_method_files() -> dict[str, str]:
    section = readme_section("Writing an SAE or an attribution visualizer")
    pattern = re.compile(r"<!-- method file: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```", re.S)
    return {m["path"]: m["body"] for m in pattern.finditer(section)}


def test_a_plugin_written_from_the_readme_uses_the_public_api_and_passes_the_contract_checks(tmp_path, monkeypatch):
    files = {**readme_plugin_files(), **readme_method_files()}
    assert {
        "convlens_energy/__init__.py",
        "convlens_methods/__init__.py",
        "convlens_methods/sae.py",
        "convlens_methods/attribution.py",
    } <= set(files)
    for relative, body in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(body)
    for path in tmp_path.rglob("*.py"):
        for _, module in imported_modules(path):
            assert not module.startswith("convlens") or module in PUBLIC_MODULES, f"{path.name} imports {module}"
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry(strict=True)
    for package in ("convlens_energy", "convlens_methods"):
        registry.add_plugin(importlib.import_module(package), dist=package.replace("_", "-"))
    assert check_component("filter", "energy", registry, power=3.0).params.power == 3.0
    sae = check_component("sae", "plain-relu", registry, input_dim=6, expansion=2.0)
    assert sae.latent_dim == 12 and sae.sparsity == {"l1": 1.0}
    assert check_component("visualizer", "grad-x-act", registry).explains_units_on_images


def importable(module: str, name: str) -> bool:
    """``from module import name`` would work: an attribute, or a submodule."""
    if hasattr(importlib.import_module(module), name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return False
    return True


def test_every_convlens_name_the_benchmarks_import_exists():
    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("convlens"):
                missing += [
                    f"{path.name}: {node.module}.{a.name}" for a in node.names if not importable(node.module, a.name)
                ]
    assert not missing, "benchmarks import names that do not exist:\n" + "\n".join(missing)
