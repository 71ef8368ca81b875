"""The new attribution methods on the other targets: an SAE latent and a channel of a later layer (the model seen
as a one-logit classifier by ``UnitAsLogit`` for the peers), and the CAMs that are also activation filters (their
weights equal the visualizers' maps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import convlens
from convlens import ExplainTarget, FilterContext
from convlens.models.layers import activations_at
from helpers import rescaled
from test_attribution_methods import assert_matches
from test_unit_attribution import UnitAsLogit, active_units

MAP_LAYER, UNIT_LAYER = "block2", "block3"


@pytest.fixture(scope="module")
def unit_case():
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=4, seed=0)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    channels = activations_at(bundle.module, images[:1], UNIT_LAYER).activations[UNIT_LAYER].shape[1]
    sae = convlens.registry.create("sae", "relu-l1", input_dim=channels, latent_dim=2 * channels, seed=1).eval()
    channel, latent = active_units(bundle, images, UNIT_LAYER, sae)
    targets = {
        "channel": (ExplainTarget(layer=UNIT_LAYER, channel=channel), UnitAsLogit(bundle.module, UNIT_LAYER, channel)),
        "latent": (
            ExplainTarget(sae=sae, latent=latent, layer=UNIT_LAYER),
            UnitAsLogit(bundle.module, UNIT_LAYER, latent, sae),
        ),
    }
    return bundle, images, targets


@pytest.mark.parametrize("kind", ["channel", "latent"])
@pytest.mark.parametrize("method", ["HiResCAM", "LayerCAM", "XGradCAM", "ScoreCAM", "AblationCAM"])
def test_cams_of_units_match_pytorch_grad_cam(unit_case, kind, method):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    bundle, images, targets = unit_case
    target, wrapper = targets[kind]
    ours = convlens.registry.create("visualizer", method.lower()).explain(bundle, images, MAP_LAYER, target)
    layer = bundle.module.get_submodule(MAP_LAYER)
    with getattr(pytorch_grad_cam, method)(model=wrapper, target_layers=[layer]) as cam:
        cam.get_target_width_height = lambda _input: (ours.shape[2], ours.shape[1])
        reference = cam(input_tensor=images, targets=[ClassifierOutputTarget(0)] * len(images))
    wrapper.zero_grad(set_to_none=True)
    assert_matches(rescaled(ours), reference, f"{method} of a {kind}")


@pytest.mark.parametrize("kind", ["channel", "latent"])
@pytest.mark.parametrize("method", ["integrated-gradients", "input-x-gradient", "guided-backprop", "occlusion"])
def test_input_attributions_of_units_match_captum(unit_case, kind, method):
    import captum.attr as attr

    from test_attribution_methods import captum_model

    bundle, images, targets = unit_case
    target, wrapper = targets[kind]
    ours = convlens.registry.create("visualizer", method).input_attribution(bundle, images, MAP_LAYER, target)
    if method == "integrated-gradients":
        reference = attr.IntegratedGradients(wrapper).attribute(images, baselines=0.0, target=0, n_steps=32)
    elif method == "input-x-gradient":
        reference = attr.InputXGradient(wrapper).attribute(images.clone(), target=0)
    elif method == "guided-backprop":
        guided = UnitAsLogit(captum_model(bundle.module), UNIT_LAYER, wrapper.unit, wrapper.sae)
        reference = attr.GuidedBackprop(guided).attribute(images.clone(), target=0)
    else:
        reference = attr.Occlusion(wrapper).attribute(
            images, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0.0, target=0
        )
    assert_matches(ours, reference.detach(), f"{method} of a {kind}")


def test_integrated_gradients_is_complete():
    """The attributions of an image sum to the target's change from the baseline (Sundararajan et al. 2017, the
    completeness axiom), to the quadrature's accuracy."""
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32, seed=0)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ig = convlens.registry.create("visualizer", "integrated-gradients", steps=64)
    classes = torch.tensor([1, 4])
    attributions = ig.input_attribution(bundle, images, "block3", ExplainTarget(classes=classes))
    with torch.no_grad():
        logits, baseline = bundle.module(images), bundle.module(torch.zeros_like(images))
    change = (logits - baseline).gather(1, classes[:, None]).squeeze(1)
    np.testing.assert_allclose(attributions.sum(dim=(1, 2, 3)).numpy(), change.numpy(), rtol=0.02, atol=1e-3)


@pytest.mark.parametrize("name", ["hirescam", "layercam", "xgradcam", "eigencam"])
def test_cam_filters_weigh_patches_by_the_visualizers_maps(name):
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=4, seed=0)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    activations = activations_at(bundle.module, images, "block3").activations["block3"]
    weights = convlens.registry.create("filter", name)(
        activations, FilterContext(model=bundle, images=images, layer="block3")
    )
    with torch.no_grad():
        predicted = bundle.module(images).argmax(1)
    maps = convlens.registry.create("visualizer", name).explain(bundle, images, "block3", ExplainTarget(predicted))
    torch.testing.assert_close(weights, maps)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "occlusion"])
def test_perturbation_methods_score_every_target_in_the_same_passes(unit_case, method):
    """Several classes, or several units of one layer, share the forward passes of the changed copies and get the
    maps they get one at a time; a mix of classes and units falls back to one set of passes each."""
    bundle, images, _ = unit_case
    visualizer = convlens.registry.create("visualizer", method)
    calls = []
    handle = bundle.module.register_forward_pre_hook(lambda *_: calls.append(1))
    classes = [ExplainTarget(classes=torch.tensor([0, 1, 2])), ExplainTarget(classes=torch.tensor([3, 3, 3]))]
    units = [ExplainTarget(layer=UNIT_LAYER, channel=channel) for channel in (0, 5, 9)]
    mixed = [classes[0], units[0]]
    try:
        visualizer.explain(bundle, images, MAP_LAYER, classes[0])  # warm-up: the layer call counts are cached
        for group in (classes, units, mixed):
            calls.clear()
            together = visualizer.explain_targets(bundle, images, MAP_LAYER, group)
            shared = len(calls)
            calls.clear()
            separate = torch.stack([visualizer.explain(bundle, images, MAP_LAYER, t) for t in group], dim=1)
            torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)
            if group is mixed:
                assert shared == len(calls)
            else:
                assert shared * len(group) <= len(calls) + 2 * len(group), (shared, len(calls))
    finally:
        handle.remove()
