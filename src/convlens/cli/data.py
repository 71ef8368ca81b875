"""``convlens data shapes``: write the built-in procedurally generated dataset."""

from __future__ import annotations

import click

from convlens.runtime.locks import output_lock

from .output import echo_json


@click.group("data")
def data() -> None:
    """Built-in datasets (generated, never downloaded)."""


@data.command("shapes")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option("--n", "count", default=4000, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--size", default=64, show_default=True, type=click.IntRange(min=16), help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@click.option("--json", "as_json", is_flag=True, help="Output the summary as JSON.")
def shapes(out: str, count: int, size: int, seed: int, as_json: bool) -> None:
    """Shapes of 8 classes in 8 colours on 5 background textures, with foreground masks and concepts.

    Writes OUT/images/<shape>/*.png (an ImageFolder tree), OUT/masks/<shape>/*.png and OUT/concepts.json
    (shape, colour, texture, position, size and rotation per image). Colour and texture are independent of
    the class. Commands that take an image folder accept OUT itself.
    """
    from tqdm.auto import tqdm

    from convlens.data.shapes import write_shapes

    click.get_current_context().with_resource(output_lock(out, command="data shapes"))
    with tqdm(total=count, desc="shapes", unit="img", leave=False, disable=None) as bar:
        summary = write_shapes(out, n=count, size=size, seed=seed, progress=bar.update)
    if as_json:
        echo_json(summary)
        return
    click.echo(
        f"wrote {count} shapes images of {size}x{size} px ({summary['classes']} classes, "
        f"{summary['colours']} colours, {summary['textures']} textures, seed {seed}) with masks and "
        f"concepts.json to {out}"
    )
