"""Metrics of attribution maps: perturbation curves (deletion and insertion, Petsiuk et al. 2018), ROAD (Rong et
al. 2022), the energy-based pointing game (Wang et al. 2020), relevance rank accuracy (Arras et al. 2022), and a
bootstrap interval for the mean of a metric over images.

A perturbation metric asks a :data:`Scorer` for the score of perturbed images: ``scorer(images [B, C, H, W], rows
[B])`` returns one score per image, ``rows[b]`` being the index of the original image whose target (e.g. its class)
perturbed image ``b`` is scored for. Scorers are called under ``torch.no_grad()`` on chunks of at most
``batch_size`` images, on the device of the images. Maps ``[N, h, w]`` may have any resolution: they are resized
(bilinear) to the images' size first. Everything is computed in float32, or in float64 for float64 images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convlens.attribution.scores import Scorer, chunked_scores
from convlens.core.errors import ConvlensError

BLUR_SIZE = 11  # RISE's insertion start: a Gaussian blur of kernel 11, sigma 5
BLUR_SIGMA = 5.0
CG_TOLERANCE = 1e-10  # relative residual of the imputation's linear system
CG_ITERATIONS_PER_SIDE = 10  # the iteration cap: this many per pixel of height and width, plus 100
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
# Rong et al. 2022, eq. 5: a missing pixel is the weighted mean of its neighbours, 1/6 each side, 1/12 each corner
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def working_dtype(images: torch.Tensor) -> torch.dtype:
    """float64 for float64 images, float32 otherwise."""
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def maps_at_input(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Maps ``[N, h, w]`` at ``size`` ``(H, W)`` (bilinear, ``align_corners=False``); unchanged at that size."""
    if maps.ndim != 3:
        raise ConvlensError(f"maps must be [N, h, w], not {tuple(maps.shape)}")
    maps = maps if maps.is_floating_point() else maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def descending_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Per map ``[N, H, W]``, each pixel's place ``[N, H * W]`` when pixels are sorted by value, largest first;
    ties keep row-major order."""
    flat = maps.flatten(1)
    order = torch.sort(-flat, dim=1, stable=True).indices
    places = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


def gaussian_blur(images: torch.Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Each channel blurred by a normalised, sampled Gaussian of ``size`` taps (separable, replicate padding)."""
    offsets = torch.arange(size, device=images.device, dtype=images.dtype) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    taps = taps / taps.sum()
    channels = images.shape[1]
    half = size // 2
    blurred = F.pad(images, (half, half, half, half), mode="replicate")
    blurred = F.conv2d(blurred, taps.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(blurred, taps.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def _prepared(images: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if images.ndim != 4 or len(maps) != len(images):
        raise ConvlensError(
            f"need images [N, C, H, W] and maps [N, h, w]; got {tuple(images.shape)}, {tuple(maps.shape)}"
        )
    dtype = working_dtype(images)
    return images.to(dtype), maps_at_input(maps.to(images.device, dtype), images.shape[-2:])


def _step_pixels(pixels: int, step_pixels: int | None, steps: int | None) -> tuple[int, int]:
    """Pixels changed per step and the number of steps S covering all ``pixels``."""
    if step_pixels is not None and steps is not None:
        raise ConvlensError("give step_pixels or steps, not both")
    if step_pixels is None:
        steps = 32 if steps is None else steps
        if steps < 1:
            raise ConvlensError(f"steps must be at least 1, not {steps}")
        step_pixels = math.ceil(pixels / steps)
    if step_pixels < 1:
        raise ConvlensError(f"step_pixels must be at least 1, not {step_pixels}")
    return step_pixels, math.ceil(pixels / step_pixels)


def _curve(
    scorer: Scorer,
    changed_from: torch.Tensor,
    unchanged_from: torch.Tensor,
    ranks: torch.Tensor,
    counts: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Scores ``[N, S + 1]``: at step ``i``, the first ``counts[i]`` pixels of each image (in the order ``ranks``)
    taken from ``changed_from``, the others from ``unchanged_from``."""
    n, channels, height, width = changed_from.shape
    points = len(counts)

    def build(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(ranks.device)
        rows, step = index // points, index % points
        changed = (ranks[rows] < counts[step][:, None]).view(-1, 1, height, width)
        return torch.where(changed, changed_from[rows], unchanged_from[rows]), rows

    return chunked_scores(scorer, n * points, build, batch_size, changed_from.device).view(n, points)


def curve_auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under each curve ``[N, S + 1]`` of equally spaced points over [0, 1]."""
    steps = curve.shape[1] - 1
    return (curve.sum(dim=1) - (curve[:, 0] + curve[:, -1]) / 2) / steps


def deletion_insertion(
    scorer: Scorer,
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    step_pixels: int | None = None,
    steps: int | None = None,
    insertion_start: str = "blur",
    batch_size: int = 64,
    curves: Sequence[str] = ("deletion", "insertion"),
) -> dict[str, torch.Tensor]:
    """The deletion and insertion curves of RISE (Petsiuk et al. 2018, sec. 4.1) and their areas.

    Pixels are taken in the order of the map, largest first (ties in row-major order), ``step_pixels`` at a time
    (default: ``ceil(H * W / steps)``, ``steps`` 32), all channels together. Deletion sets them to 0, which for
    normalised inputs is the dataset mean; insertion copies them from the image into a start image: the image
    blurred (:func:`gaussian_blur`; ``insertion_start="blur"``) or zeros (``"zeros"``). Point 0 of a curve is the
    score of the unchanged (deletion) or start image (insertion), point S that of the image with all pixels deleted
    or inserted. Returns ``deletion`` and ``insertion`` ``[N, S + 1]`` and their areas ``deletion_auc`` and
    ``insertion_auc`` ``[N]`` (:func:`curve_auc`); ``curves`` names the ones computed.
    """
    if insertion_start not in ("blur", "zeros"):
        raise ConvlensError(f"insertion_start must be 'blur' or 'zeros', not '{insertion_start}'")
    images, maps = _prepared(images, maps)
    pixels = images.shape[-2] * images.shape[-1]
    per_step, step_count = _step_pixels(pixels, step_pixels, steps)
    counts = (torch.arange(step_count + 1, device=images.device) * per_step).clamp(max=pixels)
    ranks = descending_ranks(maps)
    results = {}
    if "deletion" in curves:
        results["deletion"] = _curve(scorer, torch.zeros_like(images), images, ranks, counts, batch_size)
    if "insertion" in curves:
        start = gaussian_blur(images) if insertion_start == "blur" else torch.zeros_like(images)
        results["insertion"] = _curve(scorer, images, start, ranks, counts, batch_size)
    return {**results, **{f"{name}_auc": curve_auc(curve) for name, curve in results.items()}}


def _neighbour_sums(values: torch.Tensor) -> torch.Tensor:
    """Per pixel of ``values [M, 1, H, W]``, the weighted sum of its neighbours inside the image: the stencil
    :data:`NEIGHBOUR_WEIGHTS` is ``([1, 2, 1] outer [1, 2, 1] - 4 at the centre) / 12``, applied as two separable
    passes (a float64 convolution is several times slower)."""
    padded = F.pad(values, (1, 1, 1, 1))
    rows = padded[..., :-2, :] + 2 * padded[..., 1:-1, :] + padded[..., 2:, :]
    both = rows[..., :-2] + 2 * rows[..., 1:-1] + rows[..., 2:]
    return (both - 4 * values) / 12


def _conjugate_gradients(
    apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, max_iterations: int
) -> torch.Tensor:
    """Solves ``apply(x) = rhs`` for each symmetric positive definite system ``[M, ...]`` at once (conjugate
    gradients, Hestenes and Stiefel 1952) to a residual of ``CG_TOLERANCE`` times that of ``x = 0``."""
    dims = tuple(range(1, rhs.ndim))
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    squared = residual.square().sum(dims)
    goal = CG_TOLERANCE**2 * squared
    for _ in range(max_iterations):
        active = squared > goal
        if not bool(active.any()):
            return solution
        applied = apply(direction)
        step = torch.where(active, squared / (direction * applied).sum(dims), 0.0).view(-1, *[1] * len(dims))
        solution += step * direction
        residual -= step * applied
        new_squared = residual.square().sum(dims)
        ratio = torch.where(active, new_squared / squared, 0.0).view(-1, *[1] * len(dims))
        direction = residual + ratio * direction
        squared = new_squared
    raise ConvlensError(
        f"the linear imputation did not converge in {max_iterations} conjugate-gradient iterations "
        f"(relative residual {float((squared / goal.clamp_min(1e-300)).sqrt().max()) * CG_TOLERANCE:.2e})"
    )


def linear_imputation(
    images: torch.Tensor,
    keep_mask: torch.Tensor,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noisy linear imputation (Rong et al. 2022, sec. 4.2, eq. 5): the pixels of ``images [B, C, H, W]`` outside
    ``keep_mask [B, H, W]`` (or ``[H, W]``) are replaced, per channel, by the solution of the linear system making
    each the weighted mean of its in-image neighbours (weights 1/6 sideways, 1/12 diagonally; kept neighbours
    fixed), plus ``noise`` times standard normal noise drawn from ``generator`` (on the images' device).

    The system (degrees minus neighbour weights, on the missing pixels) is symmetric positive definite whenever an
    image keeps a pixel; it is solved in float64 by conjugate gradients, with the stencil as a convolution. An image
    that keeps no pixel has no values to spread: its imputed pixels are 0 (plus the noise). Returns the images in
    their dtype.
    """
    batch, channels, height, width = images.shape
    keep = keep_mask.to(images.device).bool().expand(batch, height, width)
    keep = keep[:, None].expand(batch, channels, height, width).reshape(-1, 1, height, width)
    values = images.to(torch.float64).reshape(-1, 1, height, width)
    missing = (~keep).to(torch.float64)
    degree = _neighbour_sums(torch.ones(1, 1, height, width, dtype=torch.float64, device=images.device))

    def system(x: torch.Tensor) -> torch.Tensor:
        return missing * (degree * x - _neighbour_sums(x))

    rhs = missing * _neighbour_sums(values * keep)
    solved = _conjugate_gradients(system, rhs, max_iterations=CG_ITERATIONS_PER_SIDE * (height + width) + 100)
    filled = torch.where(keep, values, solved).view_as(images).to(images.dtype)
    if noise:
        drawn = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        filled = torch.where(keep.view_as(images), filled, filled + noise * drawn)
    return filled


def numpy_percentiles(maps: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """Per map ``[N, H, W]``, its ``percentiles`` ``[N, P]``, as ``numpy.percentile`` computes them (method
    "linear", interpolated in the maps' dtype), so thresholds match NumPy's bit for bit."""
    ordered = maps.flatten(1).sort(dim=1).values
    count = ordered.shape[1]
    columns = []
    for percentile in percentiles:
        quantile = percentile / 100
        virtual = count * quantile + (1 + quantile * -1) - 1  # numpy's _compute_virtual_index, alpha = beta = 1
        below = min(max(math.floor(virtual), 0), count - 1)
        above = min(below + 1, count - 1)
        weight = virtual - math.floor(virtual)
        low, high = ordered[:, below], ordered[:, above]
        difference = high - low
        columns.append(low + difference * weight if weight < 0.5 else high - difference * (1 - weight))
    return torch.stack(columns, dim=1)


def _road_differences(
    scorer: Scorer,
    images: torch.Tensor,
    relevance: torch.Tensor,
    percentiles: Sequence[float],
    original: torch.Tensor,
    noise: float,
    generator: torch.Generator | None,
    batch_size: int,
) -> torch.Tensor:
    """``[N, P]``: the score after imputing the pixels whose ``relevance`` is at or above each percentile of it,
    minus the original score."""
    thresholds = numpy_percentiles(relevance, percentiles)
    count = len(percentiles)

    def build(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(images.device)
        rows, column = index // count, index % count
        keep = relevance[rows] < thresholds[rows, column][:, None, None]
        return linear_imputation(images[rows], keep, noise, generator), rows

    scores = chunked_scores(scorer, len(images) * count, build, batch_size, images.device).view(len(images), count)
    return scores.to(original.dtype) - original[:, None]


def road(
    scorer: Scorer,
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    percentiles: Sequence[float] = ROAD_PERCENTILES,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """ROAD, RemOve And Debias (Rong et al. 2022), as pytorch-grad-cam's ``ROADCombined`` computes it.

    For each percentile p, MoRF imputes (:func:`linear_imputation` with ``noise``) the pixels whose map value is
    not below the map's p-th percentile (``numpy.percentile``, linear), keeping those below it; LeRF does the same
    with ``1 - map``, imputing the least relevant pixels. ``morf`` and ``lerf`` ``[N, P]`` are the scores after
    imputation minus the score of the unchanged image; ``combined`` ``[N]`` is the mean over percentiles of
    ``(lerf - morf) / 2`` (higher: the map ranks pixels better). The noise is drawn from ``generator``, MoRF's
    images first, in chunks of ``batch_size``. A constant map keeps no pixel: see :func:`linear_imputation`.
    """
    images, maps = _prepared(images, maps)

    def build_original(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(images.device)
        return images[index], index

    original = chunked_scores(scorer, len(images), build_original, batch_size, images.device).to(images.dtype)
    arguments = (percentiles, original, noise, generator, batch_size)
    morf = _road_differences(scorer, images, maps, *arguments)
    lerf = _road_differences(scorer, images, 1 - maps, *arguments)
    return {"morf": morf, "lerf": lerf, "combined": ((lerf - morf) / 2).mean(dim=1)}


def _masks_and_maps(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if masks.ndim != 3 or len(masks) != len(maps):
        raise ConvlensError(f"need maps [N, h, w] and masks [N, H, W]; got {tuple(maps.shape)}, {tuple(masks.shape)}")
    masks = masks.bool()
    return maps_at_input(maps.to(masks.device, working_dtype(maps)), masks.shape[-2:]), masks


def mask_energy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The energy-based pointing game (Score-CAM, Wang et al. 2020, sec. 5.2): per map, the share of its positive
    mass (clamped at 0, resized to the mask's size) that lies inside the mask ``[N, H, W]``; NaN for an all-zero
    map."""
    maps, masks = _masks_and_maps(maps.clamp_min(0), masks)
    inside = (maps * masks).sum(dim=(1, 2))
    total = maps.sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), math.nan)


def relevance_rank_accuracy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Relevance rank accuracy (CLEVR-XAI, Arras et al. 2022, sec. 4.2): with K the mask's pixel count, the share of
    the map's K largest pixels (map resized to the mask's size; ties in row-major order) inside the mask; NaN for an
    empty mask."""
    maps, masks = _masks_and_maps(maps, masks)
    inside = masks.flatten(1)
    top = inside.sum(dim=1)
    hits = ((descending_ranks(maps) < top[:, None]) & inside).sum(dim=1)
    return torch.where(top > 0, hits.to(maps.dtype) / top.clamp_min(1), math.nan)


def mean_interval(
    values: Any, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, float | int | None]:
    """The mean of the finite ``values`` and its percentile bootstrap interval (Efron and Tibshirani 1993, ch. 13):
    ``resamples`` means of samples drawn with replacement (NumPy, ``seed``), cut at ``(1 -/+ confidence) / 2``.
    Returns ``mean``, ``low``, ``high`` (``None`` when no value is finite) and ``n``, the number of finite values."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    flat = np.asarray(values, dtype=np.float64).ravel()
    finite = flat[np.isfinite(flat)]
    count = len(finite)
    if count == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    chunk = max(1, 1_000_000 // count)
    means = np.concatenate(
        [
            finite[rng.integers(0, count, size=(min(chunk, resamples - start), count))].mean(axis=1)
            for start in range(0, resamples, chunk)
        ]
    )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(finite.mean()), "low": float(low), "high": float(high), "n": count}
