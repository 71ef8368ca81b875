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
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from convlens.activations.store import ActivationStore
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

DENSE_ABOVE = 0.1  # a latent firing on more than this share of validation samples counts as dense
NORMALISATION_SAMPLES = 65_536


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
    log_every: int = param(100, min=1, help="steps between metric rows")
    checkpoint_every: int = param(1000, min=1, help="steps between resumable checkpoints (also at each epoch end)")
    val_samples: int = param(16_384, min=1, help="validation samples evaluated for each metric row")
    window: int = param(4, min=1, help="shards shuffled together when reading the store")
    seed: int = param(0, help="seed of the batch order (and of the SAE's initialisation when it has none)")


def adam(parameters, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where torch supports it (CPU and CUDA float tensors): about 4x faster on CPU than the default."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(parameters, lr=lr)


def split_count(store: ActivationStore, split: str) -> int:
    """Samples of ``split`` in ``store``."""
    return sum(
        int(store._select(store.read_shard(i, ("split",)), split)["split"].numel()) for i in range(len(store.shards))
    )


def input_statistics(store: ActivationStore, limit: int = NORMALISATION_SAMPLES) -> tuple[torch.Tensor, float]:
    """(mean, scale) over the first ``limit`` training samples: scale^2 = mean squared distance to the mean / C."""
    seen, total, squares = 0, None, None
    for batch in store.batches(4096, "train", shuffle=False):
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
    was_training = sae.training
    sae.eval()
    n, error, l0, inputs_nonzero = 0, 0.0, 0.0, 0.0
    total = squares = fired = None
    for batch in store.batches(batch_size, split, shuffle=False):
        x = batch[: max_samples - n].to(device).float()
        output = sae(x)
        active = output.latents != 0
        error += float((output.reconstruction - x).double().pow(2).sum())
        l0 += float(active.sum())
        inputs_nonzero += float((x != 0).sum())
        fired = active.sum(0) if fired is None else fired + active.sum(0)
        total = x.double().sum(0) if total is None else total + x.double().sum(0)
        squares = x.double().pow(2).sum(0) if squares is None else squares + x.double().pow(2).sum(0)
        n += len(x)
        if n >= max_samples:
            break
    sae.train(was_training)
    if not n:
        return {}
    variance = float((squares - total.pow(2) / n).sum())
    mean_l0 = l0 / n
    share = fired.double() / n
    return {
        "samples": n,
        "mse": error / (n * sae.input_dim),
        "fve": 1 - error / variance if variance > 0 else math.nan,
        "l0": mean_l0,
        "dead_fraction": float((share == 0).double().mean()),
        "dense_fraction": float((share > DENSE_ABOVE).double().mean()),
        "compression": (inputs_nonzero / n) / mean_l0 if mean_l0 > 0 else math.nan,
    }


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
) -> dict[str, float]:
    """One optimiser step on this rank's ``local`` rows of a global batch of ``global_rows`` (gradients summed over
    the ranks); returns the step's sums for the metric tally. A non-finite loss raises FloatingPointError."""
    sae.train()
    optimizer.zero_grad(set_to_none=True)
    output = sae(local)
    loss = output.loss
    (loss * (len(local) / global_rows)).backward()
    loss_sum = all_reduce_sum(torch.tensor([float(loss.detach()) * len(local)], dtype=torch.float64), world)
    if not math.isfinite(float(loss_sum)):
        raise FloatingPointError(f"{float(loss_sum):g}")
    if world > 1:
        for parameter in sae.parameters():
            if parameter.grad is not None:
                all_reduce_sum(parameter.grad, world)
    optimizer.step()
    sae.after_step()
    if unit_norm_decoder:
        sae.normalize_decoder_()
    with torch.no_grad():
        active = output.latents.detach() != 0
        fired = all_reduce_sum(active.any(0).to(torch.int32), world) > 0
        sae.record_activity(fired, global_rows)
        return {
            "samples": float(len(local)),
            "loss": float(loss.detach()) * len(local),
            **{name: float(term.detach()) * len(local) for name, term in output.losses.items()},
            "squared_error": float((output.reconstruction - local).double().pow(2).sum()),
            "l0": float(active.sum()),
        }


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
    if sae.input_dim != store.dim:
        raise ConvlensError(
            f"the SAE takes {sae.input_dim}-dimensional inputs, but {store.path} holds {store.dim}-channel activations"
        )
    if val_store is not None and val_store.dim != store.dim:
        raise ConvlensError(
            f"validation store {val_store.path} holds {val_store.dim}-channel activations, the "
            f"training store {store.dim}"
        )
    validation = val_store or store
    config = {
        "sae": sae_record,
        "training": params.to_dict(),
        "store": _store_record(store, "train"),
        "validation": _store_record(validation, "val"),
    }
    state_path = out / "checkpoints" / "train-state.safetensors"
    saved_config = out / "config.json"
    if resume:
        if not state_path.is_file():
            raise ConvlensError(f"nothing to resume in {out}: no {state_path.relative_to(out)}")
        previous = json.loads(saved_config.read_text())
        changed = sorted(
            k
            for k in config
            if json.dumps(previous.get(k), sort_keys=True)
            != json.dumps(json.loads(json.dumps(config[k])), sort_keys=True)
        )
        if changed:
            raise ConvlensError(f"--resume with other settings than the run in {out} ({', '.join(changed)} differ)")
    elif saved_config.is_file():
        raise ConvlensError(f"{out} already holds an SAE run; continue it with --resume or choose another --out")

    train_samples = split_count(store, "train")
    if not train_samples:
        raise ConvlensError(f"{store.path} has no training samples")
    steps_per_epoch = math.ceil(train_samples / params.batch_size)
    total_steps = params.steps or params.epochs * steps_per_epoch
    sae.to(device)
    optimizer = adam(sae.parameters(), params.lr)
    step, rows = 0, []
    tally: dict[str, float] = {}
    if resume:
        weights: dict[str, torch.Tensor] = {}
        optimizer_state, metadata = load_optimizer_state(state_path, weights)
        sae.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        step = int(metadata["step"])
        tally = metadata.get("tally", {}) if rank == 0 else dict.fromkeys(metadata.get("tally", {}), 0.0)
        metrics_file = out / "metrics.jsonl"
        if metrics_file.is_file():
            rows = [row for row in map(json.loads, metrics_file.read_text().splitlines()) if row["step"] <= step]
    else:
        if params.normalize_input:
            mean, scale = input_statistics(store)
            sae.set_normalisation(mean.to(device), scale)
        if params.unit_norm_decoder:
            sae.normalize_decoder_()
        if rank == 0:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                saved_config, {**config, "world_size": world, "versions": versions(), "device": str(device)}
            )
    barrier(world)

    def save_state() -> None:
        # the metric sums since the last row go into the checkpoint, so a resumed run writes the same rows
        summed = all_reduce_sum(torch.tensor(list(tally.values()), dtype=torch.float64), world).tolist()
        if rank == 0:
            state = {"step": step, "tally": dict(zip(tally, summed))}
            save_optimizer_state(state_path, optimizer, state, extra=sae.state_dict())

    def metric_row(tally: dict[str, float]) -> dict[str, Any]:
        values = all_reduce_sum(torch.tensor(list(tally.values()), dtype=torch.float64), world)
        summed = dict(zip(tally, values.tolist()))
        count = max(summed.pop("samples"), 1.0)
        train = {key: value / count for key, value in summed.items()}
        train["mse"] = train.pop("squared_error") / sae.input_dim
        row = {
            "step": step,
            "epoch": round(step / steps_per_epoch, 4),
            "samples": step * params.batch_size,
            "train": train,
        }
        if rank == 0:
            row["val"] = evaluate(sae, validation, "val", params.val_samples, device)
        return row

    started = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"train {sae_record['name']}",
        unit="step",
        leave=False,
        disable=(rank != 0) or (None if progress is None else not progress),
    )
    epoch, skip = divmod(step, steps_per_epoch)
    while step < total_steps:
        for position, batch in enumerate(
            store.batches(params.batch_size, "train", seed=params.seed, epoch=epoch, window=params.window)
        ):
            if position < skip:
                continue
            if step >= total_steps:
                break
            x = batch.to(device).float()
            local = x[rank::world]
            try:
                rows_local = training_step(sae, optimizer, local, len(x), world, params.unit_norm_decoder)
            except FloatingPointError as exc:
                raise ConvlensError(
                    f"the SAE loss became {exc} at step {step + 1}; the last checkpoint in {out} is "
                    "kept (try a lower --lr or --normalize-input)"
                ) from None
            for key, value in rows_local.items():
                tally[key] = tally.get(key, 0.0) + value
            step += 1
            bar.update(1)
            if step % params.log_every == 0 or step == total_steps:
                rows.append(metric_row(tally))
                tally = {}
                if rank == 0:
                    write_lines_atomic(out / "metrics.jsonl", rows)
                    bar.set_postfix(loss=f"{rows[-1]['train']['loss']:.4g}", l0=f"{rows[-1]['train']['l0']:.1f}")
            if step % params.checkpoint_every == 0 or step == total_steps:
                save_state()
            if on_step is not None:
                on_step(step)
        else:
            if step % params.checkpoint_every:
                save_state()
        epoch, skip = epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - started
    final = rows[-1] if rows else {}
    summary = {
        "out": str(out),
        "sae": sae_record["name"],
        "input_dim": sae.input_dim,
        "latent_dim": sae.latent_dim,
        "sparsity": sae.sparsity,
        "steps": step,
        "epochs": round(step / steps_per_epoch, 3),
        "train_samples": train_samples,
        "world_size": world,
        "seconds": round(seconds, 3),
        "final": final,
    }
    if rank == 0:
        save_sae(
            sae,
            out / "sae.safetensors",
            name=sae_record["name"],
            params=sae_record["params"],
            extra={
                "model": store.manifest.get("model"),
                "layer": store.manifest.get("layer"),
                "store": config["store"],
                "training": params.to_dict(),
                "steps": step,
                "metrics": final.get("val", {}),
            },
        )
        _write_curves(out, rows)
        write_json_atomic(out / "summary.json", summary)
    barrier(world)
    return summary


def _write_curves(out: Path, rows: list[dict[str, Any]]) -> None:
    from convlens.data.images import save_png
    from convlens.drawing.charts import line_chart, side_by_side

    if not rows:
        return
    steps = [row["step"] for row in rows]
    val = [row.get("val") or {} for row in rows]
    loss = line_chart(
        {
            "train loss": (steps, [row["train"]["loss"] for row in rows]),
            "train MSE": (steps, [row["train"]["mse"] for row in rows]),
            "validation MSE": (steps, [v.get("mse", math.nan) for v in val]),
        },
        title="loss",
        xlabel="step",
        ylabel="loss / MSE per element",
    )
    sparsity = line_chart(
        {
            "train L0": (steps, [row["train"]["l0"] for row in rows]),
            "validation L0": (steps, [v.get("l0", math.nan) for v in val]),
        },
        title="sparsity",
        xlabel="step",
        ylabel="active latents per sample",
    )
    save_png(side_by_side([loss, sparsity]), out / "curves.png")
