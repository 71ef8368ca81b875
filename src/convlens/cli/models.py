"""``convlens layers MODEL [model options]``: a model's named layers with their output shapes."""

from __future__ import annotations

from typing import Any

import click

from convlens.core.component_registry import default_registry

from .base import ComponentGroup
from .output import echo_json, echo_table


def _layers(component: Any, params: dict[str, Any], as_json: bool) -> None:
    from convlens.models.layers import layer_table

    bundle = default_registry().create("model", component.qualified_name, **params)
    rows = layer_table(bundle.module, bundle.input_size)
    if as_json:
        echo_json(
            {
                "model": component.name,
                "input_size": list(bundle.input_size),
                "default_layer": bundle.default_layer,
                "layers": rows,
            }
        )
        return
    echo_table(
        ["NAME", "TYPE", "OUTPUT", "PARAMS"],
        [
            (
                r["name"] + (" (default)" if r["name"] == bundle.default_layer else ""),
                r["type"],
                ("x".join(map(str, r["output_shape"])) if r["output_shape"] else "-")
                + (f" (runs {r['calls']}x: last shown)" if r["calls"] > 1 else ""),
                r["params"],
            )
            for r in rows
        ],
    )
    click.echo(
        f"{len(rows)} layers of {component.name} for input 3x{bundle.input_size[0]}x{bundle.input_size[1]}; "
        f"default layer: {bundle.default_layer}"
    )


layers = ComponentGroup(
    "layers",
    kind="model",
    run=_layers,
    shared_params=[click.Option(["--json", "as_json"], is_flag=True, help="Output JSON.")],
    help="List a model's named layers with their output shapes for the model's input size.\n\n"
    "`convlens layers MODEL --help` lists that model's own options.",
)
