"""``convlens train-sae`` and ``convlens sae-info``: train a sparse autoencoder on a store, describe a checkpoint."""

from __future__ import annotations

from typing import Any

import click

from convlens.core.component_registry import default_registry
from convlens.core.params import click_parameters, coerce, values_from_click
from convlens.runtime.locks import output_lock

from .output import echo_json
from .plugin_options import SAE_PREFIX, ModelOptionsCommand, PluginOptionsCommand
from .run_folders import default_run_folder

TRAIN_PREFIX = "train__"


def _training_params():
    from convlens.sae.training import SAETrainingParams

    return SAETrainingParams


class TrainSAECommand(PluginOptionsCommand):
    """Adds the training options (imported lazily, so `convlens --help` stays light)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not any((p.name or "").startswith(TRAIN_PREFIX) for p in self.params):
            reserved = {opt.lstrip("-") for p in self.params for opt in getattr(p, "opts", [])}
            self.params += click_parameters(_training_params(), reserved=reserved, dest_prefix=TRAIN_PREFIX)
        return super().parse_args(ctx, args)


@click.command("train-sae", cls=TrainSAECommand)
@click.option(
    "--store",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Activation store written by `convlens extract`.",
)
@click.option(
    "--sae",
    "sae_name",
    required=True,
    help="SAE architecture (see `convlens list sae`); its options follow (see --sae NAME --help).",
)
@click.option(
    "--val-store",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Validate on this store's validation split instead (e.g. magnitude-sampled data).",
)
@click.option(
    "--out", "-o", default=None, type=click.Path(file_okay=False), help="Run folder (default: runs/sae-NAME)."
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--json", "as_json", is_flag=True, help="Output the summary as JSON.")
def train_sae_command(
    store: str,
    sae_name: str,
    val_store: str | None,
    out: str | None,
    device: str | None,
    resume: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Train a sparse autoencoder on an activation store (paper sec. 8.3): Adam, shuffled batches, metrics.

    Runs data-parallel under torchrun (`torchrun --nproc-per-node 2 -m convlens train-sae ...`). Writes
    config.json, metrics.jsonl, curves.png, checkpoints/ and sae.safetensors into the run folder.
    """
    from convlens.activations.store import ActivationStore
    from convlens.runtime.device import resolve_device
    from convlens.sae.training import build_sae, train_sae

    training = coerce(_training_params(), values_from_click(options, TRAIN_PREFIX), owner="train-sae")
    activations = ActivationStore(store)
    validation = ActivationStore(val_store) if val_store else None
    sae, record = build_sae(sae_name, values_from_click(options, SAE_PREFIX), activations.dim, training.seed)
    out = out or default_run_folder(f"sae-{default_registry().get('sae', sae_name).name}")
    click.get_current_context().with_resource(output_lock(out, command="train-sae"))
    try:
        summary = train_sae(
            sae, record, activations, out, training, val_store=validation, device=resolve_device(device), resume=resume
        )
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted; the last checkpoint is kept in {out}; continue with the same command and --resume",
            err=True,
        )
        raise SystemExit(130) from None
    if summary["world_size"] > 1 and _rank() != 0:
        return
    if as_json:
        echo_json(summary)
        return
    val = summary["final"].get("val") or {}
    quality = (
        f"validation MSE {val['mse']:.4g}, variance explained {100 * val['fve']:.1f} %, L0 {val['l0']:.1f}, "
        f"dead latents {100 * val['dead_fraction']:.1f} %"
        if val
        else "no validation samples"
    )
    click.echo(
        f"trained {summary['sae']} ({summary['input_dim']} -> {summary['latent_dim']}) for {summary['steps']} "
        f"steps ({summary['epochs']:g} epochs of {summary['train_samples']} samples) in "
        f"{summary['seconds']:.1f} s: {quality}; wrote {out}/sae.safetensors, metrics.jsonl, curves.png"
    )


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@click.command("sae-info")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Output the checkpoint's metadata as JSON.")
def sae_info(path: str, as_json: bool) -> None:
    """Describe an SAE checkpoint: architecture, parameters, dimensions, where its data came from, metrics."""
    from convlens.sae.base import read_sae_metadata

    metadata = read_sae_metadata(path)
    if as_json:
        echo_json(metadata)
        return
    params = {k: v for k, v in metadata.get("params", {}).items() if k not in ("input_dim", "latent_dim")}
    store = metadata.get("store") or {}
    model = metadata.get("model") or {}
    lines = [
        f"sae:        {metadata['sae']} ({metadata['input_dim']} -> {metadata['latent_dim']} latents)",
        f"parameters: {', '.join(f'{k}={v}' for k, v in params.items()) or '-'}",
        f"model:      {model.get('name', '-') if isinstance(model, dict) else model}, "
        f"layer {metadata.get('layer', '-')}",
        f"store:      {store.get('path', '-')} ({store.get('samples', '?')} samples, "
        f"manifest {store.get('manifest_sha256', '-')})",
        f"training:   {metadata.get('steps', '?')} steps",
    ]
    metrics = metadata.get("metrics") or {}
    if metrics:
        lines.append(
            "metrics:    "
            + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        )
    click.echo("\n".join(lines))


