"""``convlens visualize NAME``: run any visualizer plugin on units of a model's layer (optionally through an SAE)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from convlens.core.component_registry import default_registry
from convlens.core.errors import ConvlensError
from convlens.core.params import click_parameters, values_from_click
from convlens.runtime.locks import output_lock
from convlens.runtime.precision import COMPUTE_DTYPES
from convlens.workflow.visualizing import parse_units as parse_units  # re-exported from its old home
from convlens.workflow.visualizing import visual_target

from .output import echo_json
from .plugin_options import MODEL_PREFIX, PluginOptionsCommand
from .run_folders import default_run_folder

VISUALIZER_PREFIX = "visualizer__"


class VisualizeCommand(PluginOptionsCommand):
    """``--model NAME`` adds the model's options; the visualizer named first adds its own."""

    plugin_flags = ("--model",)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        self.params = [p for p in self.params if not (p.name or "").startswith(VISUALIZER_PREFIX)]
        if args and not args[0].startswith("-"):
            reserved = {opt.lstrip("-") for p in self.params for opt in getattr(p, "opts", [])}
            try:
                spec = default_registry().get("visualizer", args[0]).spec.params
            except ConvlensError as exc:
                raise click.UsageError(str(exc), ctx) from exc
            self.params += click_parameters(spec, reserved=reserved, prefix="viz", dest_prefix=VISUALIZER_PREFIX)
        return super().parse_args(ctx, args)


DTYPE_OPTION = click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(COMPUTE_DTYPES),
    help="Compute precision: bfloat16 or float16 run the model under autocast (float16 needs a GPU); the outputs "
    "stay float32.",
)


def load_visual_target(
    model_name: str,
    layer: str | None,
    units: str | None,
    sae_path: str | None,
    data: Any,
    device: str | None,
    options: dict[str, Any],
    force: bool = False,
    dtype: str = "float32",
):
    """The :class:`VisualTarget` of the shared options, the model's record and the device: see
    :func:`convlens.workflow.visualizing.visual_target` (the model's ``--model-*`` options are in ``options``)."""
    model_params = values_from_click(options, MODEL_PREFIX)
    return visual_target(
        model_name,
        layer,
        units=units,
        sae=sae_path,
        data=data,
        model_params=model_params,
        device=device,
        dtype=dtype,
        force=force,
    )


@click.command("visualize", cls=VisualizeCommand, context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model plugin name, or a train-model run folder. Its options follow as --model-NAME.",
)
@click.option("--layer", default=None, help="Layer (default: the model's default layer).")
@click.option("--units", default=None, help="Units: 0,5,9, ranges 0-7, or all; SAE latents with --sae.")
@click.option(
    "--sae",
    "sae_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="An SAE checkpoint trained on this model and layer (default --layer: its layer): units are its latents.",
)
@click.option(
    "--data",
    default=None,
    type=click.Path(exists=True),
    help="An image file or an image folder, for visualizers that look at images.",
)
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="Output folder (default: runs/visualize-NAME-LAYER).",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@DTYPE_OPTION
@click.option("--force", is_flag=True, help="Use an --sae trained on another model or layer (with a warning).")
@click.option("--json", "as_json", is_flag=True, help="Print the visualizer's JSON record.")
def visualize_command(
    name: str,
    model_name: str,
    layer: str | None,
    units: str | None,
    sae_path: str | None,
    data: str | None,
    out: str | None,
    device: str | None,
    dtype: str,
    force: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Run the visualizer NAME (see `convlens list visualizer`) on units of a layer; its own options follow NAME.

    Example: convlens visualize feature-viz --model tiny-cnn --layer block4 --units 0-7 --preset improved
    """
    from convlens.runtime.run_records import versions, write_json_atomic

    registry = default_registry()
    spec = registry.get("visualizer", name)
    visualizer_params = values_from_click(options, VISUALIZER_PREFIX)
    visualizer = registry.create("visualizer", name, **visualizer_params)
    if getattr(visualizer, "needs_data", False) and data is None:
        raise ConvlensError(f"visualizer '{spec.name}' looks at images: pass --data (an image file or folder)")
    target, model_record, target_device = load_visual_target(
        model_name, layer, units, sae_path, data, device, options, force, dtype
    )
    layer, chosen, sae = target.layer, target.units, target.sae
    out_dir = Path(out) if out else default_run_folder(f"visualize-{spec.name}-{layer}")
    click.get_current_context().with_resource(output_lock(out_dir, command="visualize"))
    write_json_atomic(
        out_dir / "config.json",
        {
            "command": "visualize",
            "visualizer": {
                "name": spec.qualified_name,
                "params": visualizer.params.to_dict() if visualizer.params is not None else {},
            },
            "model": model_record,
            "layer": layer,
            "units": list(chosen),
            "sae": sae_path,
            "data": data,
            "device": str(target_device),
            "dtype": dtype,
            "versions": versions(),
        },
    )
    visualizer.progress = None if not as_json else False
    started = time.perf_counter()
    record = visualizer.run(target, out_dir)
    seconds = time.perf_counter() - started
    if as_json:
        echo_json({"out": str(out_dir), "seconds": round(seconds, 3), **record})
        return
    pictures = sum(1 for _ in out_dir.rglob("*.png"))
    what = f"{len(chosen)} {'latents' if sae is not None else 'units'} of " if chosen else ""
    rendered = f" ({len(record['objectives'])} objectives)" if isinstance(record.get("objectives"), list) else ""
    detail = f"; {record['summary']}" if record.get("summary") else ""
    click.echo(
        f"{spec.name}: {what}{layer}{rendered} in {seconds:.1f} s{detail}; wrote {pictures} PNG files "
        f"and the JSON record to {out_dir}"
    )
