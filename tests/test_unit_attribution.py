"""Attribution of a unit (a channel or an SAE latent of one layer) with the maps taken at an earlier layer:
``gradients_between``, Grad-CAM against pytorch-grad-cam, saliency, the visualizer run, and image lists as data."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import convlens
from convlens import ConvlensError, UnknownComponentError, VisualTarget
from convlens.attribution.base import ExplainTarget
from convlens.cli import cli
from convlens.data.images import images_at
from convlens.data.shapes import write_shapes
from convlens.models.layers import INPUT, activations_at, gradients_between
from helpers import assert_clean, rescaled

MODELS = [
    ("tiny-cnn", {"blocks": 4, "seed": 0}, "block2", "block3"),
    ("resnet18-smooth", {"input_size": 64, "seed": 0}, "layer2", "layer3"),
]


class UnitAsLogit(nn.Module):
    """The model seen as a one-logit classifier: the unit of ``layer`` (a channel, or an SAE latent) summed over the
    layer's positions, ``[N, 1]``; what pytorch-grad-cam explains with ``ClassifierOutputTarget(0)``."""

    def __init__(self, module, layer, unit, sae=None):
        super().__init__()
        self.module, self.layer, self.unit, self.sae = module, layer, unit, sae

    def forward(self, images):
        outputs = []
        handle = self.module.get_submodule(self.layer).register_forward_hook(lambda _m, _i, out: outputs.append(out))
        try:
            self.module(images)
        finally:
            handle.remove()
        values = outputs[0] if self.sae is None else self.sae.encode(outputs[0])
        return values[:, self.unit].sum(dim=(1, 2))[:, None]


def reference_gradcam(wrapper, layer_module, images, size=None):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=wrapper, target_layers=[layer_module]) as cam:
        if size is not None:
            cam.get_target_width_height = lambda _input: (size[1], size[0])
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(0)] * len(images))
    wrapper.zero_grad(set_to_none=True)  # pytorch-grad-cam back-propagates into the weights
    return maps


def active_units(bundle, images, layer, sae):
    """A channel and a latent of ``layer`` that fire on ``images`` (so the maps are not all zero)."""
    with torch.no_grad():
        activations = activations_at(bundle.module, images, layer).activations[layer]
        latents = sae.encode(activations)
    return int(activations.sum(dim=(0, 2, 3)).argmax()), int(latents.sum(dim=(0, 2, 3)).argmax())


