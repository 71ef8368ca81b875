"""Network dissection and compositional explanations of units (course notes 002 sec. 9.1-9.2; Bau et al. 2017,
Mu & Andreas 2020).

Every unit (a channel of the layer, or with an SAE one of its latents) gets a threshold T_k: the top ``quantile``
(0.5 %) level of its activations over every cell of every image, exact (``torch.quantile``'s linear interpolation).
Each image's map, upsampled (bilinear) to the mask grid and thresholded at T_k, is the unit's binary map M_k(x): the
cells >= T_k, or > T_k when T_k is the unit's smallest value (a unit firing on fewer than 0.5 % of the cells, such as
a sparse SAE latent, then keeps its firing region instead of every cell). With every concept c's masks L_c(x),
IoU_k,c = sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|. A unit's label is its best concept; it is a detector
when that IoU is above ``iou_threshold`` (0.04). Detectors are counted per concept category, and so are the unique
concepts they detect.

Compositional explanations extend the label of the ``compositional_units`` best units to formulas of up to
``formula_length`` concepts joined by AND, OR and AND NOT, found by beam search (``beam`` formulas kept per length);
the record lists the best formula of each length and its IoU.

Memory grows with units x concepts, never with the number of images: every quantity is streamed. The passes over
the images are: one for the thresholds (exact quantiles; two more only when a unit's top share of cells outgrows
the 2048 values kept per unit, see :class:`.engine.StreamingQuantile`), one for the IoU tallies
and each unit's top images, one per formula length above 1 (recomputing the explained units' maps only), and one
over the top images of the drawn detectors. Memory per batch of images grows with batch x concepts x mask cells
(the concept masks of the batch); lower ``batch_size`` or ``mask_size`` for large concept sets at 224 px.

Concept masks come from the data's ``concepts.json`` (``convlens data shapes``: shape and colour cover an image's
foreground, texture its background) or from mask images, ``DATA/concept_masks/<category>/<concept>/<image path
relative to DATA/images, suffix .png>`` beside the images in ``DATA/images/`` (non-zero pixels: the concept; an
image without a file has an empty mask for that concept), or any such folder given as ``concept_masks``. Masks get
the model's resize and centre crop, so they stay aligned with what the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from convlens import ConvlensError, ImageVisualizer, Params, VisualizerSpec, VisualTarget, hookimpl, param

if TYPE_CHECKING:
    import torch

UNIT_COLOUR = (255, 214, 0)  # outline of the unit's thresholded region
CONCEPT_COLOUR = (0, 214, 255)  # outline of the concept's mask
SHADE = 0.35  # brightness kept outside the unit's region


@dataclass(frozen=True)
class DissectionParams(Params):
    quantile: float = param(
        0.005,
        min=0.0,
        max=1.0,
        help="share of each unit's activations (every cell of every "
        "image) above its threshold: T_k is their (1 - quantile) quantile (NetDissect: 0.005)",
    )
    iou_threshold: float = param(
        0.04,
        min=0.0,
        max=1.0,
        help="a unit whose best IoU is above this is a detector of that concept (NetDissect: 0.04)",
    )
    mask_size: Optional[int] = param(
        None, min=1, help="side in cells of the square grid the IoU is computed on (default: the model's input size)"
    )
    max_images: Optional[int] = param(None, min=1, help="look at the first N images of --data only")
    batch_size: int = param(32, min=1, help="images per forward pass")
    workers: int = param(0, min=0, help="data-loading processes")
    formula_length: int = param(3, min=1, max=10, help="longest compositional formula (1: network dissection only)")
    beam: int = param(5, min=1, max=100, help="formulas kept per length by the beam search")
    compositional_units: int = param(
        8,
        min=0,
        max=64,
        help="explain this many units with formulas: those with the "
        "highest IoU among the dissected units (--units, default all)",
    )
    examples: int = param(4, min=1, max=32, help="top images (by the unit's strongest activation) per detector figure")
    figures: int = param(32, min=0, help="draw the figures of at most this many detectors, highest IoU first")
    concept_masks: str = param(
        "",
        help="a folder <category>/<concept>/<image path>.png of concept masks (default: "
        "the data's concepts.json, or DATA/concept_masks)",
    )
    tile: int = param(96, min=16, help="side in pixels of each image in the detector figures")


class DissectionVisualizer(ImageVisualizer):
    """Writes ``dissection.json`` (per unit: ``threshold`` T_k, best ``concept`` with its ``category`` and ``iou``,
    ``detector``, ``area`` (the share of the tallied cells in its binary maps), ``top`` (3 concepts with their IoU),
    ``examples`` (top images), ``formulas`` (best per length with IoU, for the explained units, else null);
    ``counts``: detectors per category, unique concepts, per category and in all), ``iou.safetensors`` (the
    unit x concept IoU, intersections and unions), ``detectors.png`` (detectors per category),
    ``units/<unit>.png`` per drawn detector (its top images, the region above T_k kept bright and outlined in
    yellow, the concept's mask outlined in cyan; figure kind ``"dissection"``) and ``compositional/<unit>.png``
    (IoU against formula length; kind ``"compositional"``)."""

    name = "dissection"

    def __init__(self, params: DissectionParams | None = None):
        super().__init__(params or DissectionParams())
        self._index: tuple[Any, Any] | None = None

    # --- data ------------------------------------------------------------------------------------------------------
    def data_of(self, target: VisualTarget):
        """The images of ``target.data``: ``DATA/images`` when DATA holds a ``concept_masks`` folder (and no
        ``concepts.json``), else as every visualizer reads them. Scanned once per run."""
        from convlens import images_at

        from .engine import CONCEPT_MASKS, MASK_IMAGES, dataset_concepts_file

        if self._index is not None and self._index[0] is target.data:
            return self._index[1]
        data = target.data
        if (
            isinstance(data, (str, Path))
            and not self.params.concept_masks
            and (Path(data) / CONCEPT_MASKS).is_dir()
            and dataset_concepts_file(data) is None
        ):
            images = Path(data) / MASK_IMAGES
            if not images.is_dir():
                raise ConvlensError(
                    f"{data} holds {CONCEPT_MASKS}/ but no {MASK_IMAGES}/ folder: put the images "
                    f"under {images}, or pass the mask folder as --concept-masks"
                )
            index = images_at(images)
        else:
            index = super().data_of(target)
        self._index = (target.data, index)
        return index

    # --- the run ---------------------------------------------------------------------------------------------------
    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        import torch

        from convlens import Preprocessing, SkipLog, write_json_atomic

        from .engine import StreamingQuantile, concept_masks_for, state_bytes

        params = self.params
        out_dir = Path(out_dir)
        self._index = None
        index = self.data_of(target)
        preprocessing = Preprocessing.of(target.model)
        concepts = concept_masks_for(target.data, index, preprocessing, params.concept_masks or None)
        positions = list(range(min(len(index), params.max_images or len(index))))
        device = next((p.device for p in target.model.module.parameters()), torch.device("cpu"))
        available, kind = self._probe(target, device)
        units = self._units(target, available, kind)
        size = (params.mask_size,) * 2 if params.mask_size else tuple(target.model.input_size)
        chosen = torch.tensor(units, dtype=torch.long, device=device)
        out_dir.mkdir(parents=True, exist_ok=True)

        skip_log = SkipLog(index.root)
        search = StreamingQuantile(len(units), 1.0 - params.quantile, device=device)
        seen = 0
        while not search.done:
            log = skip_log if search.passes == 0 else SkipLog(index.root)
            for batch, _, maps in self._stream(target, positions, chosen, log):
                search.update(maps.transpose(0, 1).reshape(len(units), -1))
                seen += len(batch) if search.passes == 0 else 0
            if search.passes == 0 and not seen:
                raise ConvlensError(f"none of the images under {index.root} could be read")
            search.end_pass()
        thresholds, floors = search.values, search.minimum

        tally, top, labelled = self._tally(target, positions, chosen, concepts, thresholds, floors, size, device)
        iou = tally.iou().cpu()
        names = concepts.names
        categories = [category for category, _ in concepts.concepts]
        order = iou.sort(dim=1, descending=True, stable=True).indices  # ties: the concept listed first
        best = order[:, 0]
        best_iou = iou.gather(1, best[:, None])[:, 0]
        detector = best_iou > params.iou_threshold

        explained = self._explained(units, best_iou)
        formulas, formula_bytes = self._compose(
            target, positions, chosen, explained, iou, concepts, thresholds, floors, size, device
        )
        cells = labelled * size[0] * size[1]
        ranked = order[:, :3].tolist()
        entries = []
        for column, unit in enumerate(units):
            entries.append(
                {
                    "unit": unit,
                    "threshold": float(thresholds[column]),
                    "threshold_exact": bool(search.exact[column]),
                    "concept": names[int(best[column])],
                    "category": categories[int(best[column])],
                    "iou": float(best_iou[column]),
                    "detector": bool(detector[column]),
                    "area": float(tally.unit_area[column]) / cells if cells else 0.0,
                    "top": [{"concept": names[c], "iou": float(iou[column, c])} for c in ranked[column]],
                    "examples": [
                        {"image": index.relative(index.paths[int(p)]), "position": int(p), "value": float(v)}
                        for p, v in zip(top.positions[column].tolist(), top.values[column].tolist())
                    ],
                    "formulas": formulas.get(column),
                }
            )
        counts = self._counts(entries, concepts, kind)
        record: dict[str, Any] = {
            "visualizer": self.name,
            "layer": target.layer,
            "unit_kind": kind,
            "params": params.to_dict(),
            "images": seen,
            "labelled_images": labelled,
            "skipped": skip_log.as_json(),
            "mask_size": list(size),
            "concept_source": concepts.source,
            "concepts": concepts.categories,
            "quantile": {
                "level": 1.0 - params.quantile,
                "passes": search.passes,
                "exact": bool(search.exact.all()),
                "largest_error": float(search.error_bound.max()),
            },
            "memory": {
                "quantile_state_bytes": state_bytes(search.state_tensors()),
                "tally_state_bytes": state_bytes(tally.state_tensors()),
                "formula_state_bytes": formula_bytes,
            },
            "counts": counts,
            "units": entries,
            "figures": [],
        }
        self._save_matrix(out_dir, units, names, tally, thresholds)
        record["figures"] = self._draw(
            target, out_dir, entries, concepts, thresholds, floors, size, kind, counts, index, device
        )
        record["summary"] = self._summary(counts, kind, len(explained), skip_log)
        write_json_atomic(out_dir / "dissection.json", record)
        return record

    # --- passes ----------------------------------------------------------------------------------------------------
    def _probe(self, target: VisualTarget, device: Any) -> tuple[int, str]:
        """The number of units (channels, or SAE latents) and their kind; one clear error for a layer without maps."""
        import torch

        from convlens import activations_at

        probe = activations_at(
            target.model.module, torch.zeros(1, 3, *target.model.input_size, device=device), target.layer
        ).activations[target.layer]
        if probe.ndim != 4:
            raise ConvlensError(
                f"dissection needs [C, H, W] maps, but layer '{target.layer}' gives {tuple(probe.shape[1:])}"
            )
        if target.sae is None:
            return probe.shape[1], "channel"
        if probe.shape[1] != target.sae.input_dim:
            raise ConvlensError(
                f"the SAE reads {target.sae.input_dim} channels but layer '{target.layer}' has {probe.shape[1]}"
            )
        return target.sae.latent_dim, "latent"

    @staticmethod
    def _units(target: VisualTarget, available: int, kind: str) -> list[int]:
        units = list(dict.fromkeys(target.units)) if target.units else list(range(available))
        outside = [unit for unit in units if not 0 <= unit < available]
        if outside:
            raise ConvlensError(
                f"{kind} {outside[0]} is out of range: there are {available} {kind}s "
                f"({'the SAE' if kind == 'latent' else f'layer {target.layer!r}'})"
            )
        return units

    def _maps(
        self, target: VisualTarget, images: torch.Tensor, chosen: torch.Tensor, index: Any, positions: torch.Tensor
    ) -> torch.Tensor:
        """``[B, U, h, w]`` float maps of the chosen channels or latents."""
        import torch

        from convlens import activations_at

        activations = activations_at(target.model.module, images, target.layer).activations[target.layer]
        if target.sae is not None:
            activations = target.sae.encode(activations.to(target.sae.input_mean.dtype))
        maps = activations.index_select(1, chosen).float()
        if not bool(torch.isfinite(maps).all()):
            bad = int(positions[(~torch.isfinite(maps)).flatten(1).any(dim=1).cpu()][0])
            raise ConvlensError(
                f"layer '{target.layer}' gives NaN or infinite values for image {index.relative(index.paths[bad])}"
            )
        return maps

    def _stream(self, target: VisualTarget, positions: list[int], chosen: torch.Tensor, skip_log: Any):
        """``(batch, images, maps)`` for every readable image at ``positions``, in order."""
        import torch

        index = self.data_of(target)
        device = chosen.device
        with torch.no_grad():
            for batch in self.batches(
                target, positions, batch_size=self.params.batch_size, skip_log=skip_log, workers=self.params.workers
            ):
                images = batch.images.to(device)
                yield batch, images, self._maps(target, images, chosen, index, batch.positions)

    def _tally(
        self,
        target: VisualTarget,
        positions: list[int],
        chosen: torch.Tensor,
        concepts: Any,
        thresholds: torch.Tensor,
        floors: torch.Tensor,
        size: tuple[int, int],
        device: Any,
    ):
        """The IoU tallies and each unit's top images (by its strongest activation) in one pass."""
        from convlens import SkipLog

        from .engine import IoUTally, TopImages, binary_maps, unit_chunks

        units = len(chosen)
        tally = IoUTally(units, len(concepts.concepts), device)
        top = TopImages(units, self.params.examples)
        labelled = 0
        index = self.data_of(target)
        for batch, _, maps in self._stream(target, positions, chosen, SkipLog(index.root)):
            top.update(maps.amax(dim=(2, 3)).cpu(), batch.positions)
            masks, known = concepts.batch(batch.positions.tolist(), size, device)
            if not bool(known.any()):
                continue
            maps, masks = maps[known], masks[known]
            labelled += int(known.sum())
            step = unit_chunks(units, size[0] * size[1], len(maps))
            for start in range(0, units, step):
                part = slice(start, start + step)
                binary = binary_maps(maps[:, part], thresholds[part], floors[part], size).flatten(2)
                tally.add(binary, masks, part, count_concepts=start == 0)
        if not labelled:
            raise ConvlensError(f"none of the images under {index.root} has concept masks in {concepts.source}")
        if not bool((tally.concept_area > 0).any()):
            raise ConvlensError(f"the concept masks in {concepts.source} are empty on all {labelled} images")
        return tally, top, labelled

    def _explained(self, units: list[int], best_iou: torch.Tensor) -> list[int]:
        """Columns of the units explained by formulas: the highest IoU first (ties: the lower unit)."""
        if self.params.formula_length < 2 or not self.params.compositional_units:
            return []
        order = sorted(range(len(units)), key=lambda column: (-float(best_iou[column]), units[column]))
        return order[: self.params.compositional_units]

    def _compose(
        self,
        target: VisualTarget,
        positions: list[int],
        chosen: torch.Tensor,
        explained: list[int],
        iou: torch.Tensor,
        concepts: Any,
        thresholds: torch.Tensor,
        floors: torch.Tensor,
        size: tuple[int, int],
        device: Any,
    ) -> tuple[dict[int, list[dict[str, Any]]], int]:
        """Beam search over formulas, one pass over the images per length; per explained column, the best formula
        of each length with its IoU. Also the bytes of the largest formula tally."""
        from convlens import SkipLog

        from .engine import FormulaTally, beam_step, binary_maps, first_beams, formula_text, state_bytes

        if not explained:
            return {}, 0
        names = concepts.names
        beams = first_beams(iou[explained], self.params.beam)
        history = {column: [beam[0]] for column, beam in zip(explained, beams)}
        subset = chosen[explained]
        index = self.data_of(target)
        largest = 0
        for _ in range(2, self.params.formula_length + 1):
            if not all(beams):
                break
            tally = FormulaTally([[formula for formula, _ in beam] for beam in beams], len(names), device)
            largest = max(largest, state_bytes(tally.state_tensors()))
            for batch, _, maps in self._stream(target, positions, subset, SkipLog(index.root)):
                masks, known = concepts.batch(batch.positions.tolist(), size, device)
                if bool(known.any()):
                    binary = binary_maps(maps[known], thresholds[explained], floors[explained], size).flatten(2)
                    tally.add(binary, masks[known])
            beams = beam_step(tally, self.params.beam, names)
            for column, beam in zip(explained, beams):
                if beam:
                    history[column].append(beam[0])
        result = {
            column: [
                {"length": length, "formula": formula_text(formula, names), "iou": float(value)}
                for length, (formula, value) in enumerate(steps, start=1)
            ]
            for column, steps in history.items()
        }
        return result, largest

    # --- results ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _counts(entries: list[dict[str, Any]], concepts: Any, kind: str) -> dict[str, Any]:
        detectors = [entry for entry in entries if entry["detector"]]
        by_category = dict.fromkeys(concepts.categories, 0)
        unique_by_category = {category: set() for category in concepts.categories}
        by_concept: dict[str, int] = {}
        for entry in detectors:
            by_category[entry["category"]] += 1
            unique_by_category[entry["category"]].add(entry["concept"])
            by_concept[entry["concept"]] = by_concept.get(entry["concept"], 0) + 1
        return {
            "unit_kind": kind,
            "units": len(entries),
            "detectors": len(detectors),
            "unique_concepts": len(by_concept),
            "detectors_by_category": by_category,
            "unique_concepts_by_category": {c: len(found) for c, found in unique_by_category.items()},
            "detectors_by_concept": dict(sorted(by_concept.items(), key=lambda item: (-item[1], item[0]))),
        }

    def _summary(self, counts: dict[str, Any], kind: str, explained: int, skip_log: Any) -> str:
        categories = ", ".join(f"{category} {count}" for category, count in counts["detectors_by_category"].items())
        text = (
            f"{counts['detectors']} of {counts['units']} {kind}s are detectors (IoU > "
            f"{self.params.iou_threshold:g}) of {counts['unique_concepts']} unique concepts; detectors per "
            f"category: {categories}"
        )
        if explained:
            text += f"; formulas up to length {self.params.formula_length} for {explained} {kind}s"
        if len(skip_log):
            text += f"; {skip_log.summary()}"
        return text

    @staticmethod
    def _save_matrix(out_dir: Path, units: list[int], names: list[str], tally: Any, thresholds: Any) -> None:
        import json

        import torch

        from convlens import save_tensors_atomic

        save_tensors_atomic(
            {
                "iou": tally.iou().cpu().contiguous(),
                "intersection": tally.intersection.cpu(),
                "union": tally.union().cpu().contiguous(),
                "thresholds": thresholds.cpu(),
                "units": torch.tensor(units, dtype=torch.long),
            },
            out_dir / "iou.safetensors",
            metadata={"concepts": json.dumps(names), "axes": "unit, concept"},
        )

    # --- pictures --------------------------------------------------------------------------------------------------
    def _draw(
        self,
        target: VisualTarget,
        out_dir: Path,
        entries: list[dict[str, Any]],
        concepts: Any,
        thresholds: Any,
        floors: Any,
        size: tuple[int, int],
        kind: str,
        counts: dict[str, Any],
        index: Any,
        device: Any,
    ) -> list[dict[str, Any]]:
        from convlens import BarPanel, LinePanel, save_chart

        figures = []
        labels = [
            f"{category} ({counts['unique_concepts_by_category'][category]} unique)"
            for category in counts["detectors_by_category"]
        ]
        chart = BarPanel(
            labels=labels,
            values=list(counts["detectors_by_category"].values()),
            title=f"{counts['detectors']} of {counts['units']} {kind}s are detectors of "
            f"{counts['unique_concepts']} unique concepts",
            xlabel=f"detector {kind}s",
            key="detectors",
        )
        save_chart(chart, out_dir / "detectors.png")
        figures.append(
            {
                "unit": None,
                "path": "detectors.png",
                "kind": "detectors",
                "caption": f"{kind}s whose best IoU is above {self.params.iou_threshold:g}, per concept "
                "category (unique concepts in brackets)",
            }
        )
        drawn = sorted(
            (column for column, entry in enumerate(entries) if entry["detector"]),
            key=lambda column: (-entries[column]["iou"], entries[column]["unit"]),
        )[: self.params.figures]
        tiles = self._tiles(target, drawn, entries, concepts, thresholds, floors, size, index, device)
        for column in drawn:
            entry = entries[column]
            path = self._montage(out_dir, entry, kind, tiles[column])
            figures.append(
                {
                    "unit": entry["unit"],
                    "path": path,
                    "kind": "dissection",
                    "caption": f"{kind} {entry['unit']}: {entry['concept']} (IoU {entry['iou']:.3f}); top "
                    f"{len(tiles[column])} images, above the threshold {entry['threshold']:.3g} "
                    "outlined in yellow, the concept in cyan",
                }
            )
        for entry in entries:
            if not entry["formulas"]:
                continue
            lengths = [step["length"] for step in entry["formulas"]]
            chart = LinePanel(
                series={f"{kind} {entry['unit']}": (lengths, [step["iou"] for step in entry["formulas"]])},
                title=f"{kind} {entry['unit']}: IoU of the best formula per length",
                xlabel="formula length",
                ylabel="IoU",
                integer_x=True,
                key="formulas",
            )
            relative = f"compositional/{entry['unit']:04d}.png"
            save_chart(chart, out_dir / relative)
            figures.append(
                {
                    "unit": entry["unit"],
                    "path": relative,
                    "kind": "compositional",
                    "caption": "; ".join(
                        f"{step['length']}: {step['formula']} (IoU {step['iou']:.3f})" for step in entry["formulas"]
                    ),
                }
            )
        return figures

    def _tiles(
        self,
        target: VisualTarget,
        drawn: list[int],
        entries: list[dict[str, Any]],
        concepts: Any,
        thresholds: Any,
        floors: Any,
        size: tuple[int, int],
        index: Any,
        device: Any,
    ) -> dict[int, list[Any]]:
        """Per drawn column, its top images with the unit's region and the concept's mask marked, in rank order."""
        import torch

        from convlens import Preprocessing, SkipLog, titled

        from .engine import binary_maps

        if not drawn:
            return {}
        preprocessing = Preprocessing.of(target.model)
        wanted = {column: [example["position"] for example in entries[column]["examples"]] for column in drawn}
        positions = sorted({p for chosen in wanted.values() for p in chosen})
        units = torch.tensor([entries[column]["unit"] for column in drawn], dtype=torch.long, device=device)
        concept_of = {concept: number for number, concept in enumerate(concepts.names)}
        pictures: dict[tuple[int, int], Any] = {}
        for batch, images, maps in self._stream(target, positions, units, SkipLog(index.root)):
            binary = binary_maps(maps, thresholds[drawn], floors[drawn], size).cpu()
            masks, _ = concepts.batch(batch.positions.tolist(), size)
            for row, position in enumerate(batch.positions.tolist()):
                picture = preprocessing.to_pil(images[row])
                for slot, column in enumerate(drawn):
                    if position not in wanted[column]:
                        continue
                    concept = masks[row, concept_of[entries[column]["concept"]]].view(*size)
                    value = next(e["value"] for e in entries[column]["examples"] if e["position"] == position)
                    pictures[column, position] = titled(
                        self._tile(picture, binary[row, slot].numpy(), concept.numpy()), f"max {value:.3g}", 10
                    )
        return {column: [pictures[column, p] for p in wanted[column] if (column, p) in pictures] for column in drawn}

    def _tile(self, picture: Any, region: Any, concept: Any) -> Any:
        """The picture at tile size, dimmed outside ``region`` (bool ``[H, W]``), with the outlines of the region
        (yellow) and of ``concept`` (cyan)."""
        import numpy as np
        from PIL import Image

        height = self.params.tile
        width = max(1, round(height * picture.width / picture.height))
        pixels = np.asarray(picture.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float32)

        def scaled(mask: Any) -> Any:
            return (
                np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((width, height), Image.NEAREST))
                >= 128
            )

        region, concept = scaled(region), scaled(concept)
        pixels = np.where(region[..., None], pixels, pixels * SHADE)
        for mask, colour in ((concept, CONCEPT_COLOUR), (region, UNIT_COLOUR)):
            pixels[outline(mask)] = colour
        return Image.fromarray(np.rint(pixels).clip(0, 255).astype(np.uint8), "RGB")

    def _montage(self, out_dir: Path, entry: dict[str, Any], kind: str, tiles: list[Any]) -> str:
        from PIL import Image

        from convlens import grid, save_png, titled

        blank = Image.new("RGB", tiles[0].size if tiles else (self.params.tile, self.params.tile), "white")
        sheet = grid(tiles or [blank], max(1, len(tiles)))
        heading = f"{kind} {entry['unit']}: {entry['concept']} IoU {entry['iou']:.3f}"
        relative = f"units/{entry['unit']:04d}.png"
        save_png(titled(sheet, heading, 12), out_dir / relative)
        return relative


def outline(mask: Any) -> Any:
    """The cells of a bool mask ``[H, W]`` with a 4-neighbour outside it (the image border counts as outside)."""
    import numpy as np

    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="dissection",
            factory=DissectionVisualizer,
            params=DissectionParams,
            summary="network dissection: each unit's or SAE latent's top-0.5 % region scored by IoU against concept "
            "masks, detectors and unique concepts per category, and compositional explanations (AND / OR / AND NOT "
            "formulas by beam search) (course notes 002 sec. 9.1-9.2)",
            aliases=("network-dissection", "netdissect"),
        )
    )
