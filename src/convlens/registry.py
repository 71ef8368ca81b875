"""Programmatic access to the process-wide registry: ``convlens.registry.create("filter", "magnitude")``.

The functions delegate to :func:`convlens.core.component_registry.default_registry`; plugins load on first call.
"""

from __future__ import annotations

import builtins
from typing import Any

from convlens.core.component_registry import KINDS, Component, Registry, default_registry, set_default_registry

__all__ = ["KINDS", "Component", "Registry", "list", "get", "create", "describe", "plugins", "reload"]


def list(kind: str | None = None, pattern: str | None = None) -> builtins.list[Component]:  # noqa: A001
    """Registered components of ``kind`` (all kinds when None) matching ``pattern`` (substring or glob)."""
    return default_registry().list(kind, pattern)


def get(kind: str, name: str) -> Component:
    """One component by name, alias or ``dist:name``; raises with suggestions when unknown or ambiguous."""
    return default_registry().get(kind, name)


def create(kind: str, name: str, **params: Any) -> Any:
    """Build a component with validated parameters."""
    return default_registry().create(kind, name, **params)


def describe(kind: str, name: str) -> dict[str, Any]:
    """JSON-ready description of a component: summary, source, parameters."""
    return default_registry().describe(kind, name)


def plugins() -> builtins.list[Any]:
    """One :class:`~convlens.core.loader.PluginInfo` per distribution: version, status, error, counts."""
    return default_registry().plugins()


def reload(local_plugins: tuple[str, ...] = ()) -> Registry:
    """Forget loaded plugins and start a fresh registry (after installing a plugin in this process)."""
    import importlib

    importlib.invalidate_caches()
    registry = Registry(local_plugins)
    set_default_registry(registry)
    return registry
