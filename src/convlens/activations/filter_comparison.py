"""Comparing activation filters on the same images (001 sec. 7.3, Figures 8 and 9), with a ground-truth check.

Per image, every pair of filters is compared by the cosine similarity and the Spearman rank correlation of
their patch weights; both are averaged over the images (Figure 9). Each filter's weights are drawn over the
image with the rank of every patch (Figure 8). With foreground masks (a dataset with ``concepts.json``, such
as ``shapes``), each filter's foreground precision, the share of its sampled patches that lie mostly on the
object, is set beside uniform sampling's: the check the paper could only make by eye.

Filters are compared on the weights they return, NaN read as zero, as the sampler reads them. A pair is left
out for an image where one of its maps has no direction (all zero: cosine) or no order (constant: Spearman);
the JSON gives the number of images behind every mean.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from convlens.activations.sampling import draw_positions, sampling_probabilities
from convlens.core.contracts import ActivationFilter, FilterContext
from convlens.core.errors import ConvlensError
from convlens.data.images import ImageIndex, Preprocessing, SkipLog, save_png
from convlens.data.loading import ImageDataset, decode_on_device, image_batches
from convlens.drawing.charts import enlarge, heatmap, side_by_side, titled
from convlens.drawing.plots import BarPanel, save_chart
from convlens.models.layers import activations_at
from convlens.runtime.rank_statistics import rowwise_cosine, rowwise_spearman
from convlens.runtime.run_records import versions, write_json_atomic
from convlens.runtime.seeding import torch_generator

if TYPE_CHECKING:
    from PIL import Image

    from convlens.core.contracts import ModelBundle
    from convlens.data.concepts import ConceptSet

Z_95 = 1.959964  # two-sided 95 % normal quantile


@dataclasses.dataclass(frozen=True)
class ComparisonSettings:
    layer: str
    per_image: int | None = None  # None: H x W samples per image, as extraction draws them
    seed: int = 0
    batch_size: int = 64
    max_images: int | None = None  # None: every image; otherwise a seeded random subset
    overlays: int = 4
    foreground_threshold: float = 0.5  # a patch counts as foreground when this share of its pixels is


def patch_foreground(mask: np.ndarray, preprocessing: Preprocessing, grid: tuple[int, int]) -> torch.Tensor:
    """The share of foreground pixels in each cell of the activation grid, for a mask ``[H0, W0]`` of the
    original image: the mask gets the model's resize and centre crop, then is averaged over the cells."""
    from PIL import Image

    aligned = preprocessing.eval_geometry(Image.fromarray(mask.astype(np.uint8) * 255, "L"))
    pixels = torch.from_numpy(np.asarray(aligned, dtype=np.float32) / 255.0)
    return torch.nn.functional.adaptive_avg_pool2d(pixels[None, None], grid)[0, 0].double()


def paired_difference(values: np.ndarray, baseline: np.ndarray) -> dict[str, Any]:
    """Mean of per-image differences with a normal-approximation 95 % interval, and what it says."""
    difference = values - baseline
    mean = float(difference.mean()) if difference.size else math.nan
    spread = float(difference.std(ddof=1) / math.sqrt(difference.size)) if difference.size > 1 else math.nan
    low, high = mean - Z_95 * spread, mean + Z_95 * spread
    verdict = "above uniform" if low > 0 else "below uniform" if high < 0 else "not distinguishable from uniform"
    return {"difference": mean, "ci95": [low, high], "verdict": verdict}


def _stats(values: list[torch.Tensor]) -> dict[str, Any]:
    joined = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    valid = joined[~torch.isnan(joined)]
    return {
        "mean": float(valid.mean()) if len(valid) else math.nan,
        "std": float(valid.std()) if len(valid) > 1 else math.nan,
        "images": int(len(valid)),
    }


