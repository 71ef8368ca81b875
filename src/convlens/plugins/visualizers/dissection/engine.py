"""Streaming engines for network dissection and compositional explanations (course notes 002 sec. 9.1-9.2).

Nothing here knows a model or a plugin; the ``dissection`` visualizer feeds these from its passes over images.

- :class:`StreamingQuantile`: per-unit quantiles of values streamed in one or more passes, in memory that grows
  with the number of units only. Pass 1 keeps each unit's minimum, maximum and its ``buffer`` largest values: a
  quantile among those (the 99.5 % level while a unit has at most ``buffer`` / 0.005 values, 409,600 with the
  default buffer) is known after that one pass. Otherwise each later pass either counts the values in ``bins`` equal
  bins of the interval still searched (keeping each bin's smallest and largest value) or, once that interval holds at
  most ``buffer`` values, collects them. The result is exact either way: the same order statistics and the same
  linear interpolation as ``torch.quantile`` (computed in float64). A bin whose values are all equal, or two
  consecutive ranks in different bins, end the search at once; with ``bins`` 1024 a typical unit needs 3 passes
  (range, one histogram, one collection). A pathological spread still unresolved after ``max_passes`` gets the
  middle of its last interval and is flagged inexact, with the interval's half-width as its error bound.
- :func:`binary_maps`: the unit maps upsampled (bilinear) to the mask grid and thresholded. A cell is on when its
  value is >= the unit's threshold T_k, and strictly above T_k when T_k is the unit's smallest value (a unit that
  fires on fewer than the top-quantile share of cells, e.g. a sparse SAE latent, has its threshold at its floor,
  usually 0, and ">=" would switch on every cell of every image).
- :class:`IoUTally`: per (unit, concept) the summed intersection, and per unit and per concept the summed areas,
  from which IoU_k,c = sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|.
- :class:`FormulaTally` and :func:`beam_step`: one beam-search step of compositional explanations (Mu & Andreas
  2020): for every beam formula F of a unit and every concept c, the IoU of F AND c, F OR c and F AND NOT c, from
  seven running counts (|M|, |F|, |L|, |M&F|, |M&L|, |F&L|, |M&F&L|) gathered in one pass over the images.
- :class:`ConceptMasks` and :func:`concept_masks_for`: per-pixel concept masks of a batch of images, aligned with the
  model's resize and centre crop, from a ``concepts.json`` (``convlens data shapes``) or from a folder of mask images
  (layout in :class:`FolderConcepts`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from convlens import ConvlensError

if TYPE_CHECKING:
    from convlens import ConceptSet, ImageIndex, Preprocessing

CONCEPT_MASKS = "concept_masks"
MASK_IMAGES = "images"
UPDATE_ELEMENTS = 1 << 23  # values binned at a time by StreamingQuantile.update
TALLY_ELEMENTS = 1 << 24  # upsampled unit-map cells thresholded at a time by the tallies


def state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class StreamingQuantile:
    """Per-unit ``torch.quantile(values, level)`` (linear interpolation) over values streamed in passes.

    Use::

        search = StreamingQuantile(units, 0.995)
        while not search.done:
            for values in batches:          # [units, n] each, the same values in the same amounts every pass
                search.update(values)
            search.end_pass()
        search.values                       # float64 [units]

    Memory: ``units x (3 (bins + 1) + buffer)`` numbers, whatever the number of values.
    """

    HIST, COLLECT, DONE = 0, 1, 2

    def __init__(
        self,
        units: int,
        level: float,
        *,
        bins: int = 1024,
        buffer: int = 2048,
        max_passes: int = 12,
        device: torch.device | str | None = None,
    ):
        if not 0.0 <= level <= 1.0:
            raise ConvlensError(f"a quantile level lies between 0 and 1, got {level}")
        if units < 1 or bins < 2 or buffer < 1 or max_passes < 3:
            raise ConvlensError("StreamingQuantile needs units >= 1, bins >= 2, buffer >= 1 and max_passes >= 3")
        self.units, self.level, self.bins, self.buffer_size, self.max_passes = units, level, bins, buffer, max_passes
        device = torch.device(device) if device is not None else torch.device("cpu")
        f64 = dict(dtype=torch.float64, device=device)
        self.minimum = torch.full((units,), math.inf, **f64)
        self.maximum = torch.full((units,), -math.inf, **f64)
        self.count = 0
        self.passes = 0
        self.stage = "range"
        # the search: values in [low, high] hold ranks below + 0 .. below + inside - 1
        self.low = torch.zeros(units, **f64)
        self.high = torch.zeros(units, **f64)
        self.below = torch.zeros(units, dtype=torch.long, device=device)
        self.mode = torch.zeros(units, dtype=torch.long, device=device)
        self.counts = torch.zeros(units, bins + 1, dtype=torch.long, device=device)  # the last column: not counted
        self.bin_min = torch.full((units, bins + 1), math.inf, **f64)
        self.bin_max = torch.full((units, bins + 1), -math.inf, **f64)
        self.kept = torch.full((units, buffer), -math.inf, **f64)  # pass 1: the largest values, descending
        self.filled = torch.zeros(units, dtype=torch.long, device=device)
        self.lower_value = torch.zeros(units, **f64)  # order statistic at floor(rank)
        self.upper_value = torch.zeros(units, **f64)  # and at ceil(rank)
        self.exact = torch.ones(units, dtype=torch.bool, device=device)
        self.error_bound = torch.zeros(units, **f64)
        self.rank_low = self.rank_high = 0
        self.weight = 0.0

    # --- state -----------------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the search keeps between batches (its size depends on units, bins and buffer only)."""
        return {
            name: getattr(self, name)
            for name in (
                "minimum",
                "maximum",
                "low",
                "high",
                "below",
                "mode",
                "counts",
                "bin_min",
                "bin_max",
                "kept",
                "filled",
                "lower_value",
                "upper_value",
                "exact",
                "error_bound",
            )
        }

    @property
    def done(self) -> bool:
        return self.stage == "done"

    @property
    def values(self) -> torch.Tensor:
        """The quantile of each unit, float64 ``[units]`` (after :attr:`done`)."""
        if not self.done:
            raise ConvlensError("the quantile search has not finished")
        return torch.lerp(self.lower_value, self.upper_value, torch.full_like(self.lower_value, self.weight))

    # --- passes ----------------------------------------------------------------------------------------------------
    def update(self, values: torch.Tensor) -> None:
        """Add ``values [units, n]`` of the current pass."""
        if values.ndim != 2 or values.shape[0] != self.units:
            raise ConvlensError(f"StreamingQuantile expects values [{self.units}, n], got {tuple(values.shape)}")
        if self.done:
            raise ConvlensError("the quantile search has finished; it takes no more values")
        step = max(1, UPDATE_ELEMENTS // self.units)
        for start in range(0, values.shape[1], step):
            chunk = values[:, start : start + step].to(device=self.minimum.device, dtype=torch.float64)
            if self.stage == "range":
                self.minimum = torch.minimum(self.minimum, chunk.amin(dim=1))
                self.maximum = torch.maximum(self.maximum, chunk.amax(dim=1))
                self.count += chunk.shape[1]
                self.kept = torch.cat([self.kept, chunk], dim=1).topk(self.buffer_size, dim=1).values
            else:
                self._search(chunk)

    def _search(self, chunk: torch.Tensor) -> None:
        inside = (chunk >= self.low[:, None]) & (chunk <= self.high[:, None])
        hist = inside & (self.mode == self.HIST)[:, None]
        if bool(hist.any()):
            width = (self.high - self.low).clamp_min(torch.finfo(torch.float64).tiny)
            where = ((chunk - self.low[:, None]) / width[:, None] * self.bins).floor().clamp_(0, self.bins - 1).long()
            where = torch.where(hist, where, torch.full_like(where, self.bins))
            self.counts.scatter_add_(1, where, hist.long())
            self.bin_min.scatter_reduce_(1, where, chunk, "amin")
            self.bin_max.scatter_reduce_(1, where, chunk, "amax")
        collect = inside & (self.mode == self.COLLECT)[:, None]
        if bool(collect.any()):
            slots = self.filled[:, None] + collect.long().cumsum(dim=1) - 1
            rows, columns = collect.nonzero(as_tuple=True)
            self.kept[rows, slots[rows, columns]] = chunk[rows, columns]
            self.filled += collect.sum(dim=1)

    def end_pass(self) -> None:
        """Close the current pass; :attr:`done` tells whether another is needed."""
        self.passes += 1
        if self.stage == "range":
            self._start()
        else:
            self._narrow()
        if self.stage != "done" and self.passes >= self.max_passes:
            self._give_up()

    def _start(self) -> None:
        if self.count == 0:
            raise ConvlensError("the quantile search saw no values")
        if not bool(torch.isfinite(self.minimum).all() & torch.isfinite(self.maximum).all()):
            raise ConvlensError("the quantile search saw NaN or infinite values")
        rank = self.level * (self.count - 1)  # as torch.quantile (linear): lerp(v[floor], v[ceil], rank - floor)
        self.rank_low, self.rank_high = math.floor(rank), math.ceil(rank)
        self.weight = rank - self.rank_low
        if self.count - 1 - self.rank_low < self.buffer_size:  # both order statistics are among the largest kept
            self.lower_value.copy_(self.kept[:, self.count - 1 - self.rank_low])
            self.upper_value.copy_(self.kept[:, self.count - 1 - self.rank_high])
            self.mode.fill_(self.DONE)
            self.stage = "done"
            return
        self.kept.fill_(math.inf)  # collection pads with +inf, so that sorting leaves the padding last
        self.low.copy_(self.minimum)
        self.high.copy_(self.maximum)
        constant = self.minimum == self.maximum
        self.lower_value.copy_(self.minimum)
        self.upper_value.copy_(self.minimum)
        self.mode.fill_(self.HIST)
        self.mode[constant] = self.DONE
        self.stage = "search"
        self._finish_if_resolved()

    def _narrow(self) -> None:
        hist = self.mode == self.HIST
        collect = self.mode == self.COLLECT  # before the histograms hand units over to collection
        if bool(hist.any()):
            self._narrow_histograms(hist)
        if bool(collect.any()):
            ordered = self.kept[collect].sort(dim=1).values
            below = self.below[collect]
            rows = torch.arange(len(ordered), device=ordered.device)
            self.lower_value[collect] = ordered[rows, self.rank_low - below]
            self.upper_value[collect] = ordered[rows, self.rank_high - below]
            self.mode[collect] = self.DONE
        self._finish_if_resolved()

    def _narrow_histograms(self, hist: torch.Tensor) -> None:
        counts = self.counts[hist, : self.bins]
        cumulative = counts.cumsum(dim=1)
        below = self.below[hist]
        local = torch.stack([self.rank_low - below, self.rank_high - below], dim=1)  # [h, 2]
        where = torch.searchsorted(cumulative, local, right=True).clamp_(max=self.bins - 1)
        rows = torch.arange(len(counts), device=counts.device)
        low_bin, high_bin = where[:, 0], where[:, 1]
        bin_min, bin_max = self.bin_min[hist], self.bin_max[hist]
        split = low_bin != high_bin  # rank_low is the last value of its bin, rank_high the first of a later one
        low_min, low_max = bin_min[rows, low_bin], bin_max[rows, low_bin]
        flat = ~split & (low_min == low_max)  # both ranks in one bin whose values are all equal
        lower = torch.where(split, low_max, low_min)
        upper = torch.where(split, bin_min[rows, high_bin], low_min)
        resolved = split | flat
        indices = hist.nonzero(as_tuple=True)[0]
        self.lower_value[indices[resolved]] = lower[resolved]
        self.upper_value[indices[resolved]] = upper[resolved]
        self.mode[indices[resolved]] = self.DONE
        go_on = ~resolved
        if bool(go_on.any()):
            units = indices[go_on]
            chosen = low_bin[go_on]
            inside = counts[go_on].gather(1, chosen[:, None])[:, 0]
            self.below[units] += cumulative[go_on].gather(1, chosen[:, None])[:, 0] - inside
            self.low[units] = low_min[go_on]
            self.high[units] = low_max[go_on]
            self.mode[units] = torch.where(inside <= self.buffer_size, self.COLLECT, self.HIST)
        self.counts[hist] = 0
        self.bin_min[hist] = math.inf
        self.bin_max[hist] = -math.inf

    def _finish_if_resolved(self) -> None:
        if bool((self.mode == self.DONE).all()):
            self.stage = "done"

    def _give_up(self) -> None:
        left = self.mode != self.DONE
        middle = (self.low[left] + self.high[left]) / 2
        self.lower_value[left] = middle
        self.upper_value[left] = middle
        self.error_bound[left] = (self.high[left] - self.low[left]) / 2
        self.exact[left] = False
        self.mode[left] = self.DONE
        self.stage = "done"


def binary_maps(
    maps: torch.Tensor, thresholds: torch.Tensor, floors: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """``maps [B, U, h, w]`` upsampled (bilinear, ``align_corners=False``) to ``size`` and thresholded per unit:
    bool ``[B, U, H, W]``, on where value >= threshold, or > threshold when the threshold is the unit's floor."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    thresholds = thresholds.to(device=maps.device, dtype=torch.float64)
    at_floor = (thresholds <= floors.to(device=maps.device, dtype=torch.float64)).view(1, -1, 1, 1)
    level = float32_ceiling(thresholds).view(1, -1, 1, 1)
    return torch.where(at_floor, maps > level, maps >= level)


def float32_ceiling(values: torch.Tensor) -> torch.Tensor:
    """The smallest float32 >= each float64 value: for a float32 ``v``, ``v >= t`` exactly when
    ``v >= float32_ceiling(t)``, and ``v > t`` exactly when ``v > float32_ceiling(t)`` if ``t`` is a float32."""
    rounded = values.float()
    low = rounded.double() < values
    return torch.where(low, torch.nextafter(rounded, torch.full_like(rounded, math.inf)), rounded)


def unit_chunks(units: int, cells: int, images: int) -> int:
    """How many units to upsample at a time so that ``images x units x cells`` stays near :data:`TALLY_ELEMENTS`."""
    return max(1, TALLY_ELEMENTS // max(1, cells * images))


def _counts(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum_b left[b] @ right[b]^T`` for bool ``[B, m, P]`` and ``[B, n, P]``: float64 ``[m, n]``. Each product
    counts at most P < 2^24 cells, exact in float32; images go a few at a time so that the float copies stay near
    :data:`TALLY_ELEMENTS` numbers."""
    batch, m, cells = left.shape
    step = max(1, TALLY_ELEMENTS // max(1, (m + right.shape[1]) * cells))
    total = torch.zeros(m, right.shape[1], dtype=torch.float64, device=left.device)
    for start in range(0, batch, step):
        part = torch.bmm(left[start : start + step].float(), right[start : start + step].float().transpose(1, 2))
        total += part.sum(dim=0, dtype=torch.float64)
    return total


class IoUTally:
    """Summed intersections ``[units, concepts]`` and areas of unit masks ``[units]`` and concept masks
    ``[concepts]`` over images; its memory is ``units x concepts``, whatever the number of images."""

    def __init__(self, units: int, concepts: int, device: torch.device | str | None = None):
        zeros = dict(dtype=torch.float64, device=device)
        self.intersection = torch.zeros(units, concepts, **zeros)
        self.unit_area = torch.zeros(units, **zeros)
        self.concept_area = torch.zeros(concepts, **zeros)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"intersection": self.intersection, "unit_area": self.unit_area, "concept_area": self.concept_area}

    def add(
        self,
        unit_masks: torch.Tensor,
        concept_masks: torch.Tensor,
        units: slice | None = None,
        count_concepts: bool = True,
    ) -> None:
        """``unit_masks [B, u, P]`` (bool; the units ``units`` of the tally, default all) and ``concept_masks
        [B, C, P]`` of the same images. ``count_concepts``: add the concept areas (once per image)."""
        units = units if units is not None else slice(None)
        self.intersection[units] += _counts(unit_masks, concept_masks)
        self.unit_area[units] += unit_masks.sum(dim=(0, 2), dtype=torch.float64)
        if count_concepts:
            self.concept_area += concept_masks.sum(dim=(0, 2), dtype=torch.float64)

    def union(self) -> torch.Tensor:
        return self.unit_area[:, None] + self.concept_area[None, :] - self.intersection

    def iou(self) -> torch.Tensor:
        """``[units, concepts]`` float64; 0 where both masks are empty on every image."""
        union = self.union()
        return torch.where(union > 0, self.intersection / union.clamp_min(1), torch.zeros_like(union))


# --- compositional explanations ---------------------------------------------------------------------------------
# A formula is a nested tuple: ("concept", index) | ("and", F, G) | ("or", F, G) | ("and not", F, G).
OPERATIONS = ("and", "or", "and not")


def leaf(concept: int) -> tuple:
    return ("concept", concept)


def leaves(formula: tuple) -> list[int]:
    return [formula[1]] if formula[0] == "concept" else leaves(formula[1]) + leaves(formula[2])


def formula_length(formula: tuple) -> int:
    return len(leaves(formula))


def formula_text(formula: tuple, names: Sequence[str]) -> str:
    """``(colour=red OR colour=blue) AND NOT texture=dots``: a compound left side is bracketed unless it chains
    with the same operation (OR with OR; AND and AND NOT with each other)."""
    if formula[0] == "concept":
        return names[formula[1]]
    operation, left, right = formula
    text = formula_text(left, names)
    chains = left[0] == "concept" or left[0] == operation or {left[0], operation} <= {"and", "and not"}
    return f"{text if chains else f'({text})'} {operation.upper()} {formula_text(right, names)}"


def canonical(formula: tuple) -> str:
    """A key equal for formulas that differ only by the order of ANDed or ORed terms."""

    def terms(node: tuple, operation: str) -> list[str]:
        if node[0] == operation or (operation == "and" and node[0] == "and not"):
            right = canonical(node[2]) if node[0] != "and not" else f"not {canonical(node[2])}"
            return terms(node[1], operation) + [right]
        return [canonical(node)]

    if formula[0] == "concept":
        return str(formula[1])
    operation = "or" if formula[0] == "or" else "and"
    return f"{operation}({','.join(sorted(terms(formula, operation)))})"


def evaluate(formula: tuple, concept_masks: torch.Tensor) -> torch.Tensor:
    """The formula's mask ``[B, P]`` from concept masks ``[B, C, P]``."""
    if formula[0] == "concept":
        return concept_masks[:, formula[1]]
    left, right = evaluate(formula[1], concept_masks), evaluate(formula[2], concept_masks)
    if formula[0] == "and":
        return left & right
    if formula[0] == "or":
        return left | right
    return left & ~right


class FormulaTally:
    """The counts one beam step needs, summed over images: per explained unit its mask area, per beam formula its
    area and overlap with the unit, and per (beam formula, concept) the overlaps with the concept. Memory:
    ``units x beam x concepts``."""

    def __init__(self, beams: Sequence[Sequence[tuple]], concepts: int, device: torch.device | str | None = None):
        self.beams = [list(beam) for beam in beams]
        width = max((len(beam) for beam in self.beams), default=0)
        units = len(self.beams)
        zeros = dict(dtype=torch.float64, device=device)
        self.unit = torch.zeros(units, **zeros)  # |M|
        self.formula = torch.zeros(units, width, **zeros)  # |F|
        self.concept = torch.zeros(concepts, **zeros)  # |L|
        self.unit_formula = torch.zeros(units, width, **zeros)  # |M & F|
        self.unit_concept = torch.zeros(units, concepts, **zeros)  # |M & L|
        self.formula_concept = torch.zeros(units, width, concepts, **zeros)  # |F & L|
        self.all_three = torch.zeros(units, width, concepts, **zeros)  # |M & F & L|

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: getattr(self, name)
            for name in ("unit", "formula", "concept", "unit_formula", "unit_concept", "formula_concept", "all_three")
        }

    def add(self, unit_masks: torch.Tensor, concept_masks: torch.Tensor) -> None:
        """``unit_masks [B, U, P]`` of the explained units and ``concept_masks [B, C, P]`` (bool)."""
        batch, units, cells = unit_masks.shape
        width = self.formula.shape[1]
        step = max(1, TALLY_ELEMENTS // max(1, units * width * cells))
        for start in range(0, batch, step):
            self._add(unit_masks[start : start + step], concept_masks[start : start + step], width)

    def _add(self, unit_masks: torch.Tensor, concept_masks: torch.Tensor, width: int) -> None:
        batch, units, cells = unit_masks.shape
        formulas = torch.zeros(batch, units, width, cells, dtype=torch.bool, device=unit_masks.device)
        for u, beam in enumerate(self.beams):
            for w, formula in enumerate(beam):
                formulas[:, u, w] = evaluate(formula, concept_masks)
        both = formulas & unit_masks[:, :, None]
        self.unit += unit_masks.sum(dim=(0, 2), dtype=torch.float64)
        self.concept += concept_masks.sum(dim=(0, 2), dtype=torch.float64)
        self.formula += formulas.sum(dim=(0, 3), dtype=torch.float64)
        self.unit_formula += both.sum(dim=(0, 3), dtype=torch.float64)
        self.unit_concept += _counts(unit_masks, concept_masks)
        self.formula_concept += _counts(formulas.flatten(1, 2), concept_masks).view(units, width, -1)
        self.all_three += _counts(both.flatten(1, 2), concept_masks).view(units, width, -1)

    def scores(self) -> dict[str, torch.Tensor]:
        """IoU ``[units, beam, concepts]`` of F AND c, F OR c and F AND NOT c, by operation."""
        unit = self.unit[:, None, None]
        formula, unit_formula = self.formula[:, :, None], self.unit_formula[:, :, None]
        concept, unit_concept = self.concept[None, None, :], self.unit_concept[:, None, :]
        pairs = {
            "and": (self.all_three, self.formula_concept),
            "or": (unit_formula + unit_concept - self.all_three, formula + concept - self.formula_concept),
            "and not": (unit_formula - self.all_three, formula - self.formula_concept),
        }
        result = {}
        for operation, (intersection, area) in pairs.items():
            union = unit + area - intersection
            result[operation] = torch.where(union > 0, intersection / union.clamp_min(1), torch.zeros_like(union))
        return result


def first_beams(iou: torch.Tensor, width: int) -> list[list[tuple[tuple, float]]]:
    """Length-1 beams from a unit-by-concept IoU matrix ``[U, C]``: each unit's ``width`` best concepts (ties: the
    lower concept index first)."""
    beams = []
    for row in iou.tolist():
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))[:width]
        beams.append([(leaf(c), row[c]) for c in order])
    return beams


