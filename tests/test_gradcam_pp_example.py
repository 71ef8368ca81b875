"""The third-party example plugin under examples/plugins/convlens-gradcam-pp: Grad-CAM++ as a visualizer and an
activation filter, added purely through its own ``convlens`` entry point.

The tests need the example installed (its README install command does it:
``pip install -e examples/plugins/convlens-gradcam-pp``) and fail with that instruction otherwise, like
``test_gated_example.py``. The maps are checked against pytorch-grad-cam's ``GradCAMPlusPlus`` as
``test_gradcam.py`` checks the built-in Grad-CAM.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convlens
from convlens import FilterContext
from convlens.attribution.base import ExplainTarget
from convlens.core.errors import ContractError, ConvlensError
from convlens.models.layers import activations_at
from helpers import assert_clean, require_installed, rescaled

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "convlens-gradcam-pp"
DIST = "convlens-gradcam-pp"
NAMES = ("gradcam++", "gradcam-pp", "grad-cam++", "gradcampp")
MODELS = [
    ("tiny-cnn", {"blocks": 4, "input_size": 64, "seed": 0}, "block3", 64),
    ("resnet18-smooth", {"input_size": 64, "seed": 0}, "layer3", 64),
]


@pytest.fixture
def installed_example():
    """The README's install command installs the example; without it these tests fail, not skip."""
    require_installed(DIST, EXAMPLE)


def reference_gradcam_pp(module, layer_module, images, classes, grid):
    """pytorch-grad-cam's GradCAMPlusPlus, with its resize set to the activation grid (cv2 resize to the same size)."""
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAMPlusPlus(model=module, target_layers=[layer_module]) as cam:
        cam.get_target_width_height = lambda _input: (grid[1], grid[0])
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    module.zero_grad(set_to_none=True)  # pytorch-grad-cam back-propagates into the weights
    return maps


def _images(size, n=4, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- (1) discovery through the entry point ---------------------------------------------------------------------
def test_both_components_come_from_the_example_distribution(installed_example, convlens_registry):
    entry_points = [ep for ep in importlib.metadata.entry_points(group="convlens") if ep.dist.name == DIST]
    assert [(ep.name, ep.value) for ep in entry_points] == [(DIST, "convlens_gradcam_pp")]
    info = {p.dist: p for p in convlens_registry.plugins()}[DIST]
    assert info.status == "ok" and info.counts["visualizer"] == 1 and info.counts["filter"] == 1

    from convlens_gradcam_pp.methods import GradCAMPlusPlusFilter, GradCAMPlusPlusVisualizer

    for kind, cls in (("visualizer", GradCAMPlusPlusVisualizer), ("filter", GradCAMPlusPlusFilter)):
        for name in NAMES:
            component = convlens.registry.get(kind, name)
            assert (component.dist, component.version, component.qualified_name) == (DIST, "0.1.0", f"{DIST}:gradcam++")
        described = convlens_registry.describe(kind, f"{DIST}:gradcam++")
        assert described["source"] == f"convlens_gradcam_pp.methods:{cls.__name__}"
        created = convlens.registry.create(kind, "grad-cam++", class_index=3)
        assert isinstance(created, cls) and created.name == "gradcam++" and created.params.class_index == 3
        # the built-in Grad-CAM of the same kind is still there, and still convlens's own
        assert convlens.registry.get(kind, "gradcam").dist == "convlens"
    assert {p["name"] for p in convlens_registry.describe("visualizer", "gradcam++")["params"]} == {
        "class_index",
        "max_images",
        "batch_size",
        "alpha",
        "map_layer",
    }
    assert [p["name"] for p in convlens_registry.describe("filter", "gradcam++")["params"]] == ["class_index"]
    assert convlens.registry.create("filter", "gradcam++").needs_gradients


def test_listing_the_plugin_does_not_import_torch(installed_example):
    code = (
        "import sys, convlens.registry as r\n"
        "assert sorted(c.kind for c in r.list(None, 'gradcam++') if c.dist == 'convlens-gradcam-pp') "
        "== ['filter', 'visualizer']\n"
        "assert 'torch' not in sys.modules, 'listing imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- (2) the formula, by hand and against pytorch-grad-cam -----------------------------------------------------
def test_formula_by_hand_in_float64(installed_example):
    from convlens_gradcam_pp.methods import gradcam_pp_maps, gradcam_pp_weights

    # one image, two channels on a 1 x 2 grid
    activations = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]], dtype=torch.float64)  # channel sums 4 and 2
    gradients = torch.tensor([[[[1.0, -1.0]], [[0.0, 2.0]]]], dtype=torch.float64)
    eps = 1e-6
    # channel 0: alpha = 1 / (2 + 4) at the positive gradient (the negative one is cut by the ReLU)
    # channel 1: alpha = 0 where g = 0, and 4 / (2 * 4 + 2 * 8) at g = 2
    weights = torch.tensor([[1 / (6 + eps), 2 * 4 / (24 + eps)]], dtype=torch.float64)
    torch.testing.assert_close(gradcam_pp_weights(activations, gradients), weights, rtol=0, atol=1e-15)
    cam = (weights[0, 0] * activations[0, 0] + weights[0, 1] * activations[0, 1]).clamp_min(0)  # ~[5/6, 1/2]
    expected = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
    torch.testing.assert_close(gradcam_pp_maps(activations, gradients)[0], expected, rtol=0, atol=1e-15)
    assert abs(float(expected[0, 0]) - 1.0) < 1e-6 and float(expected[0, 1]) == 0.0
    # no positive gradient: every weight is 0, and so is the map (not NaN)
    flat = gradcam_pp_maps(activations, -gradients.abs())
    assert torch.equal(flat, torch.zeros_like(flat))


