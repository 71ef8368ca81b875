"""``convlens bench``: the installed methods measured on data whose answer is known."""

from __future__ import annotations

from typing import Any

import click

from .output import echo_json, echo_table
from .plugin_options import ModelOptionsCommand, load_model
from .run_folders import default_run_folder

GRID_NAMES = ("default", "quick")  # the keys of convlens.sae.bench.GRIDS (not imported here: it loads torch)


@click.group("bench")
def bench() -> None:
    """Benchmarks of the installed plugins on data whose answer is known (planted dictionaries, object masks)."""


@bench.command("sae")
@click.option(
    "--grid",
    "grid_name",
    type=click.Choice(GRID_NAMES),
    default="default",
    show_default=True,
    help="Grid points: 'default' (7 planted dictionaries, 32-256 inputs; about an hour on a 2-core CPU) or "
    "'quick' (one small point, for tests).",
)
@click.option(
    "--sae",
    "sae_names",
    multiple=True,
    help="An SAE plugin to benchmark (repeatable; default: every installed one, third-party included).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the planted data, the SAEs and training.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option(
    "--out", "-o", default=None, type=click.Path(file_okay=False), help="Output folder (default: runs/bench-sae)."
)
@click.option("--keep-runs", is_flag=True, help="Keep each point's store and each SAE's run folder under OUT/work.")
@click.option("--json", "as_json", is_flag=True, help="Output bench.json's content.")
def bench_sae_command(
    grid_name: str,
    sae_names: tuple[str, ...],
    seed: int,
    device: str | None,
    out: str | None,
    keep_runs: bool,
    as_json: bool,
) -> None:
    """Train every installed SAE plugin on planted dictionaries and score how well it recovers them.

    Each grid point plants unit-norm atoms (power-law frequencies, correlated groups, noise); every SAE gets its
    default parameters, twice as many latents as atoms, and k or a target L0 equal to the true L0; training runs
    20,480 steps of 64 at a learning rate of 1e-3 on the default grid. Writes bench.json, bench.png (and .svg) and
    index.html: MMCS, share of atoms recovered at cosine 0.9, dead latents, variance explained and wall time per grid
    point and SAE. A plugin that fails gets its error in the table.
    """
    from pathlib import Path

    from convlens.report.bench_page import write_bench_page
    from convlens.runtime.device import resolve_device
    from convlens.runtime.locks import output_lock
    from convlens.sae.bench import estimate_seconds, grid, installed_saes, run_bench

    points = grid(grid_name)
    saes = installed_saes(sae_names)
    resolved = resolve_device(device)
    folder = Path(out) if out else default_run_folder("bench-sae")
    click.get_current_context().with_resource(output_lock(folder, command="bench sae"))
    steps = sum(point.steps for point in points) * len(saes)
    estimate = (
        f"; about {_duration(estimate_seconds(points, len(saes)))} on a 2-core CPU" if resolved.type == "cpu" else ""
    )
    click.echo(
        f"bench sae: {_count(len(points), 'grid point')} x {_count(len(saes), 'SAE')} "
        f"({', '.join(c.name for c in saes)}), "
        f"{steps} training steps{estimate}",
        err=True,
    )
    with _progress(steps) as bar:
        summary = run_bench(
            points,
            saes,
            folder,
            seed=seed,
            device=resolved,
            keep_runs=keep_runs,
            on_step=bar.update,
            on_start=lambda point, sae: bar.set_postfix_str(f"{point.name} {sae.name}"),
        )
    write_bench_page(summary, folder)
    if as_json:
        echo_json(summary)
        return
    _echo_scores(summary)
    click.echo(_summary_line(summary, folder))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _progress(steps: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="bench sae", unit="step", leave=False, disable=None)


def _echo_scores(summary: dict[str, Any]) -> None:
    def score(value: float | None, percent: bool = False) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f} %" if percent else f"{value:.3f}"

    rows = [
        [
            row["point"],
            row["sae"],
            score(row.get("mmcs")),
            score(row.get("recovered"), percent=True),
            score(row.get("dead"), percent=True),
            score(row.get("fve"), percent=True),
            f"{row['l0']:.2f} / {row['true_l0']:.2f}" if row.get("l0") is not None else "-",
            f"{row['seconds']:.1f}",
            row["error"] or "",
        ]
        for row in summary["results"]
    ]
    echo_table(["grid point", "SAE", "MMCS", "recovered", "dead", "FVE", "L0 / true", "seconds", "error"], rows)


def _summary_line(summary: dict[str, Any], folder: Any) -> str:
    threshold = summary["recovered_at"]
    parts = []
    for sae in summary["saes"]:
        rows = [row for row in summary["results"] if row["qualified_name"] == sae["qualified_name"]]
        reached = sum(1 for row in rows if row["error"] is None and row["mmcs"] >= threshold)
        failed = sum(1 for row in rows if row["error"] is not None)
        parts.append(f"{sae['name']} {reached}/{len(rows)}" + (f" ({failed} failed)" if failed else ""))
    return (
        f"MMCS >= {threshold:g} on grid points: {', '.join(parts)}; {summary['seconds']:.0f} s; wrote {folder}/"
        "bench.json, bench.png, index.html"
    )


