"""``convlens circuit``: the subgraph of filters and kernels a unit depends on (the ``circuit`` visualizer)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from convlens.core.component_registry import default_registry
from convlens.core.errors import ConvlensError
from convlens.core.params import click_parameters, values_from_click
from convlens.runtime.locks import output_lock

from .output import echo_json, echo_table
from .plugin_options import ModelOptionsCommand
from .run_folders import default_run_folder
from .visualize import DTYPE_OPTION, VISUALIZER_PREFIX, load_visual_target

METHOD = "circuit"


class CircuitCommand(ModelOptionsCommand):
    """``--model NAME`` adds the model's options; the circuit visualizer's parameters are options too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        self.params = [p for p in self.params if not (p.name or "").startswith(VISUALIZER_PREFIX)]
        reserved = {opt.lstrip("-") for p in self.params for opt in getattr(p, "opts", [])}
        try:
            spec = default_registry().get("visualizer", METHOD).spec.params
        except ConvlensError as exc:
            raise click.UsageError(str(exc), ctx) from exc
        self.params += click_parameters(spec, reserved=reserved, prefix="circuit", dest_prefix=VISUALIZER_PREFIX)
        return super().parse_args(ctx, args)


@click.command("circuit", cls=CircuitCommand)
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model plugin name, or a train-model run folder. Its options follow as --model-NAME.",
)
@click.option("--layer", default=None, help="Layer of the units (default: the model's default layer).")
@click.option(
    "--units",
    default=None,
    help="Units: 0,5,9, ranges 0-7; SAE latents with --sae. Without units, "
    "--class-index K explains the model's loss on class K.",
)
@click.option(
    "--sae",
    "sae_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="An SAE checkpoint trained on this model and --layer (default: its layer): the units are its latents.",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True),
    help="Images the scores are averaged over (and held-out images for the validation).",
)
@click.option(
    "--out", "-o", default=None, type=click.Path(file_okay=False), help="Output folder (default: runs/circuit-LAYER)."
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@DTYPE_OPTION
@click.option("--force", is_flag=True, help="Use an --sae trained on another model or layer (with a warning).")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def circuit_command(
    model_name: str,
    layer: str | None,
    units: str | None,
    sae_path: str | None,
    data: str,
    out: str | None,
    device: str | None,
    dtype: str,
    force: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Score every filter and kernel for a unit (Taylor |activation x gradient|, VISCNN), extract the subgraph that
    keeps the best edges, check it against random and worst subgraphs on held-out images, and write circuit.json,
    an interactive view.html and PNG summaries per unit.

    Example: convlens circuit --model tiny-cnn --layer block3 --units 5 --data shapes/ --sparsity 0.1
    """
    from convlens.runtime.run_records import versions, write_json_atomic

    visualizer = default_registry().create("visualizer", METHOD, **values_from_click(options, VISUALIZER_PREFIX))
    target, model_record, target_device = load_visual_target(
        model_name, layer, units, sae_path, data, device, options, force, dtype
    )
    layer, chosen = target.layer, target.units
    out_dir = Path(out) if out else default_run_folder(f"circuit-{layer}")
    click.get_current_context().with_resource(output_lock(out_dir, command="circuit"))
    write_json_atomic(
        out_dir / "config.json",
        {
            "command": "circuit",
            "params": visualizer.params.to_dict(),
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
    visualizer.progress = False if as_json else None
    started = time.perf_counter()
    record = visualizer.run(target, out_dir)
    seconds = time.perf_counter() - started
    if as_json:
        echo_json({"out": str(out_dir), "seconds": round(seconds, 3), **record})
        return
    if record["validation"]:
        echo_table(
            ["edges kept", "best", "random", "worst"],
            [
                [f"{row['fraction']:.1%}", f"{row['best']:.3f}", f"{row['random']:.3f}", f"{row['worst']:.3f}"]
                for row in record["validation"]
            ],
        )
    views = [f"{out_dir / unit['folder'] / 'view.html'}" for unit in record["units"]]
    what = ", ".join(unit["label"] for unit in record["units"][:3]) + (", ..." if len(record["units"]) > 3 else "")
    click.echo(
        f"circuit of {what} in {seconds:.1f} s: {record['summary']}; open {views[0]}"
        + (f" (and {len(views) - 1} more)" if len(views) > 1 else "")
    )
