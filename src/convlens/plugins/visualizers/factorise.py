"""Matrix factorisation of a layer's activations into groups of units (course notes 002 sec. 7, Figures 31-32).

One image's activations ``A [C, H*W]`` (after a ReLU, so non-negative) are factorised by non-negative matrix
factorisation, ``A ~ W H`` with ``W [C, k] >= 0`` the groups' directions and ``H [k, H*W] >= 0`` their spatial maps.
The solver is HALS (hierarchical alternating least squares; Cichocki and Phan 2009, Gillis 2014): each row
of ``H``, then each column of ``W``, gets in turn its exact non-negative least-squares update with the others
fixed, from a seeded random start scaled like scikit-learn's (``sqrt(mean(A) / k) |N(0, 1)|``). Directions are
returned with unit norm and the groups ordered by their share of the activations.

Each group's map is drawn over the image in its own colour (all groups in one overlay, Figure 31, and one overlay
per group) and its direction is rendered by feature visualisation (Figure 32). Negative activations (LeakyReLU)
are clamped at 0 and the record says how many there were. With an SAE the non-negative latent codes are
factorised and each group's direction is decoded into the layer's channel space to be rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens import ConvlensError, ImageVisualizer, VisualizerSpec, VisualTarget, hookimpl, param
from convlens.plugins.visualizers.feature_viz.api import DirectionImageParams

if TYPE_CHECKING:
    import torch

PANEL_GAP = 8


@dataclass(frozen=True)
class FactoriseParams(DirectionImageParams):
    size: int = param(64, min=8, help="side in pixels of each group's feature visualisation")
    seed: int = param(0, help="seed of the factorisation's random start (per image) and of the feature visualisations")
    groups: int = param(4, min=1, help="factors k: groups of units, each with a direction and a spatial map")
    iterations: int = param(500, min=1, help="HALS iterations (one update of every row of H and column of W)")
    max_images: int = param(1, min=1, help="factorise at most this many images of --data, in order, each on its own")
    top_units: int = param(5, min=1, help="units listed per group, largest weight first")
    alpha: float = param(0.6, min=0.0, max=1.0, help="opacity of the group colours where a group is strongest")
    overlay_size: int = param(224, min=16, help="side in pixels (the longer one) of the overlays")


@dataclass
class Factorisation:
    directions: torch.Tensor  # W [m, k], float64, columns of unit norm
    maps: torch.Tensor  # H [k, n], float64
    error: float  # ||A - W H||_F / ||A||_F


def nmf(matrix: torch.Tensor, groups: int, *, iterations: int = 500, seed: int = 0) -> Factorisation:
    """Non-negative ``matrix [m, n] ~ W [m, k] H [k, n]`` by HALS in float64 on the matrix's device; groups in
    decreasing order of ``sum(H[j])`` (their share of the activations, the directions having unit norm)."""
    import torch

    from convlens import torch_generator

    a = torch.as_tensor(matrix).detach().to(torch.float64)
    if a.ndim != 2:
        raise ConvlensError(f"NMF factorises a matrix, got a tensor of shape {tuple(a.shape)}")
    rows, columns = a.shape
    if not 1 <= groups <= min(rows, columns):
        raise ConvlensError(
            f"NMF into {groups} groups needs at least that many rows and columns; the matrix is {rows} x {columns}"
        )
    if not bool(torch.isfinite(a).all()):
        raise ConvlensError("NMF: the matrix has NaN or infinite values")
    if bool((a < 0).any()):
        raise ConvlensError(f"NMF needs a non-negative matrix; its smallest value is {float(a.min()):.3g}")
    total = torch.linalg.norm(a)
    if float(total) == 0:
        raise ConvlensError("NMF: the matrix is all zeros, there is nothing to factorise")
    generator = torch_generator(seed, "nmf")
    scale = float((a.mean() / groups).sqrt())
    w = (torch.randn(rows, groups, generator=generator, dtype=torch.float64).abs() * scale).to(a.device)
    h = (torch.randn(groups, columns, generator=generator, dtype=torch.float64).abs() * scale).to(a.device)
    tiny = torch.finfo(torch.float64).tiny  # a zero column (row) has a zero numerator too and stays put
    for _ in range(iterations):
        wta, wtw = w.T @ a, w.T @ w
        for j in range(groups):
            h[j] = (h[j] + (wta[j] - wtw[j] @ h) / wtw[j, j].clamp_min(tiny)).clamp_min_(0)
        aht, hht = a @ h.T, h @ h.T
        for j in range(groups):
            w[:, j] = (w[:, j] + (aht[:, j] - w @ hht[:, j]) / hht[j, j].clamp_min(tiny)).clamp_min_(0)
    norms = w.norm(dim=0)
    w, h = w / norms.clamp_min(tiny), h * norms[:, None]
    order = torch.sort(h.sum(dim=1), descending=True, stable=True).indices
    w, h = w[:, order], h[order]
    return Factorisation(w, h, float(torch.linalg.norm(a - w @ h) / total))


def group_colours(count: int) -> list[tuple[int, int, int]]:
    """The chart palette, then hues spaced by the golden angle."""
    import colorsys

    from convlens import PALETTE

    colours = list(PALETTE[:count])
    for number in range(len(colours), count):
        red, green, blue = colorsys.hsv_to_rgb((number * 0.618034) % 1.0, 0.8, 0.9)
        colours.append((round(red * 255), round(green * 255), round(blue * 255)))
    return colours


def tinted(picture: Any, strengths: Any, colours: list[tuple[int, int, int]], alpha: float) -> Any:
    """``strengths [k, H, W]`` in [0, 1] (the picture's size) painted over ``picture``: each pixel takes the
    strength-weighted mix of the group colours, with opacity ``alpha`` times the strongest group's strength."""
    import numpy as np
    from PIL import Image

    strengths = np.asarray(strengths, dtype=np.float32)
    base = np.asarray(picture.convert("RGB"), dtype=np.float32)
    mix = np.einsum("khw,kc->hwc", strengths, np.asarray(colours, dtype=np.float32))
    mix /= np.maximum(strengths.sum(axis=0), 1e-12)[..., None]
    weight = alpha * strengths.max(axis=0)[..., None]
    return Image.fromarray(np.rint((1 - weight) * base + weight * mix).clip(0, 255).astype(np.uint8), "RGB")


class Factorise(ImageVisualizer):
    """Writes per image ``factors/<image>/overlay.png`` (all groups over the image beside their direction images),
    ``factors/<image>/group-<j>-map.png``, ``factors/<image>/group-<j>-direction.png`` and ``factorise.json``.

    Per image the record gives the relative error, the negative values clamped (count, share, minimum) and per
    group its colour, ``share`` (the fraction of the image's positions where it is the strongest group; positions
    with no activation belong to none), ``mass`` (its share of ``sum(H)``) and its top units with their weights in
    the unit-norm direction."""

    name = "factorise"

    def __init__(self, params: FactoriseParams | None = None):
        super().__init__(params or FactoriseParams())

    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        from convlens import write_json_atomic
        from convlens.plugins.visualizers.feature_viz.api import per_image_run

        out_dir = Path(out_dir)

        def describe(entry: dict[str, Any], name: str, image: Any, values: Any, kind: str) -> list[dict[str, Any]]:
            entry.update(self._image(target, image, values, entry["position"], f"factors/{name}", kind, out_dir))
            return self._figures(entry)

        record, skip_log = per_image_run(self, target, out_dir, "factorise.json", describe, method="HALS")
        kind = record["unit_kind"]
        errors = [entry["error"] for entry in record["images"]]
        clamped = sum(entry["clamped"]["count"] for entry in record["images"])
        record["skipped"] = skip_log.as_json()
        record["summary"] = (
            f"NMF of {target.layer} ({kind}s) into {self.params.groups} groups for {len(errors)} "
            f"image{'s' if len(errors) != 1 else ''}; relative error "
            + (f"{errors[0]:.3g}" if len(errors) == 1 else f"{min(errors):.3g} to {max(errors):.3g}")
            + (f"; clamped {clamped} negative values at 0" if clamped else "")
            + (f"; {skip_log.summary()}" if len(skip_log) else "")
        )
        write_json_atomic(out_dir / "factorise.json", record)
        return record

    def _image(
        self, target: VisualTarget, image: Any, values: Any, position: int, folder: str, kind: str, out_dir: Path
    ) -> dict[str, Any]:
        """Factorise one image's ``values [D, h, w]`` (activations or SAE codes) and draw its groups."""
        import torch

        from convlens import Preprocessing, derive_seed, enlarge, save_png
        from convlens.plugins.visualizers.feature_viz.api import direction_objectives, render_images, to_pil

        params = self.params
        units, height, width = values.shape
        if params.groups > min(units, height * width):
            raise ConvlensError(
                f"{params.groups} groups: layer '{target.layer}' has {units} {kind}s and "
                f"{height} x {width} = {height * width} positions; give --groups at most "
                f"{min(units, height * width)}"
            )
        matrix = values.detach().flatten(1).to(torch.float64)
        negative = matrix < 0
        clamped = {"count": int(negative.sum()), "share": float(negative.float().mean()), "min": float(matrix.min())}
        found = nmf(
            matrix.clamp_min(0),
            params.groups,
            iterations=params.iterations,
            seed=derive_seed(params.seed, "factorise", position),
        )
        directions, maps = found.directions.cpu(), found.maps.cpu()
        active = matrix.clamp_min(0).sum(dim=0).cpu() > 0
        strongest = maps.argmax(dim=0)
        rendered = render_images(
            target.model,
            target.layer,
            direction_objectives(directions.T.float(), target.sae),
            params,
            sae=target.sae,
            progress=self.progress,
        )
        picture = enlarge(Preprocessing.of(target.model).to_pil(image), params.overlay_size)
        peaks = maps.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        strengths = (
            torch.nn.functional.interpolate(
                (maps / peaks).view(-1, 1, height, width).float(),
                size=(picture.height, picture.width),
                mode="bilinear",
                align_corners=False,
            )[:, 0]
            .clamp(0, 1)
            .numpy()
        )
        colours = group_colours(params.groups)
        groups = []
        for j in range(params.groups):
            top = torch.sort(directions[:, j], descending=True, stable=True).indices[: params.top_units].tolist()
            entry = {
                "group": j,
                "colour": list(colours[j]),
                "share": float(((strongest == j) & active).float().mean()),
                "mass": float(maps[j].sum() / maps.sum()),
                "top_units": [{"unit": unit, "weight": float(directions[unit, j])} for unit in top],
                "map": f"{folder}/group-{j}-map.png",
                "direction": f"{folder}/group-{j}-direction.png",
            }
            save_png(tinted(picture, strengths[j : j + 1], [colours[j]], params.alpha), out_dir / entry["map"])
            save_png(to_pil(rendered[j].image), out_dir / entry["direction"])
            groups.append(entry)
        overlay = tinted(picture, strengths, colours, params.alpha)
        self._draw_combined(
            overlay, [to_pil(r.image) for r in rendered], groups, found.error, out_dir / f"{folder}/overlay.png"
        )
        return {
            "shape": [units, height, width],
            "error": found.error,
            "clamped": clamped,
            "overlay": f"{folder}/overlay.png",
            "groups": groups,
        }

    def _draw_combined(
        self, overlay: Any, directions: list[Any], groups: list[dict[str, Any]], error: float, path: Path
    ) -> None:
        """Figure 31: the overlay of every group beside each group's direction image framed in its colour."""
        from PIL import Image, ImageOps

        from convlens import labelled_grid, save_png, side_by_side, titled_to_fit

        side = max(self.params.size, self.params.overlay_size // 2 - 8)
        tiles = [
            ImageOps.expand(picture.resize((side, side), Image.BILINEAR), border=4, fill=tuple(group["colour"]))
            for picture, group in zip(directions, groups)
        ]
        labels = [f"group {group['group']}: {group['share']:.0%}" for group in groups]
        legend, _ = labelled_grid(tiles, labels, columns=min(len(tiles), 2))
        title = f"{len(groups)} groups, error {error:.3f}"
        save_png(
            side_by_side([titled_to_fit(overlay, title), titled_to_fit(legend, "directions")], gap=PANEL_GAP), path
        )

    @staticmethod
    def _figures(entry: dict[str, Any]) -> list[dict[str, Any]]:
        figures = [
            {
                "unit": None,
                "path": entry["overlay"],
                "kind": "factorisation",
                "caption": f"{entry['image']}: {len(entry['groups'])} groups by NMF, relative error "
                f"{entry['error']:.3g}",
            }
        ]
        for group in entry["groups"]:
            units = ", ".join(str(unit["unit"]) for unit in group["top_units"])
            figures += [
                {
                    "unit": None,
                    "path": group["map"],
                    "kind": "factor-map",
                    "caption": f"{entry['image']}: group {group['group']} (strongest on {group['share']:.0%} of the "
                    f"image; units {units})",
                },
                {
                    "unit": None,
                    "path": group["direction"],
                    "kind": "factor-direction",
                    "caption": f"{entry['image']}: group {group['group']} direction (units {units})",
                },
            ]
        return figures


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="factorise",
            factory=Factorise,
            params=FactoriseParams,
            summary="non-negative matrix factorisation of an image's activations into groups of units: spatial maps "
            "over the image and each group's direction by feature visualisation (002 Figures 31-32)",
            aliases=("factorize", "nmf"),
        )
    )
