"""Extraction of an activation dataset (001 sec. 7.2.6, Figure 7; design.md sec. 3-4).

Images are split into fixed chunks of ``images_per_shard``; chunk k becomes shard k. Under ``torchrun`` rank r
takes the chunks with k % world_size == r, so ranks read disjoint images and write their own shards; rank 0
writes the manifest once every shard exists. A re-run of the same settings writes only missing shards, and
because every image draws its samples from (seed, image index), the result is the same sample for sample
whatever the number of processes, the batch size, or the interruptions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from convlens.activations.sampling import sample_activations
from convlens.activations.store import FORMAT, finished_chunks, write_shard
from convlens.core.contracts import ActivationFilter, FilterContext
from convlens.core.errors import ConvlensError
from convlens.data.images import ImageIndex, Preprocessing, SkipLog, require_readable, shown
from convlens.data.loading import ImageBatch, ImageDataset, decode_on_device, grouped_image_batches
from convlens.models.layers import activations_at
from convlens.runtime.distributed import barrier, distributed_rank
from convlens.runtime.precision import autocast, channels_last, check_compute_dtype
from convlens.runtime.run_records import write_json_atomic
from convlens.runtime.seeding import torch_generator

if TYPE_CHECKING:
    from convlens.core.contracts import ModelBundle


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    model: dict[str, Any]
    layer: str
    filter: dict[str, Any]
    per_image: int | None = None  # None: H x W samples per image
    seed: int = 0
    val_fraction: float = 0.1
    images_per_shard: int = 256
    batch_size: int = 64
    save_maps: bool = False
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # of the stored vectors
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # of the forward pass (autocast)


def validation_images(count: int, fraction: float, seed: int) -> torch.Tensor:
    """A bool mask over image indices: the images whose samples form the validation split."""
    mask = torch.zeros(count, dtype=torch.bool)
    chosen = round(count * fraction)
    mask[torch.randperm(count, generator=torch_generator(seed, "split"))[:chosen]] = True
    return mask


def extract(
    bundle: ModelBundle,
    filter_: ActivationFilter,
    index: ImageIndex,
    out: str | Path,
    settings: ExtractionSettings,
    *,
    device: torch.device | None = None,
    workers: int = 0,
    decode: str = "auto",
    progress: bool | None = None,
    dataset: dict[str, Any] | None = None,
    on_nonfinite: Literal["skip", "stop"] = "skip",
) -> dict[str, Any]:
    """Write (or complete) the activation store ``out``; returns the run summary of this process.

    ``workers`` loader processes decode images (``decode``: auto, cpu or device, see
    :mod:`convlens.data.loading`). An image whose activations hold NaN or inf is left out and recorded among the
    skipped files (``on_nonfinite="skip"``) or stops the run naming it (``"stop"``)."""
    from tqdm.auto import tqdm

    out = Path(out)
    rank, world = distributed_rank()
    device = device or torch.device("cpu")
    check_compute_dtype(settings.compute_dtype, device)
    jpeg_bytes = decode_on_device(decode, device)
    module = channels_last(bundle.module.to(device).eval(), device)
    count = len(index)
    chunks = math.ceil(count / settings.images_per_shard)
    config = _config(settings, index, dataset)
    require_readable(index)
    if rank == 0:
        _start_or_check(out, config, index)
    barrier(world)
    done = finished_chunks(out)
    todo = [c for c in range(chunks) if c % world == rank and c not in done]
    groups = [_chunk_positions(chunk, settings.images_per_shard, count) for chunk in todo]
    run = _ChunkRun(bundle, filter_, index, settings, validation_images(count, settings.val_fraction, settings.seed))
    totals = {"images": 0, "samples": 0, "fallbacks": 0, "skipped": 0, "nonfinite": 0}
    started = time.perf_counter()
    bar = tqdm(
        total=sum(len(group) for group in groups),
        desc=f"extract {settings.layer}",
        unit="img",
        leave=False,
        disable=(rank != 0) or (None if progress is None else not progress),
    )
    skip_logs: dict[int, SkipLog] = {}
    batches = grouped_image_batches(
        ImageDataset(index, Preprocessing.of(bundle), jpeg_bytes=jpeg_bytes),
        groups,
        batch_size=settings.batch_size,
        skip_log_of=lambda group: skip_logs.setdefault(group, SkipLog(index.root)),
        workers=workers,
        device=device,
    )
    for group, batch in batches:
        skip_log = skip_logs.setdefault(group, SkipLog(index.root))
        if batch is not None:
            with autocast(device, settings.compute_dtype):
                bar.update(run.add(module, batch, skip_log, on_nonfinite))
            continue
        record = run.write(out, todo[group], groups[group], skip_log)
        for key in totals:
            totals[key] += record[key]
        del skip_logs[group]
    bar.close()
    seconds = time.perf_counter() - started
    barrier(world)
    manifest = write_manifest(out, config, chunks) if rank == 0 else None
    return {
        "out": str(out),
        "rank": rank,
        "world_size": world,
        "chunks_written": len(todo),
        "chunks_reused": len(done),
        **totals,
        "decode": "device" if jpeg_bytes else "cpu",
        "seconds": round(seconds, 3),
        "images_per_second": round(totals["images"] / seconds, 1) if seconds > 0 and totals["images"] else None,
        "manifest": manifest,
    }


def _config(settings: ExtractionSettings, index: ImageIndex, dataset: dict[str, Any] | None) -> dict[str, Any]:
    config = {"format": FORMAT, **dataclasses.asdict(settings)}
    if settings.compute_dtype == "float32":  # so that stores written before compute_dtype existed still resume
        del config["compute_dtype"]
    return {**config, "dataset": dataset or {"root": str(index.root)}, "images": len(index)}


def _start_or_check(out: Path, config: dict[str, Any], index: ImageIndex) -> None:
    """Start the store ``out``, or check that the one there was started with the same settings."""
    config_path = out / "extraction.json"
    if not config_path.is_file():
        (out / "shards").mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_path, config)
        write_json_atomic(out / "images.json", [index.relative(p) for p in index.paths])
        return
    saved = _with_resolved_root(json.loads(config_path.read_text()))
    now = _with_resolved_root(json.loads(json.dumps(config)))
    if saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConvlensError(
            f"{out} holds an extraction with other settings ({', '.join(changed)} differ); "
            f"to extract with these settings, write to a new --out (the finished shards in {out} are kept)"
        )


def _chunk_positions(chunk: int, images_per_shard: int, count: int) -> range:
    return range(chunk * images_per_shard, min(count, (chunk + 1) * images_per_shard))


SHARD_PARTS = ("vectors", "image_index", "position", "weight", "maps", "map_image_index")


class _ChunkRun:
    """The samples of the chunk being extracted, batch by batch, and the shard they become."""

    def __init__(
        self,
        bundle: ModelBundle,
        filter_: ActivationFilter,
        index: ImageIndex,
        settings: ExtractionSettings,
        val_mask: torch.Tensor,
    ):
        self.bundle, self.filter, self.index, self.settings, self.val_mask = bundle, filter_, index, settings, val_mask
        self._reset()

    def _reset(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {key: [] for key in SHARD_PARTS}
        self.fallbacks, self.nonfinite, self.grid = 0, 0, None

    def add(self, module: torch.nn.Module, batch: ImageBatch, skip_log: SkipLog, on_nonfinite: str) -> int:
        """Sample the activations of ``batch``; returns how many files it accounted for (skipped ones too)."""
        settings = self.settings
        images = batch.images
        labels = batch.labels.to(images.device)
        target = (lambda logits: self.filter.gradient_target(logits, labels)) if self.filter.needs_gradients else None
        captured = activations_at(
            module, images, settings.layer, target=target, model_name=settings.model.get("name", "model")
        )
        activations = captured.activations[settings.layer].float()
        if activations.ndim != 4:
            raise ConvlensError(
                f"layer '{settings.layer}' gives shape {tuple(activations.shape)}; extraction "
                "needs a convolutional layer with output [N, C, H, W]"
            )
        gradients = captured.gradients.get(settings.layer)
        gradients = gradients.float() if gradients is not None else None
        kept = batch.positions
        finite = _finite_images(activations, kept, self.index, settings.layer, skip_log, on_nonfinite)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            keep = finite.to(activations.device)
            activations, images, labels = activations[keep], images[keep], labels[keep]
            gradients = gradients[keep] if gradients is not None else None
            kept = kept[finite]
            if not len(kept):
                return len(batch.skipped) + len(finite)
        context = FilterContext(
            model=self.bundle, images=images, labels=labels, layer=settings.layer, gradients=gradients
        )
        weights = self.filter(activations, context)
        self.grid = list(activations.shape[2:])
        per_image = settings.per_image or self.grid[0] * self.grid[1]
        samples = sample_activations(activations, weights, kept, per_image=per_image, seed=settings.seed)
        self.parts["vectors"].append(samples.vectors.to(getattr(torch, settings.dtype)))
        self.parts["image_index"].append(samples.image_index)
        self.parts["position"].append(samples.position)
        self.parts["weight"].append(samples.weight)
        if settings.save_maps:
            self.parts["maps"].append(weights.detach().float().cpu())
            self.parts["map_image_index"].append(kept)
        self.fallbacks += int(samples.fallback.sum())
        return len(batch.skipped) + len(finite)

    def write(self, out: Path, chunk: int, positions: range, skip_log: SkipLog) -> dict[str, int]:
        """Write the chunk's shard; returns its counts for the run totals."""
        tensors = _chunk_tensors(self.parts, self.val_mask, self.bundle, self.settings)
        images = len(positions) - len(skip_log)
        write_shard(
            out,
            chunk,
            tensors,
            {
                "first_image": positions.start,
                "last_image": positions.stop - 1,
                "images": images,
                "fallbacks": self.fallbacks,
                "skipped": skip_log.as_json(),
                "grid": self.grid,
            },
        )
        record = {
            "images": images,
            "samples": int(tensors["vectors"].shape[0]),
            "fallbacks": self.fallbacks,
            "skipped": len(skip_log),
            "nonfinite": self.nonfinite,
        }
        self._reset()
        return record


