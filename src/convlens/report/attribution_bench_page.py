"""The page of ``convlens bench attribution``: every attribution method's score on every metric with its interval,
what each method costs against a bare forward pass, the chart, and each method's maps of the first images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convlens.report.pages import cell, esc, facts, figure, fmt, metric, note, page, table

BENCH_PAGE = "index.html"


def write_attribution_bench_page(record: dict[str, Any], out: Path) -> Path:
    """``out/index.html`` from the record :func:`convlens.attribution.bench.write_bench` writes as bench.json."""
    body = "\n".join(
        [
            facts(_facts(record)),
            "<h2>Scores</h2>",
            note(
                f"Mean over the images with its {100 * record['confidence']:.0f} % bootstrap interval; the best "
                "mean of each metric is marked. A dash: the metric needs what this data does not give (see "
                "Metrics)."
            ),
            scores_table(record),
            figure("bench.png", "each metric's mean and interval per method", vector="bench.svg"),
            "<h2>Cost</h2>",
            note("Seconds for the maps of all images, and that time over a bare forward pass of the same batches."),
            _costs(record),
            "<h2>Maps</h2>",
            figure("maps.png", "each method's maps of the first images (rows: methods)"),
            "<h2>Metrics</h2>",
            _metrics(record),
        ]
    )
    path = out / BENCH_PAGE
    footer = f"convlens {record['versions'].get('convlens', '')}: bench attribution, seed {record['seed']}"
    path.write_text(page("Attribution benchmark", body, nav=[], footer=footer), encoding="utf-8")
    return path


def _facts(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("model", esc(record.get("model") or "?")),
        ("layer", esc(record["layer"])),
        ("data", esc(record["data"])),
        ("images", esc(len(record["images"]))),
        ("explained class", esc("the label" if record["labelled"] else "the prediction")),
        ("object masks", esc("yes" if record["masks"] else "no")),
        ("shuffled-label model", esc("yes" if record["shuffled_model"] else "no")),
        ("device", esc(record["device"])),
        ("wall time", esc(fmt(record["seconds"], "sec"))),
    ]


def scores_table(record: dict[str, Any]) -> str:
    """Methods by metrics, each cell ``mean [low, high]`` (``data-metric`` the metric, ``data-value`` the mean)."""
    metrics = [m for m in record.get("metrics", []) if m.get("applies")]
    results = {(row.get("method"), row.get("metric")): row for row in record.get("results", [])}
    best = {m.get("name"): _best(record, m) for m in metrics}
    rows = []
    for method in record.get("methods", []):
        cells = [f"<td>{esc(method.get('method'))}</td>"]
        for m in metrics:
            row = results.get((method.get("method"), m.get("name")), {})
            cells.append(_score_cell(row, str(m.get("name")), best[m.get("name")] == method.get("method")))
        rows.append(cells)
    arrows = [f"{m.get('name')} {'↑' if m.get('higher_is_better', True) else '↓'}" for m in metrics]
    return table(["method", *arrows], rows, numeric=list(range(1, len(metrics) + 1)), id="attribution-scores")


def _best(record: dict[str, Any], metric_record: dict[str, Any]) -> str | None:
    rows = [
        r
        for r in record.get("results", [])
        if r.get("metric") == metric_record.get("name") and isinstance(r.get("mean"), (int, float))
    ]
    if not rows:
        return None
    sign = 1 if metric_record.get("higher_is_better", True) else -1
    return max(rows, key=lambda row: sign * row["mean"]).get("method")


def _score_cell(row: dict[str, Any], name: str, best: bool) -> str:
    if row.get("error"):
        return f'<td class="error" title="{esc(row["error"])}">error</td>'
    if not all(isinstance(row.get(key), (int, float)) for key in ("mean", "low", "high")):
        return cell("-")
    shown = f"{fmt(row['mean'])} [{fmt(row['low'])}, {fmt(row['high'])}]"
    mark = " best" if best else ""
    return (
        f'<td class="num{mark}" data-metric="{esc(name)}" data-value="{esc(row["mean"])}">'
        f"{'<strong>' if best else ''}{esc(shown)}{'</strong>' if best else ''}</td>"
    )


def _costs(record: dict[str, Any]) -> str:
    rows = [
        [
            f"<td>{esc(row['method'])}</td>",
            f"<td>{esc(row['dist'])}</td>",
            f"<td>{esc(row.get('cost') or '')}</td>",
            metric(row.get("seconds"), "seconds", "sec"),
            metric(row.get("forward_ratio"), "forward-ratio"),
            f"<td>{esc(row.get('error') or '')}</td>",
        ]
        for row in record["methods"]
    ]
    return table(["method", "plugin", "passes", "seconds", "x bare forward", "error"], rows, numeric=[3, 4])


def _metrics(record: dict[str, Any]) -> str:
    rows = [
        [
            f"<td>{esc(m['name'])}</td>",
            f"<td>{esc(m['dist'])}</td>",
            f"<td>{esc('higher' if m['higher_is_better'] else 'lower')}</td>",
            f"<td>{esc(m['summary'])}</td>",
            f"<td>{esc('yes' if m['applies'] else 'no: needs ' + str(m['needs']))}</td>",
        ]
        for m in record["metrics"]
    ]
    return table(["metric", "plugin", "better", "what it measures", "applies"], rows)
