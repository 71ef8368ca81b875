"""The ``convlens`` command line. Thin: parse, call the core, print."""

from __future__ import annotations

import os
from typing import Any

import click

from convlens._version import __version__
from convlens.core.component_registry import default_registry
from convlens.core.errors import PluginLoadError
from convlens.core.loader import local_file_errors

from .base import ConvlensGroup, set_debug, setup_registry
from .bench import bench
from .circuit import circuit_command
from .compare_filters import compare_filters_command
from .data import data
from .extract import extract
from .filters import apply_filter
from .models import layers
from .plugin_commands import info, install, list_components, plugins, uninstall
from .rank_units import rank_units_command
from .report import report_command
from .run import demo_command, run_command
from .sae import evaluate_sae_command, sae_info, sweep_command, train_sae_command
from .sanity_check import sanity_check_command
from .training import train_model_command
from .visualize import visualize_command


def load_plugin_files(ctx: click.Context, param: click.Parameter, paths: tuple[str, ...]) -> None:
    """Load the ``--plugin`` files now: one asked for by name that fails to load stops the command with one
    message naming the file and the error (installed plugins that fail are only marked ``error``)."""
    setup_registry(ctx, param, paths)
    if not paths or ctx.resilient_parsing:
        return
    try:
        infos = default_registry().plugins()
    except PluginLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    failures = local_file_errors(infos, paths)
    if failures:
        raise click.ClickException("; ".join(f"cannot load --plugin {failure}" for failure in failures))


@click.group(cls=ConvlensGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="convlens")
@click.option(
    "--plugin",
    "plugin_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    callback=load_plugin_files,
    expose_value=False,
    is_eager=True,
    help="Load a one-off local plugin from a Python file (repeatable).",
)
@click.option(
    "--debug",
    is_flag=True,
    callback=set_debug,
    expose_value=False,
    is_eager=True,
    help="Show full tracebacks instead of one-line errors.",
)
def cli() -> None:
    """convlens: mechanistic interpretability for convolutional networks.

    Every model, activation filter, sparse autoencoder and visualizer is a plugin; `convlens list` shows
    them and `convlens info KIND NAME` describes one.
    """


@cli.result_callback()
def _after_command(*_results: Any, **_options: Any) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun (torch is imported only then)
        from convlens.runtime.distributed import leave_process_group

        leave_process_group()


for command in (
    plugins,
    list_components,
    info,
    install,
    uninstall,
    apply_filter,
    layers,
    data,
    train_model_command,
    extract,
    compare_filters_command,
    train_sae_command,
    sae_info,
    evaluate_sae_command,
    sweep_command,
    visualize_command,
    sanity_check_command,
    rank_units_command,
    run_command,
    demo_command,
    report_command,
    circuit_command,
    bench,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="convlens")
