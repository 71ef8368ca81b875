"""Dataset examples: the images that excite a unit most and least (paper 001 sec. 9.2.4, Figures 22-23; course
notes 002 sec. 3.2).

One streaming pass over the images keeps, per unit (a CNN channel, a neuron at one position, or an SAE latent),
the top-k and bottom-k images ranked by the unit's strongest activation in the image, with where that peak lies.
Each image counts once per unit, ties go to the image that comes first, and memory grows with units x k, never
with the dataset. The examples are then drawn as crops of the peak's receptive field, heat-map overlays of the
unit's map, and a montage per unit that can start with the unit's feature visualisation.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Optional

from convlens import (
    ConvlensError,
    ImageVisualizer,
    Params,
    VisualizerSpec,
    VisualTarget,
    autocast,
    hookimpl,
    param,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DatasetExamplesParams(Params):
    k: int = param(5, min=1, help="top and bottom images kept per unit")
    bottom: bool = param(True, help="also keep the k images where the unit is weakest")
    position: Optional[tuple[int, int]] = param(
        None, help="y,x: rank by this one position of the map (a neuron) instead of the strongest position"
    )
    max_images: Optional[int] = param(None, min=1, help="look at the first N images of --data only")
    batch_size: int = param(64, min=1, help="images per forward pass")
    workers: int = param(0, min=0, help="data-loading processes")
    tile: int = param(96, min=16, help="side in pixels of each crop and overlay in the montages")
    feature_viz: str = param("", help="a feature-viz output folder: each unit's image goes first in its montage")
    alpha: float = param(0.5, min=0.0, max=1.0, help="opacity of the heat map in the overlays")


@dataclasses.dataclass
class RankedExamples:
    """Per unit, up to k images with their score, peak ``(y, x)`` and the unit's map in that image."""

    values: torch.Tensor  # [U, k']
    positions: torch.Tensor  # [U, k'] dataset positions
    peaks: torch.Tensor  # [U, k', 2]
    maps: torch.Tensor  # [U, k', h, w]


class RunningExamples:
    """The streaming top-k and bottom-k. Scores arrive in dataset order; a stable sort over what is kept followed by
    the new batch therefore breaks ties towards the earlier image, exactly like a brute-force ranking would."""

    def __init__(self, units: int, k: int, keep_bottom: bool = True):
        self.units, self.k = units, k
        self.sides = {"top": None, "bottom": None} if keep_bottom else {"top": None}

    def update(self, scores: torch.Tensor, positions: torch.Tensor, peaks: torch.Tensor, maps: torch.Tensor) -> None:
        """``scores [B, U]`` for dataset ``positions [B]``, ``peaks [B, U, 2]`` and ``maps [B, U, h, w]``."""
        import torch

        batch = RankedExamples(
            scores.T, positions[None, :].expand(self.units, -1), peaks.transpose(0, 1), maps.transpose(0, 1)
        )
        for side, kept in self.sides.items():
            joined = (
                batch
                if kept is None
                else RankedExamples(
                    *(torch.cat([a, b], dim=1) for a, b in zip(dataclasses.astuple(kept), dataclasses.astuple(batch)))
                )
            )
            order = joined.values.sort(dim=1, descending=side == "top", stable=True).indices[:, : self.k]
            self.sides[side] = RankedExamples(
                joined.values.gather(1, order),
                joined.positions.gather(1, order),
                joined.peaks.gather(1, order[..., None].expand(-1, -1, 2)),
                joined.maps[torch.arange(self.units)[:, None], order],
            )


def unit_maps(model, images: torch.Tensor, layer: str, units: tuple[int, ...], sae: Any) -> torch.Tensor:
    """``[B, U, h, w]`` in float32 (also under autocast): the chosen channels of the layer, or the chosen SAE
    latents' maps."""
    from convlens import activations_at

    activations = activations_at(model.module, images, layer).activations[layer]
    if activations.ndim != 4:
        raise ConvlensError(f"layer '{layer}' gives {tuple(activations.shape[1:])}, not a [C, H, W] map")
    if sae is not None:
        if activations.shape[1] != sae.input_dim:
            raise ConvlensError(
                f"the SAE reads {sae.input_dim} channels but layer '{layer}' has {activations.shape[1]}"
            )
        activations = sae.encode(activations)
    index = list(units)
    return activations[:, index].float()


