"""The ``circuit`` visualizer: scores, subgraph, validation and sub-features of each unit (or a class), written as
safetensors, JSON, an interactive HTML view and PNG summaries (see :mod:`.circuit`)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens import ConvlensError, ImageVisualizer, VisualTarget

from .graph import INPUT_LAYER
from .scoring import (
    CircuitParams,
    CircuitTarget,
    Scores,
    Subgraph,
    extract_subgraph,
    figure8_ordering_holds,
    score_components,
    target_nodes,
    validate_subgraphs,
)

if TYPE_CHECKING:
    import torch

    from .graph import ChannelGraph

KERNEL_DECIMALS = 4


class CircuitVisualizer(ImageVisualizer):
    """Writes, per unit (``unit-<u>/``, ``latent-<k>/`` or ``class-<k>/``): ``scores.safetensors`` (``nodes/<layer>``
    and ``edges/<layer>`` scores, ``subgraph/<layer>`` the kept edges as 0/1), ``circuit.json`` (the graph's layers,
    the subgraph's nodes with their top incoming edges and kernels, its kept edges, the validation table and the
    sub-features), ``view.html`` (click a node: its feature visualisation and top edges), ``subgraph.png``,
    ``validation.png`` (correlation against the share of edges kept, VISCNN Figure 8) and ``subfeatures.png``; and
    ``nodes/<layer>-<channel>.png`` feature visualisations shared by the units, and ``circuit.json`` with every
    unit's summary and the validation table averaged over the units. The model runs under autocast to
    ``target.dtype``; scores are accumulated in float64 and written in float32."""

    name = "circuit"

    def __init__(self, params: CircuitParams | None = None):
        super().__init__(params or CircuitParams())

    def run(self, target: VisualTarget, out_dir: Path) -> dict[str, Any]:
        import torch

        from convlens import SkipLog, write_json_atomic

        from .graph import ChannelGraph

        params = self.params
        out_dir = Path(out_dir)
        circuits = self._targets(target)
        model = target.model
        device = next((p.device for p in model.module.parameters()), torch.device("cpu"))
        graph = ChannelGraph.trace(model.module, tuple(model.input_size))
        index = self.data_of(target)
        count = min(len(index), params.max_images or len(index))
        fit, held = self._split(count)
        skip_log = SkipLog(index.root)

        def positioned(positions: list[int], data: Any = None):
            source = target if data is None else dataclasses.replace(target, data=data)
            for batch in self.batches(
                source, positions, batch_size=params.batch_size, skip_log=skip_log, workers=params.workers
            ):
                if len(batch):
                    yield batch.positions.tolist(), batch.images.to(device)

        def batches(positions: list[int], data: Any = None):
            return (images for _, images in positioned(positions, data))

        contrast_positions = None
        if params.contrast:
            contrast_index = self.data_of(dataclasses.replace(target, data=params.contrast))
            contrast_positions = list(range(min(len(contrast_index), params.max_images or len(contrast_index))))
        out_dir.mkdir(parents=True, exist_ok=True)
        node_images: dict[str, str] = {}
        units, figures, tables = [], [], []
        for circuit in circuits:
            folder = out_dir / circuit.slug
            folder.mkdir(parents=True, exist_ok=True)
            contrast = batches(contrast_positions, params.contrast) if contrast_positions is not None else None
            scores = score_components(
                graph, circuit, params.criterion, batches(fit), contrast, seed=params.seed, dtype=target.dtype
            )
            subgraph = extract_subgraph(graph, circuit, scores, params.sparsity, params.mode)
            record = self._record(graph, target, circuit, scores, subgraph)
            if params.validate:
                record["validation"] = validate_subgraphs(
                    graph,
                    circuit,
                    scores,
                    lambda: batches(held),
                    params.sparsities,
                    params.mode,
                    params.random_draws,
                    params.seed,
                    target.dtype,
                )
                record["figure8_ordering"] = figure8_ordering_holds(record["validation"])
                tables.append(record["validation"])
            kept_by_cluster = None
            if params.subfeatures:
                record["subfeatures"], kept_by_cluster = self._subfeatures(
                    graph, circuit, positioned(sorted(fit + held)), batches, index, folder, target.dtype
                )
            self._feature_visualisations(target, graph, record, out_dir, node_images)
            for node in record["nodes"]:
                node["image"] = f"../{node_images[node['id']]}" if node["id"] in node_images else None
                for entry in node["inputs"]:
                    entry["image"] = f"../{node_images[entry['source']]}" if entry["source"] in node_images else None
            self._write_unit(graph, folder, record, scores, subgraph, kept_by_cluster)
            write_json_atomic(folder / "circuit.json", record)
            units.append(self._summary(record, circuit, folder.relative_to(out_dir)))
            unit_number = circuit.unit
            for name, kind, caption in (
                (
                    "subgraph.png",
                    "circuit",
                    f"circuit of {circuit.label}: {record['subgraph']['edges_kept']} edges ({params.criterion})",
                ),
                (
                    "validation.png",
                    "circuit-validation",
                    f"{circuit.label}: correlation with the full model of best, random and worst subgraphs",
                ),
                ("subfeatures.png", "circuit-subfeatures", f"{circuit.label}: sub-feature subgraph separability"),
            ):
                if (folder / name).is_file():
                    figures.append(
                        {
                            "unit": unit_number,
                            "path": (folder / name).relative_to(out_dir).as_posix(),
                            "kind": kind,
                            "caption": caption,
                        }
                    )
        mean_table = _mean_table(tables) if tables else None
        if mean_table and len(tables) > 1:
            _validation_chart(
                mean_table,
                f"{len(tables)} targets at {target.layer}: correlation with the full model",
                out_dir / "validation.png",
            )
        record = {
            "visualizer": self.name,
            "params": params.to_dict(),
            "dtype": target.dtype,
            "layer": target.layer,
            "unit_kind": "latent" if target.sae is not None else ("class" if not target.units else "channel"),
            "graph": {
                "layers": len(graph.layers),
                "nodes": sum(layer.channels for layer in graph.layers),
                "edges": graph.edge_count(),
            },
            "images": {"scored": len(fit), "held_out": len(held), "skipped": skip_log.as_json()},
            "units": units,
            "views": [f"{unit['folder']}/view.html" for unit in units],
            "validation": mean_table,
            "figure8_ordering": figure8_ordering_holds(mean_table) if mean_table else None,
            "figures": figures,
        }
        record["summary"] = self._overall_summary(record)
        write_json_atomic(out_dir / "circuit.json", record)
        return record

    # --- inputs --------------------------------------------------------------------------------------------------
    def _targets(self, target: VisualTarget) -> list[CircuitTarget]:
        params = self.params
        if target.units:
            return [CircuitTarget(target.layer, unit, target.sae, neuron=params.neuron) for unit in target.units]
        if params.class_index is None:
            raise ConvlensError("circuit: give units (--units, latents with --sae) or a class (--class-index)")
        if target.sae is not None:
            raise ConvlensError("circuit: a class target reads the model's loss; it takes no SAE")
        return [CircuitTarget(None, None, class_index=params.class_index)]

    def _split(self, count: int) -> tuple[list[int], list[int]]:
        """Dataset positions scored and held out (``held_out`` of them when validating), by a seeded shuffle."""
        import torch

        from convlens import torch_generator

        if count < 2 and self.params.validate:
            raise ConvlensError("circuit validation needs at least 2 images (or pass --no-validate)")
        if not self.params.validate:
            return list(range(count)), []
        order = torch.randperm(count, generator=torch_generator(self.params.seed, "circuit-held-out")).tolist()
        held = min(count - 1, max(1, round(self.params.held_out * count)))
        return sorted(order[held:]), sorted(order[:held])

    # --- the record ----------------------------------------------------------------------------------------------
    def _record(
        self, graph: ChannelGraph, target: VisualTarget, circuit: CircuitTarget, scores: Scores, subgraph: Subgraph
    ) -> dict[str, Any]:
        import torch

        from .graph import flatten_edges, iter_edges

        params = self.params
        flat_scores = flatten_edges(graph, scores.edges)
        kept_indices = subgraph.kept.nonzero().flatten()
        drawn = kept_indices[torch.sort(-flat_scores[kept_indices], stable=True).indices[: params.view_edges]]
        layer_starts = [(layer, offset) for layer, offset in iter_edges(graph)]
        targets = [
            f"{name}:{channel}"
            for name, chosen in target_nodes(graph, circuit).items()
            for channel in chosen.nonzero().flatten().tolist()
        ]
        edges, node_ids = [], dict.fromkeys(targets)
        for flat in drawn.tolist():
            layer, offset = next((layer, offset) for layer, offset in reversed(layer_starts) if offset <= flat)
            row, column = divmod(flat - offset, layer.edge_shape[1])
            source = "{}:{}".format(*layer.edge_source(row, column))
            end = f"{layer.name}:{layer.edge_target(row, column)}"
            kernel = self._kernel(graph, layer, row, column)
            edges.append(
                {
                    "source": source,
                    "target": end,
                    "kind": "kernel" if layer.kind == "conv" else "branch",
                    "layer": layer.name,
                    "score": float(flat_scores[flat]),
                    "sign": _sign(kernel),
                }
            )
            node_ids.setdefault(source)
            node_ids.setdefault(end)
        kept_by_layer = {
            layer.name: subgraph.kept[offset : offset + layer.edge_count].view(layer.edge_shape)
            for layer, offset in layer_starts
        }
        nodes = []
        for node_id in node_ids:
            name, channel = node_id.rsplit(":", 1)
            nodes.append(
                {
                    "id": node_id,
                    "layer": name,
                    "channel": int(channel),
                    "score": float(scores.nodes[name][int(channel)]),
                    "target": node_id in targets,
                    "view": graph.layer[name].view,
                    "inputs": self._inputs(graph, graph.layer[name], int(channel), scores, kept_by_layer),
                }
            )
        feature_edges = int(subgraph.feature.sum())
        return {
            "title": f"circuit of {circuit.label}",
            "criterion": params.criterion,
            "target": {
                "label": circuit.label,
                "kind": circuit.kind,
                "layer": circuit.layer,
                "unit": circuit.unit,
                "class_index": circuit.class_index,
                "nodes": targets,
            },
            "images": {"scored": scores.images, "contrast": scores.contrast_images},
            "layers": [layer.to_dict() for layer in graph.layers],
            "subgraph": {
                "edges_kept": subgraph.count,
                "feature_edges": feature_edges,
                "fraction": subgraph.fraction,
                "mode": params.mode,
                "sparsity": params.sparsity,
                "nodes": len(nodes),
                "edges_drawn": len(edges),
            },
            "nodes": nodes,
            "edges": edges,
        }

    def _inputs(
        self, graph: ChannelGraph, layer, channel: int, scores: Scores, kept: dict[str, torch.Tensor]
    ) -> list[dict[str, Any]]:
        """The node's best-scored incoming edges in the whole graph, with kernels."""
        import torch

        if layer.kind == "input":
            return []
        if layer.kind == "conv":
            row_scores, rows = scores.edges[layer.name][channel], None
        else:
            row_scores, rows = scores.edges[layer.name][:, channel], True
        order = torch.sort(-row_scores, stable=True).indices[: self.params.node_inputs].tolist()
        entries = []
        for index in order:
            row, column = (index, channel) if rows else (channel, index)
            entries.append(
                {
                    "source": "{}:{}".format(*layer.edge_source(row, column)),
                    "score": float(row_scores[index]),
                    "kept": bool(kept[layer.name][row, column]),
                    "kernel": self._kernel(graph, layer, row, column),
                }
            )
        return entries

    @staticmethod
    def _kernel(graph: ChannelGraph, layer, row: int, column: int) -> list[list[float]] | None:
        if layer.kind != "conv":
            return None
        weight = graph.graph_module.get_submodule(layer.module).weight[row, column].detach().double().cpu()
        return [[round(float(value), KERNEL_DECIMALS) for value in line] for line in weight]

    def _summary(self, record: dict[str, Any], circuit: CircuitTarget, folder: Path) -> dict[str, Any]:
        summary = {
            "unit": circuit.unit,
            "label": circuit.label,
            "folder": folder.as_posix(),
            "edges_kept": record["subgraph"]["edges_kept"],
            "feature_edges": record["subgraph"]["feature_edges"],
            "top_nodes": [
                node["id"]
                for node in sorted(record["nodes"], key=lambda n: -n["score"])
                if not node["target"] and node["layer"] != INPUT_LAYER
            ][:5],
        }
        if "validation" in record:
            summary["validation"] = record["validation"]
            summary["figure8_ordering"] = record["figure8_ordering"]
        if "subfeatures" in record:
            sub = record["subfeatures"]
            summary["subfeatures"] = {key: sub[key] for key in ("clusters", "separability", "shuffled")}
        return summary

    def _overall_summary(self, record: dict[str, Any]) -> str:
        units = record["units"]
        edges = sum(unit["edges_kept"] for unit in units) / len(units)
        text = f"{len(units)} circuit(s) of {record['graph']['edges']:,} graph edges, {edges:,.0f} kept on average"
        table = record["validation"]
        if table:
            last = table[-1]
            holds = "holds" if record["figure8_ordering"] else "does NOT hold"
            text += (
                f"; at {last['fraction']:.1%} of the edges, correlation best {last['best']:.2f}, random "
                f"{last['random']:.2f}, worst {last['worst']:.2f} (best > random > worst {holds} at every "
                "sparsity)"
            )
        return text

    # --- outputs -------------------------------------------------------------------------------------------------
    def _write_unit(
        self,
        graph: ChannelGraph,
        folder: Path,
        record: dict[str, Any],
        scores: Scores,
        subgraph: Subgraph,
        kept_by_cluster: list[torch.Tensor] | None,
    ) -> None:
        import torch

        from convlens import save_tensors_atomic

        from .graph import unflatten_edges
        from .view import draw_subgraph, write_view

        tensors = {f"nodes/{name}": values.float() for name, values in scores.nodes.items()}
        tensors.update({f"edges/{name}": values.float() for name, values in scores.edges.items()})
        tensors.update(
            {
                f"subgraph/{name}": kept.to(dtype=torch.uint8)
                for name, kept in unflatten_edges(graph, subgraph.kept).items()
            }
        )
        for number, kept in enumerate(kept_by_cluster or []):
            tensors.update(
                {
                    f"cluster{number}/{name}": mask.to(dtype=torch.uint8)
                    for name, mask in unflatten_edges(graph, kept).items()
                }
            )
        save_tensors_atomic(
            {key: value.contiguous() for key, value in tensors.items()},
            folder / "scores.safetensors",
            metadata={"criterion": scores.criterion, "target": record["target"]["label"]},
        )
        draw_subgraph(record, folder / "subgraph.png")
        if record.get("validation"):
            _validation_chart(
                record["validation"],
                f"{record['target']['label']}: correlation with the full model",
                folder / "validation.png",
            )
        write_view(record, folder)

    def _subfeatures(self, graph, circuit, positioned, batches, index, folder, dtype):
        from convlens import BarPanel, save_chart

        from .subfeatures import cluster_patches, subfeature_subgraphs, top_patches

        params = self.params
        patches = top_patches(graph, circuit, positioned, params.patches, dtype)
        labels = cluster_patches(patches.vectors, params.min_cluster_size)
        result = subfeature_subgraphs(
            graph,
            circuit,
            patches,
            labels,
            lambda chosen: batches(sorted(chosen)),
            params.criterion,
            params.sparsity,
            params.mode,
            params.shuffles,
            params.seed,
            dtype,
        )
        kept = result.pop("kept", None)
        for member in result["members"]:
            member["images"] = [index.relative(index.paths[p]) for p in member["images"][:16]]
        if result["separability"] is not None:
            chart = BarPanel(
                labels=["clusters", "shuffled"],
                values=[result["separability"], result["shuffled"]],
                title="edge IoU between sub-feature subgraphs",
                xlabel="mean pairwise IoU (lower: more separable)",
                maximum=1.0,
                key="subfeatures",
            )
            save_chart(chart, folder / "subfeatures.png")
        return result, kept

    def _feature_visualisations(
        self, target: VisualTarget, graph: ChannelGraph, record: dict[str, Any], out_dir: Path, done: dict[str, str]
    ) -> None:
        """Render the best-scored view nodes not rendered yet into ``out_dir/nodes``, one feature-viz run per
        layer."""
        from convlens import registry

        budget = self.params.feature_viz_nodes
        if budget <= 0:
            return
        candidates = sorted(
            (node for node in record["nodes"] if node["view"] is not None),
            key=lambda node: (not node["target"], -node["score"]),
        )[:budget]
        wanted: dict[str, list[dict[str, Any]]] = {}
        for node in candidates:
            if node["id"] not in done:
                wanted.setdefault(node["view"], []).append(node)
        for view, nodes in wanted.items():
            visualizer = registry.create(
                "visualizer", "feature-viz", steps=self.params.feature_viz_steps, grid=False, seed=self.params.seed
            )
            visualizer.progress = self.progress
            with tempfile.TemporaryDirectory() as scratch:
                units = tuple(n["channel"] for n in nodes)
                rendered = visualizer.run(VisualTarget(target.model, view, units, dtype=target.dtype), Path(scratch))
                for node, entry in zip(nodes, rendered["objectives"]):
                    relative = f"nodes/{node['layer']}-{node['channel']}.png"
                    (out_dir / "nodes").mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(scratch) / entry["image"], out_dir / relative)
                    done[node["id"]] = relative


def _sign(kernel: list[list[float]] | None) -> float:
    if kernel is None:
        return 1.0
    values = [value for line in kernel for value in line]
    total = sum(abs(value) for value in values)
    return sum(values) / total if total else 0.0


def _mean_table(tables: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The validation rows averaged over targets, per sparsity (as VISCNN's Figure 8 averages over nodes)."""
    rows = []
    for number, first in enumerate(tables[0]):
        group = [table[number] for table in tables]
        row = {"sparsity": first["sparsity"], "targets": len(group)}
        for key in ("fraction", "best", "random", "worst", "edges"):
            row[key] = sum(entry[key] for entry in group) / len(group)
        rows.append(row)
    return rows


def _validation_chart(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    from convlens import LinePanel, save_chart

    fractions = [row["fraction"] for row in rows]
    series = {kind: (fractions, [row[kind] for row in rows]) for kind in ("best", "random", "worst")}
    chart = LinePanel(
        series=series,
        title=title,
        xlabel="share of the feature graph's edges kept",
        ylabel="correlation with the full model",
        key="validation",
    )
    save_chart(chart, path)
