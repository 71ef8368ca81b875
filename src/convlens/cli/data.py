"""``convlens data``: the generated ``shapes`` dataset, and real data assembled from installed packages."""

from __future__ import annotations

import click

from convlens.runtime.locks import output_lock

from .output import echo_json


@click.group("data")
def data() -> None:
    """Built-in datasets (generated, or assembled from installed packages; never downloaded)."""


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


@data.command("photos")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option("--json", "as_json", is_flag=True, help="Output the summary as JSON.")
def photos(out: str, as_json: bool) -> None:
    """Photographs that installed packages ship, copied byte for byte, with their source and licence.

    Sources (each optional; a missing one is skipped and named): foolbox's 20 labelled ImageNet photos and
    scikit-image's photos (pip install -e ".[real]"), scikit-learn's and matplotlib's sample photos, and the
    natural photographs of Debian's opencv-doc (apt-get install opencv-doc). Writes OUT/<source>_<file> (a flat
    folder: convlens reads it unlabelled) and OUT/photos.json (per file: source, original path, licence, sha256,
    and the ImageNet class index and name where known).
    """
    from convlens.data.real_photos import write_photos

    click.get_current_context().with_resource(output_lock(out, command="data photos"))
    summary = write_photos(out)
    if as_json:
        echo_json(summary)
        return
    sources = ", ".join(f"{name} {count}" for name, count in summary["sources"].items())
    skipped = "".join(
        f"; skipped {item['source']} ({item['reason']}: {item['install']})" for item in summary["skipped"]
    )
    click.echo(
        f"wrote {summary['images']} photos ({summary['imagenet_labelled']} ImageNet-labelled; {sources}) with "
        f"photos.json to {out}{skipped}"
    )


@data.command("fashion-mnist")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option(
    "--n", "count", type=click.IntRange(min=10), help="Number of images, class-balanced  [default: the whole split]"
)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the choice of images with --n.")
@click.option(
    "--source",
    type=click.Path(file_okay=False),
    help="Folder of the gzipped idx files  [default: $CONVLENS_FASHION_MNIST, else /usr/share/datasets/fashion-mnist]",
)
@click.option("--json", "as_json", is_flag=True, help="Output the summary as JSON.")
def fashion_mnist(out: str, count: int | None, split: str, seed: int, source: str | None, as_json: bool) -> None:
    """Fashion-MNIST (Debian's dataset-fashion-mnist) as PNGs, with foreground masks and concepts.json.

    Writes OUT/images/<k>_<class>/<index>.png (an ImageFolder tree numbered as Fashion-MNIST's labels),
    OUT/masks/<k>_<class>/<index>.png (the item's non-zero pixels) and OUT/concepts.json, so that compare-filters
    scores foreground precision on it. --n draws a class-balanced subset: n // 10 images per class (one more for
    the first n % 10 classes), a random choice seeded by --seed and the class.
    """
    from tqdm.auto import tqdm

    from convlens.data.fashion_mnist import source_folder, write_fashion_mnist

    folder = source_folder(source)
    click.get_current_context().with_resource(output_lock(out, command="data fashion-mnist"))
    with tqdm(total=count, desc="fashion-mnist", unit="img", leave=False, disable=None) as bar:
        summary = write_fashion_mnist(out, n=count, split=split, seed=seed, source=folder, progress=bar.update)
    if as_json:
        echo_json(summary)
        return
    click.echo(
        f"wrote {summary['images']} Fashion-MNIST {split} images (10 classes, seed {seed}) with masks and "
        f"concepts.json to {out} (from {folder})"
    )
