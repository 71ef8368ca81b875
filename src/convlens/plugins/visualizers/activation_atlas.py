"""Activation atlas (course notes 002 sec. 4, Figures 14-16): how a layer responds to a whole dataset.

One activation vector per image: the layer's channels at one spatial position drawn at random (from a generator
seeded by the run seed and the image's index in the dataset, so the draw does not depend on the batch size or the
order of reading), or with an SAE that position's latent code. All vectors are projected to 2-D (UMAP when
``umap-learn`` is installed, else PCA computed here in float64; t-SNE from scikit-learn on request), a
``grid`` x ``grid`` grid is laid over the projection's bounding box, and every cell holding at least ``min_count``
points gets the mean of its vectors (for SAE codes: the mean code ``z`` decoded to the layer's channels with the
SAE's decoder as ``decode(z) - decode(0)``, the part of the reconstruction the latents write; see
``feature_viz.directions.channel_directions``), which feature visualisation then inverts with a direction objective
(``Objective.direction``, a preset of feature-viz), ``render_batch`` cells per optimisation batch.

Cells: ``column = min(grid - 1, floor((x - x_min) / (x_max - x_min) * grid))`` and, with ``y`` pointing up,
``row = grid - 1 - min(grid - 1, floor((y - y_min) / (y_max - y_min) * grid))``: row 0 is drawn at the top and
holds the largest ``y``, as in the scatter plot. An axis of zero extent puts every point in its first cell.

PCA: the eigenvectors of the float64 scatter matrix of the centred vectors (accumulated over chunks, so it never
needs a float64 copy of the data), largest eigenvalues first; each component's sign is chosen so that its entry of
largest magnitude is positive (scikit-learn's convention since 1.5). ``x`` is the first component, ``y`` the second.

Written into the output folder:

- ``atlas.png``: ``grid * size`` pixels square plus a white margin of :data:`MARGIN` pixels on every side; cell
  (row, column) occupies ``[MARGIN + column * size, MARGIN + row * size]`` onward; empty cells stay white. Density is
  shown (``density``) by opacity: ``share = log(1 + count) / log(1 + max count)``, ``alpha = 0.25 + 0.75 * share``,
  ``pixel = round(alpha * image + (1 - alpha) * 255)``; or by size: the image scaled to ``round(size * (0.25 +
  0.75 * share))`` pixels, centred in its cell; or not at all.
- ``projection.png``: the projected points as small dots over the grid's lines, ``y`` up.
- ``cells/rRR-cCC.png``: each inverted cell at ``size`` pixels.
- ``points.safetensors``: per point ``coordinates [N, 2]`` (float64), ``positions [N, 2]`` (y, x in the layer's
  map), ``images [N]`` (index in the dataset), ``vectors [N, D]`` (float32; channels, or latents with an SAE),
  ``cells [N, 2]`` (row, column); per inverted cell ``cell_index [K, 2]`` (row, column), ``cell_means [K, D]``
  (float64) and ``cell_directions [K, C]`` (float32: what was inverted).
- ``activation_atlas.json``: the projection, grid, bounds, layout and density rule, per cell its count, centre,
  image and top units, and per image its point (up to :data:`POINTS_IN_JSON` points; beyond that the points are in
  ``points.safetensors`` only).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from convlens import ConvlensError, ImageVisualizer, Params, VisualizerSpec, VisualTarget, hookimpl, param
from convlens.plugins.visualizers.feature_viz.api import PRESETS

if TYPE_CHECKING:
    import numpy as np
    import torch

MARGIN = 8  # white pixels around the atlas's grid
TOP_UNITS = 5  # units listed per cell
POINTS_IN_JSON = 20000  # beyond this many points, they are in points.safetensors only
SCATTER_SIDE = 480  # pixels of the scatter plot's plotting area
EXTRA = "pip install 'convlens[atlas]'"
PACKAGES = {"umap": ("umap", "umap-learn"), "tsne": ("sklearn", "scikit-learn")}
NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


@dataclass(frozen=True)
class ActivationAtlasParams(Params):
    grid: int = param(12, min=1, max=256, help="cells per side of the grid laid over the projection")
    min_count: int = param(3, min=1, help="a cell is inverted when at least this many points fall into it")
    max_images: Optional[int] = param(
        None, min=1, help="use at most this many images of --data, a random subset drawn from --seed (default: all)"
    )
    projection: Literal["auto", "pca", "tsne", "umap"] = param(
        "auto",
        help="2-D projection: auto (UMAP when umap-learn is installed, else PCA), pca, tsne "
        "(scikit-learn) or umap (umap-learn); the last two come with the atlas extra",
    )
    seed: int = param(0, help="seed of the sampled positions, the image subset, t-SNE/UMAP and the inversions")
    preset: Literal["naive", "improved", "fourier"] = param(
        "fourier", help="feature-visualisation preset of the inversions (see feature-viz)"
    )
    steps: int = param(128, min=1, help="optimisation steps per inversion")
    size: int = param(48, min=8, help="pixels per side of each inverted cell (and of its square in the atlas)")
    density: Literal["alpha", "size", "none"] = param(
        "alpha", help="how the atlas shows a cell's point count: opacity, the image's size, or not at all"
    )
    batch_size: int = param(64, min=1, help="images per forward pass")
    render_batch: int = param(64, min=1, help="cells optimised together in one feature-visualisation batch")
    workers: int = param(0, min=0, help="data-loading processes")


def resolve_projection(requested: str) -> str:
    """``pca``, ``tsne`` or ``umap`` for ``requested``; one error naming the extra when its package is missing."""
    if requested == "auto":
        return "umap" if importlib.util.find_spec("umap") is not None else "pca"
    if requested in PACKAGES:
        module, package = PACKAGES[requested]
        if importlib.util.find_spec(module) is None:
            raise ConvlensError(
                f"projection '{requested}' needs {package}, which is not installed: {EXTRA} (or use --projection pca)"
            )
    return requested


def pca_2d(vectors: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, dict[str, Any]]:
    """The first two principal components of ``vectors [N, D]``: coordinates ``[N, 2]`` (float64) and a record of
    the components (see the module docstring for the method and the sign convention)."""
    import torch

    count, dims = vectors.shape
    total = torch.zeros(dims, dtype=torch.float64)
    for rows in vectors.split(chunk):
        total += rows.double().sum(0)
    mean = total / count
    scatter = torch.zeros(dims, dims, dtype=torch.float64)
    for rows in vectors.split(chunk):
        centred = rows.double() - mean
        scatter += centred.T @ centred
    eigenvalues, eigenvectors = torch.linalg.eigh(scatter)
    kept = eigenvalues.argsort(descending=True, stable=True)[: min(2, dims)]
    components = eigenvectors[:, kept].T.clone()  # [k, D]
    largest = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(len(kept)), largest])
    components *= torch.where(signs == 0, 1.0, signs).to(torch.float64)[:, None]
    if len(kept) < 2:  # a layer with one channel: the second coordinate is 0
        components = torch.cat([components, torch.zeros(2 - len(kept), dims, dtype=torch.float64)])
    coordinates = torch.cat([(rows.double() - mean) @ components.T for rows in vectors.split(chunk)])
    variances = eigenvalues.clamp_min(0)
    trace = float(variances.sum())
    ratio = [float(variances[i]) / trace if trace > 0 else 0.0 for i in kept.tolist()]
    ratio += [0.0] * (2 - len(ratio))
    return coordinates, {
        "explained_variance_ratio": ratio,
        "sign": "each component's entry of largest magnitude is positive",
    }


def project(vectors: torch.Tensor, method: str, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[N, 2]`` float64 coordinates of ``vectors [N, D]`` by ``method`` (pca, tsne or umap), and its details."""
    import torch

    count = vectors.shape[0]
    if method == "pca":
        return pca_2d(vectors)
    data = vectors.double().numpy()
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (count - 1) / 3)))
        embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed % 2**32).fit_transform(
            data
        )
        details = {"perplexity": perplexity}
    else:
        import umap

        neighbours = max(2, min(15, count - 1))
        embedded = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed % 2**32).fit_transform(data)
        details = {"n_neighbors": neighbours}
    return torch.as_tensor(embedded, dtype=torch.float64), details


