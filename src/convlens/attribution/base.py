"""Attribution maps, and the visualizer run every attribution method shares (course notes 002 sec. 6).

An attribution method subclasses :class:`AttributionVisualizer` and implements
:meth:`~AttributionVisualizer.attribute`: maps ``[N, h, w]`` for a batch of images and an :class:`ExplainTarget`
(a class per image, a channel of a layer, or an SAE latent), taking its gradients from :func:`target_gradients`.
The base turns that into the visualizer run (heat-map overlays, ``maps.safetensors``, a JSON record, and the
pointing game when the images come with foreground masks), and :mod:`convlens.attribution.sanity_checks` calls the same
method, so a third-party method gets all of these, and every kind of target, for free.

Importing this module does not import torch, so plugin modules can subclass the base and still be listed cheaply.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from convlens.core.contracts import ActivationFilter, FilterContext, ModelBundle, VisualTarget
from convlens.core.errors import ContractError, ConvlensError
from convlens.core.params import Params, param
from convlens.data.image_visualizer import ImageVisualizer

if TYPE_CHECKING:
    import torch

    from convlens.models.layers import Capture

NORMALISE_EPSILON = 1e-7


@dataclasses.dataclass(frozen=True)
class AttributionParams(Params):
    """Parameters every attribution visualizer starts with; methods subclass this and add their own."""

    class_index: Optional[int] = param(
        None,
        min=0,
        help="explain this class for every image (default: the "
        "predicted class); unused with --units (the units are the targets)",
    )
    map_layer: Optional[str] = param(
        None, help="take the maps at this layer (default: --layer); with --units the units stay those of --layer"
    )
    max_images: Optional[int] = param(None, min=1, help="at most this many images of --data, in order")
    batch_size: int = param(16, min=1, help="images per forward and backward pass")
    alpha: float = param(0.5, min=0.0, max=1.0, help="opacity of the heat map drawn over each image")


@dataclasses.dataclass(frozen=True)
class GradientMapFilterParams(Params):
    """Parameters of an activation filter weighted by a class's gradient map (:class:`GradientMapFilter`)."""

    class_index: Optional[int] = param(
        None, help="explain this class for every image (default: the label, or the predicted class)", min=0
    )


