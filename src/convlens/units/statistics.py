"""Activation statistics and concept selectivity of a layer's channels and of SAE latents, in one pass over images.

Every unit of one layer (group ``cnn``) and every latent of each SAE applied at that layer (one group per SAE
label) gets: how often it fires (share of (image, position) cells and of images with activation > 0), its mean and
largest activation, the mean of its per-image maxima, the largest per-image mean (what a feature visualisation of
the whole channel is compared with), its share of the group's total |activation| (as
``convlens rank-units`` measures a unit's magnitude) and whether it is dead (never > 0 on these images).

With a concept set (``concepts.json``), every categorical attribute (e.g. shape, colour, texture) and each of its
values is scored per unit by the AUROC of the per-image maximum for separating the images showing that value from
the rest. The class labels of an ImageFolder are one more attribute, ``class``, with or without a concept set
(unless the set already has an attribute grouping the images as their classes do); a flat folder without a
concept set has none. A unit is *selective* for a value when that value is the only one, across all attributes,
whose AUROC reaches the threshold. Only running sums and the ``[images, units]`` per-image maxima are kept in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from convlens.core.errors import ConvlensError
from convlens.data.concepts import CLASS_CATEGORY, repeats_the_classes
from convlens.data.images import ImageIndex, Preprocessing, SkipLog
from convlens.data.loading import ImageDataset, decode_on_device, image_batches
from convlens.models.layers import activations_at, full_precision, resolve_layer
from convlens.runtime.precision import autocast, channels_last, check_compute_dtype
from convlens.runtime.rank_statistics import average_ranks
from convlens.runtime.run_records import write_json_atomic
from convlens.runtime.seeding import torch_generator
from convlens.runtime.tensor_files import save_tensors_atomic

if TYPE_CHECKING:
    from convlens.core.contracts import ModelBundle
    from convlens.data.concepts import ConceptSet
    from convlens.sae.base import SparseAutoencoder

CNN_GROUP = "cnn"
CNN_GROUP_KIND = "channel"
RANK_ELEMENTS = 1 << 22  # scores ranked at a time: keeps the rank temporaries of a chunk near 130 MB


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per unit, the AUROC of ``scores [images, units]`` for telling ``positive [images]`` (bool) images from the
    rest: the Mann-Whitney U statistic over ``n1 * n0``, ties counting one half (float64 ``[units]``).

    When every image is positive or every image negative the AUROC is undefined and NaN is returned for every unit.
    """
    if positive.ndim != 1:
        raise ConvlensError(f"auroc takes a 1-D positive mask, got shape {tuple(positive.shape)}")
    return concept_aurocs(scores, positive[None])[0]


