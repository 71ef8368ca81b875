"""``convlens compare-filters``: how activation filters agree on the same images, and how well they find objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from convlens.core.component_registry import default_registry
from convlens.core.errors import ConvlensError
from convlens.runtime.locks import output_lock

from .output import echo_json
from .plugin_options import PluginOptionsCommand, load_model
from .run_folders import default_run_folder


def parse_filter_options(values: tuple[str, ...], names: list[str]) -> dict[str, dict[str, str]]:
    """``FILTER.PARAM=VALUE`` strings grouped by filter; each filter must be one of ``names``."""
    grouped: dict[str, dict[str, str]] = {name: {} for name in names}
    for value in values:
        key, sep, setting = value.partition("=")
        filter_name, dot, param = key.partition(".")
        if not sep or not dot or not param:
            raise ConvlensError(f"--filter-option '{value}' is not of the form FILTER.PARAM=VALUE")
        if filter_name not in grouped:
            raise ConvlensError(
                f"--filter-option '{value}' names '{filter_name}', which is not among --filters ({', '.join(names)})"
            )
        grouped[filter_name][param.replace("-", "_")] = setting
    return grouped


@click.command("compare-filters", cls=PluginOptionsCommand)
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model plugin name, or a train-model run folder. Its options follow as --model-NAME.",
)
@click.option("--layer", default=None, help="Layer to compare at (default: the model's default layer).")
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Image folder; with a concepts.json (e.g. `convlens data shapes`) foreground precision is scored.",
)
@click.option(
    "--filters",
    "filter_list",
    default="magnitude,active-count,max,median,gradcam",
    show_default=True,
    help="Comma-separated filters to compare.",
)
@click.option(
    "--filter-option",
    "filter_options",
    multiple=True,
    metavar="FILTER.PARAM=VALUE",
    help="A filter's own option, e.g. median.threshold=0.5 (repeatable).",
)
@click.option(
    "--per-image",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per image for foreground precision (default: H x W of the layer, as extract draws).",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=None,
    help="Compare on a seeded random subset of this many images (default: every image).",
)
@click.option(
    "--overlays",
    default=4,
    show_default=True,
    type=click.IntRange(min=0),
    help="Images drawn with every filter's patch weights and ranks (Figure 8).",
)
@click.option(
    "--foreground-threshold",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="A patch counts as foreground when at least this share of its pixels is.",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="Run folder (default: runs/compare-filters-LAYER).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="Image-decoding processes.")
@click.option("--json", "as_json", is_flag=True, help="Output the result as JSON.")
def compare_filters_command(
    model_name: str,
    layer: str | None,
    data: str,
    filter_list: str,
    filter_options: tuple[str, ...],
    per_image: int | None,
    max_images: int | None,
    overlays: int,
    foreground_threshold: float,
    batch_size: int,
    out: str | None,
    seed: int,
    device: str | None,
    workers: int,
    as_json: bool,
    **options: Any,
) -> None:
    """Compare activation filters on the same images (paper sec. 7.3, Figures 8 and 9).

    Writes comparison.json (per-image cosine similarity and Spearman rank correlation of every pair, averaged;
    fallback rates; foreground precision against uniform sampling when the data has masks), cosine.png,
    spearman.png, foreground-precision.png and overlays/ with each filter's patch weights and ranks.
    """
    from convlens.activations.filter_comparison import ComparisonSettings, compare_filters
    from convlens.data.concepts import load_concepts
    from convlens.data.images import DATASET_FILE, scan_images
    from convlens.runtime.device import resolve_device

    registry = default_registry()
    names = [name.strip() for name in filter_list.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ConvlensError(f"--filters names a filter twice: {filter_list}")
    if len(names) < 2:
        raise ConvlensError("--filters needs at least two filters, e.g. magnitude,median")
    params = parse_filter_options(filter_options, names)
    filters = {name: registry.create("filter", name, **params[name]) for name in names}
    bundle, model_record = load_model(model_name, options)
    layer = layer or bundle.default_layer
    index = scan_images(data)
    concepts = load_concepts(data) if (Path(data) / DATASET_FILE).is_file() else None
    settings = ComparisonSettings(
        layer=layer,
        per_image=per_image,
        seed=seed,
        batch_size=batch_size,
        max_images=max_images,
        overlays=overlays,
        foreground_threshold=foreground_threshold,
    )
    out = out or default_run_folder(f"compare-filters-{layer}")
    click.get_current_context().with_resource(output_lock(out, command="compare-filters"))
    filter_records = {
        name: {"name": registry.get("filter", name).qualified_name, "params": f.params.to_dict() if f.params else {}}
        for name, f in filters.items()
    }
    result = compare_filters(
        bundle,
        filters,
        index,
        out,
        settings,
        concepts=concepts,
        device=resolve_device(device),
        workers=workers,
        run_info={
            "model": model_record,
            "filter_settings": filter_records,
            "dataset": {"root": str(index.root), "fingerprint": index.fingerprint()},
        },
    )
    if as_json:
        echo_json({"out": str(out), **result})
        return
    for line in result["findings"]:
        click.echo(line)
    masks = "" if result["foreground_precision"] else " (no concepts.json: foreground precision not scored)"
    click.echo(
        f"compared {len(names)} filters at {layer} {tuple(result['grid'])} on {result['images']} images in "
        f"{result['seconds']:.1f} s{masks}; wrote {out}/comparison.json, cosine.png, spearman.png"
        f"{', foreground-precision.png' if result['foreground_precision'] else ''} and "
        f"{len(result['overlays'])} overlays"
    )
    if result["skipped"]:
        click.echo(
            f"skipped {len(result['skipped'])} unreadable files: "
            + ", ".join(f"{s['path']} ({s['reason']})" for s in result["skipped"][:5])
        )
