"""SAEs trained on the stores of different activation filters and validated on one common store (paper 001
sec. 7.3-7.4, Figures 10-11).

The paper trains one SAE per filtered dataset with everything else equal and validates every one of them on part of
the magnitude-sampled dataset. Training error alone says little: a store with fewer background patches is harder to
reconstruct (Figure 10, where uniform sampling, the "original dataset", has the lowest error). On the common store
the SAEs of the filtered stores end lower than the one of the uniform store (Figure 11): that is the paper's claim,
which :func:`filtered_beat_baseline` checks on a run's numbers. The curves are drawn raw and after 1-d Gaussian
smoothing, as in Figure 11.

:func:`compare_filter_saes` reads the SAE run folders (:func:`convlens.sae.training.train_sae` with ``val_store``
the common store) and writes ``summary.json`` and ``errors.png`` / ``errors.svg`` beside them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convlens.core.errors import ConvlensError
from convlens.drawing.plots import LinePanel, save_chart
from convlens.runtime.run_records import write_json_atomic

SUMMARY_FILE = "summary.json"
FIGURE_FILE = "errors.png"
TRUNCATE = 4.0  # the smoothing kernel reaches this many sigmas each side (scipy.ndimage.gaussian_filter1d's default)


def gaussian_smooth(values: Sequence[float], sigma: float) -> list[float]:
    """``values`` convolved with a Gaussian of ``sigma`` points, the ends mirrored (scipy.ndimage's "reflect"
    mode); ``sigma`` 0 leaves them as they are."""
    if sigma <= 0 or len(values) < 2:
        return [float(v) for v in values]
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(np.asarray(values, dtype=np.float64), radius, mode="symmetric")
    return np.convolve(padded, kernel, mode="valid").tolist()


def metric_rows(run_folder: Path) -> list[dict[str, Any]]:
    """The metric rows of an SAE run (``metrics.jsonl``)."""
    path = run_folder / "metrics.jsonl"
    if not path.is_file():
        raise ConvlensError(f"{path} is missing: the SAE run in {run_folder} did not finish")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per metric row: the step, the training MSE (on the training batches since the previous row) and the
    validation MSE."""
    return {
        "steps": [row["step"] for row in rows],
        "train_mse": [row["train"]["mse"] for row in rows],
        "val_mse": [(row.get("val") or {}).get("mse", math.nan) for row in rows],
    }


def filtered_beat_baseline(final_val: Mapping[str, float], baseline: str) -> dict[str, Any]:
    """The paper's claim on one run: every SAE trained on a filtered store ends with a lower validation error on
    the common store than the SAE trained on the ``baseline`` (uniform) store. ``final_val`` maps each filter to
    that error; a NaN counts as not lower."""
    reference = final_val[baseline]
    filtered = [label for label in final_val if label != baseline]
    not_lower = [label for label in filtered if not final_val[label] < reference]
    return {"holds": bool(filtered) and not not_lower, "baseline": baseline, "not_lower": not_lower}


def share_below(
    curve: Sequence[float], steps: Sequence[float], reference: Sequence[float], ref_steps: Sequence[float]
) -> float | None:
    """The share of the logged steps both curves have at which ``curve`` lies below ``reference`` (None when they
    share no step)."""
    by_step = dict(zip(ref_steps, reference))
    pairs = [(value, by_step[step]) for step, value in zip(steps, curve) if step in by_step]
    return sum(value < other for value, other in pairs) / len(pairs) if pairs else None


def compare_filter_saes(
    runs: Mapping[str, Path], baseline: str, validated_on: str, sigma: float, out: Path
) -> dict[str, Any]:
    """Read the SAE run of every filter (``runs``: filter label to run folder, each validated on the store of
    ``validated_on``), write ``summary.json`` and the figure into ``out`` and return the summary."""
    if baseline not in runs:
        raise ConvlensError(f"no SAE run of the baseline filter '{baseline}' among {', '.join(runs)}")
    curves = {label: error_curves(metric_rows(folder)) for label, folder in runs.items()}
    smoothed = {label: gaussian_smooth(curve["val_mse"], sigma) for label, curve in curves.items()}
    rows = []
    for label, folder in runs.items():
        below = None
        if label != baseline:
            below = share_below(smoothed[label], curves[label]["steps"], smoothed[baseline], curves[baseline]["steps"])
        rows.append({**_run_record(label, folder, out), "below_baseline": below, "curves": curves[label]})
    if len({row["validation_store"] for row in rows}) > 1:
        raise ConvlensError(f"the SAEs in {out} were validated on different stores; they cannot be compared")
    final_val = {row["filter"]: _number(row["final_val_mse"]) for row in rows}
    summary = {
        "validated_on": validated_on,
        "baseline": baseline,
        "sigma": sigma,
        "filters": rows,
        "claim": filtered_beat_baseline(final_val, baseline),
        "figure": FIGURE_FILE,
    }
    draw_error_curves(curves, smoothed, validated_on, sigma, out / FIGURE_FILE)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def _run_record(label: str, folder: Path, out: Path) -> dict[str, Any]:
    """One SAE run of the comparison: its folder (relative to ``out``), stores, sample counts and final errors."""
    config = json.loads((folder / "config.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    final = summary.get("final") or {}
    return {
        "filter": label,
        "run": folder.relative_to(out).as_posix() if out in folder.parents else str(folder),
        "store": config["store"]["path"],
        "train_samples": summary.get("train_samples"),
        "validation_store": config["validation"]["path"],
        "validation_samples": (final.get("val") or {}).get("samples"),
        "steps": summary.get("steps"),
        "final_train_mse": (final.get("train") or {}).get("mse"),
        "final_val_mse": (final.get("val") or {}).get("mse"),
    }


def draw_error_curves(
    curves: Mapping[str, dict[str, list[float]]],
    smoothed_val: Mapping[str, list[float]],
    validated_on: str,
    sigma: float,
    path: Path,
) -> None:
    """Figures 10 and 11 side by side: per filter the training error on its own store and the validation error on
    the common store against steps, smoothed, with the raw curves faint beneath when smoothing changes them."""

    def panel(key: str, title: str, values: dict[str, tuple[list[float], list[float]]]) -> LinePanel:
        series = {label: (curves[label]["steps"], smooth) for label, (_, smooth) in values.items()}
        faint = {}
        if sigma > 0:
            for label, (raw, _) in values.items():
                series[f"{label} (raw)"] = (curves[label]["steps"], raw)
                faint[f"{label} (raw)"] = label
        xlabel = f"step (Gaussian smoothing, sigma = {sigma:g} logged points)" if sigma > 0 else "step"
        return LinePanel(
            series=series, title=title, xlabel=xlabel, ylabel="MSE per element", integer_x=True, key=key, faint=faint
        )

    train = {label: (c["train_mse"], gaussian_smooth(c["train_mse"], sigma)) for label, c in curves.items()}
    val = {label: (c["val_mse"], smoothed_val[label]) for label, c in curves.items()}
    save_chart(
        [
            panel("train", "training error on each filter's store (Figure 10)", train),
            panel("validation", f"validation error on the {validated_on} store (Figure 11)", val),
        ],
        path,
    )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
