"""Dataset examples (streaming top-k / bottom-k against brute force), receptive fields, and unit ranking."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import convlens
from convlens import ConvlensError, ModelBundle, VisualTarget
from convlens.cli import cli
from convlens.models.layers import receptive_field
from convlens.plugins.visualizers.dataset_examples import RunningExamples
from convlens.sae.base import save_sae
from convlens.units.ranking import rank_units


def identity_model(size: int = 6) -> ModelBundle:
    """Layer "0" is a 1x1 convolution that copies the three colour channels: activations are pixels / 255."""
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3)[:, :, None, None])
    module = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return ModelBundle(module, (size, size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), default_layer="0")


@pytest.fixture
def tied_images(tmp_path):
    """24 images of 6 x 6 px whose pixels take 4 values only (but for one), so that many images tie on a channel's
    maximum."""
    generator = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = generator.choice(np.array([0, 60, 120, 200], dtype=np.uint8), size=(24, 6, 6, 3), p=[0.4, 0.3, 0.2, 0.1])
    pixels[5] = 255  # the brightest image, and every position ties inside it: its peak is the first one
    pixels[7, :, :, 1] = 0  # an image where channel 1 is zero everywhere
    for number, image in enumerate(pixels):
        Image.fromarray(image, "RGB").save(folder / f"{number:02d}.png")
    return folder, pixels.astype(np.float64) / 255


def brute_force(maps: np.ndarray, k: int, position=None):
    """Per unit: (positions, values, peaks) of the top-k and bottom-k images, ties to the lower image index."""
    images, units = maps.shape[:2]
    flat = maps.reshape(images, units, -1)
    if position is None:
        values, where = flat.max(axis=2), flat.argmax(axis=2)
    else:
        where = np.full((images, units), position[0] * maps.shape[3] + position[1])
        values = maps[:, :, position[0], position[1]]
    result = {}
    for unit in range(units):
        top = np.lexsort((np.arange(images), -values[:, unit]))[:k]
        bottom = np.lexsort((np.arange(images), values[:, unit]))[:k]
        result[unit] = {
            side: [(int(i), float(values[i, unit]), divmod(int(where[i, unit]), maps.shape[3])) for i in order]
            for side, order in (("top", top), ("bottom", bottom))
        }
    return result


def as_tuples(record_unit, side):
    return [(e["position"], e["value"], tuple(e["peak"])) for e in record_unit[side]]


@pytest.mark.parametrize("batch_size, position", [(5, None), (24, None), (7, (2, 3))])
def test_streaming_examples_equal_brute_force_with_ties(tied_images, tmp_path, batch_size, position):
    folder, pixels = tied_images
    maps = pixels.transpose(0, 3, 1, 2)  # [images, channels, 6, 6]
    visualizer = convlens.registry.create(
        "visualizer", "dataset-examples", k=4, batch_size=batch_size, position=position, tile=16
    )
    record = visualizer.run(VisualTarget(identity_model(), "0", units=(0, 1, 2), data=folder), tmp_path / "out")
    expected = brute_force(maps, 4, position)
    for unit_record in record["units"]:
        unit = unit_record["unit"]
        for side in ("top", "bottom"):
            got = as_tuples(unit_record, side)
            assert [g[0] for g in got] == [e[0] for e in expected[unit][side]], (unit, side)
            np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected[unit][side]], atol=1e-6)
            assert [g[2] for g in got] == [e[2] for e in expected[unit][side]], (unit, side)
            assert len({g[0] for g in got}) == len(got)  # each image at most once per unit
    assert record["images"] == 24 and record["unit_kind"] == "channel"
    top_of_unit1 = record["units"][1]["top"]
    if position is None:
        assert top_of_unit1[0]["position"] == 5 and top_of_unit1[0]["peak"] == [0, 0]  # ties inside an image
        assert 7 in [e["position"] for e in record["units"][1]["bottom"]]
    for unit_record in record["units"]:
        assert (tmp_path / "out" / unit_record["montage"]).is_file()
        for example in unit_record["top"] + unit_record["bottom"]:
            with Image.open(tmp_path / "out" / example["crop"]) as crop:
                assert crop.size == (16, 16)
    assert json.loads((tmp_path / "out" / "dataset_examples.json").read_text())["units"] == record["units"]
    assert json.loads((tmp_path / "out" / "dataset_examples.json").read_text())["figures"] == record["figures"]
    expected_figures = [
        (u["unit"], kind, path)
        for u in record["units"]
        for kind, path in [("montage", u["montage"])]
        + [(side, e["overlay"]) for side in ("top", "bottom") for e in u[side]]
    ]
    assert [(f["unit"], f["kind"], f["path"]) for f in record["figures"]] == expected_figures
    assert all((tmp_path / "out" / f["path"]).is_file() for f in record["figures"])
    first_top = next(f for f in record["figures"] if f["kind"] == "top")
    example = record["units"][0]["top"][0]
    assert first_top["caption"] == (
        f"top 1: {example['image']}, value {example['value']:.3g}, peak ({example['peak'][0]}, {example['peak'][1]})"
    )


def test_examples_of_sae_latents_equal_brute_force(tied_images, tmp_path):
    folder, pixels = tied_images
    sae = convlens.registry.create("sae", "relu-l1", input_dim=3, latent_dim=6, seed=2).eval()
    with torch.no_grad():
        latents = sae.encode(torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()).double().numpy()
    visualizer = convlens.registry.create("visualizer", "dataset-examples", k=3, batch_size=10, tile=16)
    record = visualizer.run(VisualTarget(identity_model(), "0", units=(1, 4), sae=sae, data=folder), tmp_path / "o")
    expected = brute_force(latents[:, [1, 4]], 3)
    assert record["unit_kind"] == "latent"
    for column, unit_record in enumerate(record["units"]):
        got = as_tuples(unit_record, "top")
        assert [g[0] for g in got] == [e[0] for e in expected[column]["top"]]
        np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected[column]["top"]], atol=1e-5)


def test_running_examples_memory_depends_on_units_and_k_not_images():
    running = RunningExamples(units=5, k=3)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, 400, 40):
        scores = torch.randn(40, 5, generator=generator)
        running.update(
            scores, torch.arange(start, start + 40), torch.zeros(40, 5, 2, dtype=torch.long), torch.zeros(40, 5, 2, 2)
        )
    for ranked in running.sides.values():
        assert ranked.values.shape == (5, 3) and ranked.maps.shape == (5, 3, 2, 2)


def test_receptive_fields_match_the_architecture():
    tiny = convlens.registry.create("model", "tiny-cnn", blocks=4, width=8).module
    # conv 3x3 then max-pool 2 per block: sizes 4, 10, 22, 38 (the last block does not pool), strides 2, 4, 8, 8
    fields = [receptive_field(tiny, f"block{b}", (64, 64)) for b in (1, 2, 3, 4)]
    assert [f.size for f in fields] == [(4, 4), (10, 10), (22, 22), (38, 38)]
    assert [f.stride for f in fields] == [(2.0, 2.0), (4.0, 4.0), (8.0, 8.0), (8.0, 8.0)]
    resnet = convlens.registry.create("model", "resnet18-smooth", input_size=224).module
    assert receptive_field(resnet, "layer1", (224, 224)).size == (43, 43)  # 7x7/2 conv, 3x3/2 pool, four 3x3 convs
    block2 = fields[1]
    assert block2.box(0, 0) == (0, 0, 10, 10)  # clipped at the image's corner, still 10 px
    top, left, bottom, right = block2.box(8, 8)
    assert (bottom - top, right - left) == (10, 10) and top <= 8 * 4 + 1 < bottom


def test_dataset_examples_cli_with_feature_visualisation_and_clear_errors(tmp_path):
    from convlens.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", n=24, size=32, seed=0)
    (tmp_path / "shapes" / "images" / "circle" / "broken.png").write_bytes(b"not a png")
    model = ["--model", "tiny-cnn", "--model-blocks", "3", "--model-width", "8", "--model-input-size", "32"]
    feature_viz = CliRunner().invoke(
        cli,
        [
            "visualize",
            "feature-viz",
            *model,
            "--layer",
            "block2",
            "--units",
            "0-2",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "fv"),
        ],
    )
    assert feature_viz.exit_code == 0, feature_viz.output
    out = tmp_path / "examples"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "dataset-examples",
            *model,
            "--layer",
            "block2",
            "--units",
            "0-2",
            "--data",
            str(tmp_path / "shapes"),
            "--k",
            "3",
            "--feature-viz",
            str(tmp_path / "fv"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "top and bottom 3 of 24 images for 3 channels" in result.output
    assert "skipped 1 unreadable file" in result.output
    record = json.loads((out / "dataset_examples.json").read_text())
    assert record["receptive_field"] == {"size": [10, 10], "stride": [4.0, 4.0], "grid": [8, 8], "covers_input": False}
    assert [u["unit"] for u in record["units"]] == [0, 1, 2] and record["skipped"][0]["reason"] == "not an image"
    with Image.open(out / record["units"][0]["montage"]) as montage:
        assert montage.width > 4 * 96
    errors = {
        "needs units": ["visualize", "dataset-examples", *model, "--data", str(tmp_path / "shapes")],
        "outside the 8 x 8 map": [
            "visualize",
            "dataset-examples",
            *model,
            "--layer",
            "block2",
            "--units",
            "0",
            "--data",
            str(tmp_path / "shapes"),
            "--position",
            "9,9",
        ],
        "cannot read": [
            "visualize",
            "dataset-examples",
            *model,
            "--units",
            "0",
            "--data",
            str(tmp_path / "shapes"),
            "--feature-viz",
            str(tmp_path),
        ],
    }
    for message, arguments in errors.items():
        failed = CliRunner().invoke(cli, [*arguments, "--out", str(tmp_path / "bad")])
        assert failed.exit_code != 0 and message in failed.output and "Traceback" not in failed.output


def test_nan_activations_name_the_image(tied_images, tmp_path):
    folder, _ = tied_images
    bundle = identity_model()
    with torch.no_grad():
        bundle.module[0].weight[1, 1] = float("nan")
    visualizer = convlens.registry.create("visualizer", "dataset-examples", k=2)
    with pytest.raises(ConvlensError, match=r"NaN or infinite values for image 00\.png"):
        visualizer.run(VisualTarget(bundle, "0", units=(0, 1), data=folder), tmp_path / "o")


def test_rank_units_equals_a_float64_computation_and_counts_active_units(tmp_path):
    bundle = convlens.registry.create("model", "tiny-cnn", blocks=3, input_size=32, width=8)
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    sae = convlens.registry.create("sae", "topk", input_dim=32, latent_dim=64, k=3, seed=0).eval()
    result = rank_units(bundle, image, "block3", sae=sae, top=4)
    with torch.no_grad():
        activations = bundle.module[:3](image[None])[0].double()
        latents = sae.encode(activations.float()[None])[0].double()
    for key, maps in (("channels", activations), ("latents", latents)):
        magnitudes = maps.abs().sum(dim=(1, 2))
        ranked = result[key]
        expected = sorted(range(len(magnitudes)), key=lambda u: (-float(magnitudes[u]), u))
        assert [r["unit"] for r in ranked["top"]] == expected[:4]
        assert [r["unit"] for r in ranked["least"]] == sorted(
            range(len(magnitudes)), key=lambda u: (float(magnitudes[u]), u)
        )[:4]
        np.testing.assert_allclose([r["magnitude"] for r in ranked["top"]], magnitudes[expected[:4]].numpy(), rtol=1e-6)
        assert ranked["active"] == int((maps.abs().flatten(1) > 0).any(dim=1).sum())
        assert ranked["top_share"] == pytest.approx(float(magnitudes[expected[:4]].sum() / magnitudes.sum()))
    # a TopK SAE keeps 3 latents per position: at most 3 x 16 positions of 64 latents can be active
    assert result["latents"]["active"] <= 48

    image_path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image_path)
    save_sae(sae, tmp_path / "sae.safetensors", name="topk", params={"input_dim": 32, "latent_dim": 64, "k": 3})
    model = ["--model", "tiny-cnn", "--model-blocks", "3", "--model-width", "8", "--model-input-size", "32"]
    cli_result = CliRunner().invoke(
        cli,
        [
            "rank-units",
            *model,
            "--layer",
            "block3",
            "--image",
            str(image_path),
            "--sae",
            str(tmp_path / "sae.safetensors"),
            "--top",
            "3",
            "--out",
            str(tmp_path / "rank"),
            "--json",
        ],
    )
    assert cli_result.exit_code == 0, cli_result.output
    ranked = json.loads(cli_result.output)
    assert len(ranked["channels"]["top"]) == 3 and ranked["latents"]["units"] == 64
    assert (tmp_path / "rank" / "top-latents.png").is_file() and (tmp_path / "rank" / "ranking.json").is_file()
    text = CliRunner().invoke(cli, ["rank-units", *model, "--layer", "block3", "--image", str(image_path)])
    assert text.exit_code == 0 and re.search(r"\d+ of 32 channels active", text.output)
    mismatch = CliRunner().invoke(
        cli,
        [
            "rank-units",
            *model,
            "--layer",
            "block2",
            "--image",
            str(image_path),
            "--sae",
            str(tmp_path / "sae.safetensors"),
        ],
    )
    assert mismatch.exit_code != 0 and "32-dimensional inputs" in mismatch.output
