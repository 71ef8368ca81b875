"""Component specs and the registry that finds, describes and creates them.

Names are case-insensitive and ``-``/``_`` insensitive; a name may be qualified as ``dist:name``. When two
distributions register the same (kind, name), both are kept and the bare name raises an "ambiguous"
error naming both qualified names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import pluggy

from convlens.core import loader as plugin_loading
from convlens.core.contracts import ActivationFilter, Visualizer
from convlens.core.errors import (
    AmbiguousComponentError,
    ConvlensError,
    PluginLoadError,
    UnknownComponentError,
    did_you_mean,
)
from convlens.core.params import NoParams, Params, coerce, parameter_specs
from convlens.core.params import describe as describe_params

KINDS = ("model", "filter", "sae", "visualizer", "metric")
_HOOK_FOR_KIND = {kind: f"register_{kind}s" for kind in KINDS}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """What a plugin registers: a name, a factory ``factory(params)`` and a parameter dataclass.

    ``runs_code`` marks a component that executes code its parameters name (a model built from a Python file):
    such parameters are taken only from the user, never from a run folder's record.
    """

    name: str
    factory: Callable[[Any], Any] | str
    params: type = NoParams
    summary: str = ""
    aliases: tuple[str, ...] = ()
    runs_code: bool = False
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name in (self.name, *self.aliases):
            if not isinstance(name, str) or not _NAME_PATTERN.match(name):
                raise ConvlensError(
                    f"invalid {self.kind} name {name!r}: use letters, digits and '-', '_', '.', '+' (no ':')"
                )
        if isinstance(self.factory, str):
            if ":" not in self.factory:
                raise ConvlensError(f"{self.kind} '{self.name}': lazy factory must look like 'module:attr'")
        elif not callable(self.factory):
            raise ConvlensError(f"{self.kind} '{self.name}': factory must be callable or 'module:attr'")
        if not (
            isinstance(self.params, type)
            and issubclass(self.params, Params)
            and dataclasses.is_dataclass(self.params)
            and self.params.__dataclass_params__.frozen
        ):
            raise ConvlensError(
                f"{self.kind} '{self.name}': params must be a frozen dataclass deriving from convlens.Params"
            )
        missing = [f.name for f in dataclasses.fields(self.params) if f.default is dataclasses.MISSING and f.init]
        if missing:
            raise ConvlensError(f"{self.kind} '{self.name}': parameters without a default: {', '.join(missing)}")
        parameter_specs(self.params)
        object.__setattr__(self, "aliases", tuple(self.aliases))


@dataclasses.dataclass(frozen=True)
class ModelSpec(ComponentSpec):
    kind: ClassVar[str] = "model"


@dataclasses.dataclass(frozen=True)
class FilterSpec(ComponentSpec):
    kind: ClassVar[str] = "filter"


@dataclasses.dataclass(frozen=True)
class SAESpec(ComponentSpec):
    kind: ClassVar[str] = "sae"


@dataclasses.dataclass(frozen=True)
class VisualizerSpec(ComponentSpec):
    kind: ClassVar[str] = "visualizer"


@dataclasses.dataclass(frozen=True)
class MetricSpec(ComponentSpec):
    kind: ClassVar[str] = "metric"


_SPEC_FOR_KIND = {
    "model": ModelSpec,
    "filter": FilterSpec,
    "sae": SAESpec,
    "visualizer": VisualizerSpec,
    "metric": MetricSpec,
}


@dataclasses.dataclass(frozen=True)
class Component:
    """A registered spec with where it came from."""

    spec: ComponentSpec
    dist: str
    version: str
    module: str

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def qualified_name(self) -> str:
        return f"{self.dist}:{self.spec.name}"

    @property
    def source(self) -> str:
        factory = self.spec.factory
        if isinstance(factory, str):
            return factory
        return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def normalize_kind(kind: str) -> str:
    """``'filters'``, ``'Filter'`` -> ``'filter'``; unknown kinds raise with the valid ones."""
    key = kind.strip().lower()
    if key not in KINDS and key.endswith("s") and key[:-1] in KINDS:
        key = key[:-1]
    if key not in KINDS:
        raise UnknownComponentError(f"unknown kind '{kind}'{did_you_mean(key, KINDS)}; kinds: {', '.join(KINDS)}")
    return key


class Registry:
    """All components of all loaded plugins. Plugins load on first use, never at import."""

    def __init__(self, local_plugins: tuple[str, ...] = (), *, strict: bool | None = None):
        self.local_plugins = tuple(str(p) for p in local_plugins)
        self._strict = strict
        self._loaded = False
        self._components: list[Component] = []
        self._infos: dict[str, plugin_loading.PluginInfo] = {}
        self._plugin_objects: list[tuple[plugin_loading.PluginSource, Any]] = []
        self._manager: pluggy.PluginManager | None = None

    @property
    def strict(self) -> bool:
        return plugin_loading.env_flag(plugin_loading.STRICT_ENV) if self._strict is None else self._strict

    # -- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        if self._loaded:
            return
        budget = plugin_loading.plugin_budget()
        self._manager = manager = plugin_loading.new_plugin_manager()
        sources = plugin_loading.discover_sources(self.local_plugins)
        self._infos, self._plugin_objects = plugin_loading.load_sources(manager, sources)
        for source, plugin in self._plugin_objects:
            self._register_plugin(source, plugin)
        plugin_loading.mark_slow(list(self._infos.values()), budget)
        self._loaded = True
        self._raise_if_strict()

    def _loaded_manager(self) -> pluggy.PluginManager:
        if self._manager is None:
            self.load()
        if self._manager is None:  # load() always creates it
            raise RuntimeError("the plugin manager was not created")
        return self._manager

    def add_plugin(self, plugin: Any, dist: str = "local", version: str = "local") -> None:
        """Register a plugin object (a module or a class/instance with hookimpls) directly."""
        self.load()
        label = getattr(plugin, "__name__", type(plugin).__name__)
        source = plugin_loading.PluginSource(dist, version, label, lambda: plugin, local=True)
        info = self._infos.setdefault(plugin_loading.canonical_dist(dist), plugin_loading.PluginInfo(dist, version))
        info.modules.append(label)
        try:
            plugin_loading.register_checked(self._loaded_manager(), plugin, f"{dist}:{label}:{id(plugin)}")
        except Exception as exc:
            info.status = "error"
            info.errors.append(f"{label}: {plugin_loading._describe(exc)}")
            self._raise_if_strict()
            return
        self._plugin_objects.append((source, plugin))
        self._register_plugin(source, plugin)
        self._raise_if_strict()

    def remove_plugin(self, plugin: Any) -> None:
        """Undo :meth:`add_plugin`: the plugin's components go and its hooks are unregistered."""
        for index, (source, obj) in enumerate(self._plugin_objects):
            if obj is plugin:
                del self._plugin_objects[index]
                self._loaded_manager().unregister(plugin)
                self._components = [c for c in self._components if c.module != source.label or c.dist != source.dist]
                key = plugin_loading.canonical_dist(source.dist)
                info = self._infos.get(key)
                if info is not None:
                    info.modules.remove(source.label)
                    if not info.modules:
                        del self._infos[key]
                    else:
                        self._recount(info)
                return

    def _register_plugin(self, source: plugin_loading.PluginSource, plugin: Any) -> None:
        info = self._infos[plugin_loading.canonical_dist(source.dist)]
        collected: list[Component] = []
        started = time.perf_counter()
        try:
            for kind, hook in _HOOK_FOR_KIND.items():
                plugin_loading.call_hook_per_plugin(
                    self._loaded_manager(), hook, plugin, register=self._collector(kind, source, collected)
                )
        except Exception as exc:  # keep nothing of a plugin that failed half-way
            info.status = "error"
            info.errors.append(f"{source.label}: {plugin_loading._describe(exc)}")
            return
        finally:
            info.load_seconds += time.perf_counter() - started
        self._components.extend(collected)
        self._recount(info)

    def _collector(self, kind: str, source: plugin_loading.PluginSource, collected: list[Component]):
        spec_type = _SPEC_FOR_KIND[kind]

        def register(spec: ComponentSpec) -> None:
            if not isinstance(spec, spec_type):
                raise ConvlensError(
                    f"register_{kind}s must register {spec_type.__name__} records, got {type(spec).__name__}"
                )
            name = _canonical(spec.name)
            for existing in (*self._components, *collected):
                if (
                    existing.kind == kind
                    and _canonical(existing.name) == name
                    and plugin_loading.canonical_dist(existing.dist) == plugin_loading.canonical_dist(source.dist)
                ):
                    raise ConvlensError(f"{kind} '{spec.name}' is registered twice by {source.dist}")
            collected.append(Component(spec, source.dist, source.version, source.label))

        return register

    def _recount(self, info: plugin_loading.PluginInfo) -> None:
        key = plugin_loading.canonical_dist(info.dist)
        counts = {kind: 0 for kind in KINDS}
        for component in self._components:
            if plugin_loading.canonical_dist(component.dist) == key:
                counts[component.kind] += 1
        info.counts = counts

    def _raise_if_strict(self) -> None:
        if not self.strict:
            return
        failures = [f"{info.dist}: {info.error}" for info in self._infos.values() if info.status == "error"]
        if failures:
            raise PluginLoadError(f"plugin loading failed ({plugin_loading.STRICT_ENV}=1): " + "; ".join(failures))

    def register_commands(self, cli: Any) -> None:
        """Let every loaded plugin add its subcommands to ``cli``; a failing plugin is marked error."""
        self.load()
        for source, plugin in self._plugin_objects:
            try:
                plugin_loading.call_hook_per_plugin(self._loaded_manager(), "register_commands", plugin, cli=cli)
            except Exception as exc:
                info = self._infos[plugin_loading.canonical_dist(source.dist)]
                info.status = "error"
                info.errors.append(f"{source.label}: register_commands: {plugin_loading._describe(exc)}")
        self._raise_if_strict()

    # -- queries -----------------------------------------------------------------------------------

    def plugins(self) -> list[plugin_loading.PluginInfo]:
        self.load()
        for info in self._infos.values():
            if not info.counts:
                info.counts = {kind: 0 for kind in KINDS}
        return list(self._infos.values())

    def list(self, kind: str | None = None, pattern: str | None = None) -> list[Component]:
        """Components of ``kind`` (all kinds when None) whose name or alias matches ``pattern``.

        A pattern with ``*``, ``?`` or ``[`` is a glob; otherwise it matches as a substring.
        """
        self.load()
        kinds = (normalize_kind(kind),) if kind else KINDS
        found = [c for c in self._components if c.kind in kinds]
        if pattern:
            lowered = pattern.lower()
            globbing = any(ch in pattern for ch in "*?[")

            def matches(component: Component) -> bool:
                for name in (component.name, component.qualified_name, *component.spec.aliases):
                    name = name.lower()
                    if fnmatch.fnmatchcase(name, lowered) if globbing else lowered in name:
                        return True
                return False

            found = [c for c in found if matches(c)]
        return sorted(found, key=lambda c: (KINDS.index(c.kind), c.name.lower(), c.dist.lower()))

    def get(self, kind: str, name: str) -> Component:
        """The component called ``name`` (or an alias, or ``dist:name``) of ``kind``."""
        self.load()
        kind = normalize_kind(kind)
        of_kind = [c for c in self._components if c.kind == kind]
        dist = None
        bare = name
        if ":" in name:
            dist, bare = name.split(":", 1)
            dist = plugin_loading.canonical_dist(dist)
        key = _canonical(bare)
        candidates = [c for c in of_kind if dist is None or plugin_loading.canonical_dist(c.dist) == dist]
        matches = [c for c in candidates if _canonical(c.name) == key]
        if not matches:
            matches = [c for c in candidates if key in {_canonical(a) for a in c.spec.aliases}]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            options = " and ".join(f"'{c.qualified_name}'" for c in matches)
            raise AmbiguousComponentError(
                f"{kind} name '{name}' is ambiguous: registered by {options}; use one of those qualified names"
            )
        known = [c.name for c in of_kind] + [a for c in of_kind for a in c.spec.aliases]
        if dist is not None:
            known += [c.qualified_name for c in of_kind]
        hint = did_you_mean(name, known)
        where = f" in distribution '{dist}'" if dist else ""
        raise UnknownComponentError(f"unknown {kind} '{name}'{where}{hint} (run 'convlens list {kind}' to see all)")

    def create(self, kind: str, name: str, **params: Any) -> Any:
        """Build a component: parameters validated (unknown keys rejected), then ``factory(params)``."""
        component = self.get(kind, name)
        values = coerce(component.spec.params, params, owner=f"{component.kind} '{component.name}'")
        obj = resolve_factory(component)(values)
        if isinstance(obj, (ActivationFilter, Visualizer)):
            obj.name = component.name
        return obj

    def describe(self, kind: str, name: str) -> dict[str, Any]:
        """JSON-ready description of one component."""
        component = self.get(kind, name)
        spec = component.spec
        return {
            "kind": component.kind,
            "name": spec.name,
            "qualified_name": component.qualified_name,
            "dist": component.dist,
            "version": component.version,
            "summary": spec.summary,
            "aliases": list(spec.aliases),
            "runs_code": spec.runs_code,
            "source": component.source,
            "plugin_module": component.module,
            "params": describe_params(spec.params),
        }


def resolve_factory(component: Component) -> Callable[[Any], Any]:
    factory = component.spec.factory
    if not isinstance(factory, str):
        return factory
    module_name, _, attr_path = factory.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except Exception as exc:
        raise ConvlensError(
            f"{component.kind} '{component.qualified_name}': cannot load its factory '{factory}': "
            f"{plugin_loading._describe(exc)}"
        ) from exc
    return target


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry used by ``convlens.registry`` and the CLI."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def set_default_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (None: a fresh one is made on next use)."""
    global _default
    _default = registry
