"""Finding and loading plugins: entry points of the group ``convlens`` plus one-off local files.

Loading is tolerant: a plugin that fails to import, to validate against the hook specs or to register is
marked ``error`` with its message, none of its components are kept, and everything else keeps working.
``CONVLENS_STRICT_PLUGINS=1`` turns such failures into an error. ``CONVLENS_LOAD_PLUGINS`` is an
allow-list of distributions (empty: built-ins only); ``CONVLENS_DISABLE_PLUGINS`` lists distributions to
skip. Each plugin's import and registration time is measured; a plugin slower than
``CONVLENS_PLUGIN_BUDGET`` seconds (default 5) is marked ``slow`` (an import cannot be interrupted safely, so it is
reported, not stopped). Built-ins are found through the same entry points; a source checkout without installed metadata
falls back to :data:`BUILTIN_MODULES` (a test keeps that list equal to ``pyproject.toml``). A local file must
implement at least one hook; :func:`local_file_errors` picks out its failures, which the CLI reports and stops on.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

from convlens.core import hookspecs
from convlens.core.errors import ConvlensError, PluginLoadError, did_you_mean


def lazy_attributes(namespace: dict[str, Any], table: dict[str, str]) -> Callable[[str], Any]:
    """A module's ``__getattr__`` (PEP 562) that imports each name of ``table`` (name -> the module defining it) on
    use, so importing the module stays cheap: ``__getattr__ = convlens.lazy_attributes(globals(), {"Model":
    "my_plugin.model"})``. Nothing is cached: a name always is its defining module's (a test may patch it there)."""
    owner = namespace.get("__name__", "module")

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {owner!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__


ENTRY_POINT_GROUP = "convlens"
BUILTIN_DIST = "convlens"
BUILTIN_MODULES = (
    "convlens.plugins.filters.magnitude",
    "convlens.plugins.filters.active_count",
    "convlens.plugins.filters.median",
    "convlens.plugins.filters.maximum",
    "convlens.plugins.filters.uniform",
    "convlens.plugins.gradcam.filter",
    "convlens.plugins.models.torchvision_models",
    "convlens.plugins.models.tiny_cnn",
    "convlens.plugins.models.python_model",
    "convlens.plugins.models.efficientnet_lite",
    "convlens.plugins.models.timm_models",
    "convlens.plugins.saes.relu_l1",
    "convlens.plugins.saes.topk",
    "convlens.plugins.saes.jumprelu",
    "convlens.plugins.saes.batchtopk",
    "convlens.plugins.saes.matryoshka",
    "convlens.plugins.visualizers.feature_viz",
    "convlens.plugins.gradcam.visualizer",
    "convlens.plugins.visualizers.saliency",
    "convlens.plugins.visualizers.edge_detector",
    "convlens.plugins.attribution.hirescam",
    "convlens.plugins.attribution.layercam",
    "convlens.plugins.attribution.xgradcam",
    "convlens.plugins.attribution.eigencam",
    "convlens.plugins.attribution.scorecam",
    "convlens.plugins.attribution.ablationcam",
    "convlens.plugins.attribution.integrated_gradients",
    "convlens.plugins.attribution.input_x_gradient",
    "convlens.plugins.attribution.smoothgrad",
    "convlens.plugins.attribution.guided_backprop",
    "convlens.plugins.attribution.guided_gradcam",
    "convlens.plugins.attribution.occlusion",
    "convlens.plugins.attribution.random_map",
    "convlens.plugins.metrics.faithfulness",
    "convlens.plugins.metrics.localisation",
    "convlens.plugins.metrics.randomisation",
    "convlens.plugins.visualizers.dataset_examples",
    "convlens.plugins.visualizers.activation_maps",
    "convlens.plugins.visualizers.conv_weights",
    "convlens.plugins.visualizers.activation_grid",
    "convlens.plugins.visualizers.activation_atlas",
    "convlens.plugins.visualizers.factorise",
    "convlens.plugins.visualizers.dissection",
    "convlens.plugins.visualizers.circuit",
)

STRICT_ENV = "CONVLENS_STRICT_PLUGINS"
LOAD_ENV = "CONVLENS_LOAD_PLUGINS"
DISABLE_ENV = "CONVLENS_DISABLE_PLUGINS"
BUDGET_ENV = "CONVLENS_PLUGIN_BUDGET"
DEFAULT_BUDGET_SECONDS = 5.0


def canonical_dist(name: str) -> str:
    """Distribution names compare like pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclasses.dataclass
class PluginSource:
    """One loadable plugin object: an entry point, a fallback built-in module or a local file."""

    dist: str
    version: str
    label: str
    load: Callable[[], Any]
    builtin: bool = False
    requirements: tuple[str, ...] = ()
    local: bool = False


@dataclasses.dataclass
class PluginInfo:
    """A row of ``convlens plugins``: one distribution (or local file) and how its loading went."""

    dist: str
    version: str
    status: str = "ok"
    errors: list[str] = dataclasses.field(default_factory=list)
    modules: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    builtin: bool = False
    requirements: tuple[str, ...] = ()
    load_seconds: float = 0.0

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors) if self.errors else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dist": self.dist,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "modules": list(self.modules),
            "components": dict(self.counts),
            "builtin": self.builtin,
            "requirements": list(self.requirements),
            "load_seconds": round(self.load_seconds, 3),
        }


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def plugin_budget() -> float:
    """Seconds a plugin may take to import and register before it is marked ``slow``."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET_SECONDS
    try:
        budget = float(raw)
    except ValueError:
        budget = -1.0
    if not budget > 0:
        raise PluginLoadError(f"{BUDGET_ENV} must be a positive number of seconds, got {raw!r}")
    return budget


def mark_slow(infos: list[PluginInfo], budget: float) -> None:
    """Mark every plugin that loaded but took longer than ``budget`` seconds as ``slow``."""
    for info in infos:
        if info.status == "ok" and info.load_seconds > budget:
            info.status = "slow"


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {canonical_dist(item) for item in raw.split(",") if item.strip()}


def discover_sources(local_paths: tuple[str | os.PathLike, ...] = ()) -> list[PluginSource]:
    """Every plugin that could be loaded, built-ins first, without importing any of them."""
    sources: list[PluginSource] = []
    seen: set[tuple[str, str]] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ep.name
        key = (canonical_dist(dist), ep.value)
        if key in seen:
            continue
        seen.add(key)
        sources.append(
            PluginSource(
                dist=dist,
                version=ep.dist.version if ep.dist is not None else "unknown",
                label=ep.value,
                load=ep.load,
                builtin=canonical_dist(dist) == BUILTIN_DIST,
                requirements=tuple(ep.dist.requires or ()) if ep.dist is not None else (),
            )
        )
    if not any(source.builtin for source in sources):
        from convlens._version import __version__

        for module in BUILTIN_MODULES:
            sources.append(
                PluginSource(
                    BUILTIN_DIST, __version__, module, functools.partial(importlib.import_module, module), True
                )
            )
    sources.sort(key=lambda s: not s.builtin)
    for path in local_paths:
        sources.append(_local_source(Path(path)))
    return sources


def _local_source(path: Path) -> PluginSource:
    def load() -> Any:
        if not path.is_file():
            raise ConvlensError(f"plugin file not found: {path}")
        module_name = f"convlens_local_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConvlensError(f"cannot load plugin file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module

    return PluginSource(dist=path.stem, version="local", label=str(path), load=load, local=True)


def installed_plugin_dists() -> dict[str, str]:
    """``{dist: version}`` of every distribution with a ``convlens`` entry point; imports nothing."""
    found = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None:
            found[ep.dist.name] = ep.dist.version
    return found


def new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def load_sources(
    manager: pluggy.PluginManager, sources: list[PluginSource]
) -> tuple[dict[str, PluginInfo], list[tuple[PluginSource, Any]]]:
    """Import and register each source with ``manager``; returns the infos and the loaded (source, object)."""
    allowed = _env_list(LOAD_ENV)
    disabled = _env_list(DISABLE_ENV) or set()
    infos: dict[str, PluginInfo] = {}
    loaded: list[tuple[PluginSource, Any]] = []
    for source in sources:
        key = canonical_dist(source.dist)
        info = infos.get(key)
        if info is None:
            info = infos[key] = PluginInfo(
                source.dist,
                source.version,
                builtin=source.builtin,
                requirements=source.requirements,
            )
        info.modules.append(source.label)
        if key in disabled or (allowed is not None and not (source.builtin or source.local) and key not in allowed):
            info.status = "disabled"
            continue
        started = time.perf_counter()
        try:
            plugin = source.load()
            register_checked(manager, plugin, f"{source.dist}:{source.label}")
            if source.local:
                require_some_hook(manager, plugin)
        except Exception as exc:  # a broken plugin must not break the others
            info.status = "error"
            info.errors.append(f"{source.label}: {_describe(exc)}")
            continue
        finally:
            info.load_seconds += time.perf_counter() - started
        loaded.append((source, plugin))
    return infos, loaded


def register_checked(manager: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Register ``plugin`` and reject hook implementations that match no spec (a misspelled hook name)."""
    manager.register(plugin, name=name)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        manager.unregister(plugin)
        raise ConvlensError(_unknown_hook_message(exc)) from None


def _unknown_hook_message(exc: pluggy.PluginValidationError) -> str:
    found = re.search(r"unknown hook '([^']+)'", str(exc))
    if found is None:
        return str(exc)
    return f"unknown hook '{found[1]}'{did_you_mean(found[1], hook_names())}"


def hook_names() -> list[str]:
    """The names of the hooks a plugin may implement, e.g. ``register_filters``."""
    return [name for name, value in vars(hookspecs).items() if hasattr(value, f"{hookspecs.PROJECT_NAME}_spec")]


def require_some_hook(manager: pluggy.PluginManager, plugin: Any) -> None:
    """Reject a plugin that implements no hook: it would load, add nothing and say nothing."""
    if manager.get_hookcallers(plugin):
        return
    manager.unregister(plugin)
    undecorated = [name for name in hook_names() if callable(getattr(plugin, name, None))]
    if undecorated:
        raise ConvlensError(f"{', '.join(undecorated)} lacks the @convlens.hookimpl decorator")
    raise ConvlensError(f"implements no hook: define one of {', '.join(hook_names())} with @convlens.hookimpl")


def local_file_errors(infos: list[PluginInfo], paths: tuple[str | os.PathLike, ...]) -> list[str]:
    """The errors of the plugin files ``paths`` (``--plugin``), each starting with the file's path."""
    labels = tuple(f"{Path(path)}: " for path in paths)
    return [error for info in infos for error in info.errors if error.startswith(labels)]


def call_hook_per_plugin(manager: pluggy.PluginManager, hook_name: str, plugin: Any, **kwargs: Any) -> None:
    """Call one plugin's implementation of ``hook_name`` (if any), so its failure stays its own."""
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        if impl.plugin is plugin:
            impl.function(**{name: kwargs[name] for name in impl.argnames})


def _describe(exc: BaseException) -> str:
    """The exception as one line: convlens's own message alone, other exceptions with their type."""
    text = str(exc).strip()
    if isinstance(exc, ConvlensError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
