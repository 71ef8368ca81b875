"""Circuits: the filters and kernels a unit depends on, extracted as a subgraph that runs as a model (VISCNN, 004
sec. 2.1-2.2, 4.1-4.2; the circuits thread, 002 sec. 5).

The model is read as a channel graph (:mod:`.graph`): nodes are conv filters and the channels
of additions, edges their 2-D kernels and the branches into additions, followed through ResNet skips and
concatenations. Scores of every node and edge with respect to a target (a channel's or an SAE latent's mean
activation over the map, one neuron, or the model's cross-entropy loss on a class), averaged over an image set:

- ``taylor`` (eqs. 3-4): per image, |sum over the positions of the component's output map of activation x gradient|,
  the first-order change of the target when the component is removed (its gate derivative), then the mean over the
  images. Eq. 4 takes the absolute value per position; per image it is taken after the sum, which is what removing
  the whole map changes (and what a finite-difference check of a removal measures).
- ``activation``: the mean over the images of the mean magnitude of the component's output map (a node: of
  |activation|; an edge: |mean of its output map|), ignoring the target but for which components lead to it.
- ``weight``: the L2 norm of a kernel (an addition's branches: 1); a node, of its whole filter.
- ``random``: uniform random scores (seeded), the baseline.

With ``contrast`` images the scores of that set are subtracted (VISCNN's query "tiger - overall").

A subgraph keeps a share of the feature graph's edges (those with a path to the target), the best ones, or the
smallest best set holding a share of the total score; removed kernels and branches are gated to 0, so the subgraph
runs as a model. Validation (sec. 4.1, Figure 8): on held-out images, the Pearson correlation of the target's
response (its map, or per image for a class) in the subgraph with the full model's, for the best, random and worst
subgraphs of each sparsity (a response that does not vary correlates 0).

The package: :mod:`.graph` (the channel graph, gated runs, gate derivatives), :mod:`.scoring` (scores, subgraphs,
validation), :mod:`.subfeatures` (clusters of a unit's top patches and their subgraphs), :mod:`.visualizer` (the
visualizer that writes a unit's record and pictures) and :mod:`.view` (the interactive HTML view).
"""

from __future__ import annotations

from convlens import VisualizerSpec, hookimpl

from .scoring import CircuitParams


@hookimpl
def register_visualizers(register):
    register(
        VisualizerSpec(
            name="circuit",
            factory="convlens.plugins.visualizers.circuit.visualizer:CircuitVisualizer",
            params=CircuitParams,
            summary="the filters and kernels a unit depends on: Taylor scores, subgraph extraction validated against "
            "random and worst subgraphs, sub-feature subgraphs, interactive graph view (VISCNN)",
            aliases=("circuits", "viscnn"),
        )
    )
