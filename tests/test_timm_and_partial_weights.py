"""The timm model plugin against timm itself, and partial checkpoints for the torchvision, timm and python models."""

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import convlens
from convlens import ConvlensError, PartialWeightsWarning
from convlens.cli import cli
from convlens.testing import check_component

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def create(name, **params):
    return convlens.registry.create("model", name, **params)


@pytest.fixture(scope="module")
def timm():
    """timm (the `real` extra); the partial-weights tests of the other models run without it."""
    return pytest.importorskip("timm")


def seeded_timm(timm, arch, seed, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, **kwargs).eval()


def logits(module):
    with torch.no_grad():
        return module.eval()(IMAGES)


@pytest.fixture(scope="module")
def reference(timm):
    return seeded_timm(timm, "resnet18", seed=7, num_classes=5)


def test_safetensors_weights_give_timms_logits(reference, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(path))
    bundle = create("timm", arch="resnet18", weights=str(path), num_classes=5)
    assert torch.equal(logits(bundle.module), logits(reference))
    assert not torch.equal(logits(create("timm", arch="resnet18", num_classes=5).module), logits(reference))


def test_pt_state_dict_loads_and_a_pickled_module_is_refused(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "state.pt")
    bundle = create("timm", arch="resnet18", weights=str(tmp_path / "state.pt"), num_classes=5)
    assert torch.equal(logits(bundle.module), logits(reference))
    torch.save(reference, tmp_path / "whole.pt")
    with pytest.raises(ConvlensError, match="refusing to load .*pickle"):
        create("timm", arch="resnet18", weights=str(tmp_path / "whole.pt"), num_classes=5)


def test_random_init_is_timms_with_the_seed(timm):
    bundle = create("timm", arch="mobilenetv3_small_100", seed=3)
    assert torch.equal(logits(bundle.module), logits(seeded_timm(timm, "mobilenetv3_small_100", seed=3)))


@pytest.mark.parametrize(
    "arch, size, mean, crop",
    [("resnet18", 224, (0.485, 0.456, 0.406), 0.95), ("inception_v3", 299, (0.5, 0.5, 0.5), 0.875)],
)
def test_preprocessing_is_timms(timm, arch, size, mean, crop):
    bundle = create("timm", arch=arch)
    config = timm.data.resolve_data_config({}, model=timm.create_model(arch, pretrained=False))
    assert bundle.input_size == tuple(config["input_size"][1:]) == (size, size)
    assert bundle.mean == tuple(config["mean"]) == mean
    assert bundle.std == tuple(config["std"])
    assert bundle.crop_fraction == config["crop_pct"] == crop


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_100"])
def test_default_layer_gives_timms_final_feature_map(timm, arch):
    bundle = check_component("model", "timm", arch=arch)
    captured = {}
    layer = bundle.module.get_submodule(bundle.default_layer)
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.update(output=output))
    with torch.no_grad():
        features = bundle.module.forward_features(IMAGES)
        bundle.module(IMAGES)
    handle.remove()
    assert torch.equal(captured["output"], features)


def test_num_classes_changes_the_head(timm):
    bundle = create("timm", arch="mobilenetv3_small_100", num_classes=7)
    assert bundle.module.get_classifier().out_features == 7 and logits(bundle.module).shape == (2, 7)


@pytest.mark.parametrize("weights", ["imagenet", "pretrained"])
def test_hub_weights_name_the_local_file_alternative(timm, weights):
    with pytest.raises(ConvlensError, match="no model hub.*weights=PATH.safetensors.*save_file"):
        create("timm", arch="resnet18", weights=weights)


def test_unknown_arch_and_tag_suggest(timm):
    with pytest.raises(ConvlensError, match="unknown timm architecture 'resnt18'; did you mean 'resnet18'"):
        create("timm", arch="resnt18")
    with pytest.raises(ConvlensError, match="no pretrained tag 'resnet18.a1_in1kk'; did you mean 'resnet18.a1_in1k'"):
        create("timm", arch="resnet18.a1_in1kk")


def test_missing_timm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConvlensError, match=r'pip install -e "\.\[real\]"'):
        create("timm", arch="resnet18")


def test_layers_command_lists_a_timm_model(timm):
    result = CliRunner().invoke(cli, ["layers", "timm", "--arch", "mobilenetv3_small_100", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["default_layer"] == "blocks.5"


@pytest.fixture(scope="module")
def vgg16_features(tmp_path_factory):
    """A seeded VGG16's features, and a checkpoint holding only them."""
    import torchvision

    torch.manual_seed(11)
    features = torchvision.models.vgg16().features.eval()
    path = tmp_path_factory.mktemp("vgg") / "features.safetensors"
    save_file({f"features.{k}": v for k, v in features.state_dict().items()}, str(path))
    return features, path


def test_features_only_checkpoint_loads_partially_into_vgg16(vgg16_features):
    features, path = vgg16_features
    with pytest.warns(PartialWeightsWarning, match=r"26 of .* 32 tensors .*6 missing.*classifier\.0\.weight") as seen:
        bundle = create("torchvision", arch="vgg16", weights=str(path), partial_weights=True)
    assert "unexpected" not in str(seen[0].message)
    with torch.no_grad():
        assert torch.equal(bundle.module.features(IMAGES), features(IMAGES))
    with pytest.raises(
        ConvlensError, match=r"does not fit the model \(missing: classifier\.0\.weight.*partial_weights"
    ):
        create("torchvision", arch="vgg16", weights=str(path))


def test_partial_timm_checkpoint_without_its_head(reference, tmp_path):
    path = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}, str(path))
    with pytest.warns(PartialWeightsWarning, match="2 missing, left as initialised: fc.weight, fc.bias"):
        bundle = create("timm", arch="resnet18", weights=str(path), num_classes=5, partial_weights=True)
    with torch.no_grad():
        assert torch.equal(bundle.module.forward_features(IMAGES), reference.forward_features(IMAGES))


@pytest.fixture
def python_model(tmp_path):
    """A 'python' model target: a conv and a linear layer."""
    source = tmp_path / "net.py"
    source.write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
    )
    return f"{source}:build"


def test_partial_python_checkpoint_with_extra_keys_warns_unexpected(python_model, tmp_path):
    conv = nn.Conv2d(3, 4, 3)
    path = tmp_path / "extra.safetensors"
    save_file({"0.weight": conv.weight.detach(), "0.bias": conv.bias.detach(), "aux.weight": torch.ones(2)}, str(path))
    with pytest.warns(PartialWeightsWarning, match="1 unexpected, ignored: aux.weight"):
        bundle = create("python", target=python_model, checkpoint=str(path), partial_weights=True, input_size=16)
    assert torch.equal(bundle.module[0].weight, conv.weight)


def test_mis_shaped_tensor_is_refused_even_when_partial(python_model, tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file({"0.weight": torch.zeros(8, 3, 3, 3)}, str(path))
    with pytest.raises(ConvlensError, match=r"shape mismatch: 0\.weight \[8, 3, 3, 3\] vs \[4, 3, 3, 3\]"):
        create("python", target=python_model, checkpoint=str(path), partial_weights=True)


def test_partial_checkpoint_matching_nothing_is_refused(python_model, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"backbone.stem.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(ConvlensError, match="shares no tensor name with the model.*the file has: backbone.stem.weight"):
        create("python", target=python_model, checkpoint=str(path), partial_weights=True)
