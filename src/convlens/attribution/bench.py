"""``convlens bench attribution``: every installed attribution method scored by every installed metric that applies,
on the same images, with a confidence interval per score, and each method's time against a bare forward pass.

The images are the first ``max_images`` of a folder; each is explained for its label (an image without one: the
model's prediction). Masks come from the folder's ``concepts.json`` (``shapes`` writes one) and enable the
localisation metrics; a model trained on the same images with shuffled labels enables data randomisation
(:func:`train_on_shuffled_labels` trains one from a ``train-model`` run folder). A method or metric that fails gets
its error in the table; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convlens.attribution.base import AttributionVisualizer, ExplainTarget, aligned_mask, target_classes
from convlens.attribution.metrics import mean_interval
from convlens.core.component_registry import Component, default_registry
from convlens.core.contracts import AttributionMetric, MetricCase, ModelBundle
from convlens.core.errors import ConvlensError
from convlens.runtime.seeding import derive_seed

BENCH_FILE = "bench.json"


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What the benchmark runs: ``methods`` and ``metrics`` by registry name (empty: every installed one)."""

    layer: str | None = None
    max_images: int = 32
    batch_size: int = 16
    methods: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    confidence: float = 0.95
    seed: int = 0


@dataclasses.dataclass
class BenchImages:
    images: torch.Tensor
    names: list[str]
    labels: torch.Tensor | None
    masks: torch.Tensor | None
    pictures: list[Any]


def installed(kind: str, names: Sequence[str]) -> list[Component]:
    """The components of ``kind`` called ``names`` (each checked), or every installed one."""
    registry = default_registry()
    return [registry.get(kind, name) for name in names] if names else registry.list(kind)


def attribution_methods(names: Sequence[str]) -> list[tuple[Component, AttributionVisualizer | None, str | None]]:
    """Every installed (or named) visualizer that is an attribution method, created with its defaults, or the
    error that creating it raised. A named visualizer that is not an attribution method is an error."""
    registry = default_registry()
    methods = []
    for component in installed("visualizer", names):
        try:
            created = registry.create("visualizer", component.qualified_name)
        except Exception as error:  # a broken third-party plugin gets its row, the others still run
            methods.append((component, None, f"{type(error).__name__}: {error}"))
            continue
        if isinstance(created, AttributionVisualizer):
            methods.append((component, created, None))
        elif names:
            raise ConvlensError(f"visualizer '{component.name}' is not an attribution method")
    if not methods:
        raise ConvlensError("no attribution method is installed")
    return methods


def attribution_metrics(names: Sequence[str]) -> list[tuple[Component, AttributionMetric]]:
    registry = default_registry()
    return [(c, registry.create("metric", c.qualified_name)) for c in installed("metric", names)]


def read_images(model: ModelBundle, data: str | Path, count: int) -> BenchImages:
    """The first ``count`` readable images of ``data`` as the model's inputs, their labels and, when the folder
    has a ``concepts.json`` covering all of them, their foreground masks."""
    from convlens.data.concepts import load_concepts
    from convlens.data.images import Preprocessing, images_at
    from convlens.data.loading import first_images

    index = images_at(data)
    preprocessing = Preprocessing.of(model)
    batch = first_images(index, preprocessing, count)
    positions = [int(p) for p in batch.positions]
    labels = torch.tensor([index.labels[p] for p in positions]) if index.labels is not None else None
    masks = None
    if (Path(data) / "concepts.json").is_file():
        concepts = load_concepts(data)
        concept_of = concepts.positions_in(index)
        if all(p in concept_of for p in positions):
            masks = torch.stack(
                [torch.from_numpy(aligned_mask(concepts.foreground(concept_of[p]), preprocessing)) for p in positions]
            )
    names = [index.relative(index.paths[p]) for p in positions]
    pictures = [preprocessing.to_pil(image) for image in batch.images]
    return BenchImages(batch.images, names, labels, masks, pictures)


