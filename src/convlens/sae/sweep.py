"""Sweeps: several SAE configurations trained in one pass over a store (paper 001 sec. 8.4, Figures 16-17).

Every batch read from the store feeds one optimiser step of every configuration, so the data is read once
whatever the number of configurations. Afterwards each configuration is evaluated on the validation samples
and the sweep writes the sparsity / fidelity Pareto frontier per architecture (Figure 16) and, for groups of
configurations that vary one parameter, the ablation curves (Figure 17), as JSON and PNG.

A configuration is ``{"sae": NAME, "params": {...}, "group": optional, "label": optional}``; configurations
sharing a ``group`` other than ``"frontier"`` form an ablation over the one parameter in which they differ.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convlens.activations.store import ActivationStore
from convlens.core.errors import ConvlensError
from convlens.drawing.plots import LinePanel, save_chart
from convlens.runtime.run_records import versions, write_json_atomic
from convlens.sae.base import save_sae
from convlens.sae.schedule import TrainingSchedule
from convlens.sae.training import (
    POOL_SAMPLES,
    LossWatch,
    SAETrainingParams,
    adam,
    evaluate_batches,
    first_batches,
    input_statistics,
    split_count,
    training_batches,
    training_split_in_memory,
    training_step,
)

FRONTIER = "frontier"


def _label(config: dict[str, Any]) -> str:
    settings = ",".join(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in sorted(config.get("params", {}).items())
    )
    return config.get("label") or f"{config['sae']}[{settings}]"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (L0, error) that no other point beats on both (lower L0 and lower error)."""
    front = [
        i
        for i, (l0, error) in enumerate(points)
        if not any(o_l0 <= l0 and o_error <= error and (o_l0, o_error) != (l0, error) for o_l0, o_error in points)
    ]
    return sorted(front, key=lambda i: points[i][0])