@click.command("evaluate-sae", cls=ModelOptionsCommand)
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model plugin name, or a train-model run folder. Its options follow as --model-NAME.",
)
@click.option("--layer", default=None, help="Layer the SAE was trained on (default: the one in its checkpoint).")
@click.option(
    "--sae",
    "sae_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="SAE checkpoint (sae.safetensors of a train-sae run).",
)
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Image folder.")
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluate on a seeded random subset of this many images (default: every image).",
)
@click.option(
    "--ablate",
    default="8",
    show_default=True,
    help="Latents to zero one at a time: a count (the most active) or a comma-separated list of ids.",
)
@click.option("--ablation-images", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--out", "-o", default=None, type=click.Path(dir_okay=False), help="Also write the result to this JSON file."
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="Image-decoding processes.")
@click.option("--force", is_flag=True, help="Evaluate an SAE trained on another model or layer (with a warning).")
@click.option("--json", "as_json", is_flag=True, help="Output the result as JSON.")
def evaluate_sae_command(
    model_name: str,
    layer: str | None,
    sae_path: str,
    data: str,
    max_images: int | None,
    ablate: str,
    ablation_images: int,
    batch_size: int,
    out: str | None,
    seed: int,
    device: str | None,
    workers: int,
    force: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Splice an SAE into its model: top-1 and KL divergence with the layer replaced by the SAE reconstruction,
    against the model alone and the layer zero-ablated; and each ablated latent's effect on the class logits."""
    from pathlib import Path

    from convlens.core.errors import ConvlensError
    from convlens.data.images import scan_images
    from convlens.runtime.device import resolve_device
    from convlens.runtime.run_records import write_json_atomic
    from convlens.sae.base import load_sae
    from convlens.sae.evaluation import evaluate_splice
    from convlens.sae.provenance import check_sae_target, trained_layer

    from .plugin_options import load_model

    try:
        latents: Any = int(ablate)
    except ValueError:
        try:
            latents = [int(part) for part in ablate.split(",") if part.strip()]
        except ValueError:
            raise ConvlensError(
                f"--ablate '{ablate}' is neither a count nor a comma-separated list of latent ids"
            ) from None
    bundle, model_record = load_model(model_name, options)
    layer = layer or trained_layer(sae_path) or bundle.default_layer
    resolved_device = resolve_device(device)
    sae = load_sae(sae_path, input_dim=layer_channels(bundle, layer, model_record["name"]), device=resolved_device)
    check_sae_target(sae_path, model_record, layer, force=force)
    result = evaluate_splice(
        bundle,
        sae,
        layer,
        scan_images(data),
        batch_size=batch_size,
        max_images=max_images,
        ablate=latents,
        ablation_images=ablation_images,
        seed=seed,
        device=resolved_device,
        workers=workers,
    )
    result = {"model": model_record, "sae": str(sae_path), **result}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out), result)
    if as_json:
        echo_json(result)
        return
    top1 = result["top1"]
    accuracy = (
        f"top-1 {100 * top1['model']:.1f} % alone, {100 * top1['sae']:.1f} % with the SAE (drop "
        f"{100 * result['top1_drop']:.1f} points), {100 * top1['zero']:.1f} % with the layer zeroed; "
        if top1["model"] is not None
        else "no labels, so no top-1; "
    )
    recovered = f" ({100 * result['kl_recovered']:.1f} % recovered)" if result["kl_recovered"] is not None else ""
    click.echo(
        f"{accuracy}KL(model || SAE) {result['kl_sae']:.4g} nats against {result['kl_zero_ablation']:.4g} "
        f"for zero ablation{recovered}; layer variance explained {100 * (result['layer_fve'] or 0):.1f} %, "
        f"L0 {result['layer_l0']:.1f}; {result['images']} images at {layer}" + (f"; wrote {out}" if out else "")
    )
    for entry in result.get("ablation", []):
        lowered = ", ".join(f"{c['class']} {c['change']:+.3g}" for c in entry.get("most_lowered", []))
        click.echo(
            f"  latent {entry['latent']}: active on {entry['images_active']} images; zeroing it lowers {lowered or '-'}"
        )