def beam_step(tally: FormulaTally, width: int, names: Sequence[str]) -> list[list[tuple[tuple, float]]]:
    """Per unit, the ``width`` best formulas one concept longer than its beam's, each built by joining a beam
    formula with a concept it does not use yet by AND, OR or AND NOT; formulas equal up to the order of their terms
    count once. Ties go to the formula listed first (beam order, then operation, then concept)."""
    scores = {operation: values.cpu().tolist() for operation, values in tally.scores().items()}
    beams = []
    for u, beam in enumerate(tally.beams):
        candidates: dict[str, tuple[tuple, float]] = {}
        order = 0
        ranked = []
        for w, formula in enumerate(beam):
            used = set(leaves(formula))
            for operation in OPERATIONS:
                for c in range(len(names)):
                    if c in used:
                        continue
                    built = (operation, formula, leaf(c))
                    key = canonical(built)
                    if key in candidates:
                        continue
                    candidates[key] = (built, scores[operation][u][w][c])
                    ranked.append((-candidates[key][1], order, key))
                    order += 1
        ranked.sort()
        beams.append([candidates[key] for _, _, key in ranked[:width]])
    return beams


# --- concept masks -----------------------------------------------------------------------------------------------
def _resized(mask: np.ndarray, preprocessing: Preprocessing, size: tuple[int, int]) -> np.ndarray:
    """A bool mask of the original image given the model's resize and centre crop, then resized to ``size``."""
    from PIL import Image

    aligned = preprocessing.eval_geometry(Image.fromarray(mask.astype(np.uint8) * 255, "L"))
    if aligned.size != (size[1], size[0]):
        aligned = aligned.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(aligned) >= 128


