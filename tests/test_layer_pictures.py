"""The activation-maps and conv-weights visualizers: tile pixels and JSON numbers against direct computations."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import convlens
from convlens import ConvlensError, ModelBundle, VisualTarget
from convlens.cli import cli
from convlens.data.images import Preprocessing, open_rgb
from convlens.drawing.charts import heat_colours
from convlens.testing import check_component

SIDE = 16  # input pixels; the 1x1 conv keeps the grid, so a tile of 64 pixels gives each cell 4 x 4 pixels
CELL = 4


def colour_model(activation: nn.Module) -> ModelBundle:
    """A 1x1 conv whose five channels are known functions of the pixels: 3 R, G, -G, R and 0."""
    conv = nn.Conv2d(3, 5, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0] = 3.0
        conv.weight[1, 1] = 1.0
        conv.weight[2, 1] = -1.0
        conv.weight[3, 0] = 1.0
    module = nn.Sequential(conv, activation, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    return ModelBundle(module, (SIDE, SIDE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), default_layer="1")


@pytest.fixture
def images(tmp_path):
    """Three images: red rises from left to right, green is full and blue is off; the later ones are darker."""
    folder = tmp_path / "images"
    folder.mkdir()
    for number in range(3):
        pixels = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
        pixels[..., 0] = np.arange(SIDE) * 15 // (number + 1)
        pixels[..., 1] = 255 - 50 * number
        Image.fromarray(pixels, "RGB").save(folder / f"image{number}.png")
    return folder


def layer_output(bundle, image_path):
    """The layer's activations for one image, computed without the visualizer: [C, H, W]."""
    pixels = Preprocessing.of(bundle).eval_transform(open_rgb(image_path))
    with torch.no_grad():
        return bundle.module[:2](pixels[None])[0]


