"""The ``feature-viz`` visualizer: optimise one image per objective (or a group of ``diversity`` images), many
objectives per batch.

A step renders the batch from its parameterisation (RGBA ones composited on random backgrounds), applies each
image's random transforms, runs the model up to the layer (no further unless a class logit is wanted) with its
weights frozen, and ascends the sum over the batch of each image's objective minus its total variation (and the
diversity and opacity penalties). Images of different objectives never interact: objective ``i`` reads only image
``i``, the model is in eval mode, and a group of diversity copies is never split across batches. The model (and the
SAE) always take the same number of images at a time, :func:`model_chunk` of the settings' batch size, the last
chunk padded with copies of its first image whose values are dropped, and so does the blur (the total variation's
gradient is elementwise): convolution kernels round differently for different batch sizes, and Adam's normalised
steps carry a difference of 1e-7 in a small gradient into whole pixel values, so only the same shapes give the same
images. A batch so gives, bit for bit, the images that separate runs with the same settings and seeds give
(measured: 200 steps of every preset on tiny-cnn, five kinds of objective; a batch of 32 costs 1.4x the unchunked
step at 32 px, nothing more at 224 px).

A step costs the model's forward and backward to the image and little else: the weights take no gradient, the
transforms' matrices and the blur kernel are made once, and the host reads nothing back from the device but every
few steps (whether the loss is still finite). With ``dtype`` bfloat16 or float16 the model runs under autocast while
the image, the objective and the optimiser stay in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens import (
    ConvlensError,
    Visualizer,
    VisualTarget,
    autocast,
    derive_seed,
    first_tensor,
    grid,
    resolve_layer,
    save_png,
    side_by_side,
    torch_generator,
    write_json_atomic,
)

from . import FeatureVizParams
from .images import (
    DEFAULT_COLOUR_COVARIANCE,
    RandomBackgrounds,
    RandomTransforms,
    colour_mixing,
    create_images,
    estimate_colour_covariance,
    total_variation,
)
from .objectives import (
    BatchObjective,
    Objective,
    Shapes,
    check_objective,
    interpolation,
    parse_objective,
    unit_objectives,
)
from .redirect import RedirectSwitch, redirected


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    steps: int = 200
    lr: float = 1.0
    lr_schedule: str = "constant"  # or "cosine": from lr down to 0 over the steps
    parameterisation: str = "pixels"
    decorrelate: bool = True
    colour_covariance: tuple[tuple[float, ...], ...] = DEFAULT_COLOUR_COVARIANCE
    tv_weight: float = 1e-3
    blur: float = 0.3
    scale: tuple[float, float] = (0.8, 1.2)
    rotation: float = 15.0
    translation: float = 0.2
    flip: float = 0.5
    jitter: int = 0
    init_std: float = 1.0
    size: tuple[int, int] = (224, 224)
    batch_size: int = 32
    snapshots: tuple[int, ...] = ()
    seed: int = 0
    retries: int = 0
    redirect_steps: int = 0
    diversity: int = 1  # images per objective, pushed apart
    diversity_weight: float = 0.25
    transparency: float = 0.0  # > 0: an alpha channel, its mean opacity penalised by this share of the objective


@dataclasses.dataclass
class Rendered:
    objective: Objective
    seed: int
    image: torch.Tensor  # [3, H, W] in [0, 1] ([4, H, W], RGBA, with transparency), on the CPU
    start_value: float
    final_value: float
    snapshots: dict[int, torch.Tensor]
    attempts: int = 1
    copy: int = 0  # which of the objective's images (with diversity)
    similarity: float | None = None  # with diversity: mean cosine of its layer activations with its group's others

    @property
    def reached_start(self) -> bool:
        return self.final_value > self.start_value


FINITE_CHECK_STEPS = 25  # steps between checks that the loss is finite: each check waits for a GPU


class _ReachedLayer(Exception):
    pass


class LayerForward:
    """The model from normalised-on-the-fly RGB images to a layer's output (and the logits when asked). Its hook
    on the layer stays on while :meth:`attached` (a render registers it once, not once per step)."""

    def __init__(self, module: nn.Module, layer: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        self.module, self.layer, self.mean, self.std = module, layer, mean, std
        self._handle = None
        self._recorded: list[torch.Tensor] = []
        self._stop = True

    @contextlib.contextmanager
    def attached(self) -> Iterator[LayerForward]:
        self._handle = self.layer.register_forward_hook(self._record)
        try:
            yield self
        finally:
            self._handle.remove()
            self._handle = None

    def normalised(self, images: torch.Tensor) -> torch.Tensor:
        """What the model takes: RGB in [0, 1] normalised by the model's mean and standard deviation."""
        return (images - self.mean) / self.std

    def _record(self, _module, _inputs, output) -> None:
        self._recorded.append(first_tensor(output))
        if self._stop:
            raise _ReachedLayer  # the layers after it would only cost time

    def __call__(self, images: torch.Tensor, with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._handle is None:
            with self.attached():
                return self(images, with_logits)
        self._recorded, self._stop = [], not with_logits
        try:
            logits = first_tensor(self.module(self.normalised(images)))
        except _ReachedLayer:
            logits = None
        if not self._recorded:
            raise ConvlensError("the layer did not run in the model's forward pass")
        return self._recorded[0], logits


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode and no weight gradients for the block: the backward pass then only reaches the image."""
    modules = [m for m in modules if m is not None]
    training = [m.training for m in modules]
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    try:
        for module in modules:
            module.eval()
        for parameter in trainable:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        for module, mode in zip(modules, training):
            module.train(mode)


def probe_shapes(forward: LayerForward, size: tuple[int, int], sae, device: torch.device) -> Shapes:
    with torch.no_grad():
        activations, logits = forward(torch.full((1, 3, *size), 0.5, device=device), with_logits=True)
    if activations is None or activations.ndim != 4:
        shape = None if activations is None else tuple(activations.shape)
        raise ConvlensError(f"feature visualisation needs a layer with [N, C, H, W] output, got {shape}")
    if sae is not None and sae.input_dim != activations.shape[1]:
        raise ConvlensError(f"the SAE takes {sae.input_dim} channels but the layer has {activations.shape[1]}")
    classes = logits.shape[1] if logits is not None and logits.ndim == 2 else None
    return Shapes(
        activations.shape[1],
        activations.shape[2],
        activations.shape[3],
        classes,
        sae.latent_dim if sae is not None else None,
    )


def render(
    module: nn.Module,
    layer: str,
    objectives: list[Objective],
    settings: RenderSettings,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    sae=None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    on_batch=None,
    dtype: str = "float32",
) -> list[Rendered]:
    """One image per objective; ``on_batch(list[Rendered])`` is called as each batch finishes. The model (and the
    SAE) run under autocast to ``dtype``; the images, objectives and optimiser stay in float32."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(module.parameters()).device
    forward = LayerForward(
        module,
        resolve_layer(module, layer),
        torch.tensor(mean, device=device).view(1, 3, 1, 1),
        torch.tensor(std, device=device).view(1, 3, 1, 1),
    )
    mixing = colour_mixing(settings.colour_covariance).to(device) if settings.decorrelate else None
    results: list[Rendered] = []
    switch = RedirectSwitch(on=False)
    with (
        frozen(module, sae),
        forward.attached(),
        redirected(module, switch) if settings.redirect_steps else contextlib.nullcontext(),
    ):
        shapes = probe_shapes(forward, settings.size, sae, device)
        for objective in objectives:
            check_objective(objective, shapes, layer)
        batches = _batches(objectives, settings)
        bar = tqdm(
            total=len(batches) * settings.steps,
            desc=f"feature-viz {layer}",
            unit="step",
            leave=False,
            disable=None if progress is None else not progress,
        )
        renderer = _Renderer(forward, shapes, settings, sae, mixing, device, bar, dtype, switch)
        try:
            for batch in batches:
                done = renderer.batch(batch)
                results += done
                if on_batch is not None:
                    on_batch(done)
        finally:
            bar.close()
    return results


def _batches(objectives: list[Objective], settings: RenderSettings) -> list[list[tuple[Objective, int]]]:
    """The jobs ``(objective, copy)`` of each batch: ``settings.diversity`` copies of every objective, a group of
    copies never split (a batch holds at least one group)."""
    copies = settings.diversity
    per_batch = max(1, settings.batch_size // copies) * copies
    jobs = [(objective, copy) for objective in objectives for copy in range(copies)]
    return [jobs[start : start + per_batch] for start in range(0, len(jobs), per_batch)]


CPU_MODEL_CHUNK = 8  # on a CPU a convolution on 8 images costs about what 8 of 32 do; padding costs little


def model_chunk(device: torch.device | str, batch_size: int) -> int:
    """How many images every model call takes: the batch size on a GPU (padding a lone image to it costs little
    time there), at most :data:`CPU_MODEL_CHUNK` on a CPU (where padding costs in proportion)."""
    return batch_size if torch.device(device).type == "cuda" else min(batch_size, CPU_MODEL_CHUNK)


@dataclasses.dataclass
class _Renderer:
    """What every batch of one :func:`render` call shares."""

    forward: LayerForward
    shapes: Shapes
    settings: RenderSettings
    sae: Any
    mixing: torch.Tensor | None
    device: torch.device
    bar: Any
    dtype: str
    switch: RedirectSwitch

    def batch(self, jobs: list[tuple[Objective, int]]) -> list[Rendered]:
        """Each job ``(objective, copy)`` rendered, each render that did not get above its start again from another
        seed up to ``settings.retries`` times (with diversity, its whole group), the better kept."""
        done = _render_batch(self, jobs)
        for attempt in range(1, self.settings.retries + 1):
            done = self._retried(done, attempt)
        return done

    def _retried(self, done: list[Rendered], attempt: int) -> list[Rendered]:
        copies = self.settings.diversity
        groups = [done[start : start + copies] for start in range(0, len(done), copies)]
        failed = [number for number, group in enumerate(groups) if not all(r.reached_start for r in group)]
        if not failed:
            return done
        self.bar.total += self.settings.steps
        self.bar.refresh()
        again = _render_batch(self, [(r.objective, r.copy) for n in failed for r in groups[n]], attempt)
        for position, number in enumerate(failed):
            retried = again[position * copies : (position + 1) * copies]
            better = _group_score(retried) > _group_score(groups[number])
            groups[number] = [
                dataclasses.replace(r, attempts=attempt + 1) for r in (retried if better else groups[number])
            ]
        return [rendered for group in groups for rendered in group]


def _group_score(group: list[Rendered]) -> tuple[int, float]:
    """How a group of renders (one without diversity) compares with a retry of it: renders above their start, then
    the sum of the final values."""
    return sum(r.reached_start for r in group), sum(r.final_value for r in group)


class _ChunkedModel:
    """The model (and the SAE) on chunks of a fixed number of images, the last padded: values of the objectives
    and the layer's activations of every image, the same whatever batch the image is in."""

    def __init__(self, renderer: _Renderer, objectives: list[Objective]):
        self.renderer = renderer
        self.size = model_chunk(renderer.device, renderer.settings.batch_size)
        self.parts = [slice(start, start + self.size) for start in range(0, len(objectives), self.size)]
        self.objectives = [
            BatchObjective(objectives[part], renderer.shapes, renderer.sae).to(renderer.device) for part in self.parts
        ]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objectives' values ``[B]`` and the layer's activations ``[B, C, h, w]`` of ``images``."""
        outputs = [self._chunk(images[part], objective) for part, objective in zip(self.parts, self.objectives)]
        return torch.cat([values for values, _ in outputs]), torch.cat([acts for _, acts in outputs])

    def _chunk(self, images: torch.Tensor, objective: BatchObjective) -> tuple[torch.Tensor, torch.Tensor]:
        renderer, count = self.renderer, len(images)
        padding = self.size - count
        padded = torch.cat([images, images[:1].detach().expand(padding, -1, -1, -1)]) if padding else images
        with autocast(renderer.device, renderer.dtype):
            activations, logits = renderer.forward(padded, objective.needs_logits)
            latents = renderer.sae.preactivations(activations) if objective.needs_latents else None
        activations = activations[:count].float()
        inputs = renderer.forward.normalised(images) if objective.needs_inputs else None
        return objective(activations, _float32(logits, count), _float32(latents, count), inputs), activations


def diversity_penalty(values: torch.Tensor, activations: torch.Tensor, copies: int) -> torch.Tensor:
    """Per image ``[B]``: the mean cosine similarity of its layer's Gram matrix with those of the other images of its
    group (``copies`` consecutive images of one objective; lucid's diversity objective, 002 sec. 3.4), times the
    size of its objective's value (held constant), so that the weight is a share of the objective whatever the
    unit's scale."""
    if copies < 2:
        return values.new_zeros(len(values))
    flat = activations.flatten(2)
    grams = torch.nn.functional.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
    grams = grams.view(-1, copies, grams.shape[1])
    similarity = grams @ grams.transpose(1, 2)
    others = (similarity.sum(-1) - similarity.diagonal(dim1=1, dim2=2)) / (copies - 1)
    return values.detach().abs() * others.flatten()


def activation_similarity(activations: torch.Tensor, copies: int) -> list[float | None]:
    """Per image, the mean cosine similarity of its flattened layer activations with those of the other images of
    its group (None without diversity)."""
    if copies < 2:
        return [None] * len(activations)
    flat = torch.nn.functional.normalize(activations.flatten(1), dim=1).view(-1, copies, activations[0].numel())
    similarity = flat @ flat.transpose(1, 2)
    others = (similarity.sum(-1) - similarity.diagonal(dim1=1, dim2=2)) / (copies - 1)
    return others.flatten().tolist()


def _seed(settings: RenderSettings, attempt: int, objective: Objective, copy: int) -> int:
    """The first attempt at the first copy keeps the seed of the objective's text; retries and copies take others."""
    keys = ("feature-viz",) if attempt == 0 else ("feature-viz", attempt)
    return derive_seed(settings.seed, *keys, objective.seed_key or objective.label, *(("copy", copy) if copy else ()))


def _render_batch(renderer: _Renderer, jobs: list[tuple[Objective, int]], attempt: int = 0) -> list[Rendered]:
    settings, device = renderer.settings, renderer.device
    objectives = [objective for objective, _ in jobs]
    seeds = [_seed(settings, attempt, objective, copy) for objective, copy in jobs]
    generators = [torch_generator(seed) for seed in seeds]
    transparent = settings.transparency > 0
    image = create_images(
        settings.parameterisation,
        generators,
        settings.size,
        settings.init_std,
        renderer.mixing,
        device,
        channels=4 if transparent else 3,
    )
    transforms = RandomTransforms(
        generators,
        settings.steps,
        settings.scale,
        settings.rotation,
        settings.translation,
        settings.flip,
        settings.jitter,
    )
    model = _ChunkedModel(renderer, objectives)
    backgrounds = RandomBackgrounds(generators, settings.steps) if transparent else None

    def rgb(images: torch.Tensor, step: int | None) -> torch.Tensor:
        """What the model sees: the images, RGBA ones on step ``step``'s backgrounds (None: mid grey)."""
        return images if backgrounds is None else backgrounds(images, step)

    def loss_of(images: torch.Tensor, step: int) -> torch.Tensor:
        """Minus the objectives plus the weighted diversity penalty, opacity and total variation, summed over the
        batch."""
        values, activations = model(transforms(rgb(images, step), step))
        loss = -values.sum()
        if settings.diversity > 1:
            penalty = diversity_penalty(values, activations, settings.diversity)
            loss = loss + settings.diversity_weight * penalty.sum()
        if transparent:
            opacity = images[:, 3].mean(dim=(1, 2))
            loss = loss + settings.transparency * (values.detach().abs() * opacity).sum()
        if settings.tv_weight > 0:
            loss = loss + settings.tv_weight * total_variation(images).sum()
        return loss

    with torch.no_grad():
        start_values = model(rgb(image.images(), None))[0]
    # one kernel per step on a GPU instead of a dozen; on the CPU the default, bit for bit as before
    fused = {"fused": True} if torch.device(device).type == "cuda" else {}
    optimizer = torch.optim.Adam(image.parameters(), lr=settings.lr, **fused)
    schedule = learning_rates(settings)
    snapshots: dict[int, torch.Tensor] = {}
    if 0 in settings.snapshots:
        with torch.no_grad():
            snapshots[0] = image.images().cpu()
    losses = torch.empty(settings.steps, device=device)  # read back every few steps, not every step
    for step in range(settings.steps):
        renderer.switch.on = step < settings.redirect_steps
        for group in optimizer.param_groups:
            group["lr"] = schedule[step]
        loss = loss_of(image.images(), step)
        losses[step] = loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if settings.blur > 0:
            image.blur_(settings.blur, model.size)
        if step + 1 in settings.snapshots:
            with torch.no_grad():
                snapshots[step + 1] = image.images().cpu()
        if (step + 1) % FINITE_CHECK_STEPS == 0 or step + 1 == settings.steps:
            check_finite(losses[: step + 1], objectives)
        renderer.bar.update(1)
    renderer.switch.on = False
    with torch.no_grad():
        final = image.images()
        final_values, final_activations = model(rgb(final, None))
    similarity = activation_similarity(final_activations, settings.diversity)
    final = final.cpu()
    return [
        Rendered(
            objective,
            seed,
            final[i],
            float(start_values[i]),
            float(final_values[i]),
            {step: shots[i] for step, shots in snapshots.items()},
            copy=copy,
            similarity=similarity[i],
        )
        for i, ((objective, copy), seed) in enumerate(zip(jobs, seeds))
    ]


def learning_rates(settings: RenderSettings) -> list[float]:
    """The learning rate of every step: constant, or a cosine from ``lr`` down to 0 over the steps."""
    if settings.lr_schedule == "constant":
        return [settings.lr] * settings.steps
    if settings.lr_schedule == "cosine":
        return [settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps)) for step in range(settings.steps)]
    raise ConvlensError(f"unknown learning-rate schedule '{settings.lr_schedule}' (constant, cosine)")


def image_activations(
    module: nn.Module, layer: str, image: torch.Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """The layer's activations ``[C, h, w]`` for one image ``[3, H, W]`` in [0, 1] (the model in eval mode)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    forward = LayerForward(
        module,
        resolve_layer(module, layer),
        torch.tensor(mean, device=device).view(1, 3, 1, 1),
        torch.tensor(std, device=device).view(1, 3, 1, 1),
    )
    with frozen(module), torch.no_grad():
        activations, _ = forward(image.unsqueeze(0).to(device), with_logits=False)
    return first_tensor(activations)[0].float().cpu()


def _float32(value: torch.Tensor | None, count: int | None = None) -> torch.Tensor | None:
    """``value`` (its first ``count`` rows) in float32."""
    return None if value is None else value[:count].float()


def check_finite(losses: torch.Tensor, objectives: list[Objective]) -> None:
    """One clear error naming the first step whose loss is NaN or infinite."""
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        step = int((~finite).nonzero()[0])
        raise ConvlensError(
            f"the objective became {float(losses[step])} at step {step + 1} for "
            f"{', '.join(o.label for o in objectives)}"
        )


def to_pil(image: torch.Tensor):
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels, mode="RGBA" if len(image) == 4 else "RGB")


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9@,.+-]+", "_", label.replace(" ", "")).strip("_") or "objective"


def _caption_notes(rendered: Rendered) -> str:
    notes = [] if rendered.reached_start else ["the render did not get above its start"]
    notes += [f"best of {rendered.attempts} attempts"] if rendered.attempts > 1 else []
    return f" ({'; '.join(notes)})" if notes else ""


def render_summary(entries: list[dict[str, Any]], listed: int = 8) -> str:
    """How many renders ended above their start, naming (the first ``listed`` of) those that did not."""
    failed = [entry["objective"] for entry in entries if not entry["reached_start"]]
    summary = f"{len(entries) - len(failed)} of {len(entries)} renders ended above their start"
    if failed:
        more = f" and {len(failed) - listed} more" if len(failed) > listed else ""
        summary += f"; not above it: {', '.join(failed[:listed])}{more}"
    return summary


class FeatureVisualizer(Visualizer):
    """Writes ``images/<n>-<objective>.png``, ``grid.png``, ``snapshots/<n>-<objective>.png`` (the image at each
    snapshot step, left to right) and ``feature_viz.json``.

    The record's ``figures`` list each final image (kind ``"feature-viz"``, drawn small) under its unit, as the
    unit's thumbnail; an objective not made from a unit (from ``objectives``, or the ``layer`` form) goes under its
    index in ``objectives`` instead, and its figure says so with ``"unit_kind": "objective"``.
    """

    name = "feature-viz"

    def __init__(self, params: FeatureVizParams | None = None):
        super().__init__(params or FeatureVizParams())

    def objectives(self, target: VisualTarget) -> list[Objective]:
        params = self.params
        if params.objective in ("inversion", "caricature"):
            chosen = [self.image_objective(target)]
        elif not target.units and params.objective != "layer":
            chosen = []
        else:
            chosen = unit_objectives(params.objective, tuple(target.units), params.position, target.sae is not None)
        chosen += [parse_objective(text) for text in params.objectives.split(";") if text.strip()]
        if params.interpolate:
            ends = [parse_objective(text) for text in params.interpolate.split(";") if text.strip()]
            if len(ends) != 2:
                raise ConvlensError(f"--interpolate takes two objectives separated by ';', got '{params.interpolate}'")
            chosen += interpolation(*ends, params.frames)
        if not chosen:
            raise ConvlensError("nothing to visualise: give units (--units) or objectives (--objectives)")
        return chosen

    def image_objective(self, target: VisualTarget) -> Objective:
        """The inversion or caricature of ``params.image``'s activations at the layer, at the render size."""
        from convlens import Preprocessing, open_rgb

        if not self.params.image:
            raise ConvlensError(f"the {self.params.objective} objective needs a photo: give --image PATH")
        bundle = target.model
        size = (self.params.size,) * 2 if self.params.size else tuple(bundle.input_size)
        preprocessing = Preprocessing(size, tuple(bundle.mean), tuple(bundle.std), bundle.crop_fraction)
        pixels = preprocessing.eval_pixels(open_rgb(self.params.image)).float() / 255
        activations = image_activations(bundle.module, target.layer, pixels, mean=bundle.mean, std=bundle.std)
        if self.params.objective == "inversion":
            return Objective.inversion(activations)
        return Objective.caricature(activations, self.params.cosine_power)

    def settings(self, target: VisualTarget) -> RenderSettings:
        resolved = self.params.resolved()
        size = self.params.size
        covariance = (
            estimate_colour_covariance(self.params.colour_data)
            if self.params.colour_data
            else DEFAULT_COLOUR_COVARIANCE
        )
        return RenderSettings(
            **{key: value for key, value in resolved.items()},
            colour_covariance=covariance,
            size=(size, size) if size else tuple(target.model.input_size),
            batch_size=self.params.batch_size,
            snapshots=tuple(self.params.snapshots),
            seed=self.params.seed,
            retries=self.params.retries,
            diversity=self.params.diversity,
            diversity_weight=self.params.diversity_weight,
            transparency=self.params.transparency,
        )

    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        out_dir = Path(out_dir)
        objectives, settings = self.objectives(target), self.settings(target)
        copies = settings.diversity
        names = [
            f"{number:03d}-{slug(o.label)}" + (f"-{copy}" if copies > 1 else "")
            for number, o in enumerate(objectives)
            for copy in range(copies)
        ]
        record: dict[str, Any] = {
            "visualizer": self.name,
            "layer": target.layer,
            "preset": self.params.preset,
            "params": self.params.to_dict(),
            "dtype": target.dtype,
            "settings": {**dataclasses.asdict(settings), "colour_data": self.params.colour_data or None},
            "objectives": [],
            "figures": [],
        }
        from_units = tuple(target.units) if self.params.objective not in ("layer", "inversion", "caricature") else ()
        written: list[Rendered] = []

        def write(batch: list[Rendered]) -> None:
            for rendered in batch:
                number, objective_number = len(written), len(written) // copies
                written.append(rendered)
                image_path = out_dir / "images" / f"{names[number]}.png"
                save_png(to_pil(rendered.image), image_path)
                entry = {
                    "objective": rendered.objective.label,
                    "seed": rendered.seed,
                    "image": image_path.relative_to(out_dir).as_posix(),
                    "activation_start": rendered.start_value,
                    "activation_final": rendered.final_value,
                    "reached_start": rendered.reached_start,
                    "attempts": rendered.attempts,
                }
                if copies > 1:
                    entry.update(copy=rendered.copy, activation_similarity=rendered.similarity)
                if rendered.snapshots:
                    strip = out_dir / "snapshots" / f"{names[number]}.png"
                    save_png(side_by_side([to_pil(shot) for shot in rendered.snapshots.values()]), strip)
                    entry["snapshots"] = {
                        "image": strip.relative_to(out_dir).as_posix(),
                        "steps": list(rendered.snapshots),
                    }
                record["objectives"].append(entry)
                figure = {
                    "unit": from_units[objective_number] if objective_number < len(from_units) else objective_number,
                    "path": entry["image"],
                    "kind": "feature-viz",
                    "caption": f"{rendered.objective.label}: activation {rendered.start_value:.3g} at the "
                    f"start, {rendered.final_value:.3g} at the end{_caption_notes(rendered)}",
                    "small": True,
                    "activation_start": rendered.start_value,
                    "activation_final": rendered.final_value,
                }
                if objective_number >= len(from_units):
                    figure["unit_kind"] = "objective"
                elif rendered.copy == 0:
                    figure["thumbnail"] = True
                record["figures"].append(figure)
            record["summary"] = render_summary(record["objectives"])
            write_json_atomic(out_dir / "feature_viz.json", record)  # complete so far, also if a later batch fails

        render(
            target.model.module,
            target.layer,
            objectives,
            settings,
            mean=target.model.mean,
            std=target.model.std,
            sae=target.sae,
            progress=self.progress,
            on_batch=write,
            dtype=target.dtype,
        )
        if self.params.grid and written:
            columns = min(len(written), max(1, round(len(written) ** 0.5 * 1.5)))
            save_png(grid([to_pil(r.image) for r in written], columns), out_dir / "grid.png")
            record["grid"] = "grid.png"
            write_json_atomic(out_dir / "feature_viz.json", record)
        return record
