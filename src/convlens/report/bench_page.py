"""The page of ``convlens bench sae``: the grid points, every SAE's scores on each, and the chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convlens.report.pages import cell, esc, facts, figure, fmt, metric, note, page, table

BENCH_PAGE = "index.html"


def write_bench_page(summary: dict[str, Any], out: Path) -> Path:
    """``out/index.html`` from the summary :func:`convlens.sae.bench.run_bench` returns (and writes as bench.json)."""
    threshold = summary["recovered_at"]
    body = "\n".join(
        [
            facts(_facts(summary)),
            "<h2>Scores</h2>",
            note(
                f"MMCS: mean over the planted atoms of the best cosine with a decoder atom; recovered: share of atoms "
                f"with a decoder atom at cosine {threshold:g} or more; dead: share of latents firing on no validation "
                "sample; FVE: fraction of the validation samples' variance explained."
            ),
            _scores(summary),
            figure(
                "bench.png",
                f"MMCS and atoms recovered per grid point; the line marks {threshold:g}",
                vector="bench.svg",
            ),
            "<h2>Grid points</h2>",
            _points(summary),
        ]
    )
    path = out / BENCH_PAGE
    footer = f"convlens {summary['versions'].get('convlens', '')}: bench sae, seed {summary['seed']}"
    path.write_text(page("SAE benchmark: planted dictionaries", body, nav=[], footer=footer), encoding="utf-8")
    return path


def _facts(summary: dict[str, Any]) -> list[tuple[str, str]]:
    saes = ", ".join(f"{sae['name']} ({sae['dist']})" for sae in summary["saes"])
    control = "yes" if summary["target_l0_supported"] else "no: penalty SAEs train with their default penalty"
    return [
        ("SAEs", esc(saes)),
        ("grid points", esc(len(summary["points"]))),
        ("trainer has target_l0", esc(control)),
        ("device", esc(summary["device"])),
        ("wall time", esc(fmt(summary["seconds"], "sec"))),
    ]


def _scores(summary: dict[str, Any]) -> str:
    numbers = {point["name"]: number for number, point in enumerate(summary["points"], start=1)}
    rows = [_score_row(numbers[row["point"]], row) for row in summary["results"]]
    headers = ["#", "grid point", "SAE", "plugin", "sparsity set by", "MMCS", "recovered", "dead", "FVE", "L0"]
    return table([*headers, "true L0", "seconds", "error"], rows, numeric=[0, 5, 6, 7, 8, 9, 10, 11])


def _score_row(number: int, row: dict[str, Any]) -> list[str]:
    start = [
        cell(number),
        f"<td>{esc(row['point'])}</td>",
        f"<td>{esc(row['sae'])}</td>",
        f"<td>{esc(row['dist'])}</td>",
        f"<td>{esc(row.get('sparsity_control', 'n/a'))}</td>",
    ]
    scores = [
        metric(row.get("mmcs"), "mmcs"),
        metric(row.get("recovered"), "recovered", "pct"),
        metric(row.get("dead"), "dead", "pct"),
        metric(row.get("fve"), "fve", "pct"),
        metric(row.get("l0"), "l0"),
        metric(row["true_l0"], "true-l0"),
        metric(row["seconds"], "seconds", "sec"),
    ]
    return [*start, *scores, f"<td>{esc(row['error'] or '')}</td>"]


def _points(summary: dict[str, Any]) -> str:
    headers = ["#", "name", "inputs", "atoms", "active", "noise", "Zipf exponent", "correlated", "train samples"]
    styles = {"noise": "pct", "correlated_share": "pct"}
    keys = ["input_dim", "atoms", "active", "noise", "frequency_exponent", "correlated_share", "train_samples"]
    rows = [
        [cell(number), f"<td>{esc(point['name'])}</td>", *(cell(point[key], styles.get(key, "num")) for key in keys)]
        + [cell(point["steps"]), cell(point["batch_size"]), cell(point["lr"] if point["lr"] is not None else "default")]
        for number, point in enumerate(summary["points"], start=1)
    ]
    return table([*headers, "steps", "batch", "learning rate"], rows, numeric=[0, *range(2, 12)])
