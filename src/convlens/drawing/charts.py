"""Pictures drawn with Pillow: matrices, heat-map overlays, titles, grids, and the colours shared with the line and
bar charts of :mod:`convlens.drawing.plots`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
INK = (40, 40, 40)
GRID = (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)


def side_by_side(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    height = max(image.height for image in images)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0), image if image.mode == "RGBA" else None)  # RGBA drawn over the white
        x += image.width + gap
    return canvas


def _diverging(value: float, low: float, high: float) -> tuple[int, int, int]:
    """Blue (low) through white (the middle) to red (high)."""
    if not math.isfinite(value):
        return (200, 200, 200)
    middle = (low + high) / 2
    if value >= middle:
        t = min((value - middle) / ((high - middle) or 1.0), 1.0)
        return (255, round(255 - t * (255 - 60)), round(255 - t * (255 - 50)))
    t = min((middle - value) / ((middle - low) or 1.0), 1.0)
    return (round(255 - t * (255 - 50)), round(255 - t * (255 - 110)), 255)


def heatmap(
    matrix: Sequence[Sequence[float]],
    labels: Sequence[str],
    *,
    title: str,
    low: float = -1.0,
    high: float = 1.0,
    cell: int = 56,
) -> Image.Image:
    """A square matrix as coloured cells with their values printed; undefined (non-finite) cells read n/a."""
    small, medium = _font(11), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = int(max([probe.textlength(label, font=small) for label in labels] + [20])) + 12
    count = len(labels)
    left, top = label_width, 34
    width = max(left + cell * count + 12, int(probe.textlength(title, font=medium)) + 20)
    height = top + cell * count + label_width
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, 8), title, fill=INK, font=medium, anchor="mt")
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            x, y = left + column * cell, top + row * cell
            draw.rectangle([x, y, x + cell, y + cell], fill=_diverging(value, low, high), outline="white")
            text = f"{value:.2f}" if math.isfinite(value) else "n/a"
            draw.text((x + cell / 2, y + cell / 2), text, fill=INK, font=small, anchor="mm")
    for number, label in enumerate(labels):
        draw.text((left - 6, top + number * cell + cell / 2), label, fill=INK, font=small, anchor="rm")
        label_layer = Image.new("RGBA", (label_width, 16), (255, 255, 255, 0))
        ImageDraw.Draw(label_layer).text((label_width - 6, 8), label, fill=INK, font=small, anchor="rm")
        rotated = label_layer.rotate(90, expand=True)
        image.paste(rotated, (left + number * cell + cell // 2 - 8, top + cell * count + 4), rotated)
    return image


def enlarge(image: Image.Image, longest_side: int = 256) -> Image.Image:
    """``image`` scaled (bilinear) so that its longest side is ``longest_side`` pixels."""
    scale = longest_side / max(image.size)
    return image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)


def titled(image: Image.Image, title: str, size: int = 12) -> Image.Image:
    """``image`` with a line of text above it."""
    band = size + 8
    canvas = Image.new("RGB", (image.width, image.height + band), "white")
    canvas.paste(image, (0, band))
    ImageDraw.Draw(canvas).text((image.width / 2, band / 2), title, fill=INK, font=_font(size), anchor="mm")
    return canvas


# Piecewise-linear approximation of the 'turbo' colour map (dark blue - cyan - green - yellow - red).
HEAT_STOPS = (
    (0.0, (48, 18, 59)),
    (0.15, (70, 107, 227)),
    (0.35, (27, 208, 213)),
    (0.5, (97, 252, 108)),
    (0.65, (210, 233, 53)),
    (0.8, (254, 155, 45)),
    (1.0, (122, 4, 3)),
)


def heat_colours(values):
    """RGB uint8 ``[..., 3]`` for values in [0, 1] (clipped; NaN reads as 0)."""
    import numpy as np

    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    positions = [stop for stop, _ in HEAT_STOPS]
    channels = [np.interp(values, positions, [colour[c] for _, colour in HEAT_STOPS]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def heat_overlay(image: Image.Image, values, alpha: float = 0.5) -> Image.Image:
    """``values [h, w]`` in [0, 1] resized (bilinear) to the image and blended over it with weight ``alpha``."""
    import numpy as np

    values = np.asarray(values, dtype=np.float32)
    if values.shape != (image.height, image.width):
        values = np.asarray(Image.fromarray(values, "F").resize(image.size, Image.BILINEAR))
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - alpha) * base + alpha * heat_colours(values).astype(np.float32)
    return Image.fromarray(np.rint(blended).clip(0, 255).astype(np.uint8), "RGB")


def grid(images: Sequence[Image.Image], columns: int, gap: int = 2, background: str = "white") -> Image.Image:
    """Images of one size in rows of ``columns``."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), background)
    for position, picture in enumerate(images):
        row, column = divmod(position, columns)
        sheet.paste(
            picture, (column * (width + gap), row * (height + gap)), picture if picture.mode == "RGBA" else None
        )
    return sheet
