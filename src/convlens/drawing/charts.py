"""Small PNG charts drawn with Pillow (line and bar charts, matrices, heat-map overlays) for run folders and reports."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
INK = (40, 40, 40)
GRID = (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"


def line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (560, 360),
) -> Image.Image:
    """Lines with markers, a legend, and axes with round ticks; non-finite points are left out."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    small, medium = _font(11), _font(13)
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    xs_all = [p[0] for p in points] or [0.0, 1.0]
    ys_all = [p[1] for p in points] or [0.0, 1.0]
    x_ticks = nice_ticks(min(xs_all), max(xs_all), 6)
    y_ticks = nice_ticks(min(ys_all), max(ys_all), 5)
    left, right, top, bottom = 58, width - 16, 30, height - 44
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.text((width / 2, 8), title, fill=INK, font=medium, anchor="mt")
    for tick in y_ticks:
        _, py = to_pixel(x0, tick)
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.text((left - 6, py), _label(tick), fill=INK, font=small, anchor="rm")
    for tick in x_ticks:
        px, _ = to_pixel(tick, y0)
        draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
        draw.text((px, bottom + 7), _label(tick), fill=INK, font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2, height - 6), xlabel, fill=INK, font=small, anchor="mb")
    label_layer = Image.new("RGBA", (bottom - top, 16), (255, 255, 255, 0))
    ImageDraw.Draw(label_layer).text(((bottom - top) / 2, 8), ylabel, fill=INK, font=small, anchor="mm")
    rotated = label_layer.rotate(90, expand=True)
    image.paste(rotated, (4, top), rotated)
    for number, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[number % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)
        legend_y = top + 8 + 16 * number
        draw.line([(left + 10, legend_y), (left + 28, legend_y)], fill=colour, width=3)
        draw.text((left + 33, legend_y), name, fill=INK, font=small, anchor="lm")
    return image


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    xlabel: str,
    colour: tuple[int, int, int] = PALETTE[0],
    size: tuple[int, int] | None = None,
    maximum: float | None = None,
) -> Image.Image:
    """Horizontal bars, one per label from the top, with the value printed at the end of each bar."""
    small, medium = _font(11), _font(13)
    row = 20
    width, height = size or (420, 60 + row * max(len(labels), 1))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    label_width = max([draw.textlength(label, font=small) for label in labels] + [20]) + 12
    left, right, top = label_width, width - 50, 30
    top_value = maximum if maximum is not None else max([v for v in values if math.isfinite(v)] + [1e-12])
    draw.text((width / 2, 8), title, fill=INK, font=medium, anchor="mt")
    for number, (label, value) in enumerate(zip(labels, values)):
        y = top + number * row
        length = 0.0 if not math.isfinite(value) else max(value, 0.0) / top_value * (right - left)
        draw.rectangle([left, y + 3, left + length, y + row - 3], fill=colour)
        draw.text((left - 6, y + row / 2), label, fill=INK, font=small, anchor="rm")
        draw.text((left + length + 4, y + row / 2), f"{value:.3g}", fill=INK, font=small, anchor="lm")
    draw.text(((left + right) / 2, height - 6), xlabel, fill=INK, font=small, anchor="mb")
    return image


def side_by_side(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    height = max(image.height for image in images)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
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
        sheet.paste(picture, (column * (width + gap), row * (height + gap)))
    return sheet