def layer_channels(bundle: Any, layer: str, model_name: str) -> int | None:
    """The channels of ``layer``'s output (one blank image through the model), or None when it has no axis 1."""
    import torch

    from convlens.models.layers import activations_at

    probe = activations_at(
        bundle.module.eval(), torch.zeros(1, 3, *bundle.input_size), layer, model_name=model_name
    ).activations[layer]
    return int(probe.shape[1]) if probe.ndim > 1 else None


class SweepCommand(TrainSAECommand):
    """The training options, and no plugin named on the command line (configurations come from a file)."""

    plugin_flags = ()


@click.command("sweep", cls=SweepCommand)
@click.option(
    "--store",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Activation store written by `convlens extract`.",
)
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help='JSON list of {"sae": NAME, "params": {...}, "group": ...} (default: --preset paper).',
)
@click.option(
    "--preset",
    default="paper",
    show_default=True,
    help="A sweep preset of convlens/recipes/defaults.toml; 'paper': the paper's frontier and L1 latent-size "
    "and clip ablations (Figures 16-17).",
)
@click.option(
    "--val-store",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Validate on this store's validation split instead.",
)
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False), help="Run folder (default: runs/sweep).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option("--json", "as_json", is_flag=True, help="Output the sweep's results as JSON.")
def sweep_command(
    store: str,
    config_file: str | None,
    preset: str,
    val_store: str | None,
    out: str | None,
    device: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Train several SAE configurations in one pass over a store; write the sparsity/fidelity Pareto frontier
    (pareto.png, Figure 16), the ablation curves (ablations.png, Figure 17) and sweep.json."""
    import json
    from pathlib import Path

    from convlens.activations.store import ActivationStore
    from convlens.core.errors import ConvlensError
    from convlens.runtime.device import resolve_device
    from convlens.sae.sweep import run_sweep
    from convlens.sae.training import build_sae
    from convlens.workflow.recipes import sweep_preset

    training = coerce(_training_params(), values_from_click(options, TRAIN_PREFIX), owner="sweep")
    if config_file:
        try:
            configs = json.loads(Path(config_file).read_text())
        except json.JSONDecodeError as exc:
            raise ConvlensError(f"cannot read {config_file}: {exc}") from None
        if not isinstance(configs, list) or not all(isinstance(c, dict) and "sae" in c for c in configs):
            raise ConvlensError(f"{config_file} must hold a JSON list of objects with an 'sae' key")
    else:
        configs = sweep_preset(preset, place="--preset")
    activations = ActivationStore(store)
    validation = ActivationStore(val_store) if val_store else None
    out = out or default_run_folder("sweep")
    click.get_current_context().with_resource(output_lock(out, command="sweep"))
    result = run_sweep(
        configs,
        lambda config: build_sae(config["sae"], config.get("params", {}), activations.dim, training.seed),
        activations,
        out,
        training,
        val_store=validation,
        device=resolve_device(device),
    )
    if as_json:
        echo_json(result)
        return
    for row in result["configs"]:
        state = (
            f"failed: {row['failed']}"
            if row["failed"]
            else (f"L0 {row['l0']:.1f}, variance explained {100 * row['fve']:.1f} %" if row["fve"] is not None else "-")
        )
        click.echo(f"  {row['label']}: {state}")
    click.echo(
        f"swept {len(result['configs'])} SAE configurations ({result['trained']} distinct, trained side by "
        f"side) for {result['steps']} steps in "
        f"{result['seconds']:.1f} s; wrote {out}/sweep.json, pareto.png"
        + (", ablations.png" if result["ablations"] else "")
    )
