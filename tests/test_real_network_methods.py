"""The methods on a real network and real photographs: ImageNet EfficientNet-Lite0 (depthwise convolutions, ReLU6,
TensorFlow "same" padding, MBConv blocks with skip additions) on foolbox's labelled ImageNet photos.

Grad-CAM and Grad-CAM++ against pytorch-grad-cam, the circuit graph and its Taylor scores against finite
differences, the cascading-randomisation sanity check, and every built-in visualizer and filter run at a middle
layer (or refusing with a specific reason).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch

import convlens
from convlens import FilterContext, VisualTarget
from convlens.attribution.base import ExplainTarget
from convlens.core.errors import ConvlensError
from convlens.models.layers import activations_at
from helpers import ROOT, assert_clean, require_installed, rescaled

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MIDDLE_LAYER = "_blocks.10"  # 112 channels on a 14 x 14 grid; its output is a skip addition
PHOTOS = 4
FIXED_CLASS = 1  # goldfish: none of the first photos shows one
SKIP_ADDITIONS = [f"_blocks.{i}.add" for i in (2, 4, 6, 7, 9, 10, 12, 13, 14)]


@pytest.fixture(scope="module")
def photos(imagenet_batch):
    """The first labelled photos, [PHOTOS, 3, 224, 224], and their labels."""
    images, labels = imagenet_batch
    return images[:PHOTOS], torch.tensor(labels[:PHOTOS])


@pytest.fixture(scope="module")
def photo_paths(imagenet_photos):
    return [str(path) for path in imagenet_photos[0][:PHOTOS]]


# --- Grad-CAM and Grad-CAM++ against pytorch-grad-cam ------------------------------------------------------------


def reference_cam(method: str, module, layer: str, images, classes, grid):
    """pytorch-grad-cam's GradCAM or GradCAMPlusPlus, resized to the activation grid (as test_gradcam.py does)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method]
    with cam_class(model=module, target_layers=[module.get_submodule(layer)]) as cam:
        cam.get_target_width_height = lambda _input: (grid[1], grid[0])
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    module.zero_grad(set_to_none=True)  # pytorch-grad-cam back-propagates into the weights
    return maps


def gradcam_maps_both_ways(method: str, bundle, images, layer: str, classes, class_index):
    """The maps of the visualizer and of the filter (``class_index`` None: the predicted class)."""
    visualizer = convlens.registry.create("visualizer", method)
    target = ExplainTarget(classes=None if class_index is None else classes)
    by_visualizer = visualizer.explain(bundle, images, layer, target)
    activations = activations_at(bundle.module, images, layer).activations[layer]
    gradient_filter = convlens.registry.create("filter", method, class_index=class_index)
    by_filter = gradient_filter(activations, FilterContext(model=bundle, images=images, layer=layer))
    return by_visualizer, by_filter


# Grad-CAM++ is not compared at _blocks.10: its denominator 2 g^2 + sum(A) g^3 cancels there to ~1e-4 of its terms
# (signed activations after the skip addition), so float32 rounding alone moves both implementations ~5e-5 away
# from the float64 map.
@pytest.mark.slow
@pytest.mark.parametrize(
    "method, layer",
    [("gradcam", "_blocks.15"), ("gradcam", MIDDLE_LAYER), ("gradcam++", "_blocks.15"), ("gradcam++", "_conv_head")],
)
def test_gradcam_matches_pytorch_grad_cam(efficientnet_lite0, photos, method, layer):
    if method == "gradcam++":
        require_installed("convlens-gradcam-pp", ROOT / "examples" / "plugins" / "convlens-gradcam-pp")
    bundle, (images, _) = efficientnet_lite0, photos
    with torch.no_grad():
        predicted = bundle.module(images).argmax(dim=1)
    fixed = torch.full_like(predicted, FIXED_CLASS)
    assert not torch.equal(predicted, fixed)
    for classes, class_index in ((predicted, None), (fixed, FIXED_CLASS)):
        by_visualizer, by_filter = gradcam_maps_both_ways(method, bundle, images, layer, classes, class_index)
        assert_clean(bundle.module)
        grid = tuple(by_visualizer.shape[1:])
        reference = reference_cam(method, bundle.module, layer, images, classes, grid)
        assert reference.shape == (PHOTOS, *grid)
        np.testing.assert_allclose(rescaled(by_visualizer).numpy(), reference, rtol=0, atol=1e-5)
        np.testing.assert_allclose(rescaled(by_filter).numpy(), reference, rtol=0, atol=1e-5)


# --- circuits: the channel graph and its Taylor scores -----------------------------------------------------------


