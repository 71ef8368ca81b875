import numpy as np
import pytest
import torch

import convlens
from convlens import FilterContext
from convlens.core.errors import ContractError
from convlens.models.layers import activations_at, count_hooks
from convlens.plugins.gradcam import gradcam_maps
from helpers import rescaled


def reference_gradcam(model, layer_module, images, classes, grid):
    """pytorch-grad-cam's GradCAM, with its resize set to the activation grid (cv2 resize to the same size)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer_module]) as cam:
        cam.get_target_width_height = lambda _input: (grid[1], grid[0])
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])


@pytest.mark.parametrize(
    "model, params, layer",
    [
        ("tiny-cnn", {"blocks": 4, "seed": 0}, "block3"),
        ("resnet18-smooth", {"input_size": 64, "seed": 0}, "layer3"),
    ],
)
def test_gradcam_filter_matches_pytorch_grad_cam(model, params, layer):
    bundle = convlens.registry.create("model", model, **params)
    module = bundle.module
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, -1, 5])  # -1: no label, so the predicted class is explained
    gradcam = convlens.registry.create("filter", "gradcam")
    captured = activations_at(module, images, layer, target=lambda logits: gradcam.gradient_target(logits, labels))
    activations = captured.activations[layer]
    ours = gradcam(activations, FilterContext(gradients=captured.gradients[layer]))
    with torch.no_grad():
        predicted = module(images).argmax(1)
    classes = torch.where(labels >= 0, labels, predicted)
    reference = reference_gradcam(module, module.get_submodule(layer), images, classes, activations.shape[2:])
    assert ours.shape == reference.shape == (4, *activations.shape[2:])
    np.testing.assert_allclose(rescaled(ours).numpy(), reference, atol=1e-5)
    assert count_hooks(module) == 0 and all(p.requires_grad for p in module.parameters())
    # without precomputed gradients the filter computes them itself from the context
    standalone = gradcam(activations, FilterContext(model=bundle, images=images, labels=labels, layer=layer))
    torch.testing.assert_close(standalone, ours)
    chosen = convlens.registry.create("filter", "gradcam", class_index=2)
    fixed = chosen(activations, FilterContext(model=bundle, images=images, layer=layer))
    reference = reference_gradcam(module, module.get_submodule(layer), images, [2] * 4, activations.shape[2:])
    np.testing.assert_allclose(rescaled(fixed).numpy(), reference, atol=1e-5)


def test_gradcam_maps_by_hand_and_clear_errors():
    activations = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # [1, 2, 2, 2]
    gradients = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, -2.0], [-2.0, -2.0]]]])  # alpha = (1, -2)
    cam = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # relu(1*A0 - 2*A1) = relu([[1, 0], [-2, -1]])
    torch.testing.assert_close(gradcam_maps(activations, gradients)[0], cam / (1 + 1e-7))
    with pytest.raises(ContractError, match="needs the model, the images and the layer"):
        convlens.registry.create("filter", "gradcam")(activations)


def test_activations_at_stops_early_and_matches_a_full_forward():
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=4)
    module = bundle.module
    images = torch.randn(3, 3, 64, 64)
    calls = []
    handle = module.fc.register_forward_hook(lambda *args: calls.append(len(args[1][0])))
    try:
        early = activations_at(module, images, "block2").activations["block2"]
        again = activations_at(module, images, "block2").activations["block2"]
    finally:
        handle.remove()
    # the layers after block2 ran once, on one image, when the model was first seen (to learn which modules run
    # more than once per forward pass), and never for the batch
    assert calls == [1] and torch.equal(early, again)
    with torch.no_grad():
        torch.testing.assert_close(early, module.block2(module.block1(images)))
    assert count_hooks(module) == 0


def test_labels_beyond_the_models_classes_get_a_clear_message():
    """A labelled folder whose classes are not the model's (e.g. 10 folders for an 8-class model)."""
    from convlens.attribution.base import target_classes
    from convlens.core.errors import ConvlensError

    logits = torch.randn(3, 8)
    assert target_classes(logits, torch.tensor([1, -1, 7]), None).tolist()[::2] == [1, 7]
    with pytest.raises(ConvlensError, match="label 9 is out of range for a model with 8 classes"):
        target_classes(logits, torch.tensor([1, 9, 2]), None)
