"""Is a result worth reading? Checks over a finished run folder that turn into warnings (the CLI summary,
``pipeline.json`` and the report's first screen) and into flags on the units whose pictures failed.

The checks read only what the steps wrote, after every run, so they also cover steps skipped as done before, and
changing a limit in ``[warnings]`` reruns nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from convlens.workflow.recipes import Recipe, WarningsSection

CHANCE_SAMPLES = 20  # fewer labelled images than this say too little about chance level to warn on


@dataclasses.dataclass
class RunChecks:
    """The warnings of a run, and per group the units whose pictures are flagged (unit -> why)."""

    warnings: list[str] = dataclasses.field(default_factory=list)
    flags: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_json_line(path: Path) -> dict[str, Any] | None:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def near_chance(accuracy: float, classes: int, margin: float, images: int | None = None) -> bool:
    """Top-1 ``accuracy`` on ``images`` does not clearly close ``margin`` of the gap from chance (one of
    ``classes``) to 100 %: it lies below that line plus two standard errors of an accuracy at chance."""
    chance = 1.0 / classes
    noise = 2.0 * math.sqrt(chance * (1.0 - chance) / images) if images else 0.0
    return accuracy < chance + margin * (1.0 - chance) + noise


def _chance_warning(what: str, accuracy: float, classes: int, images: int | None) -> str:
    on = f" on {images} images" if images else ""
    return (
        f"{what} is {100 * accuracy:.1f} %{on}, close to chance ({100 / classes:.1f} % with {classes} classes): "
        "its units and latents may say little about the task"
    )


def _trained_model_accuracy(run_dir: Path) -> tuple[float | None, int, int | None]:
    """Validation top-1, the number of classes and of validation images of the model the run trained."""
    final = _last_json_line(run_dir / "model" / "metrics.jsonl") or {}
    analysis = _json(run_dir / "model" / "error-analysis.json") or {}
    counts = [c.get("images") for c in analysis.get("classes") or [] if isinstance(c, dict)]
    images = sum(counts) if counts and all(isinstance(c, int) for c in counts) else None
    return _number(final.get("val_top1")), len(analysis.get("class_names") or []), images


def chance_warnings(run_dir: Path, layout: dict[str, Any], limits: WarningsSection) -> list[str]:
    """A model near chance level, by its validation accuracy when the run trained it, else by the SAE
    evaluation's or the predictions' accuracy on labelled images."""
    margin = limits.chance_margin
    if layout["model"].get("run"):
        accuracy, classes, images = _trained_model_accuracy(run_dir)
        if accuracy is not None and classes > 1 and near_chance(accuracy, classes, margin, images):
            return [_chance_warning("the model's validation top-1", accuracy, classes, images)]
        return []
    candidates = []
    for sae in layout["saes"]:
        evaluation = _json(run_dir / sae["evaluation"]) if sae.get("evaluation") else None
        if isinstance(evaluation, dict):
            accuracy = _number((evaluation.get("top1") or {}).get("model"))
            candidates.append(
                ("top-1 on the labelled images", accuracy, evaluation.get("classes"), evaluation.get("labelled_images"))
            )
    predictions = _json(run_dir / layout["predictions"]) if layout.get("predictions") else None
    if isinstance(predictions, dict):
        labelled, hits = predictions.get("labelled"), predictions.get("top1_hits")
        accuracy = hits / labelled if isinstance(hits, int) and isinstance(labelled, int) and labelled else None
        candidates.append(("top-1 on the labelled photos", accuracy, predictions.get("classes"), labelled))
    for what, accuracy, classes, images in candidates:
        if (
            accuracy is not None
            and isinstance(classes, int)
            and classes > 1
            and isinstance(images, int)
            and images >= CHANCE_SAMPLES
            and near_chance(accuracy, classes, margin, images)
        ):
            return [_chance_warning(f"the model's {what}", accuracy, classes, images)]
    return []


def sae_warnings(run_dir: Path, layout: dict[str, Any], limits: WarningsSection) -> list[str]:
    """Dead or dense latents past their share, and a spliced SAE that costs too much accuracy."""
    warnings = []
    for sae in layout["saes"]:
        label = sae["label"]
        summary = _json(run_dir / sae["run"] / "summary.json") or {}
        val = (summary.get("final") or {}).get("val") or {}
        dead, dense = _number(val.get("dead_fraction")), _number(val.get("dense_fraction"))
        if dead is not None and dead > limits.dead_latents:
            warnings.append(f"SAE {label}: {100 * dead:.0f} % of the latents never fired on the validation samples")
        if dense is not None and dense > limits.dense_latents:
            warnings.append(
                f"SAE {label}: {100 * dense:.0f} % of the latents are dense (fire on over 10 % of the validation "
                "samples)"
            )
        evaluation = _json(run_dir / sae["evaluation"]) if sae.get("evaluation") else None
        drop = _number((evaluation or {}).get("top1_drop"))
        if drop is not None and drop > limits.splice_loss:
            warnings.append(
                f"SAE {label}: splicing it into the model loses {100 * drop:.1f} points of top-1 accuracy (more than "
                f"{100 * limits.splice_loss:.0f}): the model with the SAE is not the model"
            )
    return warnings


def fallback_warnings(run_dir: Path, layout: dict[str, Any], limits: WarningsSection) -> list[str]:
    """Filters that fell back to uniform sampling on many images (their store is then mostly uniform samples)."""
    warnings = []
    for label, folder in layout["filters"]["stores"].items():
        manifest = _json(run_dir / folder / "manifest.json") or {}
        fallbacks, images = manifest.get("fallbacks"), manifest.get("images_used")
        if isinstance(fallbacks, int) and isinstance(images, int) and images and fallbacks / images > limits.fallbacks:
            warnings.append(
                f"filter {label}: fell back to uniform sampling on {fallbacks} of {images} images "
                f"({100 * fallbacks / images:.0f} %): its store is mostly unfiltered"
            )
    return warnings


def _unit_records(run_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    statistics = _json(run_dir / "statistics" / "statistics.json") or {}
    return {
        group: {entry["unit"]: entry for entry in values.get("units", []) if isinstance(entry, dict)}
        for group, values in (statistics.get("groups") or {}).items()
    }


def render_flags(
    run_dir: Path, visualizations: dict[str, Any], limits: WarningsSection
) -> dict[str, dict[str, list[str]]]:
    """Per group, the units whose optimised picture (a figure with ``activation_start`` / ``activation_final``)
    ended below its start, or below ``feature_viz_share`` of the unit's best image in the data (the largest
    per-image mean activation, when the statistics hold it)."""
    units = _unit_records(run_dir)
    flags: dict[str, dict[str, list[str]]] = {}
    for group, entry in visualizations.items():
        for name, folder in (entry.get("runs") or {}).items():
            record = _json(run_dir / folder / "record.json") or {}
            for figure in record.get("figures") or []:
                start, final = _number(figure.get("activation_start")), _number(figure.get("activation_final"))
                unit = figure.get("unit")
                if start is None or final is None or not isinstance(unit, int) or figure.get("unit_kind"):
                    continue
                best = _number(units.get(group, {}).get(unit, {}).get("max_image_mean"))
                why = _render_failure(final, start, best, limits.feature_viz_share)
                if why:
                    flags.setdefault(group, {}).setdefault(str(unit), []).append(f"{name}: {why}")
    return flags


def _render_failure(final: float, start: float, best: float | None, share: float) -> str | None:
    if final <= start:
        return f"the render ended at {final:.3g}, not above its start {start:.3g}"
    if best is not None and best > 0 and final < share * best:
        return (
            f"the render reached {final:.3g}, {100 * final / best:.0f} % of the unit's best image in the data "
            f"({best:.3g})"
        )
    return None


def check_run(run_dir: Path, recipe: Recipe, state: dict[str, Any]) -> RunChecks:
    """Every check over ``run_dir``, whose ``pipeline.json`` state is ``state``."""
    limits = recipe.warnings
    checks = RunChecks()
    checks.warnings += chance_warnings(run_dir, state, limits)
    checks.warnings += sae_warnings(run_dir, state, limits)
    checks.warnings += fallback_warnings(run_dir, state, limits)
    checks.flags = render_flags(run_dir, state.get("visualizations") or {}, limits)
    for group, units in checks.flags.items():
        what = "CNN channels" if group == "cnn" else f"{group} latents"
        listed = ", ".join(sorted(units, key=int))
        checks.warnings.append(
            f"feature visualisation of {len(units)} {what} did not reach its target ({listed}): their pictures "
            "are flagged in the report"
        )
    return checks