@pytest.mark.slow
@pytest.mark.parametrize("model, params, layer, size", MODELS)
def test_visualizer_matches_pytorch_grad_cam(installed_example, model, params, layer, size):
    bundle = convlens.registry.create("model", model, **params)
    module = bundle.module.eval()
    images = _images(size)
    visualizer = convlens.registry.create("visualizer", "gradcam++")
    with torch.no_grad():
        predicted = module(images).argmax(1)
    chosen = torch.tensor([0, 3, 5, 7])
    worst = 0.0
    maps = []
    for classes, target in ((chosen, ExplainTarget(classes=chosen)), (predicted, ExplainTarget(classes=None))):
        ours = visualizer.attribute(bundle, images, layer, target)
        maps.append(ours)
        assert_clean(module)
        grid = tuple(ours.shape[1:])
        assert ours.shape[0] == 4 and grid == tuple(activations_at(module, images, layer).activations[layer].shape[2:])
        assert float(ours.min()) >= 0 and float(ours.max()) <= 1
        reference = reference_gradcam_pp(module, module.get_submodule(layer), images, classes, grid)
        assert reference.shape == (4, *grid)
        np.testing.assert_allclose(rescaled(ours).numpy(), reference, rtol=0, atol=1e-5)
        worst = max(worst, float(np.abs(rescaled(ours).numpy() - reference).max()))
        # explain() is attribute() checked and detached
        torch.testing.assert_close(visualizer.explain(bundle, images, layer, target), ours)
    # the chosen classes are not all the predicted ones, so the two targets give different maps
    assert not torch.equal(chosen, predicted)
    assert not torch.allclose(maps[0], maps[1])
    print(f"{model} {layer}: largest |ours - pytorch-grad-cam| = {worst:.3g}")


# --- (3) the filter gives the visualizer's maps ----------------------------------------------------------------
@pytest.mark.parametrize("model, params, layer, size", MODELS)
def test_filter_gives_the_visualizer_maps(installed_example, model, params, layer, size):
    bundle = convlens.registry.create("model", model, **params)
    module = bundle.module.eval()
    images = _images(size, seed=2)
    labels = torch.tensor([0, 3, -1, 5])  # -1: no label, so the predicted class is explained
    with torch.no_grad():
        predicted = module(images).argmax(1)
    classes = torch.where(labels >= 0, labels, predicted)
    visualizer = convlens.registry.create("visualizer", "gradcam++")
    expected = visualizer.attribute(bundle, images, layer, ExplainTarget(classes=classes))

    gradcam_pp = convlens.registry.create("filter", "gradcam++")
    activations = activations_at(module, images, layer).activations[layer]
    standalone = gradcam_pp(activations, FilterContext(model=bundle, images=images, labels=labels, layer=layer))
    assert_clean(module)
    torch.testing.assert_close(standalone, expected, rtol=0, atol=1e-6)
    # as `convlens extract` calls it: the gradients of gradient_target computed in the same pass
    captured = activations_at(module, images, layer, target=lambda logits: gradcam_pp.gradient_target(logits, labels))
    assert_clean(module)
    extracted = gradcam_pp(captured.activations[layer], FilterContext(gradients=captured.gradients[layer]))
    torch.testing.assert_close(extracted, expected, rtol=0, atol=1e-6)
    # no labels: the predicted classes; class_index: one class for every image
    unlabelled = gradcam_pp(activations, FilterContext(model=bundle, images=images, layer=layer))
    torch.testing.assert_close(
        unlabelled, visualizer.attribute(bundle, images, layer, ExplainTarget()), rtol=0, atol=1e-6
    )
    fixed = convlens.registry.create("filter", "gradcam++", class_index=2)(
        activations, FilterContext(model=bundle, images=images, labels=labels, layer=layer)
    )
    torch.testing.assert_close(
        fixed,
        visualizer.attribute(bundle, images, layer, ExplainTarget(classes=torch.full((4,), 2))),
        rtol=0,
        atol=1e-6,
    )
    with pytest.raises(ConvlensError, match="class_index 5000 is out of range"):
        convlens.registry.create("filter", "gradcam++", class_index=5000)(
            activations, FilterContext(model=bundle, images=images, layer=layer)
        )
    with pytest.raises(ContractError, match="do not match activations"):
        gradcam_pp(activations, FilterContext(gradients=activations[:, :1]))


