"""Activation grid (course notes 002 sec. 4, Figure 13) and semantic dictionary (sec. 7, Figure 30).

Every spatial patch ``(y, x)`` of a layer's grid has a vector of activations, one value per channel. The grid draws,
in the layer's layout beside the input image, one feature visualisation per patch that maximises the direction of
that patch's vector; all patches of an image are optimised in one batch. With an SAE the patch's vector is its
latent code, decoded into the layer's channel space to give the direction (see ``feature_viz.directions``).

The semantic dictionary of one patch (the one with the largest vector norm unless ``patch`` names another) pairs
its units, sorted by their activation at the patch, with each unit's own feature visualisation (a channel
objective, or an SAE latent's), drawn as a strip after the patch's direction image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from convlens import ConvlensError, ImageVisualizer, VisualizerSpec, VisualTarget, hookimpl, param
from convlens.plugins.visualizers.feature_viz.api import DirectionImageParams

PANEL_GAP = 8
OUTLINE = (255, 64, 64)


@dataclass(frozen=True)
class ActivationGridParams(DirectionImageParams):
    max_images: int = param(1, min=1, help="draw the grids of at most this many images of --data, in order")
    patch: Optional[tuple[int, int]] = param(
        None,
        help="y,x of the patch whose semantic dictionary is drawn "
        "(default: the patch with the largest activation norm)",
    )
    dictionary_size: int = param(
        8, min=1, help="units in the semantic dictionary: the patch's strongest, among --units when given"
    )


class ActivationGrid(ImageVisualizer):
    """Writes per image ``grids/<image>.png`` (input beside the grid), ``patches/<image>/<y>-<x>.png``,
    ``dictionaries/<image>.png`` (the strip), ``units/<kind>-<unit>.png`` and ``activation_grid.json``."""

    name = "activation-grid"

    def __init__(self, params: ActivationGridParams | None = None):
        super().__init__(params or ActivationGridParams())

    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        from convlens import write_json_atomic
        from convlens.plugins.visualizers.feature_viz.api import per_image_run

        out_dir = Path(out_dir)
        unit_images: dict[int, tuple[str, Any]] = {}  # unit -> (path, picture): one render per unit for all images
        listed: set[int] = set()

        def describe(entry: dict[str, Any], name: str, image: Any, vectors: Any, kind: str) -> list[dict[str, Any]]:
            entry.update(self._image(target, image, vectors, name, kind, unit_images, out_dir))
            figures = self._figures(entry, kind, target.layer, listed=listed)
            listed.update(f["unit"] for f in figures)
            return figures

        record, skip_log = per_image_run(self, target, out_dir, "activation_grid.json", describe)
        kind = record["unit_kind"]
        first = record["images"][0]
        height, width = first["grid"]
        chosen = first["patch"]
        record["skipped"] = skip_log.as_json()
        record["summary"] = (
            f"activation grids of {target.layer} ({height} x {width} patches, {kind}s) for {len(record['images'])} "
            f"image{'s' if len(record['images']) != 1 else ''}; dictionary of patch ({chosen['y']}, {chosen['x']}): "
            f"{kind}s {', '.join(str(e['unit']) for e in first['dictionary'])}"
            + (f"; {skip_log.summary()}" if len(skip_log) else "")
        )
        write_json_atomic(out_dir / "activation_grid.json", record)
        return record

    def _image(
        self,
        target: VisualTarget,
        image: Any,
        vectors: Any,
        name: str,
        kind: str,
        unit_images: dict[int, tuple[str, Any]],
        out_dir: Path,
    ) -> dict[str, Any]:
        """Grid, patch images and dictionary of one image; ``vectors [D, H, W]`` are its activations or codes."""
        import torch

        from convlens import Preprocessing, chosen_units, save_png
        from convlens.plugins.visualizers.feature_viz.api import (
            direction_objectives,
            render_images,
            to_pil,
            unit_objectives,
        )

        params = self.params
        units, height, width = vectors.shape
        rows = vectors.flatten(1).T  # [H * W, D], row-major patches
        norms = rows.norm(dim=1)
        if params.patch is not None:
            y, x = params.patch
            if not (0 <= y < height and 0 <= x < width):
                raise ConvlensError(
                    f"patch ({y}, {x}) is outside the {height} x {width} grid of layer "
                    f"'{target.layer}' (y 0..{height - 1}, x 0..{width - 1})"
                )
        else:
            y, x = divmod(int(norms.argmax()), width)
        candidates = chosen_units(target.units, units, f"{kind}s")
        values = vectors[list(candidates), y, x].float().cpu()
        order = torch.sort(values, descending=True, stable=True).indices[: params.dictionary_size].tolist()
        dictionary = [(candidates[i], float(values[i])) for i in order]

        new_units = [unit for unit, _ in dictionary if unit not in unit_images]
        objectives = direction_objectives(rows, target.sae)
        objectives += unit_objectives("channel", tuple(new_units), None, target.sae is not None)
        rendered = render_images(target.model, target.layer, objectives, params, sae=target.sae, progress=self.progress)
        tiles = [to_pil(r.image) for r in rendered[: height * width]]
        for unit, done in zip(new_units, rendered[height * width :]):
            path = f"units/{kind}-{unit:04d}.png"
            unit_images[unit] = (path, to_pil(done.image))
            save_png(unit_images[unit][1], out_dir / path)

        patches = []
        for number, tile in enumerate(tiles):
            py, px = divmod(number, width)
            path = f"patches/{name}/{py}-{px}.png"
            save_png(tile, out_dir / path)
            patches.append({"y": py, "x": px, "norm": float(norms[number]), "image": path})
        picture = Preprocessing.of(target.model).to_pil(image)
        grid_box = self._draw_grid(picture, tiles, (height, width), (y, x), target.layer, out_dir / f"grids/{name}.png")
        lead = tiles[y * width + x]
        self._draw_dictionary(
            lead,
            [(unit, value, unit_images[unit][1]) for unit, value in dictionary],
            (y, x),
            kind,
            target.layer,
            out_dir / f"dictionaries/{name}.png",
        )
        return {
            "grid": [height, width],
            "picture": f"grids/{name}.png",
            "grid_box": grid_box,
            "tile": params.size,
            "patches": patches,
            "patch": {
                "y": y,
                "x": x,
                "norm": float(norms[y * width + x]),
                "chosen": "given" if params.patch is not None else "largest norm",
            },
            "dictionary": [
                {"unit": unit, "activation": value, "image": unit_images[unit][0]} for unit, value in dictionary
            ],
            "dictionary_picture": f"dictionaries/{name}.png",
        }

    @staticmethod
    def _draw_grid(
        picture: Any, tiles: list[Any], shape: tuple[int, int], chosen: tuple[int, int], layer: str, path: Path
    ) -> list[int]:
        """The input (scaled to the grid, the chosen patch's cell outlined) beside the tiles in the layer's layout,
        without gaps (Figure 13); returns the box ``[left, top, right, bottom]`` of the tiles in the PNG."""
        from PIL import Image, ImageDraw

        from convlens import grid, save_png, side_by_side, titled_to_fit

        (height, width), (y, x) = shape, chosen
        sheet = grid(tiles, width, gap=0)
        shown = picture.resize(sheet.size, Image.BILINEAR)
        cell_w, cell_h = sheet.width / width, sheet.height / height
        ImageDraw.Draw(shown).rectangle(
            [round(x * cell_w), round(y * cell_h), round((x + 1) * cell_w) - 1, round((y + 1) * cell_h) - 1],
            outline=OUTLINE,
        )
        panels = [titled_to_fit(shown, "input"), titled_to_fit(sheet, f"{layer}: {height} x {width} patches")]
        save_png(side_by_side(panels, gap=PANEL_GAP), path)
        left, top = panels[0].width + PANEL_GAP, panels[1].height - sheet.height
        return [left, top, left + sheet.width, top + sheet.height]

    def _draw_dictionary(
        self,
        lead: Any,
        entries: list[tuple[int, float, Any]],
        chosen: tuple[int, int],
        kind: str,
        layer: str,
        path: Path,
    ) -> None:
        """Figure 30: the patch's direction image, then each unit's image titled with its id and activation."""
        from PIL import Image

        from convlens import labelled_grid, save_png, titled_to_fit

        side = max(self.params.size, 96)
        tiles = [picture.resize((side, side), Image.BILINEAR) for picture in [lead] + [e[2] for e in entries]]
        labels = [f"patch {chosen[0]},{chosen[1]}"] + [f"{unit}: {value:.3g}" for unit, value, _ in entries]
        strip, _ = labelled_grid(tiles, labels, columns=len(tiles))
        save_png(
            titled_to_fit(
                strip,
                f"semantic dictionary of patch ({chosen[0]}, {chosen[1]}) at {layer}: "
                f"{kind}s by activation (id: value)",
            ),
            path,
        )

    @staticmethod
    def _figures(entry: dict[str, Any], kind: str, layer: str, listed: set[Any]) -> list[dict[str, Any]]:
        height, width = entry["grid"]
        y, x = entry["patch"]["y"], entry["patch"]["x"]
        figures = [
            {
                "unit": None,
                "path": entry["picture"],
                "kind": "activation-grid",
                "caption": f"{entry['image']}: activation grid of {layer}, {height} x {width} patches",
            },
            {
                "unit": None,
                "path": entry["dictionary_picture"],
                "kind": "semantic-dictionary",
                "caption": f"{entry['image']}: semantic dictionary of patch ({y}, {x}), {len(entry['dictionary'])} "
                f"{kind}s by activation",
            },
        ]
        figures += [
            {
                "unit": unit["unit"],
                "path": unit["image"],
                "kind": "feature-viz",
                "caption": f"{kind} {unit['unit']}: feature visualisation (activation {unit['activation']:.3g} "
                f"at patch ({y}, {x}) of {entry['image']})",
            }
            for unit in entry["dictionary"]
            if unit["unit"] not in listed
        ]
        return figures


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="activation-grid",
            factory=ActivationGrid,
            params=ActivationGridParams,
            summary="a feature visualisation of every patch's activation vector in the layer's layout beside the "
            "image, and the semantic dictionary of one patch (002 Figures 13 and 30)",
            aliases=("activation-grid-viz",),
        )
    )