class ConceptMasks(abc.ABC):
    """Per-pixel masks of named concepts for images of an index; subclasses implement :meth:`image_masks`."""

    #: ``(category, concept)`` pairs, in the order of the mask axis
    concepts: list[tuple[str, str]]
    #: where the masks come from, for the record
    source: str

    @property
    def names(self) -> list[str]:
        return [f"{category}={name}" for category, name in self.concepts]

    @property
    def categories(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for category, name in self.concepts:
            found.setdefault(category, []).append(name)
        return found

    @abc.abstractmethod
    def image_masks(self, position: int, size: tuple[int, int]) -> dict[int, np.ndarray] | None:
        """Concept number -> bool ``[H, W]`` mask at ``size`` of the image at index ``position`` (absent
        concepts: empty); ``None`` when the dataset has no concept information for the image (it is then left out
        of the tallies)."""

    def batch(
        self, positions: Sequence[int], size: tuple[int, int], device: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``[B, C, H * W]`` masks of the images at ``positions``, and bool ``[B]``: which images have concept
        information."""
        result = np.zeros((len(positions), len(self.concepts), size[0] * size[1]), dtype=bool)
        known = np.zeros(len(positions), dtype=bool)
        for row, position in enumerate(positions):
            masks = self.image_masks(int(position), size)
            known[row] = masks is not None
            for concept, mask in (masks or {}).items():
                result[row, concept] = mask.reshape(-1)
        return torch.from_numpy(result).to(device), torch.from_numpy(known).to(device)


class DatasetConcepts(ConceptMasks):
    """Concepts of a ``concepts.json``: an image's concept of each category covers that category's region
    (foreground, background or the whole image) of the image; the other concepts are empty in it."""

    def __init__(self, concept_set: ConceptSet, index: ImageIndex, preprocessing: Preprocessing):
        self.set = concept_set
        self.preprocessing = preprocessing
        self.concepts = concept_set.concepts
        self.number = {pair: k for k, pair in enumerate(self.concepts)}
        self.record_of = concept_set.positions_in(index)
        self.source = str(concept_set.root / "concepts.json")

    def image_masks(self, position: int, size: tuple[int, int]) -> dict[int, np.ndarray] | None:
        if position not in self.record_of:
            return None
        record_number = self.record_of[position]
        record = self.set.images[record_number]
        foreground = _resized(self.set.foreground(record_number), self.preprocessing, size)
        regions = {"foreground": foreground, "background": ~foreground, "image": np.ones_like(foreground)}
        masks = {}
        for category in self.set.categories:
            value = record.get(category)
            concept = self.number.get((category, value)) if isinstance(value, str) else None
            if concept is not None:
                masks[concept] = regions[self.set.regions[category]]
        return masks


class FolderConcepts(ConceptMasks):
    """Concepts as mask images::

        ROOT/<category>/<concept>/<image path relative to the image folder, suffix .png>

    A mask has the image's size; its non-zero pixels show the concept. An image without a file for a concept has an
    empty mask for it. Every ``<category>/<concept>`` folder is a concept, even one with no file.
    """

    def __init__(self, root: Path, index: ImageIndex, preprocessing: Preprocessing):
        self.root = Path(root)
        self.index = index
        self.preprocessing = preprocessing
        self.concepts = [
            (category.name, concept.name)
            for category in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            for concept in sorted(p for p in category.iterdir() if p.is_dir() and not p.name.startswith("."))
        ]
        if not self.concepts:
            raise ConvlensError(f"{self.root} holds no <category>/<concept> folders of mask images")
        self.source = str(self.root)

    def mask_path(self, position: int, concept: int) -> Path:
        relative = Path(self.index.relative(self.index.paths[position])).with_suffix(".png")
        category, name = self.concepts[concept]
        return self.root / category / name / relative

    def image_masks(self, position: int, size: tuple[int, int]) -> dict[int, np.ndarray] | None:
        from PIL import Image

        masks = {}
        for concept in range(len(self.concepts)):
            path = self.mask_path(position, concept)
            if not path.is_file():
                continue
            try:
                with Image.open(path) as picture:
                    present = np.asarray(picture.convert("L")) > 0
            except OSError as exc:
                raise ConvlensError(f"cannot read concept mask {path}: {exc}") from None
            masks[concept] = _resized(present, self.preprocessing, size)
        return masks


def dataset_concepts_file(data: Any) -> Path | None:
    """The ``concepts.json`` of ``data``: in the folder itself, or beside it when ``data`` is the image folder that
    the file names."""
    if not isinstance(data, (str, Path)):
        return None
    folder = Path(data)
    if (folder / "concepts.json").is_file():
        return folder / "concepts.json"
    parent = folder.parent / "concepts.json"
    if folder.is_dir() and parent.is_file():
        import json

        try:
            image_root = json.loads(parent.read_text()).get("image_root", MASK_IMAGES)
        except (OSError, ValueError, AttributeError):
            return None
        if (folder.parent / str(image_root)).resolve() == folder.resolve():
            return parent
    return None


def concept_masks_for(
    data: Any, index: ImageIndex, preprocessing: Preprocessing, mask_root: str | Path | None = None
) -> ConceptMasks:
    """The concept masks of ``data``: the folder ``mask_root`` when given, else the ``concepts.json`` of the data,
    else ``DATA/concept_masks``; one clear error when there is none."""
    from convlens import load_concepts

    if mask_root:
        if not Path(mask_root).is_dir():
            raise ConvlensError(f"concept mask folder not found: {mask_root}")
        return FolderConcepts(Path(mask_root), index, preprocessing)
    found = dataset_concepts_file(data)
    if found is not None:
        return DatasetConcepts(load_concepts(found.parent), index, preprocessing)
    if isinstance(data, (str, Path)) and (Path(data) / CONCEPT_MASKS).is_dir():
        return FolderConcepts(Path(data) / CONCEPT_MASKS, index, preprocessing)
    raise ConvlensError(
        f"{data} has no concept masks: dissection needs a dataset with a concepts.json (make one with `convlens data "
        f"shapes`) or a folder DATA/{CONCEPT_MASKS}/<category>/<concept>/<image path>.png beside the images in "
        f"DATA/{MASK_IMAGES}/ (or pass --concept-masks)"
    )


class TopImages:
    """Per unit, the ``k`` images with the largest score seen so far (ties: the earlier image), in ``[units, k]``
    tensors whatever the number of images."""

    def __init__(self, units: int, k: int, device: torch.device | str | None = None):
        self.k = k
        self.values = torch.empty(units, 0, dtype=torch.float64, device=device)
        self.positions = torch.empty(units, 0, dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, positions: torch.Tensor) -> None:
        """``scores [B, units]`` of the images at dataset ``positions [B]``, in dataset order."""
        values = torch.cat([self.values, scores.T.to(self.values)], dim=1)
        where = torch.cat([self.positions, positions.to(self.positions.device)[None].expand(len(values), -1)], dim=1)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values, self.positions = values.gather(1, order), where.gather(1, order)
