"""What the visualizers that render directions of one image's activations share (the activation grid and semantic
dictionary, 002 sec. 4 and 7, Figures 13 and 30; the factorisation's groups, Figures 31-32): the layer's maps image
by image, and feature visualisations of directions in the layer's channel space with a feature-viz preset.

A direction given in an SAE's latent space is decoded into the layer's channel space first: ``decode(z) -
decode(0)``, the part of the reconstruction the latents write (the decoder's bias and the input mean are the same
for every code, so they point nowhere in particular). Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from convlens import ModelBundle, Params, Visualizer, VisualTarget, param

if TYPE_CHECKING:
    import torch

    from .objectives import Objective
    from .render import Rendered


@dataclass(frozen=True)
class DirectionImageParams(Params):
    """The feature-visualisation settings of visualizers that render directions; the rest come from the preset."""

    preset: Literal["naive", "improved", "fourier"] = param(
        "fourier", help="feature-viz preset of every image (see `convlens info visualizer feature-viz`)"
    )
    steps: Optional[int] = param(None, min=1, help="optimisation steps (default: the preset's)")
    size: int = param(32, min=8, help="side in pixels of each feature visualisation")
    batch_size: Optional[int] = param(
        None, min=1, help="images optimised together (default: all of a figure's in one batch)"
    )
    seed: int = param(0, help="seed of the feature visualisations")


IMAGE_BATCH = 8  # images per forward pass; the renders dominate the cost


def layer_maps_by_image(
    visualizer: Visualizer, target: VisualTarget, index: Any, max_images: int, skip_log: Any
) -> Iterator[tuple[dict[str, Any], str, Any, Any]]:
    """Per readable image among the first ``max_images`` of ``index`` (``target.data``), in order: the start of its
    record entry (``image``, ``position``), a file stem ``<position>-<name>``, the model input ``[3, H, W]`` and the
    layer's maps ``[D, h, w]`` (SAE codes with ``target.sae``). Unreadable files go to ``skip_log``."""
    import torch

    from convlens import layer_maps

    positions = list(range(min(len(index), max_images)))
    device = next((p.device for p in target.model.module.parameters()), torch.device("cpu"))
    for batch in visualizer.batches(target, positions, batch_size=IMAGE_BATCH, skip_log=skip_log):
        images = batch.images.to(device)
        maps = layer_maps(target.model, images, target.layer, target.sae)
        for row in range(len(batch)):
            position = int(batch.positions[row])
            path = index.paths[position]
            yield (
                {"image": index.relative(path), "position": position},
                f"{position:05d}-{Path(path).stem}",
                images[row],
                maps[row],
            )


def per_image_run(
    visualizer: Visualizer,
    target: VisualTarget,
    out_dir: Path,
    json_name: str,
    describe: Callable[[dict[str, Any], str, Any, Any, str], list[dict[str, Any]]],
    **fields: Any,
) -> tuple[dict[str, Any], Any]:
    """The run of a visualizer that draws images one by one: the record (``fields`` plus the unit kind, params,
    feature-viz settings, ``images`` and ``figures``) written to ``json_name`` after every image, so it is complete
    so far if a later image fails. ``describe(entry, name, image, maps, kind)`` adds an image's results to its
    ``entry`` and returns its figures. Returns the record (with ``skipped``) and the skip log."""
    from convlens import ConvlensError, SkipLog, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    index = visualizer.data_of(target)
    kind = "latent" if target.sae is not None else "channel"
    record: dict[str, Any] = {
        "visualizer": visualizer.name,
        "layer": target.layer,
        "unit_kind": kind,
        **fields,
        "params": visualizer.params.to_dict(),
        "settings": settings_record(visualizer.params),
        "images": [],
        "figures": [],
    }
    skip_log = SkipLog(index.root)
    for entry, name, image, maps in layer_maps_by_image(
        visualizer, target, index, visualizer.params.max_images, skip_log
    ):
        record["figures"] += describe(entry, name, image, maps, kind)
        record["images"].append(entry)
        write_json_atomic(out_dir / json_name, record)
    if not record["images"]:
        raise ConvlensError(f"none of the images under {index.root} could be read")
    record["skipped"] = skip_log.as_json()
    return record, skip_log


def render_settings(params: DirectionImageParams, count: int) -> Any:
    """The preset's :class:`RenderSettings`, with the steps, size, batch and seed of ``params``."""
    from . import PRESETS
    from .render import RenderSettings

    settings = dict(PRESETS[params.preset])
    if params.steps is not None:
        settings["steps"] = params.steps
    return RenderSettings(
        **settings, size=(params.size, params.size), batch_size=params.batch_size or max(count, 1), seed=params.seed
    )


def settings_record(params: DirectionImageParams) -> dict[str, Any]:
    """The resolved optimisation settings, JSON-ready, for a visualizer's record (the batch follows the figure)."""
    import dataclasses

    settings = dataclasses.asdict(render_settings(params, 0))
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in settings.items()
        if key not in ("batch_size", "colour_covariance", "snapshots")
    }


def channel_directions(vectors: torch.Tensor, sae: Any = None) -> torch.Tensor:
    """Rows ``[N, D]`` as directions of the layer ``[N, C]``: unchanged, or SAE codes decoded (``decode(z) -
    decode(0)``)."""
    import torch

    if sae is None:
        return vectors
    with torch.no_grad():
        codes = vectors.to(sae.input_mean.device, sae.input_mean.dtype)
        return sae.decode(codes) - sae.decode(torch.zeros_like(codes[:1]))


def direction_objectives(vectors: torch.Tensor, sae: Any = None) -> list[Objective]:
    """One direction objective per row of ``vectors`` (SAE codes with ``sae``)."""
    from .objectives import Objective

    return [Objective.direction(row) for row in channel_directions(vectors, sae)]


def render_images(
    model: ModelBundle,
    layer: str,
    objectives: list[Objective],
    params: DirectionImageParams,
    *,
    sae: Any = None,
    progress: bool | None = None,
) -> list[Rendered]:
    """One feature visualisation per objective, in order, all in one batch unless ``params.batch_size`` says
    otherwise."""
    from .render import render

    return render(
        model.module,
        layer,
        objectives,
        render_settings(params, len(objectives)),
        mean=model.mean,
        std=model.std,
        sae=sae,
        progress=progress,
    )
