"""Every attribution method against its reference implementation: the CAM family against pytorch-grad-cam (same
method names), the gradient and perturbation families against captum, on tiny-cnn, resnet18 and
efficientnet-lite0, at two layers, for the predicted classes and for a fixed class."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import convlens
from convlens import ExplainTarget
from helpers import rescaled

MODELS = {
    "tiny-cnn": (lambda: convlens.registry.create("model", "tiny-cnn", seed=0), ("block3", "block4"), 64),
    "resnet18": (
        lambda: convlens.registry.create("model", "torchvision", arch="resnet18", input_size=64, seed=0),
        ("layer2", "layer3"),
        48,
    ),
    "efficientnet-lite0": (None, ("_blocks.3", "_blocks.8"), 64),
}
FIXED_CLASS = 3


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    """(name, bundle, layers, images [N, 3, S, S]) per model; efficientnet-lite0 needs the `real` extra."""
    name = request.param
    make, layers, size = MODELS[name]
    bundle = request.getfixturevalue("efficientnet_lite0") if make is None else make()
    bundle.module.eval()
    # two images test the batching; the largest network (the dearest on 2 CPU cores) explains one
    count = 1 if name == "efficientnet-lite0" else 2
    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(7))
    return name, bundle, layers, images


def class_targets(bundle, images):
    """The two target settings: the predicted classes and one fixed class."""
    with torch.no_grad():
        predicted = bundle.module(images).argmax(dim=1)
    return {"predicted": predicted, "fixed": torch.full_like(predicted, FIXED_CLASS)}


def assert_matches(ours, reference, what, tolerance=1e-5):
    """``ours`` equals ``reference`` to ``tolerance`` relative to the reference's largest magnitude (1 for maps
    in [0, 1])."""
    reference = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    ours = torch.as_tensor(ours, dtype=torch.float64)
    assert ours.shape == reference.shape, what
    scale = max(1.0, float(reference.abs().max()))
    error = float((ours - reference).abs().max()) / scale
    assert error <= tolerance, f"{what}: max error {error:.2e} (scale {scale:.3g})"


def explained(method, bundle, images, layer, classes, **params):
    visualizer = convlens.registry.create("visualizer", method, **params)
    return visualizer.explain(bundle, images, layer, ExplainTarget(classes=classes))


def peer_cam(cam_class, bundle, layer, images, classes, grid, **options):
    """pytorch-grad-cam's maps at the layer's own grid (its final resize set to that grid: an identity). It scales
    each layer's map to [0, 1] and then their mean once more: compare with ``rescaled`` maps."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cam_class(model=bundle.module, target_layers=[bundle.module.get_submodule(layer)], **options) as cam:
        cam.get_target_width_height = lambda _input: (grid[1], grid[0])
        cam.batch_size = 64
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def perturbed_images(name, images):
    """The images the perturbation CAMs are compared on: one forward pass per channel and image makes them the
    dearest, so the large networks (hundreds of channels) explain one image."""
    return images if name == "tiny-cnn" else images[:1]


@pytest.mark.parametrize("method", ["HiResCAM", "LayerCAM", "XGradCAM", "ScoreCAM"])
def test_cams_match_pytorch_grad_cam(case, method):
    import pytorch_grad_cam

    name, bundle, layers, images = case
    if method == "ScoreCAM":
        images = perturbed_images(name, images)
    for layer in layers:
        grid = convlens.activations_at(bundle.module, images[:1], layer).activations[layer].shape[2:]
        for setting, classes in class_targets(bundle, images).items():
            ours = explained(method.lower(), bundle, images, layer, classes)
            reference = peer_cam(getattr(pytorch_grad_cam, method), bundle, layer, images, classes, grid)
            assert_matches(rescaled(ours), reference, f"{method} {name} {layer} {setting}")


