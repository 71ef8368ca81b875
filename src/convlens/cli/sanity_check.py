"""``convlens sanity-check METHOD``: cascading parameter randomisation for any attribution visualizer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from convlens.core.component_registry import default_registry
from convlens.core.errors import ConvlensError
from convlens.core.params import values_from_click
from convlens.runtime.locks import output_lock

from .output import echo_json, echo_table
from .plugin_options import load_model
from .run_folders import default_run_folder
from .visualize import VISUALIZER_PREFIX, VisualizeCommand


@click.command("sanity-check", cls=VisualizeCommand)
@click.argument("method")
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model plugin name, or a train-model run folder. Its options follow as --model-NAME.",
)
@click.option("--layer", default=None, help="Layer the method explains at (default: the model's default layer).")
@click.option("--data", required=True, type=click.Path(exists=True), help="An image file or an image folder.")
@click.option(
    "--max-images",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images explained at every step (the first ones of --data).",
)
@click.option(
    "--baseline",
    default="edge-detector",
    show_default=True,
    help="A second attribution visualizer run through the same check ('none': no baseline).",
)
@click.option(
    "--depth",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Randomise modules this many levels down (1: the model's top-level blocks).",
)
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="Output folder (default: runs/sanity-check-METHOD-LAYER).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the re-initialisations.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def sanity_check_command(
    method: str,
    model_name: str,
    layer: str | None,
    data: str,
    max_images: int,
    baseline: str,
    depth: int,
    out: str | None,
    seed: int,
    device: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Randomise the model's blocks from the output down and measure how much METHOD's maps change (Adebayo et
    al. 2018): the Spearman rank correlation of each map with the trained model's. METHOD's own options follow it.

    Example: convlens sanity-check gradcam --model tiny-cnn --layer block3 --data shapes/
    """

    from convlens.attribution.base import AttributionVisualizer
    from convlens.attribution.sanity_checks import cascade_figures, cascade_record, cascading_randomisation
    from convlens.data.images import Preprocessing, SkipLog, images_at
    from convlens.data.loading import first_images
    from convlens.runtime.device import resolve_device
    from convlens.runtime.run_records import versions, write_json_atomic

    registry = default_registry()
    spec = registry.get("visualizer", method)
    methods = [registry.create("visualizer", method, **values_from_click(options, VISUALIZER_PREFIX))]
    if baseline.lower() != "none":
        methods.append(registry.create("visualizer", baseline))
    for candidate in methods:
        if not isinstance(candidate, AttributionVisualizer):
            raise ConvlensError(
                f"visualizer '{candidate.name}' is not an attribution method (it must subclass "
                "convlens.attribution.base.AttributionVisualizer)"
            )
    bundle, model_record = load_model(model_name, options)
    layer = layer or bundle.default_layer
    target_device = resolve_device(device)
    bundle.module.to(target_device).eval()
    index = images_at(data)
    preprocessing = Preprocessing.of(bundle)
    skip_log = SkipLog(index.root)
    batch = first_images(index, preprocessing, max_images, skip_log)
    out_dir = Path(out) if out else default_run_folder(f"sanity-check-{spec.name}-{layer}")
    click.get_current_context().with_resource(output_lock(out_dir, command="sanity-check"))
    images = batch.images.to(target_device)
    started = time.perf_counter()
    results = cascading_randomisation(
        bundle, methods, images, layer, depth=depth, seed=seed, progress=False if as_json else None
    )
    figures = cascade_figures(results, [preprocessing.to_pil(image) for image in images], out_dir)
    record = {
        "command": "sanity-check",
        "method": spec.qualified_name,
        "baseline": None if len(methods) == 1 else baseline,
        "model": model_record,
        "layer": layer,
        "depth": depth,
        "seed": seed,
        "data": data,
        "images": [index.relative(index.paths[int(p)]) for p in batch.positions],
        "skipped": skip_log.as_json(),
        **cascade_record(results, figures),
        "versions": versions(),
    }
    write_json_atomic(out_dir / "sanity_check.json", record)
    seconds = time.perf_counter() - started
    if as_json:
        echo_json({"out": str(out_dir), "seconds": round(seconds, 3), **record})
        return
    headers = ["step", "randomised"] + [f"{result.method} spearman" for result in results]
    table = [
        [step, name] + [_fixed(result.table()[step]["spearman_mean"]) for result in results]
        for step, name in enumerate(results[0].steps)
    ]
    echo_table(headers, table)
    verdicts = []
    for result in results:
        last = result.table()[-1]["spearman_mean"]
        verdicts.append(f"{result.method} {_fixed(last)}")
    click.echo(
        f"sanity-check at {layer}: {len(images)} images, {len(results[0].steps) - 1} blocks randomised in "
        f"{seconds:.1f} s; Spearman with every block randomised: {', '.join(verdicts)}; wrote the table, "
        f"spearman.png and {len(results)} cascade figures to {out_dir}"
    )


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