def patch_overlay(image: Image.Image, weights: np.ndarray, longest_side: int = 256) -> Image.Image:
    """Figure 8: the image shaded by each patch's weight (darkest = least important) with each patch's rank."""
    from PIL import Image, ImageDraw, ImageFont

    rows, columns = weights.shape
    enlarged = enlarge(image, longest_side)
    width, height = enlarged.size
    base = np.asarray(enlarged, dtype=np.float32)
    top = float(weights.max()) if weights.size else 0.0
    strength = weights / top if top > 0 else np.ones_like(weights)
    shade = (
        np.asarray(
            Image.fromarray((strength * 255).astype(np.uint8), "L").resize((width, height), Image.NEAREST),
            dtype=np.float32,
        )
        / 255.0
    )
    canvas = Image.fromarray((base * (0.12 + 0.88 * shade[..., None])).clip(0, 255).astype(np.uint8), "RGB")
    cell_width, cell_height = width / columns, height / rows
    if min(cell_width, cell_height) >= 18:
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(max(9, round(min(cell_width, cell_height) * 0.38)))
        order = np.argsort(-weights.reshape(-1), kind="stable")
        ranks = np.empty(order.size, dtype=np.int64)
        ranks[order] = np.arange(1, order.size + 1)
        for flat, rank in enumerate(ranks):
            y, x = divmod(flat, columns)
            draw.text(
                ((x + 0.5) * cell_width, (y + 0.5) * cell_height),
                str(rank),
                fill="white",
                font=font,
                anchor="mm",
                stroke_width=2,
                stroke_fill="black",
            )
    return canvas


