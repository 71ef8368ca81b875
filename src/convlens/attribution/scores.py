"""The scalar an attribution explains, evaluated without gradients on changed copies of the images: what the
perturbation methods (ScoreCAM, AblationCAM, Occlusion) and the faithfulness metrics measure.

A class target is scored by its logit; a unit target (a channel or an SAE latent) by its value summed over its
layer's positions, with the forward pass stopped at that layer. :func:`with_classes` fixes the classes of a class
target first (the prediction on the unchanged images), so that every copy is scored for the same class.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from convlens.attribution.base import AttributionVisualizer, ExplainTarget
from convlens.core.contracts import ModelBundle
from convlens.core.errors import ContractError, ConvlensError

if TYPE_CHECKING:
    import torch

#: ``scorer(images [B, C, H, W], rows [B])``: per copy, the target's value for the image ``rows[b]`` it is a copy of.
Scorer = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def with_classes(model: ModelBundle, images: torch.Tensor, target: ExplainTarget) -> ExplainTarget:
    """``target`` with its classes fixed: a class target without classes gets the model's prediction per image
    (one forward pass); other targets are returned as they are. Out-of-range classes are one clear error."""
    import torch

    if target.kind != "class":
        return target
    if target.classes is None:
        with torch.no_grad():
            return dataclasses.replace(target, classes=model.module(images).argmax(dim=1))
    classes = torch.as_tensor(target.classes, device=images.device).long()
    if classes.shape != (images.shape[0],):
        raise ContractError(f"{classes.numel()} target classes for {images.shape[0]} images")
    return dataclasses.replace(target, classes=classes)


def for_rows(target: ExplainTarget, rows: torch.Tensor) -> ExplainTarget:
    """The target of copies of the images ``rows`` (a class target with its classes fixed)."""
    if target.kind != "class" or target.classes is None:
        return target
    return dataclasses.replace(target, classes=target.classes[rows.to(target.classes.device)])


def target_scorer(model: ModelBundle, target: ExplainTarget, *, probability: bool = False) -> Scorer:
    """A :data:`Scorer` of ``target`` (classes fixed, see :func:`with_classes`; a unit's layer named): the class
    logit, or its softmax probability with ``probability``; a unit's summed value."""
    import torch

    from convlens.models.layers import activations_at, full_precision

    if target.kind == "class":
        if target.classes is None:
            raise ContractError("score a class target with its classes fixed (with_classes)")
        classes = target.classes

        def class_scores(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                logits = full_precision(model.module(images))
            if probability:
                logits = logits.softmax(dim=1)
            chosen = classes.to(logits.device)[rows.to(logits.device)]
            if int(chosen.max()) >= logits.shape[1] or int(chosen.min()) < 0:
                raise ConvlensError(f"target classes must lie in 0..{logits.shape[1] - 1}")
            return logits.gather(1, chosen[:, None]).squeeze(1)

        return class_scores
    if probability:
        raise ContractError(f"a {target.label} has no probability: score it by its value")
    layer = target.layer
    if layer is None:
        raise ContractError(f"the {target.label} target names no layer to read it at (ExplainTarget(layer=...))")
    values = target.unit_values(layer)

    def unit_scores(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return values(full_precision(activations_at(model.module, images, layer).activations[layer]))

    return unit_scores


def shared_scorer(model: ModelBundle, targets: Sequence[ExplainTarget]) -> Scorer | None:
    """A scorer of several targets at once, ``[B, T]`` from one forward pass per copy: all class targets (classes
    fixed), or units all read at one layer (the pass stops there); ``None`` for a mix, which needs a pass each."""
    import torch

    from convlens.models.layers import activations_at, full_precision

    kinds = {target.kind == "class" for target in targets}
    if kinds == {True}:
        if any(target.classes is None for target in targets):
            raise ContractError("score class targets with their classes fixed (with_classes)")
        classes = torch.stack([target.classes for target in targets], dim=1)  # type: ignore[misc]

        def class_scores(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                logits = full_precision(model.module(images))
            chosen = classes.to(logits.device)[rows.to(logits.device)]
            if int(chosen.max()) >= logits.shape[1] or int(chosen.min()) < 0:
                raise ConvlensError(f"target classes must lie in 0..{logits.shape[1] - 1}")
            return logits.gather(1, chosen)

        return class_scores
    layers = {target.layer for target in targets}
    if kinds != {False} or len(layers) != 1 or None in layers:
        return None
    (layer,) = layers
    values = [target.unit_values(layer) for target in targets]

    def unit_scores(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            output = full_precision(activations_at(model.module, images, layer).activations[layer])
        return torch.stack([value(output) for value in values], dim=1)

    return unit_scores


def chunked_scores(
    scorer: Scorer,
    count: int,
    copies: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The scores ``[count]`` of ``count`` changed copies, made and scored ``batch_size`` at a time without
    gradients: ``copies(indices)`` returns the copies with those flat indices and the row of the image each is a
    copy of."""
    import torch

    if batch_size < 1:
        raise ConvlensError(f"batch_size must be at least 1, not {batch_size}")
    scores = []
    with torch.no_grad():
        for indices in index_chunks(count, batch_size, device):
            images, rows = copies(indices)
            scores.append(scorer(images, rows.to(images.device)).reshape(-1))
    return torch.cat(scores) if scores else torch.zeros(0, device=device)


def index_chunks(count: int, batch_size: int, device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """``arange(count)`` in consecutive chunks of at most ``batch_size``."""
    import torch

    for start in range(0, count, batch_size):
        yield torch.arange(start, min(start + batch_size, count), device=device)


class PerturbationAttribution(AttributionVisualizer):
    """A method that scores changed copies of the images without gradients: one forward pass of a copy scores every
    target at once, so several targets of the same images (classes, or units of one layer) share the passes.
    Subclasses implement :meth:`attribute_shared`."""

    @abc.abstractmethod
    def attribute_shared(
        self, model: ModelBundle, images: torch.Tensor, layer: str, targets: Sequence[ExplainTarget], scorer: Scorer
    ) -> torch.Tensor:
        """Maps ``[N, T, h, w]`` of ``targets`` (classes fixed, units read at their layer), ``scorer`` giving
        ``[B, T]`` scores of copies."""

    def attribute(self, model: ModelBundle, images: torch.Tensor, layer: str, target: ExplainTarget) -> torch.Tensor:
        return self.attribute_targets(model, images, layer, [target])[:, 0]

    def attribute_targets(
        self, model: ModelBundle, images: torch.Tensor, layer: str, targets: Sequence[ExplainTarget]
    ) -> torch.Tensor:
        fixed = [with_classes(model, images, target.read_at(layer)) for target in targets]
        scorer = shared_scorer(model, fixed)
        if scorer is None:  # a mix of targets: one set of passes each
            return super().attribute_targets(model, images, layer, targets)
        return self.attribute_shared(model, images, layer, fixed, scorer)