@dataclasses.dataclass
class ExplainTarget:
    """Per image, the scalar an attribution explains: a class logit (``classes``; ``None``: the predicted class),
    or a unit of ``layer`` summed over the layer's positions: its channel ``channel``, or with ``sae`` and
    ``latent`` that latent of the SAE applied to the layer. ``layer`` ``None``: the layer the maps are taken at."""

    classes: torch.Tensor | None = None
    sae: Any = None
    latent: int | None = None
    layer: str | None = None
    channel: int | None = None

    @property
    def kind(self) -> str:
        """``"class"``, ``"channel"`` or ``"latent"``."""
        if self.sae is not None:
            if self.channel is not None or self.classes is not None:
                raise ContractError("an ExplainTarget with an SAE explains its latent, not a channel or a class")
            return "latent"
        if self.latent is not None:
            raise ContractError(f"latent {self.latent} needs the SAE it belongs to (ExplainTarget(sae=...))")
        if self.channel is not None:
            if self.classes is not None:
                raise ContractError("an ExplainTarget explains a channel or classes, not both")
            return "channel"
        return "class"

    @property
    def unit(self) -> int | None:
        """The channel or latent explained; ``None`` for a class target."""
        return {"class": None, "channel": self.channel, "latent": self.latent}[self.kind]

    @property
    def label(self) -> str:
        return {"class": "class", "channel": f"unit {self.channel}", "latent": f"latent {self.latent}"}[self.kind]

    def read_at(self, layer: str) -> ExplainTarget:
        """This target, with a unit that names no layer read at ``layer``."""
        return self if self.kind == "class" or self.layer is not None else dataclasses.replace(self, layer=layer)

    def check(self, shape: Sequence[int], layer: str) -> None:
        """One clear error unless the unit exists in a layer whose output has ``shape`` ``[N, C, ...]``."""
        kind = self.kind
        if kind == "latent":
            if len(shape) not in (2, 4) or shape[1] != self.sae.input_dim:
                raise ConvlensError(
                    f"the SAE reads {self.sae.input_dim} channels but layer '{layer}' gives {tuple(shape[1:])}"
                )
            if not 0 <= self.latent < self.sae.latent_dim:
                raise ConvlensError(
                    f"latent {self.latent} is out of range: the SAE has latents 0..{self.sae.latent_dim - 1}"
                )
        elif kind == "channel":
            if len(shape) < 2:
                raise ConvlensError(f"layer '{layer}' gives {tuple(shape[1:])}, which has no units")
            if not 0 <= self.channel < shape[1]:
                raise ConvlensError(f"unit {self.channel} is out of range: layer '{layer}' has units 0..{shape[1] - 1}")

    def unit_values(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function of ``layer``'s output giving, per image, the unit's value summed over the positions."""

        def values(output: torch.Tensor) -> torch.Tensor:
            self.check(tuple(output.shape), layer)
            unit = self.sae.encode(output)[:, self.latent] if self.kind == "latent" else output[:, self.channel]
            return unit.flatten(1).sum(dim=1) if unit.ndim > 1 else unit

        return values


def target_classes(logits, labels, class_index: int | None):
    """Per image, the class to explain: ``class_index``, else the label, else (label -1 or none) the prediction."""
    import torch

    predicted = logits.argmax(dim=1)
    if class_index is not None:
        if class_index >= logits.shape[1]:
            raise ConvlensError(f"class_index {class_index} is out of range for a model with {logits.shape[1]} classes")
        return torch.full_like(predicted, class_index)
    if labels is None:
        return predicted
    labels = labels.to(predicted.device)
    if labels.numel() and int(labels.max()) >= logits.shape[1]:
        raise ConvlensError(
            f"image label {int(labels.max())} is out of range for a model with {logits.shape[1]} classes: the "
            "folder's classes are not the model's; pass class_index, or use an unlabelled (flat) folder so that "
            "each image is explained for the model's prediction"
        )
    return torch.where(labels >= 0, labels, predicted)


class GradientMapFilter(ActivationFilter):
    """An activation filter computed from the activations and their gradient of a class logit (per image: the
    params' ``class_index``, else the label, else the prediction), such as Grad-CAM and Grad-CAM++. Subclasses
    implement :meth:`maps`; extraction passes the gradients, and without them the filter computes them itself
    from the context's model, images and layer."""

    needs_gradients = True

    @abc.abstractmethod
    def maps(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Non-negative weights ``[N, H, W]`` from activations and gradients ``[N, C, H, W]``."""

    def gradient_target(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        classes = target_classes(logits, labels, getattr(self.params, "class_index", None))
        return logits.gather(1, classes[:, None]).squeeze(1)

    def weights(self, activations: torch.Tensor, context: FilterContext) -> torch.Tensor:
        gradients = context.gradients
        if gradients is None:
            if context.model is None or context.images is None or context.layer is None:
                raise ContractError(
                    f"filter '{self.name}' needs the model, the images and the layer (or precomputed gradients); "
                    "use it through `convlens extract`, or pass FilterContext(model=..., images=..., layer=...)"
                )
            from convlens.models.layers import activations_at

            captured = activations_at(
                context.model.module,
                context.images,
                context.layer,
                target=lambda logits: self.gradient_target(logits, context.labels),
            )
            activations, gradients = captured.activations[context.layer], captured.gradients[context.layer]
        if gradients.shape != activations.shape:
            raise ContractError(
                f"gradients {tuple(gradients.shape)} do not match activations {tuple(activations.shape)}"
            )
        return self.maps(activations, gradients)


def scaled_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Each map of ``[N, H, W]`` shifted and scaled to [0, 1] as ``(m - min) / (max(m - min) + 1e-7)``, the
    normalisation of Grad-CAM's reference implementation (pytorch-grad-cam)."""
    import torch

    # max(m - min) is max - min exactly (rounding is monotonic), so one pass finds both ends
    low, high = torch.aminmax(maps.flatten(1), dim=1)
    low, high = low[:, None, None], high[:, None, None]
    return (maps - low) / ((high - low) + NORMALISE_EPSILON)


def target_gradients(model: ModelBundle, images: torch.Tensor, layer: str | None, target: ExplainTarget) -> Capture:
    """The activations of ``layer`` (``None``: the input ``images``, keyed :data:`convlens.models.layers.INPUT`) and
    the gradient of the target with respect to them, computed with no more work than that needs: no weight
    gradients, no backward pass below ``layer`` and, for a unit, no forward pass beyond the unit's layer (design.md
    sec. 7). A unit's layer must run after ``layer`` and depend on it."""
    from convlens.models.layers import gradients_between

    kind = target.kind
    if kind == "class":
        if target.classes is None:
            return gradients_between(model.module, images, layer, None, predicted_logit)
        return _given_class_gradients(model, images, layer, target.classes)
    unit_layer = target.layer or layer
    if unit_layer is None:
        raise ContractError(f"the {target.label} target names no layer to read it at (ExplainTarget(layer=...))")
    return gradients_between(model.module, images, layer, unit_layer, target.unit_values(unit_layer))


def predicted_logit(logits: torch.Tensor) -> torch.Tensor:
    """Per image, its largest logit."""
    return logits.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)


def _given_class_gradients(model: ModelBundle, images: torch.Tensor, layer: str | None, given: torch.Tensor) -> Capture:
    """:func:`target_gradients` of the logits of ``given`` classes. Their range is checked once the backward pass
    is queued, so that a GPU never waits for the check in the middle of the pass."""
    from convlens.models.layers import gradients_between

    out_of_range: list[torch.Tensor] = []

    def class_logit(logits: torch.Tensor) -> torch.Tensor:
        classes = given.to(logits.device).long()
        if classes.shape != (logits.shape[0],):
            raise ContractError(f"{classes.shape[0]} target classes for {logits.shape[0]} images")
        out_of_range.append(((classes < 0) | (classes >= logits.shape[1])).any())
        return logits.gather(1, classes.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)

    captured = gradients_between(model.module, images, layer, None, class_logit)
    if bool(out_of_range[0]):
        classes = captured.logits.shape[1]
        raise ConvlensError(f"target classes must lie in 0..{classes - 1}")
    return captured


class AttributionVisualizer(ImageVisualizer):
    """A visualizer that explains images: subclasses implement :meth:`attribute`; :meth:`run` does the rest.

    :meth:`run` explains, per image, the predicted class (or ``class_index``) or, with ``target.units``, each unit
    of ``target.layer`` (a channel, or with ``target.sae`` an SAE latent) summed over the layer's positions; the
    maps are taken at the ``map_layer`` parameter, by default ``target.layer``. The JSON record lists every overlay
    in ``figures`` as ``{"unit", "path", "kind": "attribution", "caption"}``, ``path`` relative to the output
    folder; overlays of class targets belong to no unit and carry ``"unit": null``. The model runs under
    autocast to ``target.dtype``; the maps are float32.
    """

    explains_units_on_images = True
    #: What the method costs, in passes through the model (e.g. "1 forward, 1 backward to the input"), shown by
    #: ``convlens bench attribution`` beside its measured time.
    cost: str = ""

    @abc.abstractmethod
    def attribute(self, model: ModelBundle, images: torch.Tensor, layer: str, target: ExplainTarget) -> torch.Tensor:
        """Maps ``[N, h, w]`` (any resolution: the layer's grid or the input's) for normalised ``images``."""

    def attribute_targets(
        self, model: ModelBundle, images: torch.Tensor, layer: str, targets: Sequence[ExplainTarget]
    ) -> torch.Tensor:
        """Maps ``[N, T, h, w]`` of several targets of the same images. By default :meth:`attribute` once per
        target; a method whose passes serve every target at once (a perturbation method: one forward pass of a
        changed copy scores all of them) overrides this."""
        import torch

        return torch.stack([self.explain(model, images, layer, target) for target in targets], dim=1)

    def explain_targets(
        self, model: ModelBundle, images: torch.Tensor, layer: str, targets: Sequence[ExplainTarget]
    ) -> torch.Tensor:
        """:meth:`attribute_targets`, detached and in float32, checked: ``[N, T, h, w]``."""
        import torch

        from convlens.models.layers import full_precision

        maps = self.attribute_targets(model, images, layer, targets)
        expected = (images.shape[0], len(targets))
        if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or tuple(maps.shape[:2]) != expected:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ContractError(f"attribution '{self.name}' returned {shape} for {len(targets)} targets")
        if not math.isfinite(float(maps.detach().sum(dtype=torch.float64))):
            raise ConvlensError(f"attribution '{self.name}' produced NaN or infinite values at layer '{layer}'")
        return full_precision(maps.detach())

    def explain(self, model: ModelBundle, images: torch.Tensor, layer: str, target: ExplainTarget) -> torch.Tensor:
        """:meth:`attribute`, detached and in float32 (also under autocast), with its output checked against the
        contract."""
        import torch

        from convlens.models.layers import full_precision

        maps = self.attribute(model, images, layer, target)
        if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ContractError(
                f"attribution '{self.name}' returned {shape}, expected maps [N={images.shape[0]}, h, w]"
            )
        # a float64 sum of float32 values cannot overflow: it is finite exactly when every value is
        if not math.isfinite(float(maps.detach().sum(dtype=torch.float64))):
            raise ConvlensError(f"attribution '{self.name}' produced NaN or infinite values at layer '{layer}'")
        return full_precision(maps.detach())

    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        """Explain every image of ``target.data``: ``overlays/*.png``, ``maps.safetensors``, ``attribution.json``."""
        import torch

        from convlens.data.concepts import load_concepts
        from convlens.data.images import Preprocessing, SkipLog
        from convlens.models.layers import activations_at
        from convlens.runtime.precision import autocast
        from convlens.runtime.run_records import write_json_atomic
        from convlens.runtime.tensor_files import save_tensors_atomic

        params = self.params or AttributionParams()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model, layer = target.model, target.layer
        map_layer = getattr(params, "map_layer", None) or layer
        if target.sae is not None and not target.units:
            raise ConvlensError(f"{self.name} with an SAE explains latents: name them with --units")
        index = self.data_of(target)
        positions = list(range(min(len(index), params.max_images or len(index))))
        preprocessing = Preprocessing.of(model)
        concepts = None
        if isinstance(target.data, (str, Path)) and (Path(target.data) / "concepts.json").is_file():
            concepts = load_concepts(target.data)
        concept_of = concepts.positions_in(index) if concepts is not None else {}
        device = next((p.device for p in model.module.parameters()), torch.device("cpu"))
        explained: list[ExplainTarget | None] = [
            ExplainTarget(sae=target.sae, latent=unit, layer=layer)
            if target.sae is not None
            else ExplainTarget(layer=layer, channel=unit)
            for unit in target.units
        ] or [None]
        record: dict[str, Any] = {
            "visualizer": self.name,
            "layer": layer,
            "map_layer": map_layer,
            "params": params.to_dict(),
            "dtype": target.dtype,
            "target": "latents" if target.sae is not None else "channels" if target.units else "class",
            "images": [],
            "figures": [],
        }
        maps_kept: list[torch.Tensor] = []
        positions_kept: list[int] = []
        hits: list[bool] = []
        chance: list[float] = []
        skip_log = SkipLog(index.root)
        unchecked = [explain for explain in explained if explain is not None]
        for batch in self.batches(target, positions, batch_size=params.batch_size, skip_log=skip_log):
            images = batch.images.to(device)
            if unchecked:  # every unit once, before any work, also for methods that ignore the target
                shape = tuple(activations_at(model.module, images[:1], layer).activations[layer].shape)
                for explain in unchecked:
                    explain.check(shape, layer)
                unchecked = []
            with torch.no_grad(), autocast(device, target.dtype):
                probabilities = model.module(images).float().softmax(dim=1)
            predicted = probabilities.argmax(dim=1)
            classes = predicted if params.class_index is None else torch.full_like(predicted, params.class_index)
            if params.class_index is not None and params.class_index >= probabilities.shape[1]:
                raise ConvlensError(
                    f"class_index {params.class_index} is out of range for a model with "
                    f"{probabilities.shape[1]} classes"
                )
            with autocast(device, target.dtype):
                targets = [explain or ExplainTarget(classes=classes) for explain in explained]
                maps = self.explain_targets(model, images, map_layer, targets).cpu()  # [B, targets, h, w]
            peaks = input_peaks(maps, tuple(images.shape[2:]))
            for row in range(len(batch)):
                position = int(batch.positions[row])
                picture = preprocessing.to_pil(images[row])
                for column, explain in enumerate(explained):
                    entry = self._describe(index, position, explain, classes[row], probabilities[row], model)
                    peak = peaks[row, column].tolist()
                    entry["peak"] = peak
                    if explain is None and position in concept_of:
                        mask = aligned_mask(concepts.foreground(concept_of[position]), preprocessing)
                        entry["peak_on_object"] = bool(mask[peak[0], peak[1]])
                        hits.append(entry["peak_on_object"])
                        chance.append(float(mask.mean()))
                    entry["overlay"] = self._write_overlay(
                        out_dir, picture, maps[row, column], entry, params.alpha, layer, map_layer
                    )
                    record["images"].append(entry)
                    record["figures"].append(
                        {
                            "unit": explain.unit if explain is not None else None,
                            "path": entry["overlay"],
                            "kind": "attribution",
                            "caption": self._caption(entry, model),
                        }
                    )
                maps_kept.append(maps[row])
                positions_kept.append(position)
            if hits:
                record["pointing_game"] = pointing_game(hits, chance)
            write_json_atomic(out_dir / "attribution.json", record)  # complete so far, also if a later batch fails
        if not maps_kept:
            raise ConvlensError(f"none of the images under {index.root} could be read")
        save_tensors_atomic(
            {"maps": torch.stack(maps_kept).contiguous(), "positions": torch.tensor(positions_kept)},
            out_dir / "maps.safetensors",
            metadata={
                "visualizer": self.name,
                "layer": layer,
                "map_layer": map_layer,
                "units": ",".join(str(unit) for unit in target.units),
                "axes": "image, target, y, x",
            },
        )
        record["maps"] = "maps.safetensors"
        record["skipped"] = skip_log.as_json()
        game = record.get("pointing_game")
        record["summary"] = (
            f"explained {len(positions_kept)} images"
            + (
                f"; pointing game {game['hits']}/{game['images']} = {game['accuracy']:.3f} (a random point: "
                f"{game['random_point']:.3f})"
                if game
                else ""
            )
            + (f"; {skip_log.summary()}" if len(skip_log) else "")
        )
        write_json_atomic(out_dir / "attribution.json", record)
        return record

    @staticmethod
    def _describe(
        index: Any,
        position: int,
        explain: ExplainTarget | None,
        chosen_class: Any,
        probabilities: Any,
        model: ModelBundle,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"image": index.relative(index.paths[position]), "position": position}
        predicted = int(probabilities.argmax())
        entry["predicted"] = predicted
        entry["probability"] = float(probabilities[predicted])
        if explain is None:
            entry["class"] = int(chosen_class)
            if model.class_names is not None and int(chosen_class) < len(model.class_names):
                entry["class_name"] = model.class_names[int(chosen_class)]
        elif explain.kind == "latent":
            entry["latent"] = explain.latent
        else:
            entry["unit"] = explain.channel
        return entry

    @staticmethod
    def _caption(entry: dict[str, Any], model: ModelBundle) -> str:
        names = model.class_names
        predicted = (
            names[entry["predicted"]]
            if names is not None and entry["predicted"] < len(names)
            else (f"class {entry['predicted']}")
        )
        explained = f"explains {entry.get('class_name', entry['class'])}; " if "class" in entry else ""
        return (
            f"{entry['image']}: {explained}predicted {predicted} ({entry['probability']:.2f}); "
            f"peak ({entry['peak'][0]}, {entry['peak'][1]})"
        )

    def _write_overlay(
        self, out_dir: Path, picture: Any, values: Any, entry: dict[str, Any], alpha: float, layer: str, map_layer: str
    ) -> str:
        from convlens.data.images import save_png
        from convlens.drawing.charts import enlarge, heat_overlay, side_by_side, titled

        top = float(values.max())
        shown = (values / top).numpy() if top > 0 else values.numpy() * 0
        if "latent" in entry:
            what, suffix = f"latent {entry['latent']}", f"-latent{entry['latent']}"
        elif "unit" in entry:
            what, suffix = f"unit {entry['unit']}", f"-unit{entry['unit']}"
        else:
            what, suffix = f"class {entry.get('class_name', entry['class'])}", ""
        if map_layer != layer:
            what = f"{what} of {layer} at {map_layer}" if suffix else f"{what} at {map_layer}"
        size = max(picture.size + (192,))
        panels = [enlarge(picture, size), enlarge(heat_overlay(picture, shown, alpha), size)]
        overlay = titled(side_by_side(panels, gap=4), f"{self.name}: {what}")
        relative = f"overlays/{entry['position']:05d}-{Path(entry['image']).stem}{suffix}.png"
        save_png(overlay, out_dir / relative)
        return relative


class GradientCAMVisualizer(AttributionVisualizer):
    """A class activation map computed from a layer's activations and the target's gradient to them (Grad-CAM and
    its variants): subclasses implement :meth:`maps`; only the gradients from the target back to the layer are
    computed."""

    @abc.abstractmethod
    def maps(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Maps ``[N, H, W]`` from activations and gradients ``[N, C, H, W]``."""

    def attribute(self, model: ModelBundle, images: torch.Tensor, layer: str, target: ExplainTarget) -> torch.Tensor:
        captured = target_gradients(model, images, layer, target)
        return self.maps(captured.activations[layer], captured.gradients[layer])


def input_peaks(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(y, x)`` in input pixels of the largest value of each map ``[..., h, w]`` resized (bilinear) to ``size``;
    the first such pixel in row-major order on ties."""
    import torch

    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if tuple(flat.shape[-2:]) != tuple(size):
        flat = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    where = flat.flatten(1).argmax(dim=1)
    peaks = torch.stack([where // size[1], where % size[1]], dim=1)
    return peaks.reshape(*maps.shape[:-2], 2)


def aligned_mask(mask: Any, preprocessing: Any) -> Any:
    """A foreground mask of the original image, given the model's resize and centre crop: bool ``[H, W]``."""
    import numpy as np
    from PIL import Image

    aligned = preprocessing.eval_geometry(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, "L"))
    return np.asarray(aligned) >= 128


def pointing_game(hits: list[bool], chance: list[float]) -> dict[str, Any]:
    """The share of maps whose peak lies on the object, beside the rate of a point drawn uniformly at random
    (the mean foreground share of the images)."""
    return {
        "hits": int(sum(hits)),
        "images": len(hits),
        "accuracy": sum(hits) / len(hits),
        "random_point": sum(chance) / len(chance),
    }