@pytest.fixture(scope="module")
def float64_graph(efficientnet_lite0):
    """The channel graph of a float64 copy of the model (the shared bundle stays float32)."""
    import copy

    from convlens.plugins.visualizers.circuit.graph import ChannelGraph

    module = copy.deepcopy(efficientnet_lite0.module).double().eval()
    return ChannelGraph.trace(module, (224, 224), "efficientnet-lite0")


def test_the_channel_graph_follows_the_whole_network(efficientnet_lite0, float64_graph, photos):
    graph, module = float64_graph, efficientnet_lite0.module
    convolutions = [name for name, sub in module.named_modules() if isinstance(sub, torch.nn.Conv2d)]
    assert [layer.name for layer in graph.layers if layer.kind == "conv"] == convolutions
    assert [layer.name for layer in graph.layers if layer.kind == "add"] == SKIP_ADDITIONS
    depthwise = graph.layer["_blocks.10._depthwise_conv"]
    assert depthwise.groups == depthwise.channels == 672 and depthwise.edge_shape == (672, 1)
    assert depthwise.kernel_size == (5, 5)
    skip = graph.layer[f"{MIDDLE_LAYER}.add"]
    assert [[segment.layer for segment in summand] for summand in skip.inputs] == [
        [f"{MIDDLE_LAYER}._project_conv"],
        ["_blocks.9.add"],
    ]
    assert [segment.layer for segment in graph.sources_of_layer(MIDDLE_LAYER)] == [f"{MIDDLE_LAYER}.add"]
    assert [segment.layer for segment in graph.exit_sources()] == ["_conv_head"]  # not the input read by x.size(0)
    # the ReLU6 module each block reuses is no view: a hook on it sees several tensors
    assert (
        graph.layer["_blocks.1._depthwise_conv"].view == "_blocks.1._bn1" and graph.layer["_conv_head"].view == "_bn1"
    )
    image = photos[0][:1].double()
    with torch.no_grad():
        torch.testing.assert_close(graph.run(image), graph.module(image), rtol=0, atol=1e-10)


def most_influential(taylor: torch.Tensor, row: int | None) -> tuple[int, ...]:
    """The edge (an index into the edge shape; in ``row`` when given) whose smallest |Taylor derivative| over the
    images is the largest."""
    smallest = taylor.abs().amin(dim=0)
    if row is not None:
        return row, int(smallest[row].argmax())
    return tuple(int(i) for i in np.unravel_index(int(smallest.flatten().argmax()), tuple(smallest.shape)))


# (edge layer, row): depthwise kernels (stride 1 and stride 2 with TensorFlow's uneven padding), the stem's kernels,
# and the two branches of a skip addition (row 0: the block's residual, row 1: the skip)
GATED_EDGES = [
    ("_blocks.10._depthwise_conv", None),
    ("_blocks.1._depthwise_conv", None),
    ("_conv_stem", None),
    (f"{MIDDLE_LAYER}.add", 0),
    (f"{MIDDLE_LAYER}.add", 1),
]


@pytest.mark.slow
def test_taylor_scores_are_the_finite_differences_of_the_gates(float64_graph, photos):
    from convlens.plugins.visualizers.circuit.graph import Gates, gate_derivatives
    from convlens.plugins.visualizers.circuit.scoring import CircuitTarget

    graph = float64_graph
    images, labels = photos[0][:2].double(), photos[1][:2]
    loss = CircuitTarget(layer=None, class_index=int(labels[0])).objective  # the class circuit's target
    derivatives = gate_derivatives(graph, images, loss, None)

    def loss_with_gate(name: str, edge: tuple[int, ...], value: float) -> torch.Tensor:
        gate = torch.ones(graph.layer[name].edge_shape, dtype=torch.float64)
        gate[edge] = value
        with torch.no_grad():
            return loss(graph.run(images, Gates(edges={name: gate})))

    # central differences with a step small enough not to cross the ReLU6 kinks of the many units one early kernel
    # moves (at 1e-6 some are crossed; the difference is then off by ~1e-4)
    step = 1e-7
    for name, row in GATED_EDGES:
        taylor = derivatives.edge_taylor[name]
        edge = most_influential(taylor, row)
        slope = (loss_with_gate(name, edge, 1 + step) - loss_with_gate(name, edge, 1 - step)) / (2 * step)
        assert slope.abs().min() > 1e-4, name  # not vacuous
        torch.testing.assert_close(taylor[(slice(None), *edge)], slope, rtol=1e-4, atol=1e-9, msg=f"{name} {edge}")


# --- the sanity check --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, photo_paths):
    folder = tmp_path_factory.mktemp("photos")
    for path in photo_paths:
        shutil.copy(path, folder)
    return folder