def cell_of(coordinates: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """Per point its (row, column) of the grid over the bounding box (see the module docstring), and the box."""
    import numpy as np

    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    bins = np.minimum(np.floor((coordinates - low) / span * grid).astype(np.int64), grid - 1)
    bounds = {"x": [float(low[0]), float(high[0])], "y": [float(low[1]), float(high[1])]}
    return grid - 1 - bins[:, 1], bins[:, 0], bounds


def density_share(count: int, most: int) -> float:
    return math.log1p(count) / math.log1p(most) if most > 0 else 1.0


class ActivationAtlas(ImageVisualizer):
    """See the module docstring. ``target.units`` is not used: every channel (or SAE latent) enters the vectors."""

    name = "activation-atlas"

    def __init__(self, params: ActivationAtlasParams | None = None):
        super().__init__(params or ActivationAtlasParams())

    # -- sampling -------------------------------------------------------------------------------------------------
    def positions_of(self, count: int) -> list[int]:
        """The dataset positions used: all, or a random subset of ``max_images`` drawn from the seed, in order."""
        import numpy as np

        from convlens import derive_seed

        limit = self.params.max_images
        if limit is None or limit >= count:
            return list(range(count))
        rng = np.random.default_rng(derive_seed(self.params.seed, "activation-atlas", "subset"))
        return sorted(int(p) for p in rng.choice(count, size=limit, replace=False))

    def sampled_position(self, image: int, height: int, width: int) -> tuple[int, int]:
        """The (y, x) drawn for dataset image ``image`` in a ``height`` x ``width`` map."""
        import torch

        from convlens import torch_generator

        cell = int(
            torch.randint(height * width, (1,), generator=torch_generator(self.params.seed, "activation-atlas", image))
        )
        return divmod(cell, width)

    def collect(self, target: VisualTarget) -> dict[str, Any]:
        """One vector per readable image: ``vectors [N, D]``, ``positions [N, 2]``, ``images [N]`` and the index."""
        import torch

        from convlens import SkipLog, activations_at

        index = self.data_of(target)
        positions = self.positions_of(len(index))
        device = next((p.device for p in target.model.module.parameters()), torch.device("cpu"))
        sae = target.sae
        skip_log = SkipLog(index.root)
        vectors, where, images = [], [], []
        map_size = None
        for batch in self.batches(
            target, positions, batch_size=self.params.batch_size, skip_log=skip_log, workers=self.params.workers
        ):
            maps = activations_at(target.model.module, batch.images.to(device), target.layer).activations[target.layer]
            if maps.ndim != 4:
                raise ConvlensError(
                    f"an activation atlas needs a layer with an output [N, C, H, W]; layer "
                    f"'{target.layer}' gives {tuple(maps.shape)}"
                )
            if sae is not None and maps.shape[1] != sae.input_dim:
                raise ConvlensError(
                    f"the SAE reads {sae.input_dim} channels but layer '{target.layer}' gives {maps.shape[1]}"
                )
            height, width = maps.shape[2:]
            map_size = (height, width)
            drawn = torch.tensor([self.sampled_position(int(p), height, width) for p in batch.positions])
            rows = maps[
                torch.arange(len(batch), device=maps.device),
                :,
                drawn[:, 0].to(maps.device),
                drawn[:, 1].to(maps.device),
            ]
            if sae is not None:
                with torch.no_grad():
                    rows = sae.encode(rows)
            rows = rows.detach().float().cpu()
            if not bool(torch.isfinite(rows).all()):
                bad = int(batch.positions[(~torch.isfinite(rows)).any(dim=1)][0])
                raise ConvlensError(
                    f"layer '{target.layer}' gives NaN or infinite values for image {index.relative(index.paths[bad])}"
                )
            vectors.append(rows)
            where.append(drawn)
            images.append(batch.positions.clone())
        if not vectors:
            raise ConvlensError(f"none of the images under {index.root} could be read")
        return {
            "vectors": torch.cat(vectors),
            "positions": torch.cat(where).long(),
            "images": torch.cat(images).long(),
            "index": index,
            "skip_log": skip_log,
            "map_size": map_size,
        }

    # -- the run --------------------------------------------------------------------------------------------------
    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        import numpy as np
        import torch

        from convlens import save_tensors_atomic, write_json_atomic

        params = self.params
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        method = resolve_projection(params.projection)  # before any work: a missing package fails at once
        collected = self.collect(target)
        vectors, index = collected["vectors"], collected["index"]
        count = len(vectors)
        if count < 2:
            raise ConvlensError(f"an activation atlas needs at least 2 readable images; {index.root} gave {count}")
        coordinates, details = project(vectors, method, params.seed)
        rows, columns, bounds = cell_of(coordinates.numpy(), params.grid)

        filled = self._cells(vectors, rows, columns, target)
        kind = "latent" if target.sae is not None else "channel"
        record: dict[str, Any] = {
            "visualizer": self.name,
            "layer": target.layer,
            "params": params.to_dict(),
            "projection": {"method": method, "name": NAMES[method], "requested": params.projection, **details},
            "vectors": {
                "kind": "sae-latents" if target.sae is not None else "channels",
                "dim": vectors.shape[1],
                "unit_kind": kind,
                "map_size": list(collected["map_size"]),
            },
            "images": count,
            "grid": params.grid,
            "min_count": params.min_count,
            "bounds": bounds,
            "layout": {
                "cell": params.size,
                "margin": MARGIN,
                "width": params.grid * params.size + 2 * MARGIN,
                "height": params.grid * params.size + 2 * MARGIN,
                "rows": "row 0 at the top holds the largest y; column 0 the smallest x",
                "cell_box": "[margin + column * cell, margin + row * cell, ... + cell, ... + cell]",
            },
            "density": self._density_rule(),
            "points_file": "points.safetensors",
        }
        cell_tensors = {
            "cell_index": torch.tensor([[c["row"], c["column"]] for c in filled], dtype=torch.long).view(-1, 2),
            "cell_means": (
                torch.stack([c["mean"] for c in filled])
                if filled
                else torch.zeros(0, vectors.shape[1], dtype=torch.float64)
            ),
            "cell_directions": (
                torch.stack([c["direction"] for c in filled])
                if filled
                else torch.zeros(
                    0, target.sae.input_dim if target.sae is not None else vectors.shape[1], dtype=torch.float32
                )
            ),
        }
        save_tensors_atomic(
            {
                "coordinates": coordinates,
                "positions": collected["positions"],
                "images": collected["images"],
                "vectors": vectors,
                "cells": torch.from_numpy(np.stack([rows, columns], axis=1)).long(),
                **cell_tensors,
            },
            out_dir / "points.safetensors",
        )  # no metadata: its key order is not stable, and the JSON says it all

        rendered = self._invert(target, filled)
        most = max((c["count"] for c in filled), default=0)
        record["cells"] = []
        record["figures"] = [
            {
                "unit": None,
                "path": "atlas.png",
                "kind": "atlas",
                "caption": f"activation atlas of {target.layer}: {len(filled)} cells of a "
                f"{params.grid} x {params.grid} grid over the {NAMES[method]} of {count} activations"
                + (
                    f"; {'opacity' if params.density == 'alpha' else 'size'} by point count"
                    if params.density != "none"
                    else ""
                ),
            },
            {
                "unit": None,
                "path": "projection.png",
                "kind": "projection",
                "caption": f"{NAMES[method]} of {count} "
                f"{'SAE codes' if target.sae is not None else 'activation vectors'} at {target.layer}, "
                "one random position per image",
            },
        ]
        from convlens import save_png
        from convlens.plugins.visualizers.feature_viz.api import to_pil

        pictures = []
        for cell, image in zip(filled, rendered):
            path = f"cells/r{cell['row']:02d}-c{cell['column']:02d}.png"
            picture = to_pil(image)
            save_png(picture, out_dir / path)
            pictures.append(picture)
            share = density_share(cell["count"], most)
            top = cell["mean"].sort(descending=True, stable=True)  # ties: the lower id first
            entry = {
                "row": cell["row"],
                "column": cell["column"],
                "count": cell["count"],
                "centre": self._centre(cell["row"], cell["column"], bounds),
                "image": path,
                "top_units": [
                    {"unit": int(u), "value": float(v)} for v, u in zip(top.values[:TOP_UNITS], top.indices[:TOP_UNITS])
                ],
                "direction_norm": float(cell["direction"].norm()),
            }
            if params.density == "alpha":
                entry["alpha"] = 0.25 + 0.75 * share
            elif params.density == "size":
                entry["side"] = max(1, round(params.size * (0.25 + 0.75 * share)))
            record["cells"].append(entry)
            shown = ", ".join(f"{t['unit']} ({t['value']:.3g})" for t in entry["top_units"][:3])
            record["figures"].append(
                {
                    "unit": None,
                    "path": path,
                    "kind": "atlas-cell",
                    "caption": f"cell ({cell['row']}, {cell['column']}): {cell['count']} "
                    f"activations; top {kind}s {shown}",
                }
            )
        save_png(self._atlas(record["cells"], pictures), out_dir / "atlas.png")
        save_png(self._scatter(coordinates.numpy(), bounds, method, count, target.layer), out_dir / "projection.png")

        record["points"] = (
            None
            if count > POINTS_IN_JSON
            else [
                {
                    "image": index.relative(index.paths[int(image)]),
                    "index": int(image),
                    "position": [int(y), int(x)],
                    "xy": [float(a), float(b)],
                }
                for image, (y, x), (a, b) in zip(
                    collected["images"], collected["positions"].tolist(), coordinates.tolist()
                )
            ]
        )
        skip_log = collected["skip_log"]
        record["skipped"] = skip_log.as_json()
        summary = (
            f"atlas of {count} activations ({NAMES[method]}) on a {params.grid} x {params.grid} grid: "
            f"{len(filled)} cells inverted"
        )
        if not filled:
            summary += f" (no cell holds {params.min_count} points: lower --min-count or --grid)"
        record["summary"] = summary + (f"; {skip_log.summary()}" if len(skip_log) else "")
        write_json_atomic(out_dir / "activation_atlas.json", record)
        return record

    def _cells(
        self, vectors: torch.Tensor, rows: np.ndarray, columns: np.ndarray, target: VisualTarget
    ) -> list[dict[str, Any]]:
        """The cells with at least ``min_count`` points, in row-major order, with their float64 mean vector and the
        channel-space direction that is inverted (the mean code decoded with an SAE)."""
        import numpy as np
        import torch

        from convlens.plugins.visualizers.feature_viz.api import channel_directions

        grid = self.params.grid
        flat = rows * grid + columns
        counts = np.bincount(flat, minlength=grid * grid)
        kept = [int(c) for c in np.flatnonzero(counts >= self.params.min_count)]
        cells = []
        for number in kept:
            members = torch.from_numpy(np.flatnonzero(flat == number))
            mean = vectors[members].double().mean(dim=0)
            cells.append({"row": number // grid, "column": number % grid, "count": int(counts[number]), "mean": mean})
        if cells:
            means = torch.stack([c["mean"] for c in cells]).float()
            directions = channel_directions(means, target.sae).float().cpu()
            for cell, direction in zip(cells, directions):
                cell["direction"] = direction.clone()
        return cells

    def _invert(self, target: VisualTarget, cells: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Feature visualisation of every cell's direction, ``render_batch`` cells per optimisation batch."""
        if not cells:
            return []
        from convlens.plugins.visualizers.feature_viz.api import Objective, RenderSettings, render

        params = self.params
        settings = RenderSettings(
            **{**PRESETS[params.preset], "steps": params.steps},
            size=(params.size, params.size),
            batch_size=params.render_batch,
            seed=params.seed,
        )
        objectives = [Objective.direction(cell["direction"]) for cell in cells]
        module = target.model.module
        results = render(
            module,
            target.layer,
            objectives,
            settings,
            mean=target.model.mean,
            std=target.model.std,
            progress=self.progress,
        )
        return [result.image for result in results]

    def _density_rule(self) -> dict[str, str]:
        mode = self.params.density
        rule = {"mode": mode}
        if mode != "none":
            rule["share"] = "log(1 + count) / log(1 + largest count of an inverted cell)"
        if mode == "alpha":
            rule["alpha"] = "0.25 + 0.75 * share"
            rule["pixel"] = "round(alpha * image + (1 - alpha) * 255), on white"
        elif mode == "size":
            rule["side"] = "max(1, round(size * (0.25 + 0.75 * share))) pixels, bilinear, centred in the cell"
        return rule

    def _centre(self, row: int, column: int, bounds: dict[str, list[float]]) -> list[float]:
        grid = self.params.grid
        (x_low, x_high), (y_low, y_high) = bounds["x"], bounds["y"]
        x_span = x_high - x_low if x_high > x_low else 1.0
        y_span = y_high - y_low if y_high > y_low else 1.0
        return [x_low + (column + 0.5) * x_span / grid, y_low + (grid - 1 - row + 0.5) * y_span / grid]

    def _atlas(self, cells: list[dict[str, Any]], pictures: list[Any]):
        import numpy as np
        from PIL import Image

        size, grid = self.params.size, self.params.grid
        side = grid * size + 2 * MARGIN
        canvas = np.full((side, side, 3), 255, dtype=np.uint8)
        for cell, picture in zip(cells, pictures):
            top, left = MARGIN + cell["row"] * size, MARGIN + cell["column"] * size
            if "alpha" in cell:
                alpha = cell["alpha"]
                blended = alpha * np.asarray(picture, dtype=np.float64) + (1 - alpha) * 255.0
                canvas[top : top + size, left : left + size] = np.rint(blended).clip(0, 255).astype(np.uint8)
            elif "side" in cell:
                shrunk = cell["side"]
                offset = (size - shrunk) // 2
                small = np.asarray(picture.resize((shrunk, shrunk), Image.BILINEAR))
                canvas[top + offset : top + offset + shrunk, left + offset : left + offset + shrunk] = small
            else:
                canvas[top : top + size, left : left + size] = np.asarray(picture)
        return Image.fromarray(canvas, "RGB")

    def _scatter(self, coordinates: np.ndarray, bounds: dict[str, list[float]], method: str, count: int, layer: str):
        """The points as 2 x 2 dots, darker where they pile up, over the grid's lines; ``y`` up."""
        import numpy as np
        from PIL import Image, ImageDraw, ImageFont

        from convlens import GRID, INK

        grid, side = self.params.grid, SCATTER_SIDE
        left, top, bottom = 28, 28, 24
        (x_low, x_high), (y_low, y_high) = bounds["x"], bounds["y"]
        x_span = x_high - x_low if x_high > x_low else 1.0
        y_span = y_high - y_low if y_high > y_low else 1.0
        px = np.clip(np.floor((coordinates[:, 0] - x_low) / x_span * (side - 1) + 0.5), 0, side - 2).astype(np.int64)
        py = np.clip(np.floor((y_high - coordinates[:, 1]) / y_span * (side - 1) + 0.5), 0, side - 2).astype(np.int64)
        hits = np.zeros((side, side), dtype=np.float64)
        for dy in (0, 1):
            for dx in (0, 1):
                np.add.at(hits, (py + dy, px + dx), 1.0)
        strength = (1.0 - 0.55**hits)[..., None]  # one dot is about half dark, piles approach full
        area = np.full((side, side, 3), 255.0)
        for line in range(1, grid):  # the grid's cell boundaries
            at = round(line * (side - 1) / grid)
            area[at, :] = GRID
            area[:, at] = GRID
        area = (1 - strength) * area + strength * np.array([20.0, 60.0, 140.0])
        image = Image.new("RGB", (left + side + 8, top + side + bottom), "white")
        plot = Image.fromarray(np.rint(area).astype(np.uint8), "RGB")
        image.paste(plot, (left, top))
        draw = ImageDraw.Draw(image)
        draw.rectangle([left - 1, top - 1, left + side, top + side], outline=INK)
        font = ImageFont.load_default(12)
        axis = ("PC1", "PC2") if method == "pca" else ("x", "y")
        draw.text(
            (left + side / 2, top / 2),
            f"{NAMES[method]} of {count} activations at {layer}",
            fill=INK,
            font=font,
            anchor="mm",
        )
        draw.text(
            (left + side / 2, top + side + bottom / 2),
            f"{axis[0]}  [{x_low:.3g}, {x_high:.3g}]",
            fill=INK,
            font=font,
            anchor="mm",
        )
        label = Image.new("RGB", (side, 16), "white")
        ImageDraw.Draw(label).text(
            (side / 2, 8), f"{axis[1]}  [{y_low:.3g}, {y_high:.3g}]", fill=INK, font=font, anchor="mm"
        )
        image.paste(label.rotate(90, expand=True), (left - 22, top))
        return image


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="activation-atlas",
            factory=ActivationAtlas,
            params=ActivationAtlasParams,
            summary="one random activation (or SAE code) per image projected to 2-D (UMAP, PCA or t-SNE), averaged per "
            "grid cell and inverted by feature visualisation (course notes sec. 4)",
            aliases=("atlas",),
        )
    )
