"""``convlens bench``: the installed methods measured on data whose answer is known."""

from __future__ import annotations

from typing import Any

import click

from .output import echo_json, echo_table
from .run_folders import default_run_folder

GRID_NAMES = ("default", "quick")  # the keys of convlens.sae.bench.GRIDS (not imported here: it loads torch)


@click.group("bench")
def bench() -> None:
    """Benchmarks of the installed plugins on planted data."""


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