@pytest.mark.slow
def test_sanity_check_randomises_gradcam_but_not_the_edge_detector(photo_folder, tmp_path, efficientnet_lite0):
    # the CLI builds its own model by name; the fixture only skips the test without the real extra
    from click.testing import CliRunner

    from convlens.cli import cli

    arguments = ["sanity-check", "gradcam", "--model", "efficientnet-lite0", "--layer", "_blocks.15"]
    arguments += ["--data", str(photo_folder), "--max-images", "3", "--out", str(tmp_path / "sanity"), "--json"]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["steps"] == ["none", "_fc", "_bn1", "_conv_head", "_blocks", "_bn0", "_conv_stem"]
    spearman = {(row["method"], row["randomised"]): row["spearman_mean"] for row in record["table"]}
    assert spearman[("gradcam", "none")] == pytest.approx(1.0)
    for step in record["steps"][1:]:  # from the classifier down, Grad-CAM's maps lose their rank order
        assert spearman[("gradcam", step)] < 0.5, step
    for step in record["steps"]:
        assert spearman[("edge-detector", step)] == pytest.approx(1.0), step


# --- every built-in method runs, or says why it cannot ------------------------------------------------------------

SMALL_SETTINGS = {
    "activation-atlas": dict(grid=3, min_count=1, steps=2, size=32, projection="pca", render_batch=8),
    "activation-grid": dict(steps=2, size=32),
    "circuit": dict(
        max_images=4, batch_size=2, sparsities=(0.5, 0.05), random_draws=1, feature_viz_nodes=1, feature_viz_steps=2
    ),
    "dataset-examples": dict(k=2),
    "dissection": dict(examples=1, figures=2),
    "factorise": dict(steps=2, size=32, iterations=20, top_units=2, overlay_size=64),
    "feature-viz": dict(steps=2, size=32),
    # one pass per channel, image and unit: fewer images, and maps at a 24-channel layer
    "ablationcam": dict(max_images=1, map_layer="_blocks.2"),
    "scorecam": dict(max_images=1, map_layer="_blocks.2"),
    "integrated-gradients": dict(steps=4, max_images=2),
    "smoothgrad": dict(samples=2, max_images=2),
    "occlusion": dict(window=112, stride=112, max_images=2),
}
# why a method may refuse the photographs, in its own words; given what it asks for (shapes with concept masks), it
# then has to run
REFUSALS = {"dissection": r"has no concept masks: dissection needs a dataset with a concepts\.json"}


def built_in(kind: str) -> list[str]:
    return [component.name for component in convlens.registry.list(kind) if component.dist == "convlens"]


@pytest.fixture(scope="module")
def shapes_with_concepts(tmp_path_factory):
    from convlens.data.shapes import write_shapes

    folder = tmp_path_factory.mktemp("shapes") / "shapes"
    write_shapes(folder, n=8, size=32, seed=0)
    return folder


@pytest.mark.parametrize("name", built_in("visualizer"))
def test_every_built_in_visualizer_runs_or_says_why_not(
    efficientnet_lite0, photo_paths, shapes_with_concepts, tmp_path, name
):
    visualizer = convlens.registry.create("visualizer", name, **SMALL_SETTINGS.get(name, {}))
    visualizer.progress = False
    target = VisualTarget(efficientnet_lite0, MIDDLE_LAYER, units=(0, 1), data=photo_paths)
    try:
        record = visualizer.run(target, tmp_path)
    except ConvlensError as error:
        assert name in REFUSALS, f"{name} refused: {error}"
        assert re.search(REFUSALS[name], str(error)), str(error)
        record = visualizer.run(dataclasses.replace(target, data=shapes_with_concepts), tmp_path)
    else:
        assert name not in REFUSALS, f"{name} now runs on the photographs: drop it from REFUSALS"
    json.dumps(record)
    assert list(tmp_path.rglob("*.png")) and list(tmp_path.rglob("*.json"))
    assert_clean(efficientnet_lite0.module)


@pytest.mark.parametrize("name", built_in("filter"))
def test_every_built_in_filter_runs(efficientnet_lite0, photos, name):
    images, labels = photos
    activations = activations_at(efficientnet_lite0.module, images, MIDDLE_LAYER).activations[MIDDLE_LAYER]
    context = FilterContext(model=efficientnet_lite0, images=images, labels=labels, layer=MIDDLE_LAYER)
    weights = convlens.registry.create("filter", name)(activations, context)
    assert weights.shape == (PHOTOS, 14, 14)
    assert bool(torch.isfinite(weights).all()) and bool((weights >= 0).all())
    assert_clean(efficientnet_lite0.module)
