"""The built-in ``shapes`` dataset: procedurally generated images with ground-truth concepts.

Each image shows one shape (the class) in one colour on one background texture. Colour, texture, position,
scale and rotation are drawn independently of the class, from a generator seeded by (seed, image index), so
the same seed writes the same bytes whatever the number of images generated before. Every image has a
foreground mask, and ``concepts.json`` records its shape, colour and texture: shape and colour concepts
cover the foreground, the texture concept covers the background (see :mod:`convlens.data.concepts`).

Layout written by :func:`write_shapes`::

    DIR/concepts.json               categories, regions and one record per image
    DIR/images/<shape>/<i>.png      an ImageFolder tree (the class is the shape)
    DIR/masks/<shape>/<i>.png       foreground masks, 0 or 255
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convlens.core.errors import ConvlensError
from convlens.data.images import save_png
from convlens.runtime.locks import holds_files

SHAPES = ("circle", "triangle", "square", "star", "cross", "ring", "crescent", "heart")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 185, 60),
    "cyan": (40, 205, 215),
    "blue": (50, 80, 235),
    "magenta": (215, 50, 200),
    "white": (245, 245, 245),
}
TEXTURES = ("plain", "stripes", "checks", "dots", "noise")
FORMAT = "convlens-concepts/1"
SUPERSAMPLE = 4


def _regular_polygon(sides: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / sides), radius * math.sin(phase + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    outer = _regular_polygon(points)
    inner_points = _regular_polygon(points, inner, -math.pi / 2 + math.pi / points)
    return [p for pair in zip(outer, inner_points) for p in pair]


def _cross(arm: float = 0.32) -> list[tuple[float, float]]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _heart(samples: int = 96) -> list[tuple[float, float]]:
    points = []
    for k in range(samples):
        t = 2 * math.pi * k / samples
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17.0, -(y + 2.5) / 17.0))
    return points


# Each shape is a list of (polygon in unit coordinates, fill): fill 0 cuts a hole into what came before.
_SHAPE_PARTS: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_regular_polygon(96, 0.9), 255)],
    "triangle": [(_regular_polygon(3, 1.0, -math.pi / 2), 255)],
    "square": [(_regular_polygon(4, 0.95, math.pi / 4), 255)],
    "star": [(_star(), 255)],
    "cross": [(_cross(), 255)],
    "ring": [(_regular_polygon(96, 0.95), 255), (_regular_polygon(96, 0.55), 0)],
    "crescent": [(_regular_polygon(96, 0.95), 255), ([(x + 0.45, y - 0.1) for x, y in _regular_polygon(96, 0.8)], 0)],
    "heart": [(_heart(), 255)],
}


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``[size, size, 3]`` float background in two muted tones of a random hue."""
    hue = rng.uniform(0, 1)
    saturation = rng.uniform(0.05, 0.35)
    value = rng.uniform(0.25, 0.5)
    tone_a = np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255
    tone_b = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.1, 0.1)) % 1, saturation, value + 0.22)) * 255
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if kind == "plain":
        mix = np.zeros((size, size))
    elif kind == "stripes":
        period = rng.uniform(4, 9)
        mix = np.clip(0.5 + 2.0 * np.sin(2 * math.pi * u / period), 0, 1)
    elif kind == "checks":
        cell = rng.uniform(4, 9)
        mix = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
    elif kind == "dots":
        spacing = rng.uniform(6, 11)
        du = (u / spacing) % 1 - 0.5
        dv = (v / spacing) % 1 - 0.5
        mix = np.clip((0.28 - np.hypot(du, dv)) * spacing + 0.5, 0, 1)
    elif kind == "noise":
        from PIL import Image

        coarse = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8))
        mix = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    else:
        raise ConvlensError(f"unknown texture '{kind}'")
    image = tone_a * (1 - mix[..., None]) + tone_b * mix[..., None]
    return image + rng.normal(0, 3.0, image.shape)


