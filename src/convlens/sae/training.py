"""Training a sparse autoencoder on an activation store (paper 001 sec. 8.3, Figure 18).

Adam, shuffled batches of the store's training split, metrics every ``log_every`` steps on the training window
and on validation samples (the store's validation split, or another store's), resumable checkpoints, and
data parallelism under torchrun: every rank reads the same global batch, computes on its share of the rows,
and the gradients are summed, so one process and several agree up to float rounding.

A run folder holds::

    config.json                         SAE, training parameters, stores, versions
    metrics.jsonl                       a row every log_every steps: train loss terms, MSE, L0; validation
                                        MSE, fraction of variance explained, L0, dead and dense latents,
                                        compression factor
    curves.png                          loss and sparsity against steps (Figure 18)
    checkpoints/train-state.safetensors weights, Adam state and step, written atomically
    sae.safetensors                     the trained SAE (``convlens.load_sae``)
    summary.json

A step never waits for the device: the metric sums and the first non-finite loss stay on it until a metric row or
a checkpoint is written (no state after a non-finite loss is ever saved), checkpoints are written in the
background, and the training split is held in the device's memory when it fits (``store_in_memory``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from convlens.activations.store import ActivationStore, ResidentSplit, free_memory
from convlens.core.errors import ConvlensError
from convlens.core.params import Params, param
from convlens.runtime.distributed import all_reduce_sum, barrier, distributed_rank
from convlens.runtime.run_records import (
    load_optimizer_state,
    save_optimizer_state,
    versions,
    write_json_atomic,
    write_lines_atomic,
)
from convlens.sae.base import SparseAutoencoder, save_sae
from convlens.sae.schedule import TrainingSchedule

DENSE_ABOVE = 0.1  # a latent firing on more than this share of validation samples counts as dense
NORMALISATION_SAMPLES = 65_536
POOL_SAMPLES = 8_192  # training rows an SAE initialises from and resamples dead latents from
STATE_FILE = "checkpoints/train-state.safetensors"
MEMORY_SHARE = 0.5  # store_in_memory "auto": the training split may take this share of the device's free memory


@dataclasses.dataclass(frozen=True)
class SAETrainingParams(Params):
    epochs: int = param(10, min=1, help="passes over the training split (10 in the paper, sec. 8.3)")
    steps: Optional[int] = param(None, min=1, help="stop after this many optimiser steps instead of epochs")
    batch_size: int = param(128, min=1, help="samples per step (128 in the paper)")
    lr: float = param(3e-4, min=0.0, help="Adam learning rate (3e-4 in the paper)")
    normalize_input: bool = param(
        False,
        help="centre the inputs and scale them to a mean squared norm of input_dim "
        "(kept in the checkpoint, so the SAE still takes raw activations)",
    )
    unit_norm_decoder: bool = param(False, help="rescale the decoder atoms to unit norm after every step")
    target_l0: Optional[float] = param(
        None,
        min=0.01,
        help="for SAEs whose sparsity is a penalty (relu-l1, jumprelu, ...): adapt the penalty's weight during "
        "training so that about this many latents fire per sample (the plugin's coefficient is the start)",
    )
    penalty_warmup: float = param(
        0.05, min=0.0, max=1.0, help="share of the steps over which the sparsity penalty rises from 0 to its weight"
    )
    lr_warmup: float = param(0.01, min=0.0, max=1.0, help="share of the steps of linear learning-rate warm-up")
    lr_decay: float = param(
        0.2, min=0.0, max=1.0, help="share of the steps at the end over which the learning rate decays to 0"
    )
    resample_at: tuple[float, ...] = param(
        (0.1, 0.2, 0.3, 0.4),
        help="shares of the steps after which latents dead for the last 5 % of the steps are resampled (SAEs that "
        "support it; empty: never)",
    )
    log_every: int = param(100, min=1, help="steps between metric rows")
    checkpoint_every: int = param(
        1000,
        min=1,
        help="steps between resumable checkpoints (also at each epoch end, unless the last one is still being "
        "written: they are written in the background)",
    )
    val_samples: int = param(16_384, min=1, help="validation samples evaluated for each metric row")
    window: int = param(4, min=1, help="shards shuffled together when reading the store")
    store_in_memory: Literal["auto", "yes", "no"] = param(
        "auto",
        help="hold the training split in the training device's memory instead of reading the store's shards while "
        "training (the same batches, so the same results): auto when it takes at most half of the free memory "
        "(the GPU's on cuda, the available RAM on cpu, shared by the local ranks)",
    )
    seed: int = param(0, help="seed of the batch order (and of the SAE's initialisation when it has none)")


def adam(parameters, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where torch supports it (CPU and CUDA float tensors): about 4x faster on CPU than the default.
    ``parameters``: tensors, or groups as :meth:`SparseAutoencoder.parameter_groups` gives them (a group's
    ``lr_scale`` multiplies the learning rate)."""
    parameters = [
        {**group, "lr": lr * group.get("lr_scale", 1.0)} if isinstance(group, dict) else group for group in parameters
    ]
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(parameters, lr=lr)


