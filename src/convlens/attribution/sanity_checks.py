"""Sanity checks for attribution maps: cascading and independent model-parameter randomisation (Adebayo et al.
2018; course notes 002 sec. 6.3, Figure 29).

Starting from the trained model, the parameters of one block after another are re-initialised, from the output
down to the input, and the attribution maps of the same images (explaining the classes the trained model
predicted) are compared with the trained model's maps by Spearman rank correlation, per image. A method that
explains the model should lose that correlation as the blocks it depends on are randomised; an input-only method
such as an edge detector keeps a correlation of 1. The independent variant re-initialises one block at a time,
each in a fresh copy of the trained model. The model passed in is never changed: deep copies are randomised.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.attribution.base import AttributionVisualizer, ExplainTarget
from convlens.core.contracts import ModelBundle
from convlens.core.errors import ConvlensError
from convlens.runtime.rank_statistics import rowwise_spearman
from convlens.runtime.seeding import derive_seed


def randomisation_steps(module: nn.Module, depth: int = 1) -> list[str]:
    """The sub-modules randomised one after another, output first: those ``depth`` levels below the model that own
    parameters, and shallower modules that hold parameters of their own, in reverse registration order."""
    names = []
    for name, sub in module.named_modules():
        level = name.count(".") + 1 if name else 0
        if not name or level > depth:
            continue
        own = any(True for _ in sub.parameters(recurse=False))
        if (level == depth and any(True for _ in sub.parameters())) or (level < depth and own):
            names.append(name)
    if not names:
        raise ConvlensError(f"the model has no parameters {depth} level(s) down to randomise")
    return names[::-1]


def randomise_(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter (and normalisation statistics) of ``module`` in place, reproducibly: layers
    with ``reset_parameters`` use their own initialisation; other parameters are drawn from N(0, their std)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        covered: set[int] = set()
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in sub.parameters(recurse=False))
        for parameter in module.parameters():
            if id(parameter) not in covered:
                spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
                parameter.normal_(0.0, spread if math.isfinite(spread) and spread > 0 else 0.01)


@dataclasses.dataclass
class CascadeResult:
    method: str
    steps: list[str]  # "none" first, then each randomised block
    spearman: torch.Tensor  # [steps, images], NaN where a map is constant
    maps: torch.Tensor  # [steps, images, h, w]

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for step, name in enumerate(self.steps):
            values = self.spearman[step]
            finite = values[torch.isfinite(values)]
            rows.append(
                {
                    "method": self.method,
                    "step": step,
                    "randomised": name,
                    "spearman_mean": float(finite.mean()) if len(finite) else None,
                    "spearman_std": float(finite.std()) if len(finite) > 1 else None,
                    "images": int(len(finite)),
                    "constant_maps": int(len(values) - len(finite)),
                }
            )
        return rows


def cascading_randomisation(
    model: ModelBundle,
    methods: Sequence[AttributionVisualizer],
    images: torch.Tensor,
    layer: str,
    *,
    depth: int = 1,
    seed: int = 0,
    classes: torch.Tensor | None = None,
    progress: bool | None = None,
) -> list[CascadeResult]:
    """Every method's maps and their Spearman correlation with the trained model's, after each randomisation step.

    ``classes`` (default: the trained model's predictions) stay the explained targets at every step.
    """

    def cascade(module: nn.Module, steps: list[str]) -> Iterator[nn.Module]:
        for step, name in enumerate(steps):
            randomise_(module.get_submodule(name), derive_seed(seed, step))
            yield module

    return _randomisation_check(
        model, methods, images, layer, depth, classes, progress, cascade, "cascading randomisation"
    )


def independent_randomisation(
    model: ModelBundle,
    methods: Sequence[AttributionVisualizer],
    images: torch.Tensor,
    layer: str,
    *,
    depth: int = 1,
    seed: int = 0,
    classes: torch.Tensor | None = None,
    progress: bool | None = None,
) -> list[CascadeResult]:
    """Independent layer randomisation (Adebayo et al. 2018, sec. 3): each step re-initialises only its own block,
    in a fresh copy of the trained model, with the seed the cascade gives that block; the maps are compared with the
    trained model's as in :func:`cascading_randomisation` (steps: ``"none"``, then each block, output first)."""

    def independent(module: nn.Module, steps: list[str]) -> Iterator[nn.Module]:
        for step, name in enumerate(steps):
            copied = copy.deepcopy(module)
            randomise_(copied.get_submodule(name), derive_seed(seed, step))
            yield copied

    return _randomisation_check(
        model, methods, images, layer, depth, classes, progress, independent, "independent randomisation"
    )


def _randomisation_check(
    model: ModelBundle,
    methods: Sequence[AttributionVisualizer],
    images: torch.Tensor,
    layer: str,
    depth: int,
    classes: torch.Tensor | None,
    progress: bool | None,
    randomised_models: Callable[[nn.Module, list[str]], Iterator[nn.Module]],
    description: str,
) -> list[CascadeResult]:
    """The maps of the trained model (a deep copy), then of each model ``randomised_models(copy, steps)`` yields,
    one per step, explaining ``classes`` (default: the trained model's predictions); and their Spearman correlation
    with the trained model's maps, per image."""
    from tqdm.auto import tqdm

    trained = copy.deepcopy(model.module).eval()
    steps = randomisation_steps(trained, depth)
    if classes is None:
        with torch.no_grad():
            classes = trained(images).argmax(dim=1)
    target = ExplainTarget(classes=classes)

    def explain_all(module: nn.Module) -> list[torch.Tensor]:
        bundle = dataclasses.replace(model, module=module)
        return [method.explain(bundle, images, layer, target).cpu() for method in methods]

    maps = [[first] for first in explain_all(trained)]
    disable = None if progress is None else not progress
    for module in tqdm(
        randomised_models(trained, steps),
        desc=description,
        unit="block",
        leave=False,
        total=len(steps),
        disable=disable,
    ):
        for kept, step_maps in zip(maps, explain_all(module)):
            kept.append(step_maps)
    results = []
    for kept, method in zip(maps, methods):
        stacked = torch.stack(kept)
        original = stacked[0].flatten(1)
        spearman = torch.stack([rowwise_spearman(original, step_maps.flatten(1)) for step_maps in stacked])
        results.append(CascadeResult(method.name, ["none", *steps], spearman, stacked))
    return results


def cascade_figures(
    results: Sequence[CascadeResult], pictures: Sequence[Any], out_dir: Path, shown: int = 4
) -> dict[str, str]:
    """``spearman.png`` and ``spearman.svg`` (mean Spearman per step, one line per method) and
    ``cascade-<method>.png`` (the maps of the first ``shown`` images, one row each, one column per step)."""
    import numpy as np

    from convlens.data.images import save_png
    from convlens.drawing.charts import enlarge, grid, heat_overlay, titled
    from convlens.drawing.plots import LinePanel, save_chart

    files = {}
    series = {}
    for result in results:
        means = [row["spearman_mean"] for row in result.table()]
        series[result.method] = (list(range(len(means))), [m if m is not None else math.nan for m in means])
    chart = LinePanel(
        series=series,
        title="Spearman correlation with the trained model's maps",
        xlabel="blocks randomised, from the output down",
        ylabel="mean Spearman",
        integer_x=True,
        key="spearman",
    )
    save_chart(chart, out_dir / "spearman.png")
    files["spearman"] = "spearman.png"
    for result in results:
        tiles = []
        for row in range(min(shown, result.maps.shape[1])):
            picture = enlarge(pictures[row], 128)
            for step, name in enumerate(result.steps):
                values = result.maps[step, row].numpy()
                top = float(values.max())
                shown_map = values / top if top > 0 else np.zeros_like(values)
                tiles.append(titled(heat_overlay(picture, shown_map, 0.6), name if row == 0 else "", 10))
        columns = len(result.steps)
        relative = f"cascade-{result.method}.png"
        save_png(
            titled(grid(tiles, columns), f"{result.method}: maps as blocks are randomised (left to right)", 12),
            out_dir / relative,
        )
        files[result.method] = relative
    return files


def cascade_record(results: Sequence[CascadeResult], figures: dict[str, str]) -> dict[str, Any]:
    """What a sanity check writes besides its settings: the randomised blocks, the table, the figures, and the
    mean Spearman correlation of each method once every block is randomised."""
    return {
        "steps": results[0].steps,
        "table": [row for result in results for row in result.table()],
        "figures": figures,
        "fully_randomised": {result.method: result.table()[-1]["spearman_mean"] for result in results},
    }