def run_attribution_bench(
    model: ModelBundle,
    data: str | Path,
    settings: BenchSettings,
    *,
    shuffled_model: ModelBundle | None = None,
    model_name: str | None = None,
    device: torch.device | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Explain the images with every method, score the maps with every metric; returns the summary (see the
    module docstring), which :func:`write_bench` writes."""
    device = device or torch.device("cpu")
    started = time.perf_counter()
    layer = settings.layer or model.default_layer
    model.module.to(device).eval()
    if shuffled_model is not None:
        shuffled_model.module.to(device).eval()
    read = read_images(model, data, settings.max_images)
    images = read.images.to(device)
    with torch.no_grad():
        logits = model.module(images)
    target = ExplainTarget(classes=target_classes(logits, read.labels, None))
    forward = forward_seconds(model, images, settings.batch_size)
    methods = attribution_methods(settings.methods)
    metrics = attribution_metrics(settings.metrics)
    rows, method_rows, maps_of = [], [], {}
    for component, method, error in methods:
        if on_step:
            on_step(f"{component.name}: maps")
        row = {"method": component.name, "dist": component.dist, "cost": getattr(method, "cost", ""), "error": error}
        if method is not None:
            try:
                maps, seconds = timed_maps(method, model, images, layer, target, settings.batch_size)
                maps_of[component.name] = maps
                row.update(seconds=seconds, forward_ratio=seconds / forward)
            except Exception as failure:
                row["error"] = f"{type(failure).__name__}: {failure}"
        method_rows.append(row)
        if component.name not in maps_of:
            continue
        case = MetricCase(
            model=model,
            method=method,
            images=images,
            layer=layer,
            target=target,
            maps=maps_of[component.name],
            masks=read.masks,
            shuffled_model=shuffled_model,
            batch_size=max(settings.batch_size, 32),
            seed=settings.seed,
        )
        for metric_component, metric in metrics:
            if on_step:
                on_step(f"{component.name}: {metric_component.name}")
            rows.append(scored(metric_component, metric, case, settings))
    summary = {
        "model": model_name,
        "layer": layer,
        "data": str(data),
        "images": read.names,
        "labelled": read.labels is not None,
        "masks": read.masks is not None,
        "shuffled_model": shuffled_model is not None,
        "forward_seconds": forward,
        "methods": method_rows,
        "metrics": [metric_record(c, m, read.masks is not None, shuffled_model is not None) for c, m in metrics],
        "results": rows,
        "confidence": settings.confidence,
        "seed": settings.seed,
        "device": str(device),
        "seconds": time.perf_counter() - started,
    }
    return summary | {"maps": maps_of, "pictures": read.pictures}


def forward_seconds(model: ModelBundle, images: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    """The fastest of ``repeats`` bare forward passes over ``images`` in batches of ``batch_size``."""
    best = float("inf")
    with torch.no_grad():
        model.module(images[:batch_size])  # warm-up
        for _ in range(repeats):
            synchronise(images.device)
            start = time.perf_counter()
            for first in range(0, len(images), batch_size):
                model.module(images[first : first + batch_size])
            synchronise(images.device)
            best = min(best, time.perf_counter() - start)
    return best


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_maps(
    method: AttributionVisualizer,
    model: ModelBundle,
    images: torch.Tensor,
    layer: str,
    target: ExplainTarget,
    batch_size: int,
) -> tuple[torch.Tensor, float]:
    """The method's maps of ``images`` in batches of ``batch_size`` and the seconds they took."""
    synchronise(images.device)
    start = time.perf_counter()
    parts = []
    for first in range(0, len(images), batch_size):
        rows = slice(first, first + batch_size)
        part_target = dataclasses.replace(target, classes=target.classes[rows])
        parts.append(method.explain(model, images[rows], layer, part_target))
    synchronise(images.device)
    return torch.cat(parts), time.perf_counter() - start


def scored(component: Component, metric: AttributionMetric, case: MetricCase, settings: BenchSettings) -> dict:
    """One table row: the metric's mean over the images with its bootstrap interval, or why it has none."""
    row: dict[str, Any] = {"method": case.method.name, "metric": component.name, "error": None}
    if not metric.applies_to(case):
        return row | {"applies": False}
    start = time.perf_counter()
    try:
        values = metric.score(case).detach().float().cpu()
    except Exception as failure:
        return row | {"applies": True, "error": f"{type(failure).__name__}: {failure}"}
    if values.shape != (len(case.images),):
        return row | {"applies": True, "error": f"returned {tuple(values.shape)} for {len(case.images)} images"}
    seed = derive_seed(settings.seed, component.name, case.method.name)
    interval = mean_interval(values.numpy(), confidence=settings.confidence, seed=seed % (2**32))
    return row | {"applies": True, "seconds": time.perf_counter() - start, **interval, "values": values.tolist()}


def metric_record(component: Component, metric: AttributionMetric, masks: bool, shuffled: bool) -> dict[str, Any]:
    applies = (masks or not metric.needs_masks) and (shuffled or not metric.needs_shuffled_model)
    missing = "object masks (a concepts.json)" if metric.needs_masks and not masks else "a shuffled-label model"
    return {
        "name": component.name,
        "dist": component.dist,
        "summary": component.spec.summary,
        "higher_is_better": metric.higher_is_better,
        "applies": applies,
        "needs": None if applies else missing,
    }


def write_bench(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """``bench.json`` (the summary without tensors), ``bench.png`` / ``.svg`` (one panel per metric: each
    method's mean and interval) and ``maps.png`` (every method's maps of the first images). Returns the JSON."""
    from convlens.runtime.run_records import versions, write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    record = {key: value for key, value in summary.items() if key not in ("maps", "pictures")}
    record["versions"] = versions()
    record["figures"] = {"chart": "bench.png", "maps": "maps.png"}
    draw_chart(record, out / "bench.png")
    draw_maps(summary["maps"], summary["pictures"], out / "maps.png")
    write_json_atomic(out / BENCH_FILE, record)
    return record


def draw_chart(record: dict[str, Any], path: Path) -> None:
    from convlens.drawing.plots import IntervalPanel, save_chart

    panels = []
    for metric in record["metrics"]:
        rows = [r for r in record["results"] if r["metric"] == metric["name"] and r.get("mean") is not None]
        if not rows:
            continue
        better = "higher" if metric["higher_is_better"] else "lower"
        panels.append(
            IntervalPanel(
                labels=[r["method"] for r in rows],
                values=[r["mean"] for r in rows],
                lows=[r["low"] for r in rows],
                highs=[r["high"] for r in rows],
                title=f"{metric['name']} ({better} is better)",
                xlabel=f"mean over images, {100 * record['confidence']:.0f} % interval",
                key=metric["name"],
            )
        )
    if panels:
        save_chart(panels, path, columns=3)


def draw_maps(maps: dict[str, torch.Tensor], pictures: Sequence[Any], path: Path, shown: int = 4) -> None:
    """A grid: one row per method, its maps of the first ``shown`` images over the images."""
    from convlens.data.images import save_png
    from convlens.drawing.charts import enlarge, grid, heat_overlay, titled

    tiles = []
    for name, method_maps in maps.items():
        for column in range(min(shown, len(pictures))):
            values = method_maps[column].float().cpu().numpy()
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
            tiles.append(
                titled(heat_overlay(enlarge(pictures[column], 96), scaled, 0.6), name if column == 0 else "", 10)
            )
    if tiles:
        columns = min(shown, len(pictures))
        save_png(titled(grid(tiles, columns), "each method's maps of the first images (rows: methods)", 12), path)


def train_on_shuffled_labels(
    run: str | Path, out: str | Path, *, seed: int = 0, device: Any = None, progress: bool | None = None
) -> ModelBundle:
    """The data-randomisation model of Adebayo et al. 2018: the architecture of the ``train-model`` run folder
    ``run``, built from the same parameters and trained with the same settings on the same images with their labels
    permuted (seeded), written to ``out``; a finished run in ``out`` is loaded instead of trained again."""
    from convlens.core.params import coerce
    from convlens.models.fine_tuning import TrainingData, TrainingParams, prepare_data, train_model
    from convlens.models.loading import load_model

    run, out = Path(run), Path(out)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return load_model(out)[0]
    config_file = run / "config.json"
    try:
        config = json.loads(config_file.read_text())
        recorded, training, data = config["model"], config["training"], config["data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConvlensError(f"{run} is not a train-model run folder ({config_file}: {exc})") from None
    params = coerce(TrainingParams, training, owner="train-model")
    prepared = prepare_data(data["root"], params, data.get("val_root"))
    labels = np.asarray(prepared.index.labels)
    permutation = np.random.default_rng(derive_seed(seed, "shuffled-labels") % (2**32)).permutation(len(labels))
    shuffled = dataclasses.replace(prepared.index, labels=tuple(int(label) for label in labels[permutation]))
    bundle = default_registry().create("model", recorded["name"], **recorded.get("params", {}))
    train_model(
        bundle,
        TrainingData(shuffled, prepared.train, prepared.val, prepared.val_index),
        out,
        params,
        model=recorded,
        device=device,
        progress=progress,
    )
    return bundle
