"""``convlens rank-units``: a layer's units (or an SAE's latents) ranked by their activation on one image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from convlens.runtime.locks import output_lock

from .output import echo_json, echo_table
from .plugin_options import ModelOptionsCommand, load_model


@click.command("rank-units", cls=ModelOptionsCommand)
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model plugin name, or a train-model run folder. Its options follow as --model-NAME.",
)
@click.option(
    "--image",
    "image_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The image to rank the units on.",
)
@click.option("--layer", default=None, help="Layer (default: the model's default layer).")
@click.option(
    "--sae",
    "sae_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="An SAE checkpoint trained on this layer: its latents are ranked too.",
)
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=1), help="Units listed at each end.")
@click.option(
    "--threshold",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="A unit is active when |activation| exceeds this somewhere in its map.",
)
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="Also write ranking.json and bar charts of the top units into this folder.",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON.")
def rank_units_command(
    model_name: str,
    image_path: str,
    layer: str | None,
    sae_path: str | None,
    top: int,
    threshold: float,
    out: str | None,
    device: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Rank a layer's channels (and an SAE's latents) by the sum over positions of |activation| on one image
    (paper sec. 9.2.4), and count the units that are active at all.

    Example: convlens rank-units --model tiny-cnn --layer block4 --image dog.png --sae sae.safetensors
    """
    from convlens.data.images import Preprocessing, open_rgb
    from convlens.runtime.device import resolve_device
    from convlens.sae.base import load_sae
    from convlens.units.ranking import rank_units

    bundle, model_record = load_model(model_name, options)
    layer = layer or bundle.default_layer
    target_device = resolve_device(device)
    bundle.module.to(target_device).eval()
    image = Preprocessing.of(bundle).eval_transform(open_rgb(image_path)).to(target_device)
    sae = None
    if sae_path:
        from convlens.models.layers import activations_at

        channels = activations_at(bundle.module, image[None], layer).activations[layer].shape[1]
        sae = load_sae(sae_path, input_dim=channels, device=target_device).eval()
    result = {
        "image": image_path,
        "model": model_record,
        "sae": sae_path,
        **rank_units(bundle, image, layer, sae=sae, top=top, threshold=threshold),
    }
    if out:
        _write(Path(out), result)
    if as_json:
        echo_json(result)
        return
    kinds = [("channels", "channel")] + ([("latents", "latent")] if sae is not None else [])
    for key, name in kinds:
        ranked = result[key]
        rows = [
            [f"top {i + 1}", r["unit"], f"{r['magnitude']:.4g}", f"{100 * r['share']:.1f} %"]
            for i, r in enumerate(ranked["top"])
        ]
        rows += [
            [f"least {i + 1}", r["unit"], f"{r['magnitude']:.4g}", f"{100 * r['share']:.1f} %"]
            for i, r in enumerate(ranked["least"])
        ]
        echo_table(["rank", name, "sum |activation|", "share"], rows)
        click.echo("")
    counts = "; ".join(
        f"{result[key]['active']} of {result[key]['units']} {key} active "
        f"({100 * result[key]['active_share']:.1f} %), top {top} carry "
        f"{100 * result[key]['top_share']:.1f} % of the total"
        for key, _ in kinds
    )
    click.echo(f"rank-units at {layer} on {image_path}: {counts}" + (f"; wrote {out}" if out else ""))


def _write(out: Path, result: dict[str, Any]) -> None:
    from convlens.drawing.plots import BarPanel, save_chart
    from convlens.runtime.run_records import versions, write_json_atomic

    click.get_current_context().with_resource(output_lock(out, command="rank-units"))
    write_json_atomic(out / "ranking.json", {**result, "versions": versions()})
    for key, name in (("channels", "channel"), ("latents", "latent")):
        if key in result:
            ranked = result[key]["top"]
            chart = BarPanel(
                labels=[f"{name} {r['unit']}" for r in ranked],
                values=[r["magnitude"] for r in ranked],
                title=f"top {len(ranked)} {key} on the image",
                xlabel="sum over positions of |activation|",
                key=f"top-{key}",
            )
            save_chart(chart, out / f"top-{key}.png")