def scores_and_peaks(maps: torch.Tensor, position: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and unit: the strongest value and its ``(y, x)`` (the first in row-major order on ties), or the
    value at ``position``."""
    import torch

    width = maps.shape[-1]
    if position is not None:
        values = maps[:, :, position[0], position[1]]
        return values, torch.tensor(position).expand(*values.shape, 2)
    values, where = maps.flatten(2).max(dim=2)
    return values, torch.stack([where // width, where % width], dim=-1)


def feature_viz_images(folder: str, with_sae: bool) -> dict[int, Path]:
    """Unit -> image path of a feature-viz run's single-unit objectives (channel:U, latent:U, neuron:U@y,x ...)."""
    root = Path(folder)
    try:
        record = json.loads((root / "feature_viz.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvlensError(f"feature_viz: cannot read {root / 'feature_viz.json'} ({exc})") from None
    kinds = ("latent", "latent-neuron", "direction") if with_sae else ("channel", "neuron")
    found: dict[int, Path] = {}
    for entry in record.get("objectives", []):
        match = re.fullmatch(r"([a-z-]+):(\d+)(@\d+,\d+)?", entry.get("objective", ""))
        if match and match[1] in kinds:
            found.setdefault(int(match[2]), root / entry["image"])
    return found


class DatasetExamplesVisualizer(ImageVisualizer):
    """Writes ``units/<unit>/{top,bottom}-<rank>-{crop,overlay}.png``, ``montages/<unit>.png`` and
    ``dataset_examples.json``, whose ``figures`` list per unit its montage (kind ``"montage"``) and then each
    example's overlay with the receptive field outlined (kinds ``"top"`` and ``"bottom"``, best rank first; drawn
    small, the top ones marked ``"top_example"`` for side-by-side views)."""

    name = "dataset-examples"
    reads_outputs_of = MappingProxyType({"feature_viz": "feature-viz"})

    def __init__(self, params: DatasetExamplesParams | None = None):
        super().__init__(params or DatasetExamplesParams())

    def collect(self, target: VisualTarget) -> tuple[RunningExamples, Any, dict[str, Any]]:
        """The streaming pass: ranked examples per unit, the image index, and counts."""
        import torch

        from convlens import SkipLog

        params = self.params
        units = tuple(target.units)
        if not units:
            raise ConvlensError("dataset-examples needs units: --units 0,5,9, a range like 0-7, or all")
        index = self.data_of(target)
        positions = list(range(min(len(index), params.max_images or len(index))))
        device = next((p.device for p in target.model.module.parameters()), torch.device("cpu"))
        running = RunningExamples(len(units), params.k, params.bottom)
        skip_log = SkipLog(index.root)
        seen = 0
        with torch.no_grad():
            for batch in self.batches(
                target, positions, batch_size=params.batch_size, skip_log=skip_log, workers=params.workers
            ):
                with autocast(device, target.dtype):
                    maps = unit_maps(target.model, batch.images.to(device), target.layer, units, target.sae)
                maps = maps.cpu()
                if params.position is not None and not all(0 <= p < s for p, s in zip(params.position, maps.shape[2:])):
                    raise ConvlensError(
                        f"position {params.position} is outside the {maps.shape[2]} x {maps.shape[3]} "
                        f"map of layer '{target.layer}'"
                    )
                if not bool(torch.isfinite(maps).all()):
                    bad = int(batch.positions[(~torch.isfinite(maps)).flatten(1).any(dim=1)][0])
                    raise ConvlensError(
                        f"layer '{target.layer}' gives NaN or infinite values for image "
                        f"{index.relative(index.paths[bad])}"
                    )
                values, peaks = scores_and_peaks(maps, params.position)
                running.update(values, batch.positions, peaks, maps)
                seen += len(batch)
        if not seen:
            raise ConvlensError(f"none of the images under {index.root} could be read")
        return running, index, {"images": seen, "skipped": skip_log.as_json(), "skip_summary": skip_log.summary()}

    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        from convlens import receptive_field, write_json_atomic

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        params = self.params
        feature_images = feature_viz_images(params.feature_viz, target.sae is not None) if params.feature_viz else {}
        running, index, counts = self.collect(target)
        field = receptive_field(target.model.module, target.layer, tuple(target.model.input_size))
        pictures = self._pictures(target, index, running)
        kind = "latent" if target.sae is not None else "channel"
        record: dict[str, Any] = {
            "visualizer": self.name,
            "layer": target.layer,
            "unit_kind": kind,
            "params": params.to_dict(),
            "dtype": target.dtype,
            "images": counts["images"],
            "skipped": counts["skipped"],
            "receptive_field": field.to_dict(),
            "units": [],
            "figures": [],
        }
        for column, unit in enumerate(target.units):
            entry: dict[str, Any] = {"unit": unit}
            strongest = float(running.sides["top"].values[column, 0])
            scale = strongest if strongest > 0 else 1.0  # one heat scale for all of a unit's overlays
            for side, ranked in running.sides.items():
                entry[side] = [
                    self._example(out_dir, index, pictures, field, unit, side, rank, ranked, column, scale)
                    for rank in range(ranked.values.shape[1])
                ]
            entry["montage"] = self._montage(out_dir, unit, kind, entry, feature_images.get(unit))
            record["units"].append(entry)
            record["figures"] += self._figures(unit, kind, entry, counts["images"])
        record["summary"] = (
            f"top{' and bottom' if params.bottom else ''} {params.k} of {counts['images']} images "
            f"for {len(target.units)} {kind}s" + (f"; {counts['skip_summary']}" if counts["skipped"] else "")
        )
        write_json_atomic(out_dir / "dataset_examples.json", record)
        return record

    def _figures(self, unit: int, kind: str, entry: dict[str, Any], images: int) -> list[dict[str, Any]]:
        """The unit's montage, then each example's overlay with its receptive field outlined."""
        sides = " and ".join(side for side in ("top", "bottom") if side in entry)
        figures = [
            {
                "unit": unit,
                "path": entry["montage"],
                "kind": "montage",
                "caption": f"{kind} {unit}: {sides} {self.params.k} of {images} images",
            }
        ]
        for side in ("top", "bottom"):
            figures += [
                {
                    "unit": unit,
                    "path": example["overlay"],
                    "kind": side,
                    "caption": f"{side} {rank}: {example['image']}, value {example['value']:.3g}, "
                    f"peak ({example['peak'][0]}, {example['peak'][1]})",
                    "small": True,
                    "top_example": side == "top",
                }
                for rank, example in enumerate(entry.get(side, []), start=1)
            ]
        return figures

    def _pictures(self, target: VisualTarget, index: Any, running: RunningExamples) -> dict[int, Any]:
        """The model's view (resize and centre crop) of every image that was kept, each decoded once."""
        from convlens import Preprocessing, open_rgb

        preprocessing = Preprocessing.of(target.model)
        kept = sorted({int(p) for ranked in running.sides.values() for p in ranked.positions.flatten()})
        return {position: preprocessing.eval_geometry(open_rgb(index.paths[position])) for position in kept}

    def _example(
        self,
        out_dir: Path,
        index: Any,
        pictures: dict[int, Any],
        field: Any,
        unit: int,
        side: str,
        rank: int,
        ranked: RankedExamples,
        column: int,
        scale: float,
    ) -> dict[str, Any]:
        from PIL import ImageDraw

        from convlens import heat_overlay, save_png

        position = int(ranked.positions[column, rank])
        y, x = (int(v) for v in ranked.peaks[column, rank])
        picture = pictures[position]
        top, left, bottom, right = field.box(y, x)
        tile = self.params.tile
        crop = picture.crop((left, top, right, bottom)).resize((tile, tile))
        overlay = heat_overlay(picture, (ranked.maps[column, rank].numpy() / scale).clip(0, 1), self.params.alpha)
        ImageDraw.Draw(overlay).rectangle([left, top, right - 1, bottom - 1], outline=(255, 255, 255))
        folder = f"units/{unit:04d}"
        save_png(crop, out_dir / folder / f"{side}-{rank + 1}-crop.png")
        save_png(overlay.resize((tile, tile)), out_dir / folder / f"{side}-{rank + 1}-overlay.png")
        return {
            "image": index.relative(index.paths[position]),
            "position": position,
            "value": float(ranked.values[column, rank]),
            "peak": [y, x],
            "box": [top, left, bottom, right],
            "crop": f"{folder}/{side}-{rank + 1}-crop.png",
            "overlay": f"{folder}/{side}-{rank + 1}-overlay.png",
        }

    def _montage(self, out_dir: Path, unit: int, kind: str, entry: dict[str, Any], feature_image: Path | None) -> str:
        from PIL import Image

        from convlens import grid, open_rgb, save_png, titled

        tile = self.params.tile
        blank = Image.new("RGB", (tile, tile), "white")
        lead = open_rgb(feature_image).resize((tile, tile)) if feature_image is not None else None
        rows = [("top", "crop"), ("top", "overlay")] + ([("bottom", "crop")] if "bottom" in entry else [])
        tiles = []
        for side, what in rows:
            label = "feature viz" if lead is not None and (side, what) == ("top", "crop") else ""
            first = lead if label else blank
            tiles.append(titled(first, label, 10))
            for example in entry[side]:
                with Image.open(out_dir / example[what]) as picture:
                    shown = picture.convert("RGB")
                tiles.append(titled(shown, f"{side} {example['value']:.3g}" if what == "crop" else "", 10))
            tiles += [titled(blank, "", 10)] * (self.params.k - len(entry[side]))
        relative = f"montages/{unit:04d}.png"
        save_png(
            titled(grid(tiles, self.params.k + 1), f"{kind} {unit}: top and bottom {self.params.k} images", 12),
            out_dir / relative,
        )
        return relative


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="dataset-examples",
            factory=DatasetExamplesVisualizer,
            params=DatasetExamplesParams,
            summary="top-k and bottom-k images per unit or SAE latent in one streaming pass, with receptive-field "
            "crops, heat-map overlays and montages (paper Figures 22-23)",
            aliases=("examples", "top-images"),
        )
    )