def run_sweep(
    configs: list[dict[str, Any]],
    build: Callable[[dict[str, Any]], tuple[Any, dict[str, Any]]],
    store: ActivationStore,
    out: str | Path,
    params: SAETrainingParams,
    *,
    val_store: ActivationStore | None = None,
    device: torch.device | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train every configuration (``build(config)`` gives the SAE and its record) in one pass; write ``out``."""
    from tqdm.auto import tqdm

    if not configs:
        raise ConvlensError("the sweep has no configurations")
    out = Path(out)
    if (out / "sweep.json").is_file():
        raise ConvlensError(f"{out} already holds a sweep; choose another --out")
    device = device or torch.device("cpu")
    labels = [_label(config) for config in configs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConvlensError(f"the sweep lists the same configuration twice: {', '.join(duplicates)}")
    built = [build(config) for config in configs]
    # a configuration listed in several groups (e.g. a frontier point that is also an ablation's baseline) has
    # the same resolved parameters each time: it is trained once and reported under every label
    first_of: dict[str, int] = {}
    trains = [
        first_of.setdefault(json.dumps(record, sort_keys=True), number) for number, (_, record) in enumerate(built)
    ]
    unique = sorted(set(trains))
    mean, scale = input_statistics(store) if params.normalize_input else (None, None)
    optimizers = {}
    for number in unique:
        sae = built[number][0]
        sae.to(device)
        if sae.input_dim != store.dim:
            raise ConvlensError(
                f"the SAE takes {sae.input_dim}-dimensional inputs, but {store.path} holds "
                f"{store.dim}-channel activations"
            )
        if mean is not None:
            sae.set_normalisation(mean.to(device), scale)
        if params.unit_norm_decoder:
            sae.normalize_decoder_()
        optimizers[number] = adam(sae.parameter_groups(), params.lr)
    train_samples = split_count(store, "train")
    steps_per_epoch = math.ceil(train_samples / params.batch_size)
    total_steps = params.steps or params.epochs * steps_per_epoch
    pool = torch.cat(first_batches(store, "train", POOL_SAMPLES, device))
    schedules = {}
    for number, optimizer in optimizers.items():
        sae = built[number][0]
        TrainingSchedule.check(sae, params, built[number][1]["name"])
        with torch.no_grad():
            sae.initialise_from_data(sae.normalise(pool), params.target_l0)
        schedules[number] = TrainingSchedule(sae, optimizer, params, total_steps, device)
    resident = training_split_in_memory(store, device, params.store_in_memory, train_samples)
    watches = {number: LossWatch(device) for number in unique}
    started = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        desc=f"sweep of {len(unique)} SAEs",
        unit="step",
        leave=False,
        disable=None if progress is None else not progress,
    )
    step, epoch, failed = 0, 0, {}
    while step < total_steps:
        with contextlib.closing(training_batches(store, params, epoch, device, resident)) as batches:
            for batch in batches:
                if step >= total_steps:
                    break
                x = batch.to(device).float()
                step += 1
                for number, optimizer in optimizers.items():
                    if number not in failed:
                        schedule = schedules[number]
                        schedule.before_step(step - 1)
                        sae = built[number][0]
                        loss_sum, sums = training_step(sae, optimizer, x, len(x), 1, params.unit_norm_decoder)
                        schedule.after_step(step - 1, sums["l0"], len(x))
                        if schedule.resample_due(step):
                            schedule.resample(step, pool, params.seed)
                        watches[number].observe(step, loss_sum)
                if step % params.log_every == 0 or step == total_steps:
                    failed.update(_failures(watches, failed))  # read every log_every steps, not at every step
                bar.update(1)
        epoch += 1
    bar.close()
    validation = val_store or store
    val_batches = first_batches(validation, "val", params.val_samples, device)
    metrics: dict[int, dict[str, Any]] = {}
    for number in unique:
        sae, record = built[number]
        metrics[number] = {} if number in failed else evaluate_batches(sae, val_batches, params.val_samples, device)
        if number not in failed:
            save_sae(
                sae,
                out / "configs" / f"{number:03d}" / "sae.safetensors",
                name=record["name"],
                params=record["params"],
                extra={
                    "model": store.manifest.get("model"),
                    "layer": store.manifest.get("layer"),
                    "store": {"path": str(store.path), "samples": len(store)},
                    "training": params.to_dict(),
                    "steps": step,
                    "metrics": metrics[number],
                },
            )
    results = []
    for config, label, (_, record), trained in zip(configs, labels, built, trains):
        results.append(
            {
                "label": label,
                "sae": record["name"],
                "params": config.get("params", {}),
                "group": config.get("group", FRONTIER),
                "checkpoint": str(out / "configs" / f"{trained:03d}" / "sae.safetensors"),
                "failed": failed.get(trained),
                **{key: metrics[trained].get(key) for key in ("mse", "fve", "l0", "dead_fraction", "compression")},
            }
        )
    frontier = _frontiers(results)
    ablations = _ablations(results)
    sweep = {
        "store": str(store.path),
        "validation": str(validation.path),
        "training": params.to_dict(),
        "trained": len(unique),
        "steps": step,
        "epochs": round(step / steps_per_epoch, 3),
        "configs": results,
        "frontier": frontier,
        "ablations": ablations,
        "seconds": round(time.perf_counter() - started, 3),
        "versions": versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", sweep)
    _plot_frontier(out, results, frontier)
    if ablations:
        _plot_ablations(out, ablations)
    return sweep


def _failures(watches: dict[int, LossWatch], failed: dict[int, str]) -> dict[int, str]:
    """The configurations whose loss has become NaN or inf since the last look, and at which step."""
    found = {}
    for number, watch in watches.items():
        bad = None if number in failed else watch.first_bad_step()
        if bad is not None:
            found[number] = f"loss became {bad[1]:g} at step {bad[0]}"
    return found


def _frontiers(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per architecture, the labels on its Pareto frontier of L0 against 1 - FVE (Figure 16), among the
    configurations of the frontier group (ablations change more than the sparsity setting)."""
    fronts = {}
    candidates = [r for r in results if r["group"] == FRONTIER and r["l0"] is not None and r["fve"] is not None]
    for sae in dict.fromkeys(r["sae"] for r in candidates):
        rows = [r for r in candidates if r["sae"] == sae]
        fronts[sae] = [rows[i]["label"] for i in pareto_front([(r["l0"], 1 - r["fve"]) for r in rows])]
    return fronts


def _ablations(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ablation group, the parameter its configurations vary and the metrics along it (Figure 17)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        if row["group"] != FRONTIER:
            groups.setdefault(row["group"], []).append(row)
    ablations = {}
    for group, rows in groups.items():
        keys = sorted({key for row in rows for key in row["params"]})
        varied = [key for key in keys if len({repr(row["params"].get(key)) for row in rows}) > 1]
        if len(varied) != 1:
            raise ConvlensError(
                f"ablation group '{group}' must vary exactly one parameter; it varies {', '.join(varied) or 'none'}"
            )
        key = varied[0]
        rows = sorted(rows, key=lambda row: row["params"][key])
        ablations[group] = {
            "parameter": key,
            "values": [row["params"][key] for row in rows],
            "fve": [row["fve"] for row in rows],
            "l0": [row["l0"] for row in rows],
            "labels": [row["label"] for row in rows],
        }
    return ablations


def _plot_frontier(out: Path, results: list[dict[str, Any]], frontier: dict[str, list[str]]) -> None:
    series = {}
    for sae, labels in frontier.items():
        rows = sorted((r for r in results if r["label"] in labels), key=lambda r: r["l0"])
        if rows:
            series[sae.split(":")[-1]] = ([r["l0"] for r in rows], [1 - r["fve"] for r in rows])
    if series:
        chart = LinePanel(
            series=series,
            title="sparsity against reconstruction (Pareto frontier per architecture)",
            xlabel="L0 (active latents per sample)",
            ylabel="1 - variance explained",
            log_x=None,
            legend=True,
            key="pareto",
        )
        save_chart(chart, out / "pareto.png")


def _plot_ablations(out: Path, ablations: dict[str, dict[str, Any]]) -> None:
    panels = []
    for group, ablation in ablations.items():
        values = [float(v) for v in ablation["values"]]
        whole = all(value.is_integer() for value in values)
        for name, key, ylabel in (("variance explained", "fve", "fraction"), ("L0", "l0", "active latents")):
            measured = [v if v is not None else math.nan for v in ablation[key]]
            panels.append(
                LinePanel(
                    series={name: (values, measured)},
                    title=f"{group}: {name}",
                    xlabel=ablation["parameter"],
                    ylabel=ylabel,
                    integer_x=whole,
                    log_x=None,
                )
            )
    save_chart(panels, out / "ablations.png")
