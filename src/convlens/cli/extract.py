"""``convlens extract``: sample a layer's activations by a filter into an activation store."""

from __future__ import annotations

from typing import Any, Literal

import click

from convlens.core.component_registry import default_registry
from convlens.core.params import values_from_click
from convlens.data.loading import DECODE_MODES
from convlens.runtime.locks import output_lock
from convlens.runtime.precision import COMPUTE_DTYPES

from .output import echo_json
from .plugin_options import FILTER_PREFIX, PluginOptionsCommand, load_model
from .run_folders import default_run_folder


@click.command("extract", cls=PluginOptionsCommand)
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model plugin name, or a train-model run folder. Its options follow as --model-NAME.",
)
@click.option("--layer", default=None, help="Layer to sample (default: the model's default layer).")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Image folder.")
@click.option(
    "--filter",
    "filter_name",
    default="magnitude",
    show_default=True,
    help="Activation filter; its own options follow (see --filter NAME --help).",
)
@click.option(
    "--per-image",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per image, drawn with replacement (default: H x W of the layer).",
)
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="Store folder (default: runs/activations-LAYER-FILTER).",
)
@click.option(
    "--val-fraction",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 0.9),
    help="Share of images whose samples form the validation split.",
)
@click.option("--images-per-shard", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Image-decoding processes (up to the number of cores; 0: decode in this process).",
)
@click.option(
    "--decode",
    default="auto",
    show_default=True,
    type=click.Choice(DECODE_MODES),
    help="Where JPEGs are decoded, resized and cropped: on the device (nvJPEG on CUDA), on the CPU in the loader "
    "workers, or auto (device on CUDA, else cpu). Device pixels match the CPU's within 1 grey level.",
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(COMPUTE_DTYPES),
    help="Compute precision of the forward pass (autocast; float16 needs a GPU).",
)
@click.option(
    "--store-dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Precision of the stored activation vectors.",
)
@click.option("--save-maps", is_flag=True, help="Also store every image's full filter map.")
@click.option(
    "--on-nonfinite",
    default="skip",
    show_default=True,
    type=click.Choice(["skip", "stop"]),
    help="An image whose activations hold NaN or inf: leave it out and list it (skip), or stop naming it (stop).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option("--json", "as_json", is_flag=True, help="Output the summary as JSON.")
def extract(
    model_name: str,
    layer: str | None,
    data: str,
    filter_name: str,
    per_image: int | None,
    out: str | None,
    val_fraction: float,
    images_per_shard: int,
    batch_size: int,
    workers: int,
    decode: str,
    dtype: str,
    store_dtype: str,
    save_maps: bool,
    on_nonfinite: Literal["skip", "stop"],
    seed: int,
    device: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Sample a layer's activation vectors, weighted by an activation filter, into an activation store.

    Runs data-parallel under torchrun (e.g. `torchrun --nproc-per-node 2 -m convlens extract ...`); re-running
    the same command after an interruption completes the store without duplicating or losing samples.
    """
    from convlens.activations.extraction import NONFINITE_REASON, ExtractionSettings
    from convlens.activations.extraction import extract as run_extraction
    from convlens.data.images import scan_images
    from convlens.runtime.device import resolve_device

    registry = default_registry()
    bundle, model_record = load_model(model_name, options)
    filter_params = values_from_click(options, FILTER_PREFIX)
    filter_ = registry.create("filter", filter_name, **filter_params)
    component = registry.get("filter", filter_name)
    layer = layer or bundle.default_layer
    index = scan_images(data)
    settings = ExtractionSettings(
        model=model_record,
        layer=layer,
        filter={"name": component.qualified_name, "params": filter_.params.to_dict() if filter_.params else {}},
        per_image=per_image,
        seed=seed,
        val_fraction=val_fraction,
        images_per_shard=images_per_shard,
        batch_size=batch_size,
        save_maps=save_maps,
        dtype=store_dtype,
        compute_dtype=dtype,
    )
    out = out or default_run_folder(f"activations-{layer}-{component.name}")
    click.get_current_context().with_resource(output_lock(out, command="extract"))
    summary = run_extraction(
        bundle,
        filter_,
        index,
        out,
        settings,
        device=resolve_device(device),
        workers=workers,
        decode=decode,
        dataset={"root": str(index.root), "fingerprint": index.fingerprint()},
        on_nonfinite=on_nonfinite,
    )
    manifest = summary.pop("manifest")
    if summary["rank"] != 0:
        return
    if as_json:
        echo_json(
            {
                **summary,
                "total_samples": manifest["samples"],
                "total_fallbacks": manifest["fallbacks"],
                "skipped_files": manifest["skipped"],
            }
        )
        return
    rate = f", {summary['images_per_second']:.0f} images/s" if summary["images_per_second"] else ""
    click.echo(
        f"extracted {summary['samples']} samples of {layer} ({manifest['channels']} channels) from "
        f"{summary['images']} images with filter '{component.name}' in {summary['seconds']:.1f} s{rate}; "
        f"{summary['fallbacks']} uniform fallbacks; {summary['chunks_reused']} shards reused; store {out} "
        f"holds {manifest['samples']} samples of {manifest['images_used']} images"
    )
    nonfinite = [s for s in manifest["skipped"] if s["reason"].startswith(NONFINITE_REASON)]
    unreadable = [s for s in manifest["skipped"] if s not in nonfinite]
    for skipped, what in ((unreadable, "unreadable files"), (nonfinite, "images with non-finite activations")):
        if skipped:
            items = ", ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            click.echo(f"skipped {len(skipped)} {what}: {items}{more}")