@bench.command("attribution", cls=ModelOptionsCommand)
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model plugin name, or a train-model run folder. Its options follow as --model-NAME.",
)
@click.option("--data", required=True, type=click.Path(exists=True), help="An image folder (shapes: with masks).")
@click.option("--layer", default=None, help="Layer the methods explain at (default: the model's default layer).")
@click.option(
    "--max-images", default=32, show_default=True, type=click.IntRange(min=2), help="The first images of --data."
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Images per pass.")
@click.option(
    "--method",
    "methods",
    multiple=True,
    help="An attribution visualizer to score (repeatable; default: every installed one, third-party included).",
)
@click.option(
    "--metric", "metrics", multiple=True, help="A metric to apply (repeatable; default: every installed one)."
)
@click.option(
    "--shuffled-model",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="A train-model run of the same network on shuffled labels, for data randomisation (default: trained "
    "into OUT/shuffled-labels when --model is a train-model run folder).",
)
@click.option(
    "--train-shuffled/--no-train-shuffled",
    default=True,
    show_default=True,
    help="Train the shuffled-label model when --model is a run folder and --shuffled-model is not given.",
)
@click.option(
    "--confidence", default=0.95, show_default=True, type=click.FloatRange(0.5, 0.999), help="Of the intervals."
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the intervals, ROAD's noise and the shuffles."
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="Output folder (default: runs/bench-attribution).",
)
@click.option("--json", "as_json", is_flag=True, help="Output bench.json's content.")
def bench_attribution_command(
    model_name: str,
    data: str,
    layer: str | None,
    max_images: int,
    batch_size: int,
    methods: tuple[str, ...],
    metrics: tuple[str, ...],
    shuffled_model: str | None,
    train_shuffled: bool,
    confidence: float,
    seed: int,
    device: str | None,
    out: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Score every installed attribution method on every installed metric that applies, on the first images of
    DATA: faithfulness (deletion, insertion, ROAD), localisation on object masks (mask energy, relevance rank,
    pointing game), and the randomisation checks (cascading, independent, and data randomisation with a model
    trained on shuffled labels). Writes bench.json, bench.png (and .svg), maps.png and index.html.

    Example: convlens bench attribution --model runs/train-tiny-cnn --data shapes/
    """
    from pathlib import Path

    from convlens.attribution.bench import (
        BenchSettings,
        attribution_methods,
        attribution_metrics,
        run_attribution_bench,
        train_on_shuffled_labels,
        write_bench,
    )
    from convlens.models.layers import resolve_layer
    from convlens.models.loading import load_model as load_run
    from convlens.report.attribution_bench_page import write_attribution_bench_page
    from convlens.runtime.device import resolve_device
    from convlens.runtime.locks import output_lock

    resolved = resolve_device(device)
    bundle, model_record = load_model(model_name, options)
    attribution_methods(methods)  # wrong names and a wrong layer fail here, before any training
    attribution_metrics(metrics)
    if layer:
        resolve_layer(bundle.module, layer, model_record["name"])
    folder = Path(out) if out else default_run_folder("bench-attribution")
    click.get_current_context().with_resource(output_lock(folder, command="bench attribution"))
    twin = None
    if shuffled_model:
        twin = load_run(shuffled_model)[0]
    elif train_shuffled and Path(model_name).is_dir():
        click.echo(
            f"bench attribution: training {model_record['name']} on shuffled labels (data randomisation)", err=True
        )
        twin = train_on_shuffled_labels(model_name, folder / "shuffled-labels", seed=seed, device=resolved)
    settings = BenchSettings(
        layer=layer,
        max_images=max_images,
        batch_size=batch_size,
        methods=methods,
        metrics=metrics,
        confidence=confidence,
        seed=seed,
    )
    with _progress_steps() as bar:
        summary = run_attribution_bench(
            bundle,
            data,
            settings,
            shuffled_model=twin,
            model_name=model_record["name"],
            device=resolved,
            on_step=lambda step: (bar.set_postfix_str(step), bar.update()),
        )
    record = write_bench(summary, folder)
    write_attribution_bench_page(record, folder)
    if as_json:
        echo_json(record)
        return
    _echo_attribution_scores(record)
    failed = [row["method"] for row in record["methods"] if row.get("error")]
    click.echo(
        f"scored {len(record['methods'])} methods on {sum(m['applies'] for m in record['metrics'])} metrics over "
        f"{len(record['images'])} images in {record['seconds']:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + f"; wrote {folder}/bench.json, bench.png, maps.png, index.html"
    )


def _progress_steps() -> Any:
    from tqdm.auto import tqdm

    return tqdm(desc="bench attribution", unit="step", leave=False, disable=None)


def _echo_attribution_scores(record: dict[str, Any]) -> None:
    metrics = [m for m in record["metrics"] if m["applies"]]
    results = {(row["method"], row["metric"]): row for row in record["results"]}

    def shown(row: dict[str, Any]) -> str:
        if row.get("error"):
            return "error"
        return f"{row['mean']:.3f}" if row.get("mean") is not None else "-"

    rows = [
        [method["method"], *(shown(results.get((method["method"], m["name"]), {})) for m in metrics)]
        + [f"{method['forward_ratio']:.1f}" if method.get("forward_ratio") is not None else "-"]
        for method in record["methods"]
    ]
    arrows = [f"{m['name']} {'^' if m['higher_is_better'] else 'v'}" for m in metrics]
    echo_table(["method", *arrows, "x forward"], rows)
