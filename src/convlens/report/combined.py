"""One page over several run folders: what each run found, in a few lines, with a link to its full report."""

from __future__ import annotations

import os
from pathlib import Path

from convlens.report.overview import top5_says_something
from convlens.report.pages import esc, fmt, note, page, table
from convlens.report.reader import read_run
from convlens.report.run_folder import RunFolder

COMBINED_PAGE = "index.html"


def write_combined_index(out: Path, title: str, run_dirs: list[Path]) -> Path:
    """``out/index.html``: per run its model, data and main findings, linking to ``RUN/report/index.html``."""
    sections = [_run_section(read_run(run_dir), out) for run_dir in run_dirs]
    body = "\n".join(sections)
    path = out / COMBINED_PAGE
    path.write_text(page(title, body, nav=[], footer=f"convlens: {len(run_dirs)} runs"), encoding="utf-8")
    return path


def _run_section(run: RunFolder, out: Path) -> str:
    report = run.folder / "report" / "index.html"
    link = os.path.relpath(report, out).replace(os.sep, "/")
    findings = _predictions(run) + _sanity(run) + _precision(run) + _splice(run)
    body = "\n".join(findings) if findings else note("This run has none of the summarised parts.")
    return (
        f"<section>\n<h2>{esc(run.title)}</h2>\n"
        f"<p><code>{esc(run.model_name)}</code> at <code>{esc(run.layer)}</code>; "
        f'<a href="{esc(link)}">the full report</a>.</p>\n{body}\n</section>'
    )


def _predictions(run: RunFolder) -> list[str]:
    predictions = run.predictions
    if predictions is None or not predictions.labelled:
        return []
    top5 = f", top-5 {esc(fmt(predictions.top5_hits, 'int'))}" if top5_says_something(predictions.classes) else ""
    return [
        f"<p>Classification of the {esc(fmt(predictions.labelled, 'int'))} images with a known label: top-1 "
        f"{esc(fmt(predictions.top1_hits, 'int'))}{top5}.</p>"
    ]


def _sanity(run: RunFolder) -> list[str]:
    sanity = run.sanity
    if sanity is None:
        return []
    finals = ", ".join(
        f"{method} {_two_places(values[-1] if values else None)}" for method, values in sanity.spearman.items()
    )
    return [
        f"<p>Sanity check: Spearman with the trained model's maps once every block is randomised: {esc(finals)}.</p>"
    ]


def _precision(run: RunFolder) -> list[str]:
    precision = run.comparison.precision if run.comparison is not None else None
    if precision is None:
        return []
    rows = [
        [
            f"<td>{esc(row.name)}</td>",
            f'<td class="num">{esc(fmt(row.expected, "pct"))}</td>',
            f'<td class="num">{esc(fmt(row.difference, "pct"))}</td>',
            f"<td>{esc(row.verdict)}</td>",
        ]
        for row in precision.filters
    ]
    head = (
        f"<p>Foreground precision of each filter against uniform sampling ({esc(fmt(precision.uniform, 'pct'))}):</p>"
    )
    return [head, table(["filter", "precision", "vs uniform", "verdict"], rows, numeric=[1, 2])]


def _splice(run: RunFolder) -> list[str]:
    rows = [
        [
            f"<td>{esc(sae.label)}</td>",
            f'<td class="num">{esc(fmt(sae.evaluation.top1_model, "pct"))}</td>',
            f'<td class="num">{esc(fmt(sae.evaluation.top1_sae, "pct"))}</td>',
            f'<td class="num">{esc(_two_places(sae.evaluation.kl_sae, 4))}</td>',
        ]
        for sae in run.saes
        if sae.evaluation is not None
    ]
    if not rows:
        return []
    return [
        "<p>SAEs spliced into the model:</p>",
        table(["SAE", "top-1 alone", "top-1 spliced", "KL"], rows, numeric=[1, 2, 3]),
    ]


def _two_places(value: object, places: int = 2) -> str:
    return f"{value:.{places}f}" if isinstance(value, (int, float)) else "n/a"
