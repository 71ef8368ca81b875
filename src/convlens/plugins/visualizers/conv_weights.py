"""Filter weights (paper 003 "filter weights"): the kernels of the first convolution drawn as RGB pictures.

The convolution is ``--layer`` when that is an ``nn.Conv2d`` over 3 input channels, else the model's first such
``nn.Conv2d``. Each kernel ``w [3, k, k]`` is drawn as colours ``0.5 + w / (2 m)``: mid grey is a zero weight,
and ``m`` is the largest ``|w|`` over all kernels (``scale="shared"``, so kernels compare) or over that kernel
(``"per-kernel"``, so weak kernels show their pattern). An SAE, if given, plays no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from convlens import (
    ConvlensError,
    Params,
    Visualizer,
    VisualizerSpec,
    VisualTarget,
    chosen_units,
    hookimpl,
    labelled_grid,
    param,
    shifted,
    tile_size,
    titled_to_fit,
)


@dataclass(frozen=True)
class ConvWeightsParams(Params):
    columns: Optional[int] = param(None, min=1, help="kernels per row (default: about the square root of the count)")
    tile: int = param(48, min=4, help="pixels on the longer side of a kernel (nearest-neighbour upsampling)")
    scale: str = param(
        "shared",
        choices=("shared", "per-kernel"),
        help="shared: one colour scale for all "
        "kernels, so they compare; per-kernel: each kernel scaled to its own largest |weight|",
    )


class ConvWeights(Visualizer):
    name = "conv-weights"
    needs_data = False

    def __init__(self, params: ConvWeightsParams | None = None):
        super().__init__(params or ConvWeightsParams())

    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        """``grid.png`` and ``conv_weights.json``."""
        from convlens import save_png, write_json_atomic

        params = self.params
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        layer, conv = first_rgb_conv(target.model.module, target.layer)
        weights = conv.weight.detach().float().cpu()
        units = chosen_units(target.units, weights.shape[0], "kernels")
        weights = weights[list(units)]
        largest = weights.abs().amax(dim=(1, 2, 3))
        scales = largest.tolist() if params.scale == "per-kernel" else [float(largest.max())] * len(units)
        tiles = [kernel_tile(kernel, scale, params.tile) for kernel, scale in zip(weights, scales)]
        sheet, boxes = labelled_grid(tiles, [str(unit) for unit in units], params.columns)
        shape = list(weights.shape[1:])
        shape_text = "x".join(map(str, shape))
        picture = titled_to_fit(sheet, f"{layer}: {len(units)} kernels {shape_text}, {params.scale} scale")
        save_png(picture, out_dir / "grid.png")
        norms = weights.flatten(1).norm(dim=1)
        record = {
            "visualizer": self.name,
            "layer": layer,
            "kernel_shape": shape,
            "params": params.to_dict(),
            "grid": "grid.png",
            "units": list(units),
            "kernels": [
                {
                    "unit": unit,
                    "l2_norm": float(norm),
                    "mean_colour": kernel.mean(dim=(1, 2)).tolist(),
                    "max_abs_weight": float(peak),
                    "box": shifted(box, 0, picture.height - sheet.height),
                }
                for unit, kernel, norm, peak, box in zip(units, weights, norms, largest, boxes)
            ],
            "summary": f"drew {len(units)} kernels {shape_text} of {layer} ({params.scale} scale); "
            f"L2 norms {float(norms.min()):.3g} to {float(norms.max()):.3g}",
        }
        write_json_atomic(out_dir / "conv_weights.json", record)
        return record


def first_rgb_conv(module: Any, layer: str | None = None) -> tuple[str, Any]:
    """``(name, conv)``: ``layer`` when it is an ``nn.Conv2d`` over 3 input channels, else the first such conv of
    ``module``; one clear error when there is none or when its kernels do not each span the 3 colour channels."""
    from torch import nn

    layers = dict(module.named_modules())
    if layer in layers and isinstance(layers[layer], nn.Conv2d) and layers[layer].in_channels == 3:
        name, conv = layer, layers[layer]
    else:
        found = [(n, m) for n, m in layers.items() if isinstance(m, nn.Conv2d) and m.in_channels == 3]
        if not found:
            raise ConvlensError(
                "conv-weights draws the kernels of a convolution over the RGB input, but the model "
                "has no nn.Conv2d with 3 input channels"
            )
        name, conv = found[0]
    if conv.in_channels // conv.groups != 3:
        raise ConvlensError(
            f"conv-weights draws kernels over the 3 colour channels, but convolution '{name}' is "
            f"grouped (groups={conv.groups}): each kernel sees {conv.in_channels // conv.groups} "
            f"channel(s)"
        )
    return name, conv


def kernel_tile(kernel: Any, scale: float, tile: int) -> Any:
    """A kernel ``[3, kh, kw]`` as RGB colours ``0.5 + w / (2 scale)`` (all mid grey when ``scale`` is 0), upsampled
    with nearest neighbour so that its longer side is ``tile`` pixels."""
    import numpy as np
    from PIL import Image

    weights = kernel.permute(1, 2, 0).numpy().astype(np.float64)
    colours = 0.5 + weights / (2 * scale) if scale > 0 else np.full_like(weights, 0.5)
    picture = Image.fromarray(np.rint(np.clip(colours, 0, 1) * 255).astype(np.uint8), "RGB")
    return picture.resize(tile_size(picture.size, tile), Image.NEAREST)


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="conv-weights",
            factory=ConvWeights,
            params=ConvWeightsParams,
            summary="the kernels of the first (RGB) convolution as colour tiles in a grid",
            aliases=("filter-weights", "kernels"),
        )
    )
