"""``convlens apply-filter NAME ACTIVATIONS --out WEIGHTS``: run an activation filter on saved activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from convlens.core.component_registry import default_registry

from .base import ComponentGroup
from .output import echo_json


def _apply(
    component: Any,
    params: dict[str, Any],
    activations: str,
    key: str | None,
    out: str,
    device: str | None,
    as_json: bool,
) -> None:
    from convlens.runtime.tensor_files import apply_filter_to_file

    filter_ = default_registry().create("filter", component.qualified_name, **params)
    summary = apply_filter_to_file(filter_, Path(activations), Path(out), key=key, device=device)
    summary["filter"] = component.qualified_name
    if as_json:
        echo_json(summary)
        return
    n, h, w = summary["shape"]
    click.echo(
        f"wrote weights [{n}, {h}, {w}] of filter '{component.name}' to {out} "
        f"({summary['all_zero_maps']} all-zero and {summary['all_nan_maps']} all-NaN maps of {n})"
    )


apply_filter = ComponentGroup(
    "apply-filter",
    kind="filter",
    run=_apply,
    shared_params=[
        click.Argument(["activations"], type=click.Path(exists=True, dir_okay=False)),
        click.Option(["--key"], default=None, help="Tensor name in the file (default: its only tensor)."),
        click.Option(
            ["--out", "-o"],
            required=True,
            type=click.Path(dir_okay=False),
            help="Output safetensors file with the tensor 'weights' [N, H, W].",
        ),
        click.Option(["--device"], default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)."),
        click.Option(["--json", "as_json"], is_flag=True, help="Output the summary as JSON."),
    ],
    help="Apply an activation filter to activations A[N, C, H, W] saved in a safetensors file.\n\n"
    "`convlens apply-filter NAME --help` lists that filter's own options.",
)