def cells(picture, box):
    """The colour at the centre of each of a tile's cells: [SIDE, SIDE, 3], after checking the tile is the cells
    upsampled with nearest neighbour."""
    left, top, right, bottom = box
    tile = np.asarray(picture)[top:bottom, left:right]
    centres = tile[CELL // 2 :: CELL, CELL // 2 :: CELL]
    np.testing.assert_array_equal(tile, centres.repeat(CELL, axis=0).repeat(CELL, axis=1))
    return centres


def run_maps(bundle, folder, out, units=(), sae=None, **params):
    visualizer = convlens.registry.create("visualizer", "activation-maps", **params)
    visualizer.progress = False
    record = visualizer.run(VisualTarget(bundle, "1", units, sae=sae, data=folder), out)
    assert json.loads((out / "activation_maps.json").read_text()) == record
    entry = record["images"][0]
    return record, entry, Image.open(out / entry["picture"]).convert("RGB")


def test_activation_maps_shared_scale_follow_the_activations(images, tmp_path):
    bundle = colour_model(nn.ReLU())
    record, entry, picture = run_maps(bundle, images, tmp_path / "out")
    expected = layer_output(bundle, images / "image0.png")
    assert record["units"] == [0, 1, 2, 3, 4] and record["tiles"] == "channels"
    assert len(record["images"]) == 1 and entry["image"] == "image0.png"
    top = float(expected.max())
    for unit, stats in enumerate(entry["units"]):
        assert stats["unit"] == unit
        assert stats["max"] == pytest.approx(float(expected[unit].max()))
        assert stats["mean"] == pytest.approx(float(expected[unit].mean()))
        assert stats["active"] == bool((expected[unit] > 0).any())
        assert stats["range"] == pytest.approx([0.0, top])
        grey = cells(picture, stats["box"])
        assert (grey == grey[..., :1]).all()
        np.testing.assert_allclose(grey[..., 0], np.rint(expected[unit].numpy() / top * 255), atol=1)
    assert [stats["active"] for stats in entry["units"]] == [True, True, False, True, False]
    brightest = max(range(5), key=lambda unit: cells(picture, entry["units"][unit]["box"]).sum())
    assert brightest == 0
    assert cells(picture, entry["units"][2]["box"]).max() == 0  # an inactive channel is black
    assert record["summary"] == "drew 5 channels of 1 for 1 image; 3 of 5 active"


def test_activation_maps_per_map_scale_units_and_heat(images, tmp_path):
    bundle = colour_model(nn.ReLU())
    expected = layer_output(bundle, images / "image0.png")
    record, entry, picture = run_maps(bundle, images, tmp_path / "per-map", units=(3, 1), scale="per-map")
    assert record["units"] == [3, 1] and [stats["unit"] for stats in entry["units"]] == [3, 1]
    red, green = (cells(picture, stats["box"])[..., 0] for stats in entry["units"])
    np.testing.assert_allclose(red, np.rint(expected[3].numpy() / float(expected[3].max()) * 255), atol=1)
    assert red.max() == 255 and (green == 255).all()  # each map reaches full brightness on its own scale
    record, entry, picture = run_maps(bundle, images, tmp_path / "heat", colour="heat", columns=1)
    boxes = [stats["box"] for stats in entry["units"]]
    assert len({box[0] for box in boxes}) == 1  # one column
    np.testing.assert_array_equal(cells(picture, boxes[2]), np.broadcast_to(heat_colours(0.0), (SIDE, SIDE, 3)))
    shown = expected[0].numpy() / float(expected.max())
    assert np.abs(cells(picture, boxes[0]).astype(int) - heat_colours(shown)).max() <= 2
    with pytest.raises(ConvlensError, match="channels 7 out of range"):
        run_maps(bundle, images, tmp_path / "wrong", units=(7,))


def test_activation_maps_keep_zero_identifiable_under_negative_activations(images, tmp_path):
    bundle = colour_model(nn.LeakyReLU(0.5))
    record, entry, picture = run_maps(bundle, images, tmp_path / "out")
    expected = layer_output(bundle, images / "image0.png")
    low, high = -0.5, float(expected.max())  # channel 2 is LeakyReLU(-green) with green at 1
    assert float(expected.min()) == pytest.approx(low)
    assert entry["units"][0]["range"] == pytest.approx([low, high])
    negative, zero = cells(picture, entry["units"][2]["box"]), cells(picture, entry["units"][4]["box"])
    assert (negative == 0).all()  # the lowest value is black ...
    assert (zero == round(255 * -low / (high - low))).all()  # ... and zero is the dark grey above it
    assert not entry["units"][2]["active"] and not entry["units"][4]["active"]
    assert entry["units"][2]["max"] == pytest.approx(-0.5)


def test_activation_maps_of_sae_latents_and_several_images(images, tmp_path):
    bundle = colour_model(nn.ReLU())
    sae = convlens.registry.create("sae", "relu-l1", input_dim=5, latent_dim=6, seed=3).eval()
    record, entry, picture = run_maps(bundle, images, tmp_path / "out", sae=sae, max_images=2, batch_size=1)
    assert record["tiles"] == "latents" and record["units"] == list(range(6))
    assert [entry["image"] for entry in record["images"]] == ["image0.png", "image1.png"]
    assert sorted(path.name for path in (tmp_path / "out" / "maps").iterdir()) == [
        "00000-image0.png",
        "00001-image1.png",
    ]
    with torch.no_grad():
        latents = sae.encode(layer_output(bundle, images / "image0.png")[None])[0]
    top = float(latents.max())
    assert top > 0
    for latent, stats in enumerate(entry["units"]):
        assert stats["max"] == pytest.approx(float(latents[latent].max()), abs=1e-6)
        assert stats["mean"] == pytest.approx(float(latents[latent].mean()), abs=1e-6)
        grey = cells(picture, stats["box"])[..., 0]
        np.testing.assert_allclose(grey, np.rint(latents[latent].numpy() / top * 255), atol=1)
    with pytest.raises(ConvlensError, match="the SAE reads 4 channels"):
        run_maps(bundle, images, tmp_path / "wrong", sae=convlens.registry.create("sae", "relu-l1", input_dim=4))


def test_activation_maps_need_data_and_a_conv_layer(images, tmp_path):
    bundle = colour_model(nn.ReLU())
    visualizer = convlens.registry.create("visualizer", "activation-maps")
    assert visualizer.needs_data
    with pytest.raises(ConvlensError, match="--data"):
        visualizer.run(VisualTarget(bundle, "1"), tmp_path / "out")
    with pytest.raises(ConvlensError, match=r"layer '3' gives \(1, 5\)"):
        visualizer.run(VisualTarget(bundle, "3", data=images / "image0.png"), tmp_path / "out")


def weights_model(*convs: nn.Module) -> ModelBundle:
    return ModelBundle(nn.Sequential(*convs), (8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), default_layer="0")


def run_weights(bundle, out, layer="0", units=(), **params):
    visualizer = convlens.registry.create("visualizer", "conv-weights", **params)
    record = visualizer.run(VisualTarget(bundle, layer, units), out)
    assert json.loads((out / "conv_weights.json").read_text()) == record
    return record, Image.open(out / "grid.png").convert("RGB")


def colour_of(picture, box):
    """The one colour of a tile (checked to be uniform)."""
    left, top, right, bottom = box
    tile = np.asarray(picture)[top:bottom, left:right].reshape(-1, 3)
    assert (tile == tile[0]).all()
    return tuple(int(c) for c in tile[0])


def rgb_kernels() -> nn.Conv2d:
    """Kernel 0: +1 on red; kernel 1: -0.5 on green; kernel 2: zero."""
    conv = nn.Conv2d(3, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 1] = -0.5
    return conv


def test_conv_weights_colours_shared_and_per_kernel(tmp_path):
    bundle = weights_model(rgb_kernels(), nn.ReLU())
    record, picture = run_weights(bundle, tmp_path / "shared", tile=8)
    assert record["layer"] == "0" and record["kernel_shape"] == [3, 2, 2] and record["units"] == [0, 1, 2]
    red, green, zero = (colour_of(picture, kernel["box"]) for kernel in record["kernels"])
    assert (red, green, zero) == ((255, 128, 128), (128, 64, 128), (128, 128, 128))
    assert [kernel["l2_norm"] for kernel in record["kernels"]] == pytest.approx([2.0, 1.0, 0.0])
    assert [kernel["mean_colour"] for kernel in record["kernels"]] == [
        [1.0, 0.0, 0.0],
        [0.0, -0.5, 0.0],
        [0.0, 0.0, 0.0],
    ]
    assert record["kernels"][0]["box"][2] - record["kernels"][0]["box"][0] == 8
    assert record["summary"].startswith("drew 3 kernels 3x2x2 of 0 (shared scale)")
    record, picture = run_weights(bundle, tmp_path / "per-kernel", units=(1, 2), scale="per-kernel", tile=8)
    assert [kernel["unit"] for kernel in record["kernels"]] == [1, 2]
    assert [colour_of(picture, kernel["box"]) for kernel in record["kernels"]] == [(128, 0, 128), (128, 128, 128)]
    with pytest.raises(ConvlensError, match="kernels 3 out of range"):
        run_weights(bundle, tmp_path / "wrong", units=(3,))


def test_conv_weights_choose_the_rgb_convolution(tmp_path):
    first, later_rgb = rgb_kernels(), nn.Conv2d(3, 2, 5)
    bundle = weights_model(first, nn.Conv2d(3, 4, 1), later_rgb)
    assert run_weights(bundle, tmp_path / "a", layer="2")[0]["kernel_shape"] == [3, 5, 5]  # the layer itself
    assert run_weights(bundle, tmp_path / "b", layer="1")[0]["layer"] == "1"
    bundle = weights_model(nn.Conv2d(1, 3, 3), nn.Conv2d(3, 4, 3), first)
    record = run_weights(bundle, tmp_path / "c", layer="0")[0]  # not over RGB: the first conv that is
    assert record["layer"] == "1" and record["kernel_shape"] == [3, 3, 3] and len(record["kernels"]) == 4
    with pytest.raises(ConvlensError, match=r"'0' is grouped \(groups=3\): each kernel sees 1 channel"):
        run_weights(weights_model(nn.Conv2d(3, 6, 3, groups=3)), tmp_path / "d")
    with pytest.raises(ConvlensError, match="no nn.Conv2d with 3 input channels"):
        run_weights(weights_model(nn.Conv2d(1, 3, 3), nn.Linear(3, 2)), tmp_path / "e")
    assert not convlens.registry.create("visualizer", "conv-weights").needs_data


@pytest.mark.parametrize("name", ["activation-maps", "conv-weights"])
def test_check_component(name):
    check_component("visualizer", name)


def test_both_through_the_cli(images, tmp_path):
    model = ["--model", "tiny-cnn", "--model-blocks", "3", "--model-input-size", "32"]
    out = tmp_path / "maps"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "activation-maps",
            *model,
            "--layer",
            "block2",
            "--data",
            str(images),
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["units"] == list(range(32)) and len(record["images"]) == 1
    assert (out / "activation_maps.json").is_file() and (out / record["images"][0]["picture"]).is_file()
    out = tmp_path / "weights"
    result = CliRunner().invoke(
        cli,
        ["visualize", "conv-weights", *model, "--units", "0-3", "--scale", "per-kernel", "--out", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["layer"] == "block1.0" and record["kernel_shape"] == [3, 3, 3] and len(record["kernels"]) == 4
    assert (out / "grid.png").is_file() and (out / "conv_weights.json").is_file()
    result = CliRunner().invoke(cli, ["visualize", "activation-maps", *model, "--out", str(tmp_path / "none")])
    assert result.exit_code != 0 and "--data" in result.output and "Traceback" not in result.output
