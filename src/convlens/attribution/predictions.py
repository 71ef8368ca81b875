"""What a classifier predicts for each image, and where it looks: the top classes with their probabilities and an
attribution map (e.g. Grad-CAM, Selvaraju et al. 2017) of the predicted class drawn over the image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from convlens.attribution.base import AttributionVisualizer, ExplainTarget
from convlens.core.contracts import ModelBundle


def explained_predictions(
    model: ModelBundle,
    method: AttributionVisualizer,
    images: torch.Tensor,
    names: Sequence[str],
    layer: str,
    *,
    top: int = 5,
    labels: Sequence[int | None] | None = None,
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Per image (named by ``names``) its ``top`` classes with probabilities, and hits when its label is known;
    and ``method``'s maps ``[N, h, w]`` of each image's predicted class at ``layer``."""
    with torch.no_grad():
        probabilities = model.module(images).float().softmax(dim=1)
    best = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
    maps = method.explain(model, images, layer, ExplainTarget(classes=best.indices[:, 0])).detach().cpu()
    labels = list(labels) if labels is not None else [None] * len(names)
    rows = [
        _prediction_row(model, name, indices.tolist(), values.tolist(), label)
        for name, indices, values, label in zip(names, best.indices.cpu(), best.values.cpu(), labels)
    ]
    return rows, maps


def _prediction_row(
    model: ModelBundle, name: str, classes: list[int], probabilities: list[float], label: int | None
) -> dict[str, Any]:
    class_names = model.class_names
    row: dict[str, Any] = {
        "image": name,
        "top": [
            {"class": index, "name": class_names[index] if class_names else str(index), "probability": round(p, 5)}
            for index, p in zip(classes, probabilities)
        ],
    }
    if label is not None:
        row.update(
            label=label,
            label_name=class_names[label] if class_names and label < len(class_names) else str(label),
            top1_hit=classes[0] == label,
            top5_hit=label in classes[:5],
        )
    return row


def prediction_overlays(
    rows: Sequence[dict[str, Any]], maps: torch.Tensor, pictures: Sequence[Any], out_dir: Path
) -> list[str]:
    """One PNG per image: the picture with the map of its predicted class over it, titled with that class; the
    file names relative to ``out_dir``."""
    from convlens.attribution.base import scaled_to_unit
    from convlens.data.images import save_png
    from convlens.drawing.charts import enlarge, heat_overlay, titled

    shown = scaled_to_unit(maps.float())
    files = []
    for number, (row, picture) in enumerate(zip(rows, pictures)):
        best = row["top"][0]
        title = f"{best['name']} {best['probability']:.0%}"
        relative = f"overlays/{number:03d}.png"
        save_png(titled(heat_overlay(enlarge(picture, 224), shown[number].numpy(), 0.5), title, 11), out_dir / relative)
        files.append(relative)
    return files


def prediction_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    labelled = [row for row in rows if "label" in row]
    return {
        "images": len(rows),
        "labelled": len(labelled),
        "top1_hits": sum(row["top1_hit"] for row in labelled),
        "top5_hits": sum(row["top5_hit"] for row in labelled),
    }