def test_contract_checks(installed_example):
    from convlens.testing import check_component

    # check_component gives a gradient filter a small model, its images and the layer; both Grad-CAM filters pass
    for name in ("gradcam", "gradcam++"):
        check_component("filter", name)
    # with precomputed gradients the filter is a pure function of its inputs, and keeps the same promises
    gradcam_pp = convlens.registry.create("filter", "gradcam++")
    generator = torch.Generator().manual_seed(0)
    activations, gradients = torch.randn(2, 3, 16, 5, 6, generator=generator)
    weights = gradcam_pp(activations, FilterContext(gradients=gradients))
    assert weights.shape == (3, 5, 6) and weights.is_floating_point() and bool((weights >= 0).all())
    one_by_one = torch.cat(
        [gradcam_pp(activations[i : i + 1], FilterContext(gradients=gradients[i : i + 1])) for i in range(3)]
    )
    torch.testing.assert_close(weights, one_by_one)
    assert torch.equal(weights, gradcam_pp(activations, FilterContext(gradients=gradients)))
    # the visualizer runs the helper's own end-to-end check (a small model, two PNGs)
    check_component("visualizer", "gradcam++")


# --- (4) end to end through the CLI ----------------------------------------------------------------------------
def test_visualize_through_the_cli(installed_example, tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from convlens.cli import cli
    from convlens.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", n=8, size=32, seed=0)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "gradcam++",
            "--model",
            "tiny-cnn",
            "--model-blocks",
            "3",
            "--model-input-size",
            "32",
            "--layer",
            "block2",
            "--data",
            str(tmp_path / "shapes"),
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "attribution.json").read_text())
    printed = json.loads(result.output[result.output.index("{") :])
    assert printed["out"] == str(out) and {k: v for k, v in printed.items() if k not in ("out", "seconds")} == record
    assert record["visualizer"] == "gradcam++" and record["layer"] == "block2" and record["target"] == "class"
    assert len(record["images"]) == 8 and sorted(e["position"] for e in record["images"]) == list(range(8))
    images = sorted(
        p.relative_to(tmp_path / "shapes").as_posix()
        for p in (tmp_path / "shapes").rglob("*.png")
        if p.parts[-3] == "images"
    )
    assert len(images) == 8
    assert sorted(Path(e["image"]).name for e in record["images"]) == sorted(Path(p).name for p in images)
    for entry in record["images"]:
        assert (out / entry["overlay"]).is_file() and entry["class"] == entry["predicted"]
    assert len(list((out / "overlays").glob("*.png"))) == 8
    assert record["pointing_game"]["images"] == 8  # shapes comes with foreground masks
    maps = load_file(out / "maps.safetensors")
    assert maps["maps"].shape == (8, 1, 8, 8)  # 32 px halved by block1 and block2
    assert maps["positions"].tolist() == list(range(8))
    values = maps["maps"]
    assert float(values.min()) >= 0 and float(values.max()) <= 1
    # each map scaled to [0, 1]: its minimum is 0, its maximum 1 less the 1e-7 of the denominator (relative to
    # the range of the unscaled map, small at random init)
    assert values.flatten(1).amin(dim=1).tolist() == [0.0] * 8
    assert all(0.999 < m <= 1 for m in values.flatten(1).amax(dim=1).tolist())
