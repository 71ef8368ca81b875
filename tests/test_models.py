import gc
import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import convlens
from convlens import ConvlensError, UnknownComponentError
from convlens.cli import cli
from convlens.models.checkpoints import load_state_dict, save_weights
from convlens.models.gradient_flow import zero_gradient_fraction
from convlens.models.layers import capture, class_logit_target, count_hooks, layer_table, resolve_layer
from convlens.models.smoothing import smooth_network
from convlens.testing import check_component


def create(name, **params):
    return convlens.registry.create("model", name, **params)


@pytest.mark.parametrize(
    "name, params",
    [
        ("tiny-cnn", {}),
        ("resnet18-smooth", {"input_size": 64}),
        ("torchvision", {"arch": "vgg11", "input_size": 64}),
        ("tiny-cnn", {"smooth": True}),
    ],
)
def test_models_pass_the_contract(name, params):
    check_component("model", name, **params)


def test_smooth_resnet_has_no_maxpool_or_relu_and_keeps_weights():
    base = create("torchvision", arch="resnet18", seed=3).module
    smooth = create("resnet18-smooth", seed=3, slope=0.2).module
    kinds = {type(m) for m in smooth.modules()}
    assert nn.MaxPool2d not in kinds and nn.ReLU not in kinds
    assert nn.AvgPool2d in kinds and nn.LeakyReLU in kinds
    assert all(m.negative_slope == 0.2 for m in smooth.modules() if isinstance(m, nn.LeakyReLU))
    base_state, smooth_state = base.state_dict(), smooth.state_dict()
    assert base_state.keys() == smooth_state.keys()
    assert all(torch.equal(base_state[k], smooth_state[k]) for k in base_state)
    pool = smooth.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)


def test_smooth_transform_reports_functional_relus():
    googlenet = create("torchvision", arch="googlenet").module
    report = smooth_network(googlenet)
    assert report.pools_replaced and any("BasicConv2d.forward calls relu" in n for n in report.not_replaced)
    resnet = create("torchvision", arch="resnet18").module
    report = smooth_network(resnet)
    assert report.not_replaced == [] and report.pools_replaced == ["maxpool"]


def test_smooth_resnet_lets_every_neuron_objective_start():
    # paper sec. 5.1: ReLU and max pooling zero the input gradient of some (unit, image) pairs
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 96, 96, generator=generator)
    results = {}
    for name in ("torchvision", "resnet18-smooth"):
        module = create(name, arch="resnet18", seed=0).module if name == "torchvision" else create(name, seed=0).module
        for layer, channels in (("layer2", 128), ("layer4", 512)):
            units = torch.randint(0, channels, (48,), generator=generator)
            results[name, layer] = zero_gradient_fraction(module, layer, images, units)[0]
    assert max(results["torchvision", "layer2"], results["torchvision", "layer4"]) > 0
    assert results["resnet18-smooth", "layer2"] == 0 and results["resnet18-smooth", "layer4"] == 0


def test_torchvision_weights_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = create("torchvision", arch="resnet18", seed=7).module
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference.state_dict(), folder / "resnet18-f37072fd.pth")
    loaded = create("torchvision", arch="resnet18", weights="IMAGENET1K_V1", num_classes=5).module
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
    assert loaded.fc.out_features == 5
    smooth = create("resnet18-smooth", weights="DEFAULT").module
    assert torch.equal(smooth.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(ConvlensError, match="has no torchvision weights 'IMAGENET9K'"):
        create("torchvision", arch="resnet18", weights="IMAGENET9K")


def test_uncached_weights_name_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ConvlensError) as info:
        create("torchvision", arch="alexnet", weights="IMAGENET1K_V1")
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in str(info.value)
    assert "weights=PATH" in str(info.value)


