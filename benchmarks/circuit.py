"""Circuit scores and subgraph runs on a torchvision resnet18, against floors measured in the same run.

- Taylor scores of every node and every edge (1.4 M kernels and branches) for a unit of layer3: one gated forward,
  one backward and the per-image kernel products, against the floor of a bare forward plus a backward to the input
  (the same graph without gates).
- A gated run of a subgraph (every kernel scaled by its 0/1 gate, traced ops replayed by torch.fx's interpreter),
  against a bare forward.
- The alternative the Taylor score replaces (VISCNN sec. 2.2): removing edges one at a time and re-running the
  model, extrapolated from a few removals to every edge of the feature graph.

    python benchmarks/circuit.py [--size 224] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import convlens
from convlens.plugins.visualizers.circuit.graph import ChannelGraph, Gates, gate_derivatives
from convlens.plugins.visualizers.circuit.scoring import (
    CircuitTarget,
    extract_subgraph,
    score_components,
    subgraph_gates,
)


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    module = convlens.registry.create("model", "torchvision", arch="resnet18", seed=0).module.to(device).eval()
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    graph = ChannelGraph.trace(module, (args.size, args.size), "resnet18")
    target = CircuitTarget("layer3", 7)
    stop = graph.node_of_layer("layer3")

    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare_forward_backward():
        leaf = images.clone().requires_grad_(True)
        value = module.layer3(module.layer2(module.layer1(module.maxpool(module.relu(module.bn1(module.conv1(leaf)))))))
        torch.autograd.grad(value[:, 7].mean(dim=(1, 2)).sum(), [leaf])
        synchronise()

    def taylor():
        gate_derivatives(graph, images, target.objective, stop)
        synchronise()

    def bare_forward():
        with torch.no_grad():
            module(images)
        synchronise()

    scores = score_components(graph, target, "taylor", [images])
    subgraph = extract_subgraph(graph, target, scores, 0.1)
    gates = subgraph_gates(graph, subgraph.kept, images.dtype, device)

    def gated_forward():
        with torch.no_grad():
            graph.run(images, gates)
        synchronise()

    def one_removal():
        removed = Gates(edges={"layer3.1.conv2": torch.ones(256, 256, device=device)})
        removed.edges["layer3.1.conv2"][7, 3] = 0
        with torch.no_grad():
            graph.run(images, removed, stop)
        synchronise()

    for work in (bare_forward_backward, taylor, bare_forward, gated_forward):
        work()  # warm-up
    floor = best_of(args.repeats, bare_forward_backward)
    scored = best_of(args.repeats, taylor)
    forward = best_of(args.repeats, bare_forward)
    gated = best_of(args.repeats, gated_forward)
    removal = best_of(args.repeats, one_removal)
    feature_edges = int(subgraph.feature.sum())
    result = {
        "device": str(device),
        "size": args.size,
        "batch": args.batch,
        "graph_edges": graph.edge_count(),
        "feature_edges": feature_edges,
        "bare_forward_backward_s": floor,
        "taylor_scores_s": scored,
        "taylor_over_floor": scored / floor,
        "bare_forward_s": forward,
        "gated_subgraph_forward_s": gated,
        "gated_over_forward": gated / forward,
        "one_removal_s": removal,
        "removals_for_every_feature_edge_s": removal * feature_edges,
        "removals_over_taylor": removal * feature_edges / scored,
    }
    print(
        f"Taylor scores of {graph.edge_count():,} edges: {scored:.3f} s per batch of {args.batch} = "
        f"{scored / floor:.2f}x a bare forward+backward ({floor:.3f} s)"
    )
    print(f"gated subgraph forward: {gated:.3f} s = {gated / forward:.2f}x a bare forward ({forward:.3f} s)")
    print(
        f"removing each of the {feature_edges:,} feature-graph edges in turn would take "
        f"{removal * feature_edges:,.0f} s = {removal * feature_edges / scored:,.0f}x the Taylor scores"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