# training parameters that do not change a run's results: a run may be resumed with other values
RESULT_NEUTRAL = ("store_in_memory",)


def split_count(store: ActivationStore, split: str) -> int:
    """Samples of ``split`` in ``store``."""
    return sum(len(positions) for positions in store.split_rows(split))


def input_statistics(store: ActivationStore, limit: int = NORMALISATION_SAMPLES) -> tuple[torch.Tensor, float]:
    """(mean, scale) over the first ``limit`` training samples: scale^2 = mean squared distance to the mean / C."""
    seen, total, squares = 0, None, None
    with contextlib.closing(store.batches(4096, "train", shuffle=False)) as batches:
        for batch in batches:
            batch = batch[: limit - seen].double()
            total = batch.sum(0) if total is None else total + batch.sum(0)
            squares = batch.pow(2).sum() if squares is None else squares + batch.pow(2).sum()
            seen += len(batch)
            if seen >= limit:
                break
    if not seen:
        raise ConvlensError(f"{store.path} has no training samples")
    mean = total / seen
    spread = float((squares / seen - mean.pow(2).sum()) / store.dim)
    return mean.float(), math.sqrt(spread) if spread > 0 else 1.0


def training_split_in_memory(
    store: ActivationStore, device: torch.device, choice: str, samples: int
) -> ResidentSplit | None:
    """The training split held in ``device``'s memory when ``choice`` (store_in_memory) says so, else None."""
    if choice == "no":
        return None
    needed = samples * store.vector_bytes()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    free = free_memory(device) // max(local_ranks, 1)
    if choice == "auto" and needed > MEMORY_SHARE * free:
        return None
    if needed > free:
        raise ConvlensError(
            f"store_in_memory is 'yes', but the training split of {store.path} takes {_size(needed)} and {device} "
            f"has {_size(free)} free; use 'auto' or 'no' to read it from the store while training"
        )
    return store.load_into_memory("train", device)


