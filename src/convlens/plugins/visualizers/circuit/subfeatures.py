"""Sub-feature subgraphs (VISCNN, 004 sec. 4.2): a unit that responds to dissimilar patches may be an OR over
separate processing streams. The unit's top patches (one per image, at its strongest position) are clustered by
the layer's whole activation vector there (HDBSCAN, scikit-learn); each cluster's images give their own scores and
subgraph, and the separability of those subgraphs, the mean pairwise intersection over union of their edge sets, is
compared with that of subgraphs from shuffled clusters of the same sizes (the paper: 0.24 against 0.70).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convlens import ConvlensError, autocast, full_precision

from .scoring import CircuitTarget, circuit_stop, extract_subgraph, score_components

if TYPE_CHECKING:
    import torch

    from .graph import ChannelGraph

Batches = Callable[[list[int]], Iterable["torch.Tensor"]]  # the images at these dataset positions, in batches


@dataclass
class TopPatches:
    positions: list[int]  # dataset positions of the images, strongest first
    values: torch.Tensor  # [M] the unit's activation at its strongest position in each image
    cells: list[tuple[int, int]]  # (y, x) of that position
    vectors: torch.Tensor  # [M, C] the layer's activations there


def top_patches(
    graph: ChannelGraph,
    target: CircuitTarget,
    batches: Iterable[tuple[list[int], torch.Tensor]],
    count: int,
    dtype: str = "float32",
) -> TopPatches:
    """The ``count`` images where the unit responds most, with the position of its maximum and the layer's
    activation vector there (``batches`` yields dataset positions with their images); the model runs under
    autocast to ``dtype``, the values are float32 or wider."""
    import torch

    if target.kind != "channel":
        raise ConvlensError(
            "sub-feature subgraphs are defined for a channel of a layer (not a latent, a neuron or a class)"
        )
    stop = circuit_stop(graph, target)
    positions, values, cells, vectors = [], [], [], []
    with torch.no_grad():
        for batch_positions, images in batches:
            with autocast(images.device, dtype):
                value = full_precision(graph.run(images, None, stop))
            maps = value[:, target.unit].flatten(1)
            best, where = maps.max(dim=1)
            width = value.shape[3]
            rows, columns = where // width, where % width
            picked = value[torch.arange(len(images)), :, rows, columns]
            positions += list(batch_positions)
            values.append(best.cpu())
            cells += list(zip(rows.tolist(), columns.tolist()))
            vectors.append(picked.cpu())
    if not positions:
        raise ConvlensError("no image could be read to find the unit's top patches")
    values_all = torch.cat(values)
    order = torch.sort(-values_all, stable=True).indices[:count].tolist()
    return TopPatches(
        [positions[i] for i in order], values_all[order], [cells[i] for i in order], torch.cat(vectors)[order].double()
    )


def cluster_patches(vectors: torch.Tensor, min_cluster_size: int) -> list[int]:
    """HDBSCAN labels of the patch vectors (-1: noise)."""
    try:
        from sklearn.cluster import HDBSCAN
    except ImportError as exc:
        raise ConvlensError(
            "sub-feature subgraphs cluster with scikit-learn's HDBSCAN: pip install "
            "'convlens[circuits]' (scikit-learn >= 1.3)"
        ) from exc
    if len(vectors) < min_cluster_size:
        return [-1] * len(vectors)
    return [int(label) for label in HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit(vectors.numpy()).labels_]


def edge_iou(first: torch.Tensor, second: torch.Tensor) -> float:
    union = int((first | second).sum())
    return int((first & second).sum()) / union if union else 0.0


def mean_pairwise_iou(kept: list[torch.Tensor]) -> float:
    pairs = list(itertools.combinations(kept, 2))
    return sum(edge_iou(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


def subfeature_subgraphs(
    graph: ChannelGraph,
    target: CircuitTarget,
    patches: TopPatches,
    labels: list[int],
    batches: Batches,
    criterion: str,
    sparsity: float,
    mode: str,
    shuffles: int,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """A subgraph per cluster, the separability of those subgraphs, and that of ``shuffles`` shuffles of the
    clustered images into groups of the same sizes."""
    import torch

    from convlens import torch_generator

    clusters = sorted({label for label in labels if label >= 0})
    members = {label: [patches.positions[i] for i, own in enumerate(labels) if own == label] for label in clusters}

    def subgraph_of(positions: list[int]) -> torch.Tensor:
        scores = score_components(graph, target, criterion, batches(positions), seed=seed, dtype=dtype)
        return extract_subgraph(graph, target, scores, sparsity, mode).kept

    record: dict[str, Any] = {
        "patches": len(patches.positions),
        "clusters": len(clusters),
        "noise": sum(1 for label in labels if label < 0),
        "members": [{"cluster": label, "size": len(members[label]), "images": members[label]} for label in clusters],
    }
    if len(clusters) < 2:
        record.update(
            separability=None,
            shuffled=None,
            shuffled_std=None,
            iou=None,
            note=f"HDBSCAN found {len(clusters)} cluster(s) among {len(labels)} top patches: no sub-features "
            "to separate",
        )
        return record
    kept = [subgraph_of(members[label]) for label in clusters]
    matrix = [[edge_iou(a, b) for b in kept] for a in kept]
    clustered = [position for label in clusters for position in members[label]]
    sizes = [len(members[label]) for label in clusters]
    generator = torch_generator(seed, "circuit-subfeature-shuffle")
    shuffled = []
    for _ in range(shuffles):
        order = torch.randperm(len(clustered), generator=generator).tolist()
        mixed = [clustered[i] for i in order]
        groups, start = [], 0
        for size in sizes:
            groups.append(mixed[start : start + size])
            start += size
        shuffled.append(mean_pairwise_iou([subgraph_of(group) for group in groups]))
    values = torch.tensor(shuffled, dtype=torch.float64)
    record.update(
        separability=mean_pairwise_iou(kept),
        iou=matrix,
        shuffled=float(values.mean()),
        shuffled_std=float(values.std(unbiased=False)),
        edges=[int(mask.sum()) for mask in kept],
    )
    record["kept"] = kept
    return record