def test_local_checkpoints_reload(tmp_path):
    trained = create("tiny-cnn", seed=1, num_classes=5)
    safetensors_path = tmp_path / "model.safetensors"
    save_weights(trained.module, safetensors_path)
    pt_path = tmp_path / "model.pt"
    torch.save(trained.module.state_dict(), pt_path)
    for path in (safetensors_path, pt_path):
        reloaded = create("tiny-cnn", seed=2, num_classes=5, weights=str(path)).module
        for key, value in trained.module.state_dict().items():
            assert torch.equal(reloaded.state_dict()[key], value)
    resnet = create("torchvision", arch="resnet18", num_classes=3, seed=4).module
    save_weights(resnet, tmp_path / "resnet.safetensors")
    again = create("torchvision", arch="resnet18", num_classes=3, weights=str(tmp_path / "resnet.safetensors")).module
    assert torch.equal(again.fc.weight, resnet.fc.weight)


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_objects_are_refused(tmp_path):
    whole_model = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), whole_model)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Payload()}))
    for path in (whole_model, evil):
        with pytest.raises(ConvlensError, match="refusing to load .*not a plain state dict"):
            load_state_dict(path)
    with pytest.raises(ConvlensError, match="does not fit the model .*missing: .*block1.0.weight"):
        save_file({"other": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
        create("tiny-cnn", weights=str(tmp_path / "wrong.safetensors"))


def test_python_model_from_a_file(tmp_path):
    source = tmp_path / "my_model.py"
    source.write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, 2))\n"
    )
    bundle = create("python", target=f"{source}:build", input_size=32, mean="0.5,0.5,0.5")
    assert bundle.default_layer == "0" and bundle.input_size == (32, 32) and bundle.mean == (0.5, 0.5, 0.5)
    check_component("model", "python", target=f"{source}:build", input_size=32)
    save_weights(bundle.module, tmp_path / "w.safetensors")
    again = create("python", target=f"{source}:build", checkpoint=str(tmp_path / "w.safetensors"))
    assert torch.equal(again.module[0].weight, bundle.module[0].weight)
    with pytest.raises(UnknownComponentError, match="has no layer 'conv9'"):
        create("python", target=f"{source}:build", default_layer="conv9")
    with pytest.raises(ConvlensError, match="cannot load model builder"):
        create("python", target=f"{source}:missing")


def test_unknown_layer_names_the_closest():
    module = create("resnet18-smooth", input_size=64).module
    with pytest.raises(UnknownComponentError) as info:
        resolve_layer(module, "layer5", "resnet18-smooth")
    assert "has no layer 'layer5'; closest: layer4, layer3, layer2, layer1" in str(info.value)


def test_capture_gradients_match_autograd_and_hooks_never_leak():
    bundle = create("tiny-cnn", seed=0, blocks=4)
    module = bundle.module
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([0, 1, 2, 3, 4, 5])
    got = capture(module, images, ["block2", "block4"], target=class_logit_target(classes))
    # reference: split the network at block2 by hand
    a2 = module.block1(images)
    a2 = module.block2(a2).detach().requires_grad_(True)
    logits = module.fc(module.flatten(module.pool(module.block4(module.block3(a2)))))
    (expected,) = torch.autograd.grad(logits.gather(1, classes.view(-1, 1)).sum(), a2)
    torch.testing.assert_close(got.gradients["block2"], expected)
    torch.testing.assert_close(got.activations["block2"], a2.detach())
    assert all(p.grad is None for p in module.parameters())
    assert count_hooks(module) == 0

    with pytest.raises(ZeroDivisionError):
        capture(module, images, ["block3"], target=lambda logits: 1 / 0)
    assert count_hooks(module) == 0

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    for _ in range(10):
        capture(module, images, ["block3"], target=class_logit_target(classes))
    gc.collect()
    start = rss_mb()
    for _ in range(100):
        result = capture(module, images, ["block3", "block4"], target=class_logit_target(classes))
        assert result.activations["block3"].grad_fn is None
    gc.collect()
    assert count_hooks(module) == 0
    assert rss_mb() - start < 20


def test_layers_command():
    result = CliRunner().invoke(cli, ["layers", "tiny-cnn", "--blocks", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    shapes = {row["name"]: row["output_shape"] for row in data["layers"]}
    assert data["default_layer"] == "block3" and shapes["block3"] == [64, 16, 16] and shapes["fc"] == [8]
    rows = {row["name"]: row for row in layer_table(create("tiny-cnn").module, (64, 64))}
    assert rows["block1.0"]["params"] == 3 * 16 * 9 and rows["block1"]["params"] == 0
    result = CliRunner().invoke(cli, ["layers", "tiny-cnn", "--blocks", "0"])
    assert result.exit_code == 1 and "parameter 'blocks' must be >= 1" in result.output
    assert "--arch" in CliRunner().invoke(cli, ["layers", "torchvision", "--help"]).output
