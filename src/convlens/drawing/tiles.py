"""Tiles and labelled grids of equal-sized pictures, shared by the layer-picture visualizers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

TILE_GAP = 2


def tile_size(size: tuple[int, int], tile: int) -> tuple[int, int]:
    """``size`` (width, height) scaled so that its longer side is ``tile``."""
    width, height = size
    longer = max(width, height)
    return max(1, round(width * tile / longer)), max(1, round(height * tile / longer))


def labelled_grid(
    tiles: Sequence[Image.Image], labels: Sequence[str], columns: int | None = None
) -> tuple[Image.Image, list[list[int]]]:
    """Tiles of one size, each titled with its label, in rows of ``columns`` (default: about the square root of
    the count); also each tile's box ``[left, top, right, bottom]`` in the returned image."""
    from convlens.drawing.charts import grid, titled

    columns = min(columns or math.ceil(math.sqrt(len(tiles))), len(tiles))
    cells = [titled(tile, label) for tile, label in zip(tiles, labels)]
    width, height = tiles[0].size
    band = cells[0].height - height
    boxes = []
    for position in range(len(tiles)):
        row, column = divmod(position, columns)
        left, top = column * (width + TILE_GAP), row * (cells[0].height + TILE_GAP) + band
        boxes.append([left, top, left + width, top + height])
    return grid(cells, columns, gap=TILE_GAP), boxes


def titled_to_fit(image: Image.Image, title: str, size: int = 12) -> Image.Image:
    """``charts.titled``, with white added on the right when the title is wider than the image."""
    from PIL import Image, ImageFont

    from convlens.drawing.charts import titled

    width = math.ceil(ImageFont.load_default(size).getlength(title)) + 8
    if width > image.width:
        padded = Image.new("RGB", (width, image.height), "white")
        padded.paste(image, (0, 0))
        image = padded
    return titled(image, title, size)


def shifted(box: list[int], right: int, down: int) -> list[int]:
    return [box[0] + right, box[1] + down, box[2] + right, box[3] + down]
