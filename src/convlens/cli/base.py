"""The root click group: one-message errors, --debug, --plugin, and lazily loaded plugin commands."""

from __future__ import annotations

import errno
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from convlens.core.component_registry import Registry, default_registry, set_default_registry
from convlens.core.errors import ConvlensError, PluginLoadError
from convlens.core.params import click_parameters, values_from_click

DEBUG_KEY = "convlens.debug"


def _is_debug(ctx: click.Context | None) -> bool:
    while ctx is not None:
        if ctx.meta.get(DEBUG_KEY):
            return True
        ctx = ctx.parent
    return False


def reraise_as_click(ctx: click.Context, exc: Exception) -> None:
    """Show ``exc`` as one 'Error: ...' line (exit 1), or re-raise it under --debug."""
    if _is_debug(ctx):
        raise exc
    if isinstance(exc, ConvlensError):
        raise click.ClickException(str(exc)) from exc
    raise click.ClickException(describe_unexpected(exc, _command_name(ctx))) from exc


def describe_unexpected(exc: Exception, command: str) -> str:
    """One line for an exception convlens did not turn into a message: the command, the file when known."""
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename is not None:
        if exc.errno == errno.ENOSPC:
            return f"{command}: the disk is full: cannot write {filename}; free some space and rerun"
        return f"{command}: cannot access {filename}: {exc.strerror or exc}"
    where = f" while processing {filename}" if filename else ""
    return f"{command}: unexpected {type(exc).__name__}{where}: {exc} (rerun with --debug for the traceback)"


def _command_name(ctx: click.Context) -> str:
    """'convlens NAME' of the subcommand that failed."""
    return f"convlens {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "convlens"


def _show_warning(
    fallback: Callable[..., None], message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
) -> None:
    """convlens's own warnings as one 'warning: ...' line on stderr, printed around any progress bar."""
    if category.__module__.startswith("convlens."):
        from tqdm import tqdm

        tqdm.write(f"warning: {message}", file=sys.stderr)
    else:
        fallback(message, category, *args, **kwargs)


class ConvlensGroup(click.Group):
    """Built-in commands are found without loading plugins; plugin commands load on demand."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._plugin_commands: tuple[Registry, click.Group] | None = None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            reraise_as_click(ctx, exc)

    def _plugin_group(self) -> click.Group:
        registry = default_registry()
        if self._plugin_commands is None or self._plugin_commands[0] is not registry:
            group = click.Group()
            registry.register_commands(group)
            self._plugin_commands = (registry, group)
        return self._plugin_commands[1]

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        try:
            names |= set(self._plugin_group().commands)
        except PluginLoadError:
            pass  # --help stays usable in strict mode; running a command reports the failure
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        return self._plugin_group().commands.get(cmd_name)


class ComponentGroup(click.Group):
    """``convlens <command> NAME [options] [NAME's parameters]``: one subcommand per component of a kind.

    Each subcommand is generated on demand from the component's parameter dataclass, so
    ``convlens <command> NAME --help`` lists that plugin's own options. ``run(component, params, **options)``
    receives the user's raw parameter values (validated by the registry's coercer) and the shared options.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        run: Callable[..., Any],
        shared_params: list[click.Parameter],
        **attrs: Any,
    ):
        super().__init__(name, **attrs)
        self.kind = kind
        self.run = run
        self.shared_params = shared_params

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [component.name for component in default_registry().list(self.kind)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        try:
            component = default_registry().get(self.kind, cmd_name)
        except ConvlensError as exc:
            raise click.UsageError(str(exc), ctx) from exc
        reserved = {opt.lstrip("-") for p in self.shared_params for opt in getattr(p, "opts", [])}
        command = click.Command(
            cmd_name,
            params=list(self.shared_params),
            callback=functools.partial(self._invoke_component, component),
            help=component.spec.summary,
            short_help=component.spec.summary,
        )
        command.params.extend(click_parameters(component.spec.params, reserved=reserved, prefix=self.kind))
        return command

    def _invoke_component(self, component: Any, **kwargs: Any) -> Any:
        params = values_from_click(kwargs)
        return self.run(component, params, **kwargs)


def setup_registry(ctx: click.Context, param: click.Parameter, paths: tuple[str, ...]) -> None:
    set_default_registry(Registry(paths))


def set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.meta[DEBUG_KEY] = value