def compare_filters(
    bundle: ModelBundle,
    filters: dict[str, ActivationFilter],
    index: ImageIndex,
    out: str | Path,
    settings: ComparisonSettings,
    *,
    concepts: ConceptSet | None = None,
    device: torch.device | None = None,
    workers: int = 0,
    progress: bool | None = None,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare ``filters`` (by display name) on the images of ``index`` at ``settings.layer``; write ``out``
    (``workers``: image-decoding processes)."""
    from tqdm.auto import tqdm

    if len(filters) < 2:
        raise ConvlensError("compare-filters needs at least two filters")
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cpu")
    module = bundle.module.to(device).eval()
    preprocessing = Preprocessing.of(bundle)
    chosen = list(range(len(index)))
    if settings.max_images is not None and settings.max_images < len(index):
        picked = torch.randperm(len(index), generator=torch_generator(settings.seed, "compare-images"))
        chosen = sorted(picked[: settings.max_images].tolist())
    concept_of = concepts.positions_in(index) if concepts is not None else {}
    if concepts is not None and not concept_of:
        raise ConvlensError(f"none of the images under {index.root} appear in {concepts.root / 'concepts.json'}")
    names = list(filters)
    pairs = list(itertools.combinations(range(len(names)), 2))
    cosine: dict[tuple[int, int], list[torch.Tensor]] = {pair: [] for pair in pairs}
    spearman: dict[tuple[int, int], list[torch.Tensor]] = {pair: [] for pair in pairs}
    fallbacks = dict.fromkeys(names, 0)
    sampled: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    expected: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    uniform: list[torch.Tensor] = []
    overlay_files: list[str] = []
    skip_log = SkipLog(index.root)
    images_seen, grid = 0, None
    started = time.perf_counter()
    bar = tqdm(
        total=len(chosen),
        desc=f"compare filters at {settings.layer}",
        unit="img",
        leave=False,
        disable=None if progress is None else not progress,
    )
    dataset = ImageDataset(index, preprocessing, jpeg_bytes=decode_on_device("auto", device))
    for batch in image_batches(
        dataset, batch_size=settings.batch_size, skip_log=skip_log, order=chosen, workers=workers, device=device
    ):
        images, labels = batch.images.to(device), batch.labels.to(device)
        plain = None
        maps: dict[str, torch.Tensor] = {}
        for name, filter_ in filters.items():
            if filter_.needs_gradients:
                captured = activations_at(
                    module, images, settings.layer, target=lambda logits, f=filter_: f.gradient_target(logits, labels)
                )
                activations, gradients = captured.activations[settings.layer], captured.gradients[settings.layer]
            else:
                plain = plain if plain is not None else activations_at(module, images, settings.layer)
                activations, gradients = plain.activations[settings.layer], None
            if activations.ndim != 4:
                raise ConvlensError(
                    f"layer '{settings.layer}' gives shape {tuple(activations.shape)}; filters "
                    "need a convolutional layer with output [N, C, H, W]"
                )
            context = FilterContext(
                model=bundle, images=images, labels=labels, layer=settings.layer, gradients=gradients
            )
            maps[name] = filter_(activations, context).detach().double().cpu()
        grid = tuple(next(iter(maps.values())).shape[1:])
        per_image = settings.per_image or grid[0] * grid[1]
        flat = {name: torch.nan_to_num(m.flatten(1), nan=0.0, posinf=0.0, neginf=0.0) for name, m in maps.items()}
        for i, j in pairs:
            cosine[i, j].append(rowwise_cosine(flat[names[i]], flat[names[j]]))
            spearman[i, j].append(rowwise_spearman(flat[names[i]], flat[names[j]]))
        probabilities = {}
        for name in names:
            probabilities[name], fallback = sampling_probabilities(maps[name])
            fallbacks[name] += int(fallback.sum())
        with_mask = [row for row, position in enumerate(batch.positions.tolist()) if position in concept_of]
        if with_mask:
            rows = torch.tensor(with_mask)
            foreground = (
                torch.stack(
                    [
                        patch_foreground(
                            concepts.foreground(concept_of[int(batch.positions[row])]), preprocessing, grid
                        )
                        for row in with_mask
                    ]
                ).flatten(1)
                >= settings.foreground_threshold
            )
            uniform.append(foreground.double().mean(dim=1))
            for name in names:
                chosen_probabilities = probabilities[name][rows]
                picks = draw_positions(
                    chosen_probabilities, batch.positions[rows], per_image=per_image, seed=settings.seed
                )
                sampled[name].append(foreground.gather(1, picks).double().mean(dim=1))
                expected[name].append((chosen_probabilities * foreground).sum(dim=1))
        for row in range(len(batch)):
            if len(overlay_files) >= settings.overlays:
                break
            overlay_files.append(_write_overlay(out, batch, row, images, maps, preprocessing, index))
        images_seen += len(batch)
        bar.update(len(batch) + len(batch.skipped))
    bar.close()
    if images_seen == 0:
        raise ConvlensError(f"no readable images among the {len(chosen)} chosen under {index.root}")

    matrices = {"cosine": _matrix(names, pairs, cosine), "spearman": _matrix(names, pairs, spearman)}
    precision = _precision(names, sampled, expected, uniform, settings) if uniform else None
    result = {
        **(run_info or {}),
        "layer": settings.layer,
        "grid": list(grid),
        "filters": names,
        "images": images_seen,
        "samples_per_image": settings.per_image or grid[0] * grid[1],
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "cosine": matrices["cosine"],
        "spearman": matrices["spearman"],
        "fallbacks": {name: {"images": count, "rate": count / images_seen} for name, count in fallbacks.items()},
        "foreground_precision": precision,
        "overlays": overlay_files,
        "skipped": skip_log.as_json(),
        "seconds": round(time.perf_counter() - started, 3),
        "versions": versions(),
    }
    result["findings"] = findings(result)
    for kind, title in (
        ("cosine", "cosine similarity of filter weights"),
        ("spearman", "Spearman rank correlation of filter weights"),
    ):
        save_png(heatmap(result[kind]["mean"], names, title=f"{title} ({images_seen} images)"), out / f"{kind}.png")
    if precision is not None:
        labels = ["uniform"] + names
        values = [precision["uniform"]] + [precision["filters"][name]["sampled"] for name in names]
        chart = BarPanel(
            labels=labels,
            values=values,
            title="foreground precision of sampled patches",
            xlabel="share of sampled patches on the object",
            maximum=1.0,
            key="foreground-precision",
        )
        save_chart(chart, out / "foreground-precision.png")
    result = finite_or_none(result)
    write_json_atomic(out / "comparison.json", result)
    return result


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def _matrix(
    names: list[str], pairs: list[tuple[int, int]], values: dict[tuple[int, int], list[torch.Tensor]]
) -> dict[str, Any]:
    size = len(names)
    mean = [[1.0 if i == j else math.nan for j in range(size)] for i in range(size)]
    std = [[0.0 if i == j else math.nan for j in range(size)] for i in range(size)]
    count = [[0] * size for _ in range(size)]
    for i, j in pairs:
        stats = _stats(values[i, j])
        mean[i][j] = mean[j][i] = stats["mean"]
        std[i][j] = std[j][i] = stats["std"]
        count[i][j] = count[j][i] = stats["images"]
    return {"mean": mean, "std": std, "images": count}


def _precision(
    names: list[str],
    sampled: dict[str, list[torch.Tensor]],
    expected: dict[str, list[torch.Tensor]],
    uniform: list[torch.Tensor],
    settings: ComparisonSettings,
) -> dict[str, Any]:
    baseline = torch.cat(uniform).numpy()
    table = {}
    for name in names:
        exact = torch.cat(expected[name]).numpy()
        table[name] = {
            "sampled": float(torch.cat(sampled[name]).mean()),
            "expected": float(exact.mean()),
            **paired_difference(exact, baseline),
        }
    return {
        "threshold": settings.foreground_threshold,
        "images": int(baseline.size),
        "uniform": float(baseline.mean()),
        "filters": table,
    }


def findings(result: dict[str, Any]) -> list[str]:
    """What the comparison says, in sentences: precision against uniform, closest and farthest pairs, fallbacks."""
    lines = []
    precision = result["foreground_precision"]
    if precision is not None:
        for name, row in precision["filters"].items():
            low, high = row["ci95"]
            lines.append(
                f"{name}: foreground precision {row['sampled']:.3f} (expected {row['expected']:.3f}) against "
                f"{precision['uniform']:.3f} for uniform sampling, a difference of {row['difference']:+.3f} "
                f"(95 % CI {low:+.3f} to {high:+.3f}): {row['verdict']}"
                + (
                    ""
                    if row["verdict"] == "above uniform" or name == "uniform"
                    else "; this filter does not favour the object over the background here"
                )
            )
    names = result["filters"]
    pairs = [
        (result["cosine"]["mean"][i][j], names[i], names[j])
        for i, j in itertools.combinations(range(len(names)), 2)
        if math.isfinite(result["cosine"]["mean"][i][j])
    ]
    if len(pairs) > 1:
        closest, farthest = max(pairs), min(pairs)
        lines.append(
            f"closest pair by cosine similarity: {closest[1]} and {closest[2]} ({closest[0]:.3f}); "
            f"farthest: {farthest[1]} and {farthest[2]} ({farthest[0]:.3f})"
        )
    for name, row in result["fallbacks"].items():
        if row["images"]:
            lines.append(
                f"{name}: all-zero maps on {row['images']} of {result['images']} images "
                f"({100 * row['rate']:.1f} %), sampled uniformly there"
            )
    return lines


def _write_overlay(
    out: Path,
    batch: Any,
    row: int,
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    preprocessing: Preprocessing,
    index: ImageIndex,
) -> str:
    position = int(batch.positions[row])
    picture = preprocessing.to_pil(images[row])
    panels = [titled(enlarge(picture), f"image {position}")]
    for name, values in maps.items():
        weights = torch.nan_to_num(values[row], nan=0.0, posinf=0.0, neginf=0.0).numpy()
        panels.append(titled(patch_overlay(picture, weights), name))
    relative = f"overlays/{position:05d}-{Path(index.paths[position]).stem}.png"
    save_png(side_by_side(panels), out / relative)
    return relative
