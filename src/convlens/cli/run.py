"""``convlens run RECIPE.toml`` and ``convlens demo``: the whole workflow into one run folder, then the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from convlens.runtime.locks import output_lock
from convlens.runtime.precision import COMPUTE_DTYPES

from .output import echo_json

DEMO_RECIPE = "demo.toml"


def _execute(
    recipe_path: Path,
    text: str | None,
    out: Path,
    device: str | None,
    dtype: str | None,
    workers: int,
    check: bool,
    as_json: bool,
) -> None:
    from convlens.workflow.pipeline import PipelineRun, check_run_folder
    from convlens.workflow.recipes import load_recipe

    recipe = load_recipe(recipe_path, text=text)  # every plugin, parameter and layer checked before any work
    check_run_folder(out)
    echo = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    pipeline = PipelineRun(
        recipe, out, device=device, dtype=dtype, workers=workers, progress=False if as_json else None, echo=echo
    )
    if check:
        plan = pipeline.plan()
        if as_json:
            echo_json({"out": str(out), "steps": plan})
            return
        for row in plan:
            click.echo(f"{row['status']:>7}  {row['name']}  -> {', '.join(row['outputs'])}")
        todo = sum(row["status"] != "done" for row in plan)
        click.echo(f"recipe {recipe_path.name} is valid: {len(plan)} steps, {todo} to run, in {out}")
        return
    click.get_current_context().with_resource(output_lock(out, command=f"run {recipe_path.name}"))
    try:
        summary = pipeline.run()
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; finished steps are kept in {out}: run the same command again to continue", err=True)
        raise SystemExit(130) from None
    if as_json:
        echo_json(summary)
        return
    for warning in summary["warnings"]:
        click.echo(f"warning: {warning}")
    report = f"; report: {summary['report']}" if summary["report"] else ""
    click.echo(
        f"ran {summary['ran']} of {summary['steps']} steps ({summary['skipped']} done before) in "
        f"{summary['seconds']:.0f} s into {out}{report}"
    )


def machine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--dtype and --workers, shared by run and demo: how this machine runs the steps."""
    command = click.option(
        "--workers",
        default=0,
        show_default=True,
        type=click.IntRange(min=0),
        help="Image-decoding processes for the steps that read images (up to the number of cores).",
    )(command)
    return click.option(
        "--dtype",
        default=None,
        type=click.Choice(COMPUTE_DTYPES),
        help="Compute precision of the model's passes (autocast; default: the recipe's, else float32).",
    )(command)


@click.command("run")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="Run folder (default: runs/RECIPE-NAME). Re-running into it skips the finished steps.",
)
@click.option(
    "--device", default=None, help="cpu, cuda, cuda:1, ... (default: the recipe's, else cuda when available)."
)
@machine_options
@click.option("--check", is_flag=True, help="Validate the recipe and list the steps with what is done; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (or with --check the plan) as JSON.")
def run_command(
    recipe: str, out: str | None, device: str | None, dtype: str | None, workers: int, check: bool, as_json: bool
) -> None:
    """Run a recipe of the paper's workflow (a TOML file): data, model and fine-tuning, extraction with one or
    several filters and their comparison, SAEs (and a sweep), evaluation, unit statistics, visualisation of the
    top CNN units and SAE latents, and the HTML report.

    Every step records its inputs and is skipped when its outputs exist for the same inputs, so an interrupted
    run continues where it stopped. `convlens demo --print-recipe` prints a complete recipe to start from.
    """
    path = Path(recipe)
    _execute(path, None, Path(out or f"runs/{path.stem}"), device, dtype, workers, check, as_json)


@click.command("demo")
@click.option(
    "--out", "-o", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Run folder."
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@machine_options
@click.option("--print-recipe", is_flag=True, help="Print the demo's recipe (TOML) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo_command(
    out: str, device: str | None, dtype: str | None, workers: int, print_recipe: bool, as_json: bool
) -> None:
    """The whole workflow on the generated `shapes` dataset, no download: generates the images, trains
    `tiny-cnn`, extracts and compares five filters, trains two SAEs and a small sweep, evaluates them,
    visualises the top units and latents, and writes the report (a few minutes on 2 CPU cores)."""
    from importlib.resources import files

    text = files("convlens.recipes").joinpath(DEMO_RECIPE).read_text()
    if print_recipe:
        click.echo(text, nl=False)
        return
    _execute(Path(DEMO_RECIPE), text, Path(out), device, dtype, workers, False, as_json)
