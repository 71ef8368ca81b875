import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

import convlens
from convlens import (
    AmbiguousComponentError,
    ConvlensError,
    FilterSpec,
    ParameterError,
    PluginLoadError,
    UnknownComponentError,
    hookimpl,
)
from convlens.core import loader as plugin_loading
from convlens.core.component_registry import Registry
from helpers import tomllib

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_FILTERS = [
    "active-count",
    "eigencam",
    "gradcam",
    "hirescam",
    "layercam",
    "magnitude",
    "max",
    "median",
    "uniform",
    "xgradcam",
]


def filter_plugin(*names, fail_after=None):
    """A plugin object registering filters ``names``; raises after ``fail_after`` registrations."""

    class Plugin:
        @hookimpl
        def register_filters(self, register):
            for index, name in enumerate(names):
                if fail_after is not None and index == fail_after:
                    raise RuntimeError("boom while registering")
                register(FilterSpec(name=name, factory="convlens.plugins.filters.magnitude:MagnitudeFilter"))

    return Plugin()


def test_builtins_are_found_through_entry_points(monkeypatch):
    monkeypatch.setenv("CONVLENS_LOAD_PLUGINS", "")  # built-ins only, whatever else is installed
    registry = Registry()
    assert [c.name for c in registry.list("filter")] == BUILTIN_FILTERS
    assert {c.dist for c in registry.list()} == {"convlens"}
    assert [c.name for c in registry.list("sae")] == ["batchtopk", "jumprelu", "matryoshka", "relu-l1", "topk"]
    info = {i.dist: i for i in registry.plugins()}["convlens"]
    assert info.status == "ok" and info.counts["filter"] == len(BUILTIN_FILTERS) and info.builtin


def test_fallback_module_list_matches_pyproject_entry_points():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["convlens"]
    assert sorted(declared.values()) == sorted(plugin_loading.BUILTIN_MODULES)
    for module in plugin_loading.BUILTIN_MODULES:
        module = importlib.import_module(module)
        assert any(hasattr(module, f"register_{kind}s") for kind in ("model", "filter", "sae", "visualizer", "metric"))


def test_fallback_loads_builtins_without_metadata(monkeypatch):
    monkeypatch.setattr(plugin_loading.importlib.metadata, "entry_points", lambda group: [])
    assert [c.name for c in Registry().list("filter")] == BUILTIN_FILTERS


def test_get_by_alias_case_and_qualified_name():
    registry = Registry()
    assert registry.get("filter", "neurons").name == "active-count"
    assert registry.get("Filters", "ACTIVE_COUNT").name == "active-count"
    assert registry.get("filter", "convlens:median").qualified_name == "convlens:median"


def test_unknown_names_suggest_the_closest():
    registry = Registry()
    with pytest.raises(UnknownComponentError, match="unknown filter 'magnitud'; did you mean 'magnitude'"):
        registry.get("filter", "magnitud")
    with pytest.raises(UnknownComponentError, match="unknown kind 'filtr'; did you mean 'filter'"):
        registry.list("filtr")
    with pytest.raises(UnknownComponentError, match="in distribution 'other'"):
        registry.get("filter", "other:magnitude")


def test_create_validates_parameters():
    registry = Registry()
    assert registry.create("filter", "active-count", epsilon="0.5").params.epsilon == 0.5
    with pytest.raises(
        ParameterError, match="filter 'active-count' has no parameter 'epsillon'; did you mean 'epsilon'"
    ):
        registry.create("filter", "active-count", epsillon=0.5)
    with pytest.raises(ParameterError, match="must be >= 0.0"):
        registry.create("filter", "active-count", epsilon=-1)
    with pytest.raises(ParameterError, match=r"filter 'magnitude' has no parameter 'p' \(valid parameters: none\)"):
        registry.create("filter", "magnitude", p=1)


def test_describe_is_json_ready():
    d = Registry().describe("filter", "active-count")
    assert d["dist"] == "convlens" and d["aliases"] == ["neurons"]
    assert d["params"] == [
        {
            "name": "epsilon",
            "type": "float",
            "default": 0.1,
            "min": 0.0,
            "max": None,
            "choices": None,
            "help": d["params"][0]["help"],
        }
    ]
    assert "epsilon" in d["params"][0]["help"]


def test_list_pattern_substring_and_glob():
    registry = Registry()
    assert [c.name for c in registry.list("filter", "ma")] == ["magnitude", "max"]
    assert [c.name for c in registry.list(None, "m*n")] == ["median"]
    assert [c.name for c in registry.list("filter", "neuron")] == ["active-count"]


def test_same_name_from_two_distributions_is_ambiguous(convlens_registry):
    convlens_registry.add_plugin(filter_plugin("dup"), dist="pkg-one")
    convlens_registry.add_plugin(filter_plugin("dup"), dist="pkg-two")
    with pytest.raises(AmbiguousComponentError) as info:
        convlens_registry.get("filter", "dup")
    assert "'pkg-one:dup'" in str(info.value) and "'pkg-two:dup'" in str(info.value)
    assert convlens_registry.get("filter", "pkg-two:dup").dist == "pkg-two"
    assert convlens_registry.get("filter", "pkg_Two:dup").dist == "pkg-two"
    convlens.registry.create("filter", "pkg-one:dup")