def concept_aurocs(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """:func:`auroc` for several positive masks ``[values, images]`` at once: ``[values, units]`` float64; each unit's
    scores are ranked once for all masks."""
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2 or positives.ndim != 2 or positives.shape[1] != scores.shape[0]:
        raise ConvlensError(
            f"auroc needs scores [images, units] and positives [values, images] over the same images; "
            f"got {tuple(scores.shape)} and {tuple(positives.shape)}"
        )
    if not bool(torch.isfinite(scores).all()):
        raise ConvlensError("auroc got NaN or infinite scores")
    images, units = scores.shape
    positives = positives.to(device=scores.device, dtype=torch.float64)
    n1 = positives.sum(dim=1, keepdim=True)
    n0 = images - n1
    result = torch.empty(len(positives), units, dtype=torch.float64, device=scores.device)
    step = max(1, RANK_ELEMENTS // max(images, 1))
    for start in range(0, units, step):
        ranks = average_ranks(scores[:, start : start + step].T)  # [units, images]
        result[:, start : start + step] = positives @ ranks.T
    result = (result - n1 * (n1 + 1) / 2) / (n1 * n0)
    return torch.where((n1 > 0) & (n0 > 0), result, torch.full_like(result, math.nan))


class _Accumulator:
    """Running sums of one group's units and the per-image maxima ``[images, units]`` (float32, on the CPU)."""

    def __init__(self, units: int, images: int, device: torch.device):
        zeros = dict(dtype=torch.float64, device=device)
        self.units = units
        self.fired = torch.zeros(units, **zeros)
        self.total = torch.zeros(units, **zeros)
        self.magnitude = torch.zeros(units, **zeros)
        self.max_sum = torch.zeros(units, **zeros)
        self.images_fired = torch.zeros(units, **zeros)
        self.largest = torch.full((units,), -math.inf, **zeros)
        self.best_image_mean = torch.full((units,), -math.inf, **zeros)
        self.maxima = torch.empty(images, units, dtype=torch.float32)

    def add(self, maps: torch.Tensor, row: int) -> None:
        flat = maps.flatten(2)  # [batch, units, positions]
        peaks = flat.amax(dim=2)
        self.fired += (flat > 0).sum(dim=(0, 2)).double()
        self.total += flat.sum(dim=(0, 2), dtype=torch.float64)
        self.magnitude += flat.abs().sum(dim=(0, 2), dtype=torch.float64)
        self.max_sum += peaks.sum(dim=0, dtype=torch.float64)
        self.images_fired += (peaks > 0).sum(dim=0).double()
        self.largest = torch.maximum(self.largest, peaks.amax(dim=0).double())
        image_means = flat.mean(dim=2, dtype=torch.float64)
        self.best_image_mean = torch.maximum(self.best_image_mean, image_means.amax(dim=0))
        self.maxima[row : row + len(peaks)] = peaks.float().cpu()


def _check_finite(values: torch.Tensor, layer: str, group: str) -> None:
    if not bool(torch.isfinite(values).all()):
        what = f"layer '{layer}'" if group == CNN_GROUP else f"SAE '{group}' at layer '{layer}'"
        raise ConvlensError(f"{what} gives NaN or infinite activations; statistics need finite values")


def _concept_labels(
    concepts: ConceptSet, index: ImageIndex, positions: torch.Tensor
) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """Per categorical attribute: its values and, per processed image, the value's number (-1: the image has no
    record or no string value, so it is left out; ``len(values)``: a value outside the list, one of "the rest")."""
    record_of = concepts.positions_in(index)
    records = [concepts.images[record_of[p]] if p in record_of else None for p in positions.tolist()]
    if not any(record is not None for record in records):
        raise ConvlensError(f"none of the images under {index.root} appear in {concepts.root / 'concepts.json'}")
    vocabulary: dict[str, list[str]] = {}
    labels: dict[str, torch.Tensor] = {}
    for attribute, values in concepts.categories.items():
        if not values or not all(isinstance(value, str) for value in values):
            continue
        number = {value: k for k, value in enumerate(values)}
        codes = []
        for record in records:
            value = record.get(attribute) if record is not None else None
            codes.append(number.get(value, len(values)) if isinstance(value, str) else -1)
        vocabulary[attribute] = list(values)
        labels[attribute] = torch.tensor(codes, dtype=torch.long)
    return vocabulary, labels


def _add_class_category(
    vocabulary: dict[str, list[str]], labels: dict[str, torch.Tensor], index: ImageIndex, positions: torch.Tensor
) -> None:
    """Add an ImageFolder's class labels as the attribute ``class``, unless an attribute already groups the images
    as their classes do (:func:`convlens.data.concepts.repeats_the_classes`)."""
    if index.labels is None or not index.class_names or CLASS_CATEGORY in vocabulary:
        return
    classes = torch.tensor(index.labels, dtype=torch.long)[positions]
    for codes in labels.values():
        if repeats_the_classes([code if code >= 0 else None for code in codes.tolist()], classes.tolist()):
            return
    vocabulary[CLASS_CATEGORY] = list(index.class_names)
    labels[CLASS_CATEGORY] = classes


def _selectivity(
    maxima: torch.Tensor, vocabulary: dict[str, list[str]], labels: dict[str, torch.Tensor]
) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """The (attribute, value) pairs that have images on both sides and their AUROCs ``[pairs, units]``."""
    by_images: dict[bytes, list[str]] = {}  # attributes known on the same images share one ranking of the scores
    for attribute in vocabulary:
        known = labels[attribute] >= 0
        if bool(known.any()):
            by_images.setdefault(known.numpy().tobytes(), []).append(attribute)
    scored: dict[tuple[str, str], torch.Tensor] = {}
    for attributes in by_images.values():
        known = labels[attributes[0]] >= 0
        names = [(attribute, value) for attribute in attributes for value in vocabulary[attribute]]
        positives = torch.cat(
            [
                labels[attribute][known][None, :] == torch.arange(len(vocabulary[attribute]))[:, None]
                for attribute in attributes
            ]
        )
        scored.update(zip(names, concept_aurocs(maxima[known], positives)))
    pairs = [
        (attribute, value)
        for attribute, values in vocabulary.items()
        for value in values
        if (attribute, value) in scored and not bool(torch.isnan(scored[attribute, value]).any())
    ]
    rows = [scored[pair] for pair in pairs]
    if not rows:
        return [], torch.empty(0, maxima.shape[1], dtype=torch.float64)
    return pairs, torch.stack(rows)


def _group_record(
    kind: str,
    acc: _Accumulator,
    images: int,
    cells: int,
    vocabulary: dict[str, list[str]] | None,
    labels: dict[str, torch.Tensor] | None,
    selective_auroc: float,
) -> dict[str, Any]:
    maxima = acc.maxima[:images]
    dead = (acc.fired == 0).cpu()
    magnitude = acc.magnitude.cpu()
    grand_total = float(magnitude.sum())
    share = magnitude / grand_total if grand_total > 0 else torch.zeros_like(magnitude)
    order = torch.sort(-share, stable=True).indices
    rank = torch.empty(acc.units, dtype=torch.long)
    rank[order] = torch.arange(1, acc.units + 1)
    columns = {
        "frequency": (acc.fired / cells).tolist(),
        "image_frequency": (acc.images_fired / images).tolist(),
        "mean": (acc.total / cells).tolist(),
        "max": acc.largest.tolist(),
        "mean_image_max": (acc.max_sum / images).tolist(),
        "max_image_mean": acc.best_image_mean.tolist(),
        "share": share.tolist(),
    }
    best: list[dict[str, Any] | None] = [None] * acc.units
    selective: list[str | None] = [None] * acc.units
    by_attribute = dict.fromkeys(vocabulary or (), 0)
    if vocabulary is not None:
        pairs, aurocs = _selectivity(maxima, vocabulary, labels)
        if pairs:
            top = aurocs.max(dim=0)
            passing = aurocs >= selective_auroc
            single = (passing.sum(dim=0) == 1) & ~dead
            only = passing.double().argmax(dim=0)
            for unit in range(acc.units):
                attribute, value = pairs[int(top.indices[unit])]
                best[unit] = {"attribute": attribute, "value": value, "auroc": float(top.values[unit])}
                if single[unit]:
                    attribute, value = pairs[int(only[unit])]
                    selective[unit] = f"{attribute}={value}"
                    by_attribute[attribute] += 1
    dead_list = dead.tolist()
    rank_list = rank.tolist()
    units = [
        {
            "unit": unit,
            "rank": rank_list[unit],
            **{name: values[unit] for name, values in columns.items()},
            "dead": dead_list[unit],
            "best_concept": best[unit],
            "selective": selective[unit],
        }
        for unit in range(acc.units)
    ]
    summary = {
        "units": acc.units,
        "dead": int(dead.sum()),
        "selective": sum(s is not None for s in selective),
        "selective_by_attribute": by_attribute,
    }
    return {"kind": kind, "count": acc.units, "summary": summary, "units": units}


def unit_statistics(
    model: ModelBundle,
    layer: str,
    index: ImageIndex,
    out_dir: str | Path,
    *,
    saes: Mapping[str, SparseAutoencoder] | None = None,
    concepts: ConceptSet | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device=None,
    progress: bool | None = None,
    selective_auroc: float = 0.9,
    dtype: str = "float32",
    workers: int = 0,
) -> dict[str, Any]:
    """Statistics of ``layer``'s channels and of each SAE's latents over the images of ``index`` (a seeded random
    subset of ``max_images`` of them, in index order); writes ``statistics.json`` and ``maxima.safetensors`` into
    ``out_dir`` and returns the JSON record. ``device``: where the model runs (default: where it is; on a GPU the
    model is left in channels-last memory format); ``dtype``: its compute precision (autocast; the statistics are
    computed from float32 activations either way); ``workers``: image-decoding processes."""
    from tqdm.auto import tqdm

    from convlens.runtime.device import resolve_device

    saes = dict(saes or {})
    if CNN_GROUP in saes or any(not isinstance(label, str) or not label for label in saes):
        raise ConvlensError(f"SAE labels must be non-empty strings other than '{CNN_GROUP}'; got {list(saes)}")
    if batch_size < 1:
        raise ConvlensError(f"batch size must be at least 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ConvlensError(f"max_images must be at least 1, got {max_images}")
    if not 0.5 <= selective_auroc <= 1.0:
        raise ConvlensError(f"selective_auroc must lie between 0.5 and 1, got {selective_auroc}")
    if len(index) == 0:
        raise ConvlensError(f"no images under {index.root}")
    module = model.module
    resolve_layer(module, layer)
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    elif not isinstance(device, torch.device):
        device = resolve_device(device)
    chosen = list(range(len(index)))
    if max_images is not None and max_images < len(index):
        picked = torch.randperm(len(index), generator=torch_generator(seed, "unit-statistics"))[:max_images]
        chosen = sorted(picked.tolist())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    training = {name: part.training for name, part in [(CNN_GROUP, module), *saes.items()]}
    check_compute_dtype(dtype, device)
    channels_last(module.to(device).eval(), device)
    for sae in saes.values():
        sae.to(device).eval()
    dataset = ImageDataset(index, Preprocessing.of(model), jpeg_bytes=decode_on_device("auto", device))
    skip_log = SkipLog(index.root)
    accumulators: dict[str, _Accumulator] = {}
    positions: list[torch.Tensor] = []
    seen, grid = 0, None
    bar = tqdm(
        total=len(chosen),
        desc=f"unit statistics at {layer}",
        unit="img",
        leave=False,
        disable=None if progress is None else not progress,
    )
    try:
        with torch.no_grad():
            for batch in image_batches(
                dataset, batch_size=batch_size, skip_log=skip_log, order=chosen, workers=workers, device=device
            ):
                with autocast(device, dtype):
                    activations = activations_at(module, batch.images.to(device), layer).activations[layer]
                activations = full_precision(activations)
                if activations.ndim == 2:
                    activations = activations[:, :, None, None]
                if activations.ndim != 4:
                    raise ConvlensError(
                        f"layer '{layer}' gives shape {tuple(activations.shape)}; unit statistics "
                        "need [N, C, H, W] maps or [N, C] vectors"
                    )
                _check_finite(activations, layer, CNN_GROUP)
                if grid is None:
                    grid = tuple(activations.shape[2:])
                    accumulators[CNN_GROUP] = _Accumulator(activations.shape[1], len(chosen), device)
                    for label, sae in saes.items():
                        if sae.input_dim != activations.shape[1]:
                            raise ConvlensError(
                                f"SAE '{label}' reads {sae.input_dim} channels but layer '{layer}' "
                                f"has {activations.shape[1]}"
                            )
                        accumulators[label] = _Accumulator(sae.latent_dim, len(chosen), device)
                accumulators[CNN_GROUP].add(activations, seen)
                for label, sae in saes.items():
                    with autocast(device, dtype):
                        latents = full_precision(sae.encode(activations.to(sae.input_mean.dtype)))
                    _check_finite(latents, layer, label)
                    accumulators[label].add(latents, seen)
                positions.append(batch.positions)
                seen += len(batch)
                bar.update(len(batch) + len(batch.skipped))
    finally:
        bar.close()
        module.train(training[CNN_GROUP])
        for label, sae in saes.items():
            sae.train(training[label])
    if not seen:
        raise ConvlensError(f"no readable images among the {len(chosen)} chosen under {index.root}")

    image_positions = torch.cat(positions).long()
    per_image = grid[0] * grid[1]
    vocabulary, labels = _concept_labels(concepts, index, image_positions) if concepts is not None else ({}, {})
    _add_class_category(vocabulary, labels, index, image_positions)
    if not vocabulary:
        vocabulary = labels = None
    groups = {
        label: _group_record(
            CNN_GROUP_KIND if label == CNN_GROUP else "latent",
            accumulator,
            seen,
            seen * per_image,
            vocabulary,
            labels,
            selective_auroc,
        )
        for label, accumulator in accumulators.items()
    }
    record = {
        "layer": layer,
        "images": seen,
        "positions_per_image": per_image,
        "seed": seed,
        "dtype": dtype,
        "selective_auroc": selective_auroc,
        "concepts": vocabulary,
        "concept_counts": None
        if labels is None
        else {
            attribute: {value: int((labels[attribute] == k).sum()) for k, value in enumerate(values)}
            for attribute, values in vocabulary.items()
        },
        "skipped": skip_log.as_json(),
        "groups": groups,
    }
    tensors = {f"maxima.{label}": accumulator.maxima[:seen] for label, accumulator in accumulators.items()}
    tensors["positions"] = image_positions
    save_tensors_atomic(tensors, out_dir / "maxima.safetensors", metadata={"layer": layer})
    write_json_atomic(out_dir / "statistics.json", record)
    return record