def training_batches(
    store: ActivationStore, params: SAETrainingParams, epoch: int, device: torch.device, resident: Any
) -> Iterator[torch.Tensor]:
    """One epoch of the training split in the seeded, windowed shuffle of ``params`` (from ``resident`` memory when
    the split is held there); close it when leaving early, so its prefetching stops."""
    return store.batches(
        params.batch_size,
        "train",
        seed=params.seed,
        epoch=epoch,
        window=params.window,
        device=device,
        resident=resident,
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def first_batches(
    store: ActivationStore, split: str | None, max_samples: int, device: torch.device, batch_size: int = 4096
) -> list[torch.Tensor]:
    """The batches :func:`evaluate` reads (the first ``max_samples`` samples of ``split``, unshuffled), on
    ``device``: a trainer keeps them to evaluate on at every metric row without reading the store again."""
    kept, seen = [], 0
    with contextlib.closing(store.batches(batch_size, split, shuffle=False, device=device)) as batches:
        for batch in batches:
            kept.append(batch[: max_samples - seen].to(device).float())
            seen += len(kept[-1])
            if seen >= max_samples:
                break
    return kept


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder,
    store: ActivationStore,
    split: str | None,
    max_samples: int,
    device: torch.device,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Reconstruction and sparsity of ``sae`` on the first ``max_samples`` samples of ``split``, in raw units."""
    with contextlib.closing(store.batches(batch_size, split, shuffle=False, device=device)) as batches:
        return evaluate_batches(sae, batches, max_samples, device)


@torch.no_grad()
def evaluate_batches(
    sae: SparseAutoencoder, batches: Iterable[torch.Tensor], max_samples: int, device: torch.device
) -> dict[str, float]:
    """:func:`evaluate` on the first ``max_samples`` samples of ``batches``; the sums stay on the device until the
    end."""
    was_training = sae.training
    sae.eval()
    n = 0
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        x = batch[: max_samples - n].to(device).float()
        output = sae(x)
        active, rows_active = output.latent_activity()
        _accumulate(
            sums,
            {
                "error": (output.reconstruction - x).double().pow(2).sum(),
                "l0": active,
                "inputs_nonzero": (x != 0).sum(),
                "fired": rows_active,
                "total": x.double().sum(0),
                "squares": x.double().pow(2).sum(0),
                **{f"extra.{key}": value.double() for key, value in sae.validation_metrics(x).items()},
            },
        )
        n += len(x)
        if n >= max_samples:
            break
    sae.train(was_training)
    if not n:
        return {}
    error, l0, inputs_nonzero = (float(sums[key]) for key in ("error", "l0", "inputs_nonzero"))
    variance = float((sums["squares"] - sums["total"].pow(2) / n).sum())
    mean_l0 = l0 / n
    share = sums["fired"].double() / n
    return {
        "samples": n,
        "mse": error / (n * sae.input_dim),
        "fve": 1 - error / variance if variance > 0 else math.nan,
        "l0": mean_l0,
        "dead_fraction": float((share == 0).double().mean()),
        "dense_fraction": float((share > DENSE_ABOVE).double().mean()),
        "compression": (inputs_nonzero / n) / mean_l0 if mean_l0 > 0 else math.nan,
        **{key.removeprefix("extra."): float(value) / n for key, value in sums.items() if key.startswith("extra.")},
    }


def _accumulate(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    for key, value in values.items():
        sums[key] = value if key not in sums else sums[key] + value


def _store_record(store: ActivationStore, split: str | None) -> dict[str, Any]:
    manifest = store.manifest
    return {
        "path": str(store.path),
        "split": split,
        "channels": store.dim,
        "samples": len(store),
        "model": manifest.get("model"),
        "layer": manifest.get("layer"),
        "filter": manifest.get("filter"),
        "dataset": manifest.get("dataset"),
        "manifest_sha256": _manifest_digest(store),
    }


def _changed_settings(previous: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The keys of ``config`` whose settings differ from the saved run's (ignoring :data:`RESULT_NEUTRAL`)."""

    def comparable(key: str, settings: dict[str, Any]) -> str:
        value = json.loads(json.dumps(settings.get(key)))
        if key == "training" and isinstance(value, dict):
            value = {name: setting for name, setting in value.items() if name not in RESULT_NEUTRAL}
        return json.dumps(value, sort_keys=True)

    return sorted(key for key in config if comparable(key, previous) != comparable(key, config))


def _manifest_digest(store: ActivationStore) -> str:
    import hashlib

    return hashlib.sha256((store.path / "manifest.json").read_bytes()).hexdigest()[:16]


def training_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    local: torch.Tensor,
    global_rows: int,
    world: int = 1,
    unit_norm_decoder: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """One optimiser step on this rank's ``local`` rows of a global batch of ``global_rows`` (gradients summed over
    the ranks). Returns the loss summed over every rank's rows, and this rank's sums for the metric tally, as
    tensors on the device: nothing here waits for the device, so the caller checks the loss for NaN or inf when it
    reads the sums (:class:`LossWatch`; the steps after a non-finite loss compute on garbage that is never saved)."""
    sae.train()
    optimizer.zero_grad(set_to_none=True)
    output = sae(local)
    loss = output.loss
    (loss * (len(local) / global_rows)).backward()
    rows = len(local)
    loss_sum = all_reduce_sum(loss.detach().double().reshape(1) * rows, world)
    if world > 1:
        for parameter in sae.parameters():
            if parameter.grad is not None:
                all_reduce_sum(parameter.grad, world)
    optimizer.step()
    sae.after_step()
    if unit_norm_decoder:
        sae.normalize_decoder_()
    with torch.no_grad():
        active, rows_active = output.latent_activity()
        fired = all_reduce_sum((rows_active > 0).to(torch.int32), world) > 0
        sae.record_activity(fired, global_rows)
        return loss_sum[0], {
            "samples": float(rows),
            "loss": loss.detach().double() * rows,
            **{name: term.detach().double() * rows for name, term in output.losses.items()},
            "squared_error": (output.reconstruction - local).double().pow_(2).sum(),
            "l0": active.double(),
        }


class MetricTally:
    """The sums of the metric row in progress, kept on the device (float64) so that no step waits to add them."""

    def __init__(self, device: torch.device, sums: dict[str, float] | None = None):
        self.device = device
        self.sums = {
            key: torch.tensor(value, dtype=torch.float64, device=device) for key, value in (sums or {}).items()
        }

    def add(self, sums: dict[str, torch.Tensor | float]) -> None:
        for key, value in sums.items():
            if key not in self.sums:
                self.sums[key] = torch.zeros((), dtype=torch.float64, device=self.device)
            self.sums[key].add_(value)

    def read(self, world: int) -> dict[str, float]:
        """The sums over every rank, on the host (one transfer)."""
        if not self.sums:
            return {}
        summed = all_reduce_sum(torch.stack(list(self.sums.values())), world)
        return dict(zip(self.sums, summed.tolist()))


class LossWatch:
    """The first step whose loss was NaN or inf, tracked on the device; :meth:`check` reads it (and raises)."""

    def __init__(self, device: torch.device):
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def observe(self, step: int, loss_sum: torch.Tensor) -> None:
        first = torch.isfinite(loss_sum).logical_not_().logical_and_(self.step == 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss_sum, self.loss)

    def first_bad_step(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, or None when every loss so far was finite."""
        step = int(self.step)
        return (step, float(self.loss)) if step else None

    def check(self, out: Path) -> None:
        bad = self.first_bad_step()
        if bad is not None:
            raise ConvlensError(
                f"the SAE loss became {bad[1]:g} at step {bad[0]}; the last checkpoint in {out} is kept (try a "
                "lower --lr or --normalize-input)"
            )


def build_sae(name: str, values: dict[str, Any], input_dim: int, seed: int) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE ``name`` with parameters ``values`` for ``input_dim`` channels (its seed defaulting to ``seed``),
    and its record (registry name, every resolved parameter)."""
    from convlens.core.component_registry import default_registry
    from convlens.core.params import coerce, parameter_specs

    registry = default_registry()
    component = registry.get("sae", name)
    values = dict(values)
    fields = {spec.name for spec in parameter_specs(component.spec.params)}
    if "input_dim" in fields:
        values["input_dim"] = input_dim
    if "seed" in fields and "seed" not in values:
        values["seed"] = seed
    resolved = coerce(component.spec.params, values, owner=f"sae '{component.name}'").to_dict()
    sae = registry.create("sae", component.qualified_name, **resolved)
    return sae, {"name": component.qualified_name, "params": resolved}


def train_sae(
    sae: SparseAutoencoder,
    sae_record: dict[str, Any],
    store: ActivationStore,
    out: str | Path,
    params: SAETrainingParams,
    *,
    val_store: ActivationStore | None = None,
    device: torch.device | str | None = None,
    resume: bool = False,
    progress: bool | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``sae`` (built from ``sae_record`` = {"name", "params"}) on ``store``; write the run folder ``out``."""
    from tqdm.auto import tqdm

    rank, world = distributed_rank()
    out = Path(out)
    device = torch.device(device or "cpu")
    _check_dimensions(sae, store, val_store)
    validation = val_store or store
    config = {
        "sae": sae_record,
        "training": params.to_dict(),
        "store": _store_record(store, "train"),
        "validation": _store_record(validation, "val"),
    }
    _check_run_folder(out, config, resume)
    TrainingSchedule.check(sae, params, sae_record["name"])
    train_samples = split_count(store, "train")
    if not train_samples:
        raise ConvlensError(f"{store.path} has no training samples")
    sae.to(device)
    run = TrainingRun(sae, adam(sae.parameter_groups(), params.lr), params, out, device, rank, world, train_samples)
    run.pool = torch.cat(first_batches(store, "train", POOL_SAMPLES, device))
    if resume:
        run.resume()
    else:
        _start(run, store, config)
    barrier(world)
    resident = training_split_in_memory(store, device, params.store_in_memory, train_samples)
    if rank == 0:
        run.val_batches = first_batches(validation, "val", params.val_samples, device)
    started = time.perf_counter()
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        desc=f"train {sae_record['name']}",
        unit="step",
        leave=False,
        disable=(rank != 0) or (None if progress is None else not progress),
    )
    with run.checkpoints_kept():
        epoch, skip = divmod(run.step, run.steps_per_epoch)
        while run.step < run.total_steps:
            with contextlib.closing(training_batches(store, params, epoch, device, resident)) as batches:
                run.epoch(itertools.islice(batches, skip, None), bar, on_step)
            epoch, skip = epoch + 1, 0
    bar.close()
    summary = {
        "out": str(out),
        "sae": sae_record["name"],
        "input_dim": sae.input_dim,
        "latent_dim": sae.latent_dim,
        "sparsity": sae.sparsity,
        "steps": run.step,
        "epochs": round(run.step / run.steps_per_epoch, 3),
        "train_samples": train_samples,
        "world_size": world,
        "store_in_memory": resident is not None,
        "seconds": round(time.perf_counter() - started, 3),
        "schedule": run.schedule.summary(),
        "final": run.rows[-1] if run.rows else {},
    }
    if rank == 0:
        _finish(run, store, config, summary)
    barrier(world)
    return summary


def _check_dimensions(sae: SparseAutoencoder, store: ActivationStore, val_store: ActivationStore | None) -> None:
    if sae.input_dim != store.dim:
        raise ConvlensError(
            f"the SAE takes {sae.input_dim}-dimensional inputs, but {store.path} holds {store.dim}-channel activations"
        )
    if val_store is not None and val_store.dim != store.dim:
        raise ConvlensError(
            f"validation store {val_store.path} holds {val_store.dim}-channel activations, the "
            f"training store {store.dim}"
        )


def _check_run_folder(out: Path, config: dict[str, Any], resume: bool) -> None:
    if resume:
        if not (out / STATE_FILE).is_file():
            raise ConvlensError(f"nothing to resume in {out}: no {STATE_FILE}")
        changed = _changed_settings(json.loads((out / "config.json").read_text()), config)
        if changed:
            raise ConvlensError(f"--resume with other settings than the run in {out} ({', '.join(changed)} differ)")
    elif (out / "config.json").is_file():
        raise ConvlensError(f"{out} already holds an SAE run; continue it with --resume or choose another --out")


def _start(run: TrainingRun, store: ActivationStore, config: dict[str, Any]) -> None:
    """A new run: the input normalisation, the SAE's initialisation from the data, the decoder's norm, and
    config.json."""
    if run.params.normalize_input:
        mean, scale = input_statistics(store)
        run.sae.set_normalisation(mean.to(run.device), scale)
    with torch.no_grad():
        run.sae.initialise_from_data(run.sae.normalise(run.pool), run.params.target_l0)
    if run.params.unit_norm_decoder:
        run.sae.normalize_decoder_()
    if run.rank == 0:
        (run.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            run.out / "config.json",
            {**config, "world_size": run.world, "versions": versions(), "device": str(run.device)},
        )


def _finish(run: TrainingRun, store: ActivationStore, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """The trained SAE, its curves and the summary."""
    save_sae(
        run.sae,
        run.out / "sae.safetensors",
        name=config["sae"]["name"],
        params=config["sae"]["params"],
        extra={
            "model": store.manifest.get("model"),
            "layer": store.manifest.get("layer"),
            "store": config["store"],
            "training": run.params.to_dict(),
            "steps": run.step,
            "metrics": summary["final"].get("val", {}),
        },
    )
    _write_curves(run.out, run.rows)
    write_json_atomic(run.out / "summary.json", summary)


class TrainingRun:
    """A run between its steps: the step count, the metric rows, the sums of the row in progress, the first
    non-finite loss, and the checkpoints. Reading the device's results waits for it, so they are read only when a
    metric row or a checkpoint is written."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        optimizer: torch.optim.Optimizer,
        params: SAETrainingParams,
        out: Path,
        device: torch.device,
        rank: int,
        world: int,
        train_samples: int,
    ):
        self.sae, self.optimizer, self.params, self.out, self.device = sae, optimizer, params, out, device
        self.rank, self.world = rank, world
        self.steps_per_epoch = math.ceil(train_samples / params.batch_size)
        self.total_steps = params.steps or params.epochs * self.steps_per_epoch
        self.step, self.rows = 0, []
        self.tally, self.watch = MetricTally(device), LossWatch(device)
        self.writer = CheckpointWriter(out / STATE_FILE)
        self.val_batches: list[torch.Tensor] = []
        self.pool = torch.empty(0, sae.input_dim, device=device)  # the first training rows (see POOL_SAMPLES)
        self.schedule = TrainingSchedule(sae, optimizer, params, self.total_steps, device)

    def resume(self) -> None:
        """Weights, optimiser, step, the sums of the row in progress and the rows written, from the checkpoint."""
        weights: dict[str, torch.Tensor] = {}
        optimizer_state, metadata = load_optimizer_state(self.out / STATE_FILE, weights)
        self.sae.load_state_dict(weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.step = int(metadata["step"])
        self.schedule.load_state(metadata.get("schedule", {}))
        saved = metadata.get("tally", {})  # summed over the ranks: rank 0 carries it
        self.tally = MetricTally(self.device, saved if self.rank == 0 else dict.fromkeys(saved, 0.0))
        metrics_file = self.out / "metrics.jsonl"
        if metrics_file.is_file():
            rows = map(json.loads, metrics_file.read_text().splitlines())
            self.rows = [row for row in rows if row["step"] <= self.step]

    def epoch(self, batches: Iterable[torch.Tensor], bar: Any, on_step: Callable[[int], None] | None) -> None:
        """Steps on ``batches`` until they or the run end; a checkpoint at the epoch's end."""
        for batch in batches:
            if self.step >= self.total_steps:
                return
            x = batch.to(self.device).float()
            self.schedule.before_step(self.step)
            loss_sum, sums = training_step(
                self.sae, self.optimizer, x[self.rank :: self.world], len(x), self.world, self.params.unit_norm_decoder
            )
            self.after_step(sums["l0"], len(x))
            self.tally.add(sums)
            self.watch.observe(self.step, loss_sum)
            bar.update(1)
            last = self.step == self.total_steps
            if self.step % self.params.log_every == 0 or last:
                self.write_row(bar)
            if self.step % self.params.checkpoint_every == 0 or last:
                self.save_state()
            if on_step is not None:
                on_step(self.step)
        if self.step % self.params.checkpoint_every:
            self.save_state(unless_writing=True)

    def after_step(self, active: torch.Tensor, rows: int) -> None:
        """The step's count, the controller (on the active latents of every rank), and resampling when due."""
        if self.schedule.controls and self.world > 1:
            active = all_reduce_sum(active.clone(), self.world)
        self.schedule.after_step(self.step, active, rows)
        self.step += 1
        if self.schedule.resample_due(self.step):
            self.schedule.resample(self.step, self.pool, self.params.seed)

    def write_row(self, bar: Any) -> None:
        self.watch.check(self.out)
        summed = self.tally.read(self.world)
        self.tally = MetricTally(self.device)
        count = max(summed.pop("samples"), 1.0)
        train = {key: value / count for key, value in summed.items()}
        train["mse"] = train.pop("squared_error") / self.sae.input_dim
        train["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.sae.penalty_term is not None:
            train["penalty_scale"] = float(self.sae.penalty_scale)
        row = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "samples": self.step * self.params.batch_size,
            "train": train,
        }
        if self.rank == 0:
            row["val"] = evaluate_batches(self.sae, self.val_batches, self.params.val_samples, self.device)
        self.rows.append(row)
        if self.rank == 0:
            write_lines_atomic(self.out / "metrics.jsonl", self.rows)
            bar.set_postfix(loss=f"{train['loss']:.4g}", l0=f"{train['l0']:.1f}")

    def save_state(self, unless_writing: bool = False) -> None:
        """A checkpoint, written in the background; with ``unless_writing`` none while one is still being
        written. The sums of the row in progress go into it, so a resumed run writes the same rows."""
        self.watch.check(self.out)
        summed = self.tally.read(self.world)
        if self.rank == 0 and not (unless_writing and self.writer.busy):
            metadata = {"step": self.step, "tally": summed, "schedule": self.schedule.state()}
            self.writer.save(self.optimizer, self.sae, metadata)

    @contextlib.contextmanager
    def checkpoints_kept(self) -> Iterator[None]:
        """Waits for the checkpoint being written on the way out (an error in flight stays the one raised)."""
        try:
            yield
        except BaseException:
            self.writer.wait(raise_error=False)
            raise
        self.writer.wait()


class CheckpointWriter:
    """Writes the training checkpoint in a background thread while training goes on, one write at a time. The
    state is copied at once (on cuda into pinned memory, without waiting for the device)."""

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, optimizer: torch.optim.Optimizer, sae: SparseAutoencoder, metadata: dict[str, Any]) -> None:
        self.wait()
        state = optimizer.state_dict()
        snapshot = {
            "state": {key: _host_copies(values) for key, values in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"]),
        }
        weights = _host_copies(sae.state_dict())
        copied = torch.cuda.Event() if self._on_cuda(sae) else None
        if copied is not None:
            copied.record()
        self._thread = threading.Thread(
            target=self._write, args=(snapshot, weights, metadata, copied), name="convlens-checkpoint"
        )
        self._thread.start()

    @staticmethod
    def _on_cuda(sae: SparseAutoencoder) -> bool:
        return any(tensor.is_cuda for tensor in sae.state_dict().values())

    def _write(
        self,
        snapshot: dict[str, Any],
        weights: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        copied: torch.cuda.Event | None,
    ) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            save_optimizer_state(self.path, _SavedOptimizer(snapshot), metadata, extra=weights)
        except BaseException as exc:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = exc

    def wait(self, raise_error: bool = True) -> None:
        """Until the checkpoint being written is on disk; its write error, if any, is raised here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


class _SavedOptimizer:
    """An optimiser state copied at one step, for :func:`save_optimizer_state`."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _host_copies(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every tensor copied to host memory (pinned, without waiting, from cuda)."""
    return {key: _host_copy(value) if isinstance(value, torch.Tensor) else value for key, value in values.items()}


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_cuda:
        return tensor.detach().clone()
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return pinned.copy_(tensor.detach(), non_blocking=True)


def _write_curves(out: Path, rows: list[dict[str, Any]]) -> None:
    """``curves.png`` and ``curves.svg``: the training objective, the reconstruction error and the sparsity per
    logged step, each on its own axis (the objective can be hundreds of times the MSE)."""
    from convlens.drawing.plots import LinePanel, save_chart

    if not rows:
        return
    steps = [row["step"] for row in rows]
    val = [row.get("val") or {} for row in rows]

    def panel(key: str, title: str, ylabel: str, series: dict[str, list[float]]) -> LinePanel:
        lines = {name: (steps, values) for name, values in series.items()}
        return LinePanel(series=lines, title=title, xlabel="step", ylabel=ylabel, integer_x=True, key=key)

    loss = panel("loss", "training loss", "loss (objective)", {"train loss": [row["train"]["loss"] for row in rows]})
    mse = panel(
        "mse",
        "reconstruction error",
        "MSE per element",
        {"train MSE": [row["train"]["mse"] for row in rows], "validation MSE": [v.get("mse", math.nan) for v in val]},
    )
    sparsity = panel(
        "l0",
        "sparsity",
        "active latents per sample (L0)",
        {"train L0": [row["train"]["l0"] for row in rows], "validation L0": [v.get("l0", math.nan) for v in val]},
    )
    save_chart([loss, mse, sparsity], out / "curves.png")
