"""Activation maps (paper 003 "activation maps"; course notes 002): the grid of a layer's feature maps for an image.

One PNG per image: the model's input (after its resize and crop) beside one tile per channel of the layer, or
per SAE latent with an SAE. Tiles are upsampled with nearest neighbour so the layer's cells stay visible.

Colours: a tile shows the range ``[min(0, low), max(0, high)]`` of its values (``scale="shared"``: over all tiles
of the image, so tiles compare; ``"per-map"``: each tile on its own) from dark to bright. After a ReLU ``low`` is 0,
so zero is black and a dead channel is an all-black tile; with negative values (LeakyReLU) zero sits
``-low / (high - low)`` of the way up, a dark grey, and only negative values are darker. An image's record gives
per unit its range, max, mean, whether it is active (any value > 0) and its tile's box in the PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from convlens import (
    ConvlensError,
    ImageVisualizer,
    Params,
    VisualizerSpec,
    VisualTarget,
    chosen_units,
    hookimpl,
    labelled_grid,
    layer_maps,
    param,
    shifted,
    tile_size,
    titled_to_fit,
)

if TYPE_CHECKING:
    from PIL import Image

PANEL_GAP = 8


@dataclass(frozen=True)
class ActivationMapsParams(Params):
    max_images: int = param(1, min=1, help="draw the maps of at most this many images of --data, in order")
    columns: Optional[int] = param(None, min=1, help="tiles per row (default: about the square root of the count)")
    tile: int = param(64, min=4, help="pixels on the longer side of a tile (nearest-neighbour upsampling)")
    scale: str = param(
        "shared",
        choices=("shared", "per-map"),
        help="shared: one colour range for all tiles of "
        "an image, so tiles compare; per-map: each tile from its own minimum (or 0) to its maximum",
    )
    colour: str = param("grey", choices=("grey", "heat"), help="grey levels, or the heat colour map")
    batch_size: int = param(16, min=1, help="images per forward pass")


class ActivationMaps(ImageVisualizer):
    name = "activation-maps"

    def __init__(self, params: ActivationMapsParams | None = None):
        super().__init__(params or ActivationMapsParams())

    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        """``maps/*.png`` (one per image) and ``activation_maps.json``."""
        import torch

        from convlens import Preprocessing, SkipLog, write_json_atomic

        params = self.params
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model, layer = target.model, target.layer
        index = self.data_of(target)
        positions = list(range(min(len(index), params.max_images)))
        preprocessing = Preprocessing.of(model)
        device = next((p.device for p in model.module.parameters()), torch.device("cpu"))
        kind = "latents" if target.sae is not None else "channels"
        record: dict[str, Any] = {
            "visualizer": self.name,
            "layer": layer,
            "params": params.to_dict(),
            "tiles": kind,
            "images": [],
        }
        skip_log = SkipLog(index.root)
        for batch in self.batches(target, positions, batch_size=params.batch_size, skip_log=skip_log):
            images = batch.images.to(device)
            maps = layer_maps(model, images, layer, target.sae)
            units = chosen_units(target.units, maps.shape[1], kind)
            maps = maps[:, list(units)].float().cpu()
            record["units"] = list(units)
            for row in range(len(batch)):
                position = int(batch.positions[row])
                entry = {"image": index.relative(index.paths[position]), "position": position}
                entry["picture"] = f"maps/{position:05d}-{Path(entry['image']).stem}.png"
                entry["units"] = self._draw(
                    preprocessing.to_pil(images[row]), maps[row], units, kind, layer, out_dir / entry["picture"]
                )
                record["images"].append(entry)
            write_json_atomic(out_dir / "activation_maps.json", record)  # complete so far, also if a later batch fails
        if not record["images"]:
            raise ConvlensError(f"none of the images under {index.root} could be read")
        record["skipped"] = skip_log.as_json()
        record["summary"] = self._summary(record, kind, layer) + (f"; {skip_log.summary()}" if len(skip_log) else "")
        write_json_atomic(out_dir / "activation_maps.json", record)
        return record

    def _draw(
        self, picture: Image.Image, maps: Any, units: Sequence[int], kind: str, layer: str, path: Path
    ) -> list[dict[str, Any]]:
        """Write the image beside its tiles to ``path``; per unit, its statistics and its tile's box."""
        from convlens import enlarge, save_png, side_by_side, titled

        params = self.params
        ranges = colour_ranges(maps, shared=params.scale == "shared")
        tiles = [map_tile(values, low, high, params.tile, params.colour) for values, (low, high) in zip(maps, ranges)]
        sheet, boxes = labelled_grid(tiles, [str(unit) for unit in units], params.columns)
        header = f"{layer}: {len(units)} {kind}, {params.scale} scale"
        panels = [titled(enlarge(picture, max(2 * params.tile, 128)), "input"), titled_to_fit(sheet, header)]
        save_png(side_by_side(panels, gap=PANEL_GAP), path)
        sheet_left, sheet_top = panels[0].width + PANEL_GAP, panels[1].height - sheet.height
        return [
            {
                "unit": unit,
                "max": float(values.max()),
                "mean": float(values.mean()),
                "active": bool((values > 0).any()),
                "range": [low, high],
                "box": shifted(box, sheet_left, sheet_top),
            }
            for unit, values, (low, high), box in zip(units, maps, ranges, boxes)
        ]

    @staticmethod
    def _summary(record: dict[str, Any], kind: str, layer: str) -> str:
        count = len(record["units"])
        active = [sum(unit["active"] for unit in entry["units"]) for entry in record["images"]]
        images = len(active)
        shown = (
            f"{active[0]} of {count} active"
            if images == 1
            else f"{min(active)} to {max(active)} of {count} active per image"
        )
        return f"drew {count} {kind} of {layer} for {images} image{'s' if images != 1 else ''}; {shown}"


def colour_ranges(maps: Any, shared: bool) -> list[tuple[float, float]]:
    """Per map ``[M, H, W]``, the values shown from dark to bright: ``(min(0, low), max(0, high))`` over all maps
    (``shared``) or over that map."""
    lows = [min(0.0, float(values.min())) for values in maps]
    highs = [max(0.0, float(values.max())) for values in maps]
    if shared:
        return [(min(lows), max(highs))] * len(maps)
    return list(zip(lows, highs))


def map_tile(values: Any, low: float, high: float, tile: int, colour: str) -> Image.Image:
    """One map ``[H, W]`` as an RGB tile whose longer side is ``tile`` pixels; ``low`` is dark, ``high`` bright
    (a map with ``high == low`` is all dark)."""
    import numpy as np
    from PIL import Image

    from convlens import heat_colours

    values = np.asarray(values, dtype=np.float64)
    shown = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if colour == "heat":
        picture = Image.fromarray(heat_colours(shown), "RGB")
    else:
        picture = Image.fromarray(np.rint(np.clip(shown, 0, 1) * 255).astype(np.uint8), "L").convert("RGB")
    return picture.resize(tile_size(picture.size, tile), Image.NEAREST)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="activation-maps",
            factory=ActivationMaps,
            params=ActivationMapsParams,
            summary="a layer's feature maps (or SAE latents) for an image, one tile per channel, beside the image",
            aliases=("feature-maps",),
        )
    )