@pytest.mark.parametrize("model, params, map_layer, unit_layer", MODELS)
def test_gradcam_of_a_unit_at_an_earlier_layer_matches_pytorch_grad_cam(model, params, map_layer, unit_layer):
    bundle = convlens.registry.create("model", model, **params)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        channels = activations_at(bundle.module, images, unit_layer).activations[unit_layer].shape[1]
    sae = convlens.registry.create("sae", "relu-l1", input_dim=channels, latent_dim=2 * channels, seed=1).eval()
    channel, latent = active_units(bundle, images, unit_layer, sae)
    gradcam = convlens.registry.create("visualizer", "gradcam")
    layer_module = bundle.module.get_submodule(map_layer)
    cases = [
        (ExplainTarget(layer=unit_layer, channel=channel), UnitAsLogit(bundle.module, unit_layer, channel)),
        (ExplainTarget(sae=sae, latent=latent, layer=unit_layer), UnitAsLogit(bundle.module, unit_layer, latent, sae)),
    ]
    for target, wrapper in cases:
        ours = gradcam.explain(bundle, images, map_layer, target)
        assert ours.shape[1:] == activations_at(bundle.module, images[:1], map_layer).activations[map_layer].shape[2:]
        assert float(ours.amax()) > 0.5  # a unit that fires: the maps are not all zero
        reference = reference_gradcam(wrapper, layer_module, images, size=tuple(ours.shape[1:]))
        np.testing.assert_allclose(rescaled(ours).numpy(), reference, atol=1e-5)
        upsampled = F.interpolate(ours[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        np.testing.assert_allclose(
            rescaled(upsampled).numpy(), reference_gradcam(wrapper, layer_module, images), atol=1e-5
        )
        assert_clean(bundle.module)


def hooked_forward(module, images, layers):
    """A plain forward pass recording the outputs of ``layers`` (graph kept, nothing detached)."""
    outputs = {}
    handles = [
        module.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name in layers
    ]
    try:
        module(images)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_gradients_between_equal_full_autograd_and_leave_nothing_behind():
    bundle = convlens.registry.create("model", "resnet18-smooth", input_size=64, seed=0)
    module = bundle.module
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def objective(output):
        return output[:, 7].sum(dim=(1, 2)) * torch.tensor([1.0, -2.0, 0.5])

    pixels = images.clone().requires_grad_(True)
    outputs = hooked_forward(module, pixels, ["layer2", "layer3"])
    expected_layer2, expected_pixels = torch.autograd.grad(
        objective(outputs["layer3"]).sum(), [outputs["layer2"], pixels]
    )
    module.zero_grad(set_to_none=True)

    to_layer2 = gradients_between(module, images, "layer2", "layer3", objective)
    torch.testing.assert_close(to_layer2.gradients["layer2"], expected_layer2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(to_layer2.activations["layer3"], outputs["layer3"].detach())
    assert to_layer2.logits is None  # the forward pass stopped at layer3
    to_input = gradients_between(module, images, None, "layer3", objective)
    torch.testing.assert_close(to_input.gradients[INPUT], expected_pixels, atol=1e-6, rtol=1e-5)
    same = gradients_between(module, images, "layer3", "layer3", objective)  # the unit's own layer
    assert torch.equal(same.gradients["layer3"][:, 7], torch.tensor([1.0, -2.0, 0.5])[:, None, None].expand(3, 4, 4))
    assert int((same.gradients["layer3"] != 0).sum()) == 3 * 16
    assert_clean(module)

    for source, target, message in [
        ("layer3", "layer2", "layer 'layer2' of model runs before layer 'layer3'"),
        (
            "layer3.0.conv1",
            "layer3.0.downsample",
            "layer 'layer3.0.downsample' of model does not depend on layer 'layer3.0.conv1'",
        ),
        ("layer2", "layr3", "closest: layer3"),
    ]:
        with pytest.raises(UnknownComponentError, match=message):
            gradients_between(module, images, source, target, objective)
        assert_clean(module)
    with pytest.raises(ConvlensError, match=r"unit 999 is out of range: layer 'layer3' has units 0\.\.255"):
        gradients_between(module, images, "layer2", "layer3", ExplainTarget(channel=999).unit_values("layer3"))
    assert_clean(module)


def test_saliency_of_a_unit_equals_the_input_gradient_and_stops_at_the_unit():
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32, width=8)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    saliency = convlens.registry.create("visualizer", "saliency")
    ours = saliency.explain(bundle, images, "block3", ExplainTarget(layer="block2", channel=5))
    pixels = images.double().requires_grad_(True)
    module64 = bundle.module.double()
    module64[:2](pixels)[:, 5].sum().backward()
    bundle.module.float()
    np.testing.assert_allclose(ours.numpy(), pixels.grad.abs().amax(dim=1).numpy(), rtol=1e-4, atol=1e-7)
    bundle.module.zero_grad(set_to_none=True)
    ran = []
    handle = bundle.module.fc.register_forward_hook(lambda *_: ran.append(True))
    try:
        saliency.explain(bundle, images, "block3", ExplainTarget(layer="block2", channel=5))
    finally:
        handle.remove()
    assert not ran  # the forward pass stopped at the unit's layer
    assert_clean(bundle.module)


def test_unit_targets_explain_their_kind_and_reject_mixtures():
    sae = convlens.registry.create("sae", "relu-l1", input_dim=4, latent_dim=6)
    assert ExplainTarget().kind == "class" and ExplainTarget().unit is None
    assert ExplainTarget(channel=3).label == "unit 3" and ExplainTarget(channel=3).unit == 3
    assert ExplainTarget(sae=sae, latent=5).label == "latent 5"
    assert ExplainTarget(channel=3).read_at("b").layer == "b"
    assert ExplainTarget(channel=3, layer="a").read_at("b").layer == "a"
    for wrong in (
        ExplainTarget(sae=sae, channel=1),
        ExplainTarget(latent=2),
        ExplainTarget(channel=1, classes=torch.zeros(1)),
    ):
        with pytest.raises(convlens.ContractError):
            wrong.kind  # noqa: B018  (the property raises)


def shapes_images(root, n=6, size=32):
    write_shapes(root / "shapes", n=n, size=size, seed=0)
    return sorted((root / "shapes" / "images").rglob("*.png"))


def test_images_at_a_list_keeps_exactly_its_files_in_order(tmp_path):
    files = shapes_images(tmp_path)
    chosen = [files[4], files[0], files[2], files[0]]
    index = images_at(chosen)
    assert list(index.paths) == chosen and index.labels is None
    assert index.root == tmp_path / "shapes" / "images"
    assert [index.relative(p) for p in index.paths] == [p.relative_to(index.root).as_posix() for p in chosen]
    assert images_at([str(files[1])]).root == files[1].parent
    with pytest.raises(ConvlensError, match=r"no image file at .*nothere\.png"):
        images_at([files[0], tmp_path / "nothere.png"])
    with pytest.raises(ConvlensError, match="empty"):
        images_at([])


def test_gradcam_of_units_through_the_cli_at_an_earlier_layer(tmp_path):
    write_shapes(tmp_path / "shapes", n=8, size=32, seed=0)
    model = ["--model", "tiny-cnn", "--model-blocks", "3", "--model-width", "8", "--model-input-size", "32"]
    out = tmp_path / "units"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "gradcam",
            *model,
            "--layer",
            "block3",
            "--map-layer",
            "block2",
            "--units",
            "1,4",
            "--data",
            str(tmp_path / "shapes"),
            "--max-images",
            "3",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert (record["layer"], record["map_layer"], record["target"]) == ("block3", "block2", "channels")
    assert [e["unit"] for e in record["images"]] == [1, 4] * 3 and "pointing_game" not in record
    overlays = [e["overlay"] for e in record["images"]]
    assert len(set(overlays)) == 6 and all((out / name).is_file() for name in overlays)
    assert [(f["unit"], f["kind"], f["path"]) for f in record["figures"]] == [
        (e["unit"], "attribution", e["overlay"]) for e in record["images"]
    ]
    assert all(
        f["caption"].startswith(e["image"]) and "predicted" in f["caption"] and "peak" in f["caption"]
        for f, e in zip(record["figures"], record["images"])
    )
    assert json.loads((out / "attribution.json").read_text())["figures"] == record["figures"]
    maps = load_file(out / "maps.safetensors")["maps"]
    assert maps.shape == (3, 2, 8, 8)  # images, units, the grid of block2 (block3: 4 x 4)

    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, width=8, input_size=32)
    from convlens.data.images import Preprocessing, open_rgb, scan_images

    index = scan_images(tmp_path / "shapes")
    images = torch.stack([Preprocessing.of(bundle).eval_transform(open_rgb(index.paths[i])) for i in range(3)])
    direct = convlens.registry.create("visualizer", "gradcam").explain(
        bundle, images, "block2", ExplainTarget(layer="block3", channel=4)
    )
    torch.testing.assert_close(maps[:, 1], direct, atol=1e-5, rtol=0)

    for name, units in [("gradcam", "2,99"), ("edge-detector", "99")]:
        failed = CliRunner().invoke(
            cli,
            [
                "visualize",
                name,
                *model,
                "--layer",
                "block3",
                "--units",
                units,
                "--data",
                str(tmp_path / "shapes"),
                "--out",
                str(tmp_path / "bad"),
            ],
        )
        assert failed.exit_code != 0 and "unit 99 is out of range: layer 'block3' has units 0..31" in failed.output
        assert "Traceback" not in failed.output
    wrong = CliRunner().invoke(
        cli,
        [
            "visualize",
            "gradcam",
            *model,
            "--layer",
            "block2",
            "--map-layer",
            "block3",
            "--units",
            "0",
            "--data",
            str(tmp_path / "shapes"),
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert wrong.exit_code != 0 and "runs before layer 'block3'" in wrong.output, wrong.output


@pytest.mark.parametrize("name", ["gradcam", "saliency"])
def test_units_of_an_sae_and_of_a_layer_on_a_list_of_images(tmp_path, name):
    files = shapes_images(tmp_path)
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, width=8, input_size=32)
    sae = convlens.registry.create("sae", "relu-l1", input_dim=32, latent_dim=48, seed=1).eval()
    visualizer = convlens.registry.create("visualizer", name, map_layer="block2")
    listed = [files[3], files[1]]
    record = visualizer.run(VisualTarget(bundle, "block3", units=(5, 7), sae=sae, data=listed), tmp_path / "o")
    assert record["target"] == "latents" and [e["latent"] for e in record["images"]] == [5, 7, 5, 7]
    assert [e["image"] for e in record["images"][::2]] == [
        p.relative_to(files[0].parents[1]).as_posix() for p in listed
    ]
    assert "pointing_game" not in record  # a list of images carries no concepts
    assert [f["unit"] for f in record["figures"]] == [5, 7, 5, 7]
    assert all((tmp_path / "o" / f["path"]).is_file() and f["kind"] == "attribution" for f in record["figures"])
    with pytest.raises(ConvlensError, match=r"latent 48 is out of range: the SAE has latents 0\.\.47"):
        visualizer.run(VisualTarget(bundle, "block3", units=(48,), sae=sae, data=listed), tmp_path / "bad")
    plain = visualizer.run(VisualTarget(bundle, "block3", units=(2,), data=listed[:1]), tmp_path / "plain")
    assert plain["target"] == "channels" and plain["images"][0]["unit"] == 2
    assert plain["figures"][0]["unit"] == 2
    with Image.open(tmp_path / "plain" / plain["figures"][0]["path"]) as overlay:
        assert overlay.width > 192
    assert_clean(bundle.module)
