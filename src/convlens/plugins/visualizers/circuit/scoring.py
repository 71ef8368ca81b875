"""Scores of a channel graph's nodes and edges for a target, subgraph extraction and its validation (see the
package docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

from convlens import ConvlensError, Params, param

if TYPE_CHECKING:
    import torch

    from .graph import ChannelGraph

CRITERIA = ("taylor", "activation", "weight", "random")
SUBGRAPH_KINDS = ("best", "random", "worst")


@dataclass(frozen=True)
class CircuitParams(Params):
    criterion: Literal["taylor", "activation", "weight", "random"] = param(
        "taylor",
        help="node and edge scores: taylor (|activation x gradient| of the target, VISCNN eqs. 3-4), "
        "activation (output magnitude), weight (kernel L2 norm) or random (baseline)",
    )
    sparsity: float = param(
        0.05,
        min=0.0,
        max=1.0,
        help="share of the feature graph's edges kept (mode fraction) or of its total score (mode cumulative)",
    )
    mode: Literal["fraction", "cumulative"] = param("fraction", help="how --sparsity is read")
    contrast: str = param(
        "", help="images whose scores are subtracted (VISCNN's 'class - overall' query): an image file, folder or list"
    )
    class_index: Optional[int] = param(
        None, min=0, help="without units: the target is the model's cross-entropy loss on this class"
    )
    neuron: bool = param(False, help="the unit's centre position instead of its mean over the map")
    max_images: Optional[int] = param(200, min=2, help="use at most this many images of --data (and of --contrast)")
    batch_size: int = param(32, min=1, help="images per forward and backward pass")
    workers: int = param(0, min=0, help="data-loading processes")
    validate: bool = param(
        True,
        help="hold out images and measure how well best, random and worst subgraphs "
        "reproduce the target (VISCNN Figure 8)",
    )
    sparsities: tuple[float, ...] = param(
        (0.5, 0.2, 0.1, 0.05), help="shares of edges (or of the score, mode cumulative) of the validated subgraphs"
    )
    held_out: float = param(
        0.5, min=0.05, max=0.95, help="share of the images kept out of the scores for the validation"
    )
    random_draws: int = param(3, min=1, help="random subgraphs per sparsity, averaged")
    subfeatures: bool = param(
        False, help="also cluster the unit's top patches and extract a subgraph per cluster (VISCNN sec. 4.2)"
    )
    patches: int = param(300, min=4, help="sub-features: top patches of the unit, one per image")
    min_cluster_size: int = param(20, min=2, help="sub-features: HDBSCAN's minimum cluster size")
    shuffles: int = param(5, min=1, help="sub-features: shuffled cluster assignments the separability is compared with")
    view_edges: int = param(400, min=1, help="kept edges drawn in the view and the PNG, best first")
    node_inputs: int = param(8, min=1, help="top incoming edges (with kernels) listed per node in the view")
    feature_viz_nodes: int = param(
        24, min=0, help="render the feature visualisation of this many of the view's nodes, best first (0: none)"
    )
    feature_viz_steps: int = param(128, min=1, help="optimisation steps of those feature visualisations")
    seed: int = param(0, help="seed of the random scores, the random subgraphs, the split and the shuffles")


@dataclass
class CircuitTarget:
    """What a circuit explains: a channel (``unit``) or SAE latent (``sae``) of ``layer``, read as its mean over the
    map or (``neuron``) at the map's centre, or (``unit`` None) the model's cross-entropy loss on class
    ``class_index``."""

    layer: str | None
    unit: int | None = None
    sae: Any = None
    class_index: int | None = None
    neuron: bool = False

    @property
    def kind(self) -> str:
        if self.unit is None:
            return "class"
        if self.neuron:
            return "neuron"
        return "latent" if self.sae is not None else "channel"

    @property
    def label(self) -> str:
        if self.kind == "class":
            return f"loss on class {self.class_index}"
        unit = f"latent {self.unit}" if self.sae is not None else f"unit {self.unit}"
        return f"{self.layer} {unit}" + (" (centre neuron)" if self.neuron else "")

    @property
    def slug(self) -> str:
        if self.kind == "class":
            return f"class-{self.class_index}"
        return f"{'latent' if self.sae is not None else 'unit'}-{self.unit}"

    def response(self, value: torch.Tensor) -> torch.Tensor:
        """Per image, the target's map ``[N, H, W]`` (a neuron, a class: ``[N]``) from the value it is read from."""
        import torch
        import torch.nn.functional as F

        if self.kind == "class":
            classes = torch.full((value.shape[0],), self.class_index, dtype=torch.long, device=value.device)
            return F.cross_entropy(value, classes, reduction="none")
        maps = self.sae.encode(value)[:, self.unit] if self.sae is not None else value[:, self.unit]
        if self.neuron:
            return maps[:, maps.shape[1] // 2, maps.shape[2] // 2] if maps.ndim == 3 else maps
        return maps

    def objective(self, value: torch.Tensor) -> torch.Tensor:
        response = self.response(value)
        return response.flatten(1).mean(dim=1) if response.ndim > 1 else response


@dataclass
class Scores:
    """Scores of every node ``[C]`` per layer and edge (per edge layer, its edge shape) for one target."""

    criterion: str
    nodes: dict[str, torch.Tensor]
    edges: dict[str, torch.Tensor]
    images: int = 0
    contrast_images: int = 0


# --- the graph and the target --------------------------------------------------------------------------------------


def circuit_stop(graph: ChannelGraph, target: CircuitTarget):
    """The traced operation whose value the target reads (``None``: the model's output)."""
    return None if target.kind == "class" else graph.node_of_layer(target.layer)


def target_nodes(graph: ChannelGraph, target: CircuitTarget, channels: int | None = None) -> dict[str, torch.Tensor]:
    """The graph nodes the target reads (boolean ``[C]`` per layer): a channel's node, every channel of the layer for
    an SAE latent, and every node the model's output is computed from for a class."""
    import torch

    from .graph import channel_node

    chosen = {layer.name: torch.zeros(layer.channels, dtype=torch.bool) for layer in graph.layers}
    if target.kind == "class":
        segments = graph.exit_sources()
    else:
        sources = graph.sources_of_layer(target.layer)
        count = sum(segment.count for segment in sources)
        if target.sae is None:
            if not 0 <= target.unit < count:
                raise ConvlensError(
                    f"unit {target.unit} is out of range: layer '{target.layer}' has units 0..{count - 1}"
                )
            layer, channel = channel_node(sources, target.unit)
            chosen[layer][channel] = True
            return chosen
        if target.sae.input_dim != count:
            raise ConvlensError(
                f"the SAE reads {target.sae.input_dim} channels but layer '{target.layer}' gives {count}"
            )
        if not 0 <= target.unit < target.sae.latent_dim:
            raise ConvlensError(
                f"latent {target.unit} is out of range: the SAE has latents 0..{target.sae.latent_dim - 1}"
            )
        segments = sources
    for segment in segments:
        chosen[segment.layer][segment.start : segment.start + segment.count] = True
    return chosen


# --- scores --------------------------------------------------------------------------------------------------------


def score_components(
    graph: ChannelGraph,
    target: CircuitTarget,
    criterion: str,
    batches: Iterable[torch.Tensor] = (),
    contrast: Iterable[torch.Tensor] | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> Scores:
    """The ``criterion`` scores of every node and edge, averaged over the images of ``batches`` (minus those over
    ``contrast``, when given); the model runs under autocast to ``dtype``, the scores are float64."""
    from .graph import INPUT_LAYER

    if criterion not in CRITERIA:
        raise ConvlensError(f"unknown criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    targets = target_nodes(graph, target)
    if criterion in ("weight", "random"):
        if contrast is not None:
            raise ConvlensError(f"criterion '{criterion}' does not look at images, so it has no contrast")
        scores = _static_scores(graph, criterion, seed)
    else:
        scores = _image_scores(graph, target, criterion, batches, dtype)
    if contrast is not None:
        other = _image_scores(graph, target, criterion, contrast, dtype)
        scores = Scores(
            criterion,
            {k: v - other.nodes[k] for k, v in scores.nodes.items()},
            {k: v - other.edges[k] for k, v in scores.edges.items()},
            scores.images,
            other.images,
        )
    # the target itself is read, never removed: it gets the best score of any node
    best = max(float(values.max()) for name, values in scores.nodes.items() if name != INPUT_LAYER and len(values))
    for name, chosen in targets.items():
        scores.nodes[name][chosen] = max(best, 0.0)
    return scores


def _image_scores(
    graph: ChannelGraph, target: CircuitTarget, criterion: str, batches: Iterable[torch.Tensor], dtype: str
) -> Scores:
    import torch

    from .graph import gate_derivatives

    stop = circuit_stop(graph, target)
    nodes = {layer.name: torch.zeros(layer.channels, dtype=torch.float64) for layer in graph.layers}
    edges = {layer.name: torch.zeros(layer.edge_shape, dtype=torch.float64) for layer in graph.edge_layers}
    images = 0
    for batch in batches:
        derivatives = gate_derivatives(graph, batch, target.objective, stop, dtype)
        node_values = derivatives.node_taylor if criterion == "taylor" else derivatives.node_activation
        edge_values = derivatives.edge_taylor if criterion == "taylor" else derivatives.edge_activation
        for name, values in node_values.items():
            nodes[name] += values.abs().sum(dim=0).double().cpu()
        for name, values in edge_values.items():
            edges[name] += values.abs().sum(dim=0).double().cpu()
        images += batch.shape[0]
    if not images:
        raise ConvlensError("no image could be read to score the circuit")
    return Scores(
        criterion, {k: v / images for k, v in nodes.items()}, {k: v / images for k, v in edges.items()}, images
    )


def _static_scores(graph: ChannelGraph, criterion: str, seed: int) -> Scores:
    import torch

    from convlens import torch_generator

    nodes, edges = {}, {}
    if criterion == "random":
        generator = torch_generator(seed, "circuit-random-scores")
        for layer in graph.layers:
            nodes[layer.name] = torch.rand(layer.channels, generator=generator, dtype=torch.float64)
        for layer in graph.edge_layers:
            edges[layer.name] = torch.rand(layer.edge_shape, generator=generator, dtype=torch.float64)
        return Scores(criterion, nodes, edges)
    for layer in graph.layers:
        if layer.kind == "conv":
            weight = graph.graph_module.get_submodule(layer.module).weight.detach().double().cpu()
            edges[layer.name] = weight.flatten(2).norm(dim=2)
            nodes[layer.name] = weight.flatten(1).norm(dim=1)
        elif layer.kind == "add":
            edges[layer.name] = torch.ones(layer.edge_shape, dtype=torch.float64)
            nodes[layer.name] = torch.full((layer.channels,), float(len(layer.inputs)), dtype=torch.float64)
        else:
            nodes[layer.name] = torch.ones(layer.channels, dtype=torch.float64)
    return Scores(criterion, nodes, edges)


# --- subgraphs -----------------------------------------------------------------------------------------------------


def edges_to_keep(flat_scores: torch.Tensor, feature: torch.Tensor, sparsity: float, mode: str) -> int:
    """How many edges of the feature graph (boolean ``feature``) a subgraph of ``sparsity`` keeps: that share of
    them (mode fraction), or the fewest best ones whose scores sum to that share of the total (mode cumulative)."""
    import torch

    total = int(feature.sum())
    if mode == "fraction":
        return min(total, max(1, round(sparsity * total)))
    if mode != "cumulative":
        raise ConvlensError(f"unknown subgraph mode '{mode}'; choose fraction or cumulative")
    ranked = flat_scores[feature].clamp(min=0).sort(descending=True).values
    cumulative = ranked.cumsum(0)
    if cumulative[-1] <= 0:
        return min(total, 1)
    return min(total, int(torch.searchsorted(cumulative, sparsity * cumulative[-1]).item()) + 1)


def choose_edges(
    flat_scores: torch.Tensor, feature: torch.Tensor, count: int, kind: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A boolean flat edge mask with ``count`` edges of the feature graph: the best, the worst or random ones. Ties
    go to the earlier edge."""
    import torch

    candidates = feature.nonzero().flatten()
    scores = flat_scores[candidates]
    if kind == "best":
        order = torch.sort(-scores, stable=True).indices
    elif kind == "worst":
        order = torch.sort(scores, stable=True).indices
    elif kind == "random":
        order = torch.randperm(len(candidates), generator=generator)
    else:
        raise ConvlensError(f"unknown subgraph kind '{kind}'; choose one of {', '.join(SUBGRAPH_KINDS)}")
    kept = torch.zeros_like(feature)
    kept[candidates[order[:count]]] = True
    return kept


def subgraph_gates(graph: ChannelGraph, kept_flat: torch.Tensor, dtype=None, device=None):
    """Gates that keep exactly the edges of ``kept_flat`` (every other kernel and branch is 0)."""
    from .graph import Gates, unflatten_edges

    edges = unflatten_edges(graph, kept_flat.to(device=device, dtype=dtype))
    return Gates(edges=edges)


@dataclass
class Subgraph:
    kept: torch.Tensor  # flat boolean over every edge
    feature: torch.Tensor  # flat boolean: the feature graph
    count: int

    @property
    def fraction(self) -> float:
        return self.count / max(int(self.feature.sum()), 1)


def extract_subgraph(
    graph: ChannelGraph,
    target: CircuitTarget,
    scores: Scores,
    sparsity: float,
    mode: str = "fraction",
    kind: str = "best",
    generator=None,
) -> Subgraph:
    """The ``kind`` subgraph of the feature graph at ``sparsity`` (see :func:`edges_to_keep`)."""
    from .graph import flatten_edges

    _, feature_edges = graph.ancestors(target_nodes(graph, target))
    feature = flatten_edges(graph, feature_edges)
    flat = flatten_edges(graph, scores.edges)
    count = edges_to_keep(flat, feature, sparsity, mode)
    return Subgraph(choose_edges(flat, feature, count, kind, generator), feature, count)


# --- validation (sec. 4.1) -----------------------------------------------------------------------------------------


class StreamingPearson:
    """Pearson correlation of paired values seen in chunks (float64 sums); 0 when either side does not vary."""

    def __init__(self):
        self.count = 0
        self.sums = [0.0] * 5  # x, y, xx, yy, xy

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().double().flatten().cpu(), y.detach().double().flatten().cpu()
        self.count += x.numel()
        for index, value in enumerate((x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())):
            self.sums[index] += float(value)

    @property
    def value(self) -> float:
        if self.count < 2:
            return 0.0
        n = self.count
        sx, sy, sxx, syy, sxy = self.sums
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        if vx <= 1e-12 * max(sxx, 1e-300) or vy <= 1e-12 * max(syy, 1e-300):
            return 0.0
        return max(-1.0, min(1.0, (sxy - sx * sy / n) / math.sqrt(vx * vy)))


def validate_subgraphs(
    graph: ChannelGraph,
    target: CircuitTarget,
    scores: Scores,
    batches: Callable[[], Iterable[torch.Tensor]],
    sparsities: Iterable[float],
    mode: str = "fraction",
    random_draws: int = 3,
    seed: int = 0,
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Per sparsity: the correlation of the target's response in the best, random (mean and spread over
    ``random_draws``) and worst subgraphs with the full model's, on the images of ``batches()``; the model runs
    under autocast to ``dtype``."""
    import torch

    from convlens import autocast, full_precision, torch_generator

    def response(batch: torch.Tensor, gates: Any = None) -> torch.Tensor:
        with autocast(batch.device, dtype):
            value = graph.run(batch, gates, stop)
        return target.response(full_precision(value))

    stop = circuit_stop(graph, target)
    plans = []
    for sparsity in sparsities:
        generator = torch_generator(seed, f"circuit-random-subgraph-{sparsity}")
        best = extract_subgraph(graph, target, scores, sparsity, mode, "best")
        worst = extract_subgraph(graph, target, scores, sparsity, mode, "worst")
        draws = [
            choose_edges(flatten(graph, scores), best.feature, best.count, "random", generator)
            for _ in range(random_draws)
        ]
        plans.append((sparsity, best, {"best": [best.kept], "worst": [worst.kept], "random": draws}))
    correlations = {
        (s, kind, d): StreamingPearson()
        for s, _, kinds in plans
        for kind, masks in kinds.items()
        for d in range(len(masks))
    }
    images = 0
    with torch.no_grad():
        for batch in batches():
            full = response(batch)
            for sparsity, _, kinds in plans:
                for kind, masks in kinds.items():
                    for draw, kept in enumerate(masks):
                        gates = subgraph_gates(graph, kept, batch.dtype, batch.device)
                        correlations[(sparsity, kind, draw)].update(full, response(batch, gates))
            images += batch.shape[0]
    if not images:
        raise ConvlensError("no held-out image could be read to validate the circuit")
    rows = []
    for sparsity, best, kinds in plans:
        random_values = [correlations[(sparsity, "random", d)].value for d in range(len(kinds["random"]))]
        mean = sum(random_values) / len(random_values)
        rows.append(
            {
                "sparsity": sparsity,
                "edges": best.count,
                "feature_edges": int(best.feature.sum()),
                "fraction": best.fraction,
                "best": correlations[(sparsity, "best", 0)].value,
                "random": mean,
                "random_std": float(torch.tensor(random_values).std(unbiased=False)),
                "worst": correlations[(sparsity, "worst", 0)].value,
                "images": images,
            }
        )
    return rows


def flatten(graph: ChannelGraph, scores: Scores) -> torch.Tensor:
    from .graph import flatten_edges

    return flatten_edges(graph, scores.edges)


def figure8_ordering_holds(rows: list[dict[str, Any]]) -> bool:
    """Best above random above worst at every sparsity (VISCNN Figure 8)."""
    return all(row["best"] > row["random"] > row["worst"] for row in rows)