def test_a_failing_plugin_is_marked_error_and_keeps_nothing(convlens_registry):
    convlens_registry.add_plugin(filter_plugin("half-a", "half-b", fail_after=1), dist="broken-pkg")
    info = {i.dist: i for i in convlens_registry.plugins()}["broken-pkg"]
    assert info.status == "error" and "RuntimeError: boom while registering" in info.error
    assert [c.name for c in convlens_registry.list("filter") if c.dist in ("convlens", "broken-pkg")] == BUILTIN_FILTERS


def test_a_plugin_with_a_misspelled_hook_is_an_error(convlens_registry):
    class Misspelled:
        @hookimpl
        def register_filter(self, register):
            pass

    convlens_registry.add_plugin(Misspelled(), dist="typo-pkg")
    info = {i.dist: i for i in convlens_registry.plugins()}["typo-pkg"]
    assert info.status == "error" and "register_filter" in info.error


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("CONVLENS_STRICT_PLUGINS", "1")
    registry = Registry()
    with pytest.raises(PluginLoadError, match="boom while registering"):
        registry.add_plugin(filter_plugin("x", fail_after=0), dist="broken-pkg")


def test_duplicate_within_one_distribution_is_an_error(convlens_registry):
    convlens_registry.add_plugin(filter_plugin("twice", "Twice"), dist="dup-pkg")
    info = {i.dist: i for i in convlens_registry.plugins()}["dup-pkg"]
    assert info.status == "error" and "registered twice" in info.error


def test_local_plugin_file(tmp_path):
    path = tmp_path / "my_filters.py"
    path.write_text(
        "import convlens\n"
        "from convlens.plugins.filters.magnitude import MagnitudeFilter\n"
        "@convlens.hookimpl\n"
        "def register_filters(register):\n"
        "    register(convlens.FilterSpec(name='local-energy', factory=MagnitudeFilter))\n"
    )
    registry = Registry((str(path),))
    component = registry.get("filter", "local-energy")
    assert component.dist == "my_filters" and component.version == "local"
    missing = Registry((str(tmp_path / "missing.py"),))
    info = {i.dist: i for i in missing.plugins()}["missing"]
    assert info.status == "error" and "plugin file not found" in info.error


def test_load_and_disable_environment(monkeypatch, tmp_path):
    path = tmp_path / "extra.py"
    path.write_text("")
    monkeypatch.setenv("CONVLENS_DISABLE_PLUGINS", "convlens")
    monkeypatch.setenv("CONVLENS_LOAD_PLUGINS", "")
    registry = Registry()
    assert registry.list() == []
    assert {i.status for i in registry.plugins()} == {"disabled"}
    assert "convlens" in {i.dist for i in registry.plugins()}
    monkeypatch.delenv("CONVLENS_DISABLE_PLUGINS")
    monkeypatch.setenv("CONVLENS_LOAD_PLUGINS", "")
    assert len(Registry().list("filter")) == len(BUILTIN_FILTERS)  # built-ins are always allowed


def test_invalid_specs_are_rejected():
    with pytest.raises(ConvlensError, match="invalid filter name"):
        FilterSpec(name="a:b", factory=lambda p: None)
    with pytest.raises(ConvlensError, match="module:attr"):
        FilterSpec(name="ok", factory="no_colon")
    with pytest.raises(ConvlensError, match="frozen dataclass deriving from convlens.Params"):
        FilterSpec(name="ok", factory=lambda p: None, params=int)


def test_unloadable_lazy_factory_names_component(convlens_registry):
    class Plugin:
        @hookimpl
        def register_filters(self, register):
            register(FilterSpec(name="ghost", factory="no_such_module_xyz:Thing"))

    convlens_registry.add_plugin(Plugin(), dist="ghost-pkg")
    with pytest.raises(
        ConvlensError, match="filter 'ghost-pkg:ghost': cannot load its factory 'no_such_module_xyz:Thing'"
    ):
        convlens_registry.create("filter", "ghost")


def test_register_plugin_fixture_is_scoped_to_one_test(register_plugin):
    registry = register_plugin(filter_plugin("scoped"))
    assert convlens.registry.get("filter", "scoped").dist == "test-plugin"
    assert registry is convlens.core.component_registry.default_registry()


def test_previous_test_plugin_is_gone():
    with pytest.raises(UnknownComponentError):
        convlens.registry.get("filter", "scoped")


@dataclass(frozen=True)
class _NotParams:
    x: int = 1


@dataclass(frozen=True)
class _NoDefault(convlens.Params):
    x: int


def test_params_must_be_parameter_dataclasses_with_defaults():
    with pytest.raises(ConvlensError, match="deriving from convlens.Params"):
        FilterSpec(name="p", factory=lambda p: None, params=_NotParams)
    with pytest.raises(ConvlensError, match="parameters without a default: x"):
        FilterSpec(name="p", factory=lambda p: None, params=_NoDefault)