def _with_resolved_root(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its dataset folder resolved, so that the same folder spelled differently compares equal."""
    dataset = config.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("root"), str):
        return config
    return {**config, "dataset": {**dataset, "root": str(Path(dataset["root"]).resolve())}}


NONFINITE_REASON = "non-finite activations"


def _finite_images(
    activations: torch.Tensor,
    positions: torch.Tensor,
    index: ImageIndex,
    layer: str,
    skip_log: SkipLog,
    on_nonfinite: Literal["skip", "stop"],
) -> torch.Tensor:
    """Bool ``[N]``: the images whose activations are all finite. The others are recorded in ``skip_log``, or
    the first of them stops the run (``on_nonfinite="stop"``)."""
    values = activations.detach()
    if bool(torch.isfinite(values).all()):
        return torch.ones(len(values), dtype=torch.bool)
    counts = (~torch.isfinite(values)).flatten(1).sum(1).cpu()
    for row in counts.nonzero().flatten().tolist():
        path = index.paths[int(positions[row])]
        found = f"{int(counts[row])} of {values[row].numel()} values at layer '{layer}' are NaN or inf"
        if on_nonfinite == "stop":
            raise ConvlensError(
                f"{shown(path)}: the model's activations are non-finite ({found}); the shards written so far are kept; "
                "use --on-nonfinite skip to leave such images out"
            )
        skip_log.record(index.relative(path), f"{NONFINITE_REASON}: {found}")
    return counts == 0


def _chunk_tensors(
    parts: dict[str, list[torch.Tensor]], val_mask: torch.Tensor, bundle: ModelBundle, settings: ExtractionSettings
) -> dict[str, torch.Tensor]:
    if parts["vectors"]:
        tensors = {key: torch.cat(values) for key, values in parts.items() if values}
    else:  # every image of the chunk was unreadable: an empty shard keeps the chunk accounted for
        tensors = {
            "vectors": torch.zeros(0, 0, dtype=getattr(torch, settings.dtype)),
            "image_index": torch.zeros(0, dtype=torch.long),
            "position": torch.zeros(0, 2, dtype=torch.int16),
            "weight": torch.zeros(0),
        }
    tensors["split"] = val_mask[tensors["image_index"]].to(torch.uint8)
    return tensors


def write_manifest(out: Path, config: dict[str, Any], chunks: int) -> dict[str, Any]:
    """The manifest of a store whose shards all exist; the summary of the whole dataset."""
    done = finished_chunks(out)
    missing = [c for c in range(chunks) if c not in done]
    if missing:
        raise ConvlensError(
            f"{len(missing)} shard(s) of {out} are missing (first: chunk {missing[0]}); re-run to "
            "complete the extraction"
        )
    shards = [done[c] for c in range(chunks)]
    channels = next((_channels(out / s["file"]) for s in shards if s["samples"]), 0)
    grid = next((s["grid"] for s in shards if s.get("grid")), None)
    manifest = {
        **config,
        "channels": channels,
        "grid": grid,
        "samples_per_image": config["per_image"] or (grid[0] * grid[1] if grid else None),
        "samples": sum(s["samples"] for s in shards),
        "images_used": sum(s["images"] for s in shards),
        "fallbacks": sum(s["fallbacks"] for s in shards),
        "skipped": [item for s in shards for item in s["skipped"]],
        "shards": [
            {k: s[k] for k in ("file", "samples", "bytes", "sha256", "first_image", "last_image")} for s in shards
        ],
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _channels(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int(handle.get_slice("vectors").get_shape()[1])