def test_ablationcam_matches_pytorch_grad_cam(case):
    """The same zero ablation: pytorch-grad-cam writes 0 after a ReLU (smallest activation 0) and otherwise
    ``min - 1e7``, where it is given an ablation layer that writes the paper's zero instead."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.ablation_layer import AblationLayer

    class ZeroAblation(AblationLayer):
        def __call__(self, x, *args, **kwargs):  # efficientnet's blocks take a drop_connect_rate
            output = self.activations
            for row in range(output.size(0)):
                output[row, self.indices[row], :] = 0
            return output

    name, bundle, layers, images = case
    images = perturbed_images(name, images)
    for layer in layers:
        activations = convlens.activations_at(bundle.module, images, layer).activations[layer]
        after_relu = float(activations.min()) == 0.0
        options = {} if after_relu else {"ablation_layer": ZeroAblation()}
        for setting, classes in class_targets(bundle, images).items():
            ours = explained("ablationcam", bundle, images, layer, classes)
            twin = dataclasses.replace(bundle, module=copy.deepcopy(bundle.module))  # the peer swaps the layer out
            reference = peer_cam(AblationCAM, twin, layer, images, classes, activations.shape[2:], **options)
            assert_matches(rescaled(ours), reference, f"AblationCAM {name} {layer} {setting} (relu: {after_relu})")


def test_eigencam_matches_pytorch_grad_cam_up_to_its_fixed_sign(case):
    """The peer's projection signed by convlens's rule (correlating positively with the summed activation), then
    ReLU and the [0, 1] scaling; the peer's own maps where its sign already agrees."""
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    name, bundle, layers, images = case
    for layer in layers:
        activations = convlens.activations_at(bundle.module, images, layer).activations[layer].numpy()
        projection = get_2d_projection(activations)
        centred = activations - activations.mean(axis=(2, 3), keepdims=True)
        agrees = np.einsum("nhw,nhw->n", projection, centred.sum(axis=1)) >= 0
        signed = np.where(agrees[:, None, None], projection, -projection)
        ours = explained("eigencam", bundle, torch.as_tensor(images), layer, None)
        assert_matches(ours, scale_cam_image(np.maximum(signed, 0)), f"EigenCAM {name} {layer}")
        peer = peer_cam(EigenCAM, bundle, layer, images, [0, 0], activations.shape[2:])
        if agrees.any():
            assert_matches(rescaled(ours)[agrees], peer[agrees], f"EigenCAM {name} {layer} (same sign)")


def captum_model(module):
    """A copy of ``module`` captum's guided backpropagation handles: ReLUs not in place, each ReLU6 as a ReLU then
    a clamp at 6 (captum guides ``nn.ReLU`` modules only; the composition is the same function and gradient)."""
    twin = copy.deepcopy(module)
    for parent in list(twin.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, child_name, nn.Sequential(nn.ReLU(), nn.Hardtanh(0.0, 6.0)))
            elif isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.ReLU())
    return twin


def captum_reference(method, bundle, images, layer, classes):
    import captum.attr as attr

    module = bundle.module
    if method == "integrated-gradients":
        return attr.IntegratedGradients(module).attribute(images, baselines=0.0, target=classes, n_steps=32)
    if method == "input-x-gradient":
        return attr.InputXGradient(module).attribute(images.clone(), target=classes)
    if method == "saliency":
        return attr.Saliency(module).attribute(images.clone(), target=classes)
    if method == "guided-backprop":
        return attr.GuidedBackprop(captum_model(module)).attribute(images.clone(), target=classes)
    if method == "guided-gradcam":
        twin = captum_model(module)
        return attr.GuidedGradCam(twin, twin.get_submodule(layer)).attribute(images.clone(), target=classes)
    if method == "occlusion":
        return attr.Occlusion(module).attribute(
            images, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0.0, target=classes
        )
    raise AssertionError(method)


@pytest.mark.parametrize(
    "method", ["integrated-gradients", "input-x-gradient", "saliency", "guided-backprop", "guided-gradcam", "occlusion"]
)
def test_input_attributions_match_captum(case, method):
    name, bundle, layers, images = case
    visualizer = convlens.registry.create("visualizer", method)
    for layer in layers if method == "guided-gradcam" else layers[:1]:
        for setting, classes in class_targets(bundle, images).items():
            ours = visualizer.input_attribution(bundle, images, layer, ExplainTarget(classes=classes))
            reference = captum_reference(method, bundle, images, layer, classes).detach()
            assert_matches(ours, reference, f"{method} {name} {layer} {setting}")


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad_matches_captum_noise_tunnel(case, nt_type):
    """SmoothGrad around saliency and Integrated Gradients against captum's NoiseTunnel, the same noise drawn from
    the same seed, on the first image (captum's noise level is one number per call), explained for its predicted
    class and for the fixed class."""
    import captum.attr as attr

    name, bundle, layers, images = case
    settings = class_targets(bundle, images[:1])
    classes = torch.cat([settings["predicted"], settings["fixed"]])
    images = images[:1].expand(2, -1, -1, -1)
    for base, peer in [("saliency", attr.Saliency), ("integrated-gradients", attr.IntegratedGradients)]:
        smoothgrad = convlens.registry.create(
            "visualizer", "smoothgrad", base=base, samples=4, noise_level=0.15, nt_type=nt_type, seed=3
        )
        for row in range(len(images)):
            image = images[row : row + 1]
            ours = smoothgrad.input_attribution(bundle, image, layers[0], ExplainTarget(classes=classes[row : row + 1]))
            stdev = float((image.max() - image.min()) * 0.15)  # in float32 as ours: gradients have kinks
            torch.manual_seed(3)
            options = {"n_steps": 32} if base == "integrated-gradients" else {}
            reference = attr.NoiseTunnel(peer(bundle.module)).attribute(
                image, nt_type=nt_type, nt_samples=4, stdevs=stdev, target=int(classes[row]), **options
            )
            assert_matches(ours, reference.detach(), f"smoothgrad({base}) {nt_type} {name} image {row}")