def _shape_alpha(shape: str, size: int, centre: tuple[float, float], radius: float, rotation: float) -> np.ndarray:
    """Anti-aliased coverage ``[size, size]`` in [0, 1] of ``shape`` drawn at 4x and box-downsampled."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    for polygon, fill in _SHAPE_PARTS[shape]:
        points = [
            (
                (centre[0] + radius * (x * cos_r - y * sin_r)) * SUPERSAMPLE,
                (centre[1] + radius * (x * sin_r + y * cos_r)) * SUPERSAMPLE,
            )
            for x, y in polygon
        ]
        draw.polygon(points, fill=fill)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def render_shape_image(index: int, *, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Image ``index`` of the dataset for ``seed``: RGB uint8 ``[size, size, 3]``, mask bool, and its record."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[index % len(SHAPES)]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    radius = rng.uniform(0.22, 0.4) * size
    centre = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
    rotation = rng.uniform(0, 2 * math.pi)
    background = _texture(texture, size, rng)
    alpha = _shape_alpha(shape, size, centre, radius, rotation)
    rows = np.arange(size, dtype=np.float64)[:, None, None] + 0.5
    shading = np.clip(1.0 + 0.12 * (centre[1] - rows) / radius, 0.85, 1.12)  # lit from above
    foreground = np.array(COLOURS[colour], dtype=np.float64) * shading
    foreground = foreground + rng.normal(0, 3.0, foreground.shape)
    image = background * (1 - alpha[..., None]) + foreground * alpha[..., None]
    record = {
        "shape": shape,
        "colour": colour,
        "texture": texture,
        "centre": [round(centre[0], 3), round(centre[1], 3)],
        "radius": round(radius, 3),
        "rotation_degrees": round(math.degrees(rotation), 3),
    }
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), alpha >= 0.5, record


def write_shapes(
    out: str | Path,
    *,
    n: int = 4000,
    size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write ``n`` images of ``size`` pixels into ``out`` (layout in the module docstring); returns a summary.

    Existing files of an earlier run with the same settings are overwritten with identical bytes; a folder
    holding something else is refused.
    """
    from PIL import Image

    out = Path(out)
    if n < 1:
        raise ConvlensError("--n must be at least 1")
    if size < 16:
        raise ConvlensError("--size must be at least 16 pixels")
    if holds_files(out) and not (out / "concepts.json").is_file():
        raise ConvlensError(f"{out} exists and is not a shapes dataset; choose an empty or new folder")
    for shape in SHAPES:
        (out / "images" / shape).mkdir(parents=True, exist_ok=True)
        (out / "masks" / shape).mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    records = []
    for index in range(n):
        image, mask, record = render_shape_image(index, size=size, seed=seed)
        name = f"{record['shape']}/{index:0{width}d}.png"
        save_png(Image.fromarray(image, "RGB"), out / "images" / name)
        save_png(Image.fromarray(mask.astype(np.uint8) * 255, "L"), out / "masks" / name)
        records.append({"file": name, "mask": name, **record})
        if progress is not None:
            progress(1)
    concepts = {
        "format": FORMAT,
        "generator": {"name": "shapes", "n": n, "size": size, "seed": seed},
        "image_root": "images",
        "mask_root": "masks",
        "categories": {"shape": list(SHAPES), "colour": list(COLOURS), "texture": list(TEXTURES)},
        "regions": {"shape": "foreground", "colour": "foreground", "texture": "background"},
        "images": records,
    }
    temporary = out / ".concepts.json.tmp"
    temporary.write_text(json.dumps(concepts, indent=1) + "\n")
    os.replace(temporary, out / "concepts.json")
    return {
        "out": str(out),
        "images": n,
        "size": size,
        "seed": seed,
        "classes": len(SHAPES),
        "colours": len(COLOURS),
        "textures": len(TEXTURES),
    }
