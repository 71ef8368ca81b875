"""The activation-grid visualizer: patch directions and semantic dictionaries against the layer's activations (or an
SAE's codes) computed without it, the grid's layout, determinism, and the CLI."""

import copy
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
from convlens.models.layers import activations_at
from convlens.testing import check_component

SIDE, STRIDE, CHANNELS = 16, 4, 6  # a 4 x 4 grid of patches
GRID = SIDE // STRIDE
FAST = {"steps": 3, "size": 16}


def patch_model() -> ModelBundle:
    """A seeded 4 x 4 stride-4 convolution and a ReLU: each patch of the input gives one cell of a 4 x 4 grid."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, CHANNELS, STRIDE, stride=STRIDE)
        module = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, 3))
    return ModelBundle(module.eval(), (SIDE, SIDE), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), default_layer="1")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, size=(2, SIDE, SIDE, 3), dtype=np.uint8)
    for number, pixels in enumerate(noise):
        Image.fromarray(pixels, "RGB").save(folder / f"image{number}.png")
    return folder


def reference_activations(bundle, path):
    """The layer's activations ``[C, H, W]`` in float64, computed without the visualizer."""
    pixels = Preprocessing.of(bundle).eval_transform(open_rgb(path)).double()
    module = copy.deepcopy(bundle.module).double()
    return activations_at(module, pixels[None], "1").activations["1"][0]


def run_grid(bundle, folder, out, units=(), sae=None, **params):
    visualizer = convlens.registry.create("visualizer", "activation-grid", **{**FAST, **params})
    visualizer.progress = False
    record = visualizer.run(VisualTarget(bundle, "1", units, sae=sae, data=folder), out)
    assert json.loads((out / "activation_grid.json").read_text()) == record
    return record


def direction_vectors(call, count):
    """The vectors of the first ``count`` objectives of a render call (each a single direction term)."""
    terms = [objective.terms for objective in call["objectives"][:count]]
    assert all(len(term) == 1 and term[0].kind == "vector" and term[0].weight == 1.0 for term in terms)
    return torch.stack([term[0].vector for term in terms]).double()


def test_patch_directions_are_the_activation_vectors_and_the_dictionary_their_sorted_units(images, renders, tmp_path):
    bundle = patch_model()
    record = run_grid(bundle, images, tmp_path / "out", max_images=2, dictionary_size=4)
    assert record["unit_kind"] == "channel" and [e["image"] for e in record["images"]] == ["image0.png", "image1.png"]
    assert len(renders) == 2  # one render per image: all its patches (and new dictionary units) in one batch
    rendered_units: set[int] = set()
    for call, entry in zip(renders, record["images"]):
        expected = reference_activations(bundle, images / entry["image"])
        vectors = expected.flatten(1).T  # row-major patches
        assert entry["grid"] == [GRID, GRID]
        assert call["settings"].batch_size == len(call["objectives"]) and call["settings"].steps == 3
        torch.testing.assert_close(direction_vectors(call, GRID * GRID), vectors, rtol=1e-5, atol=1e-6)
        assert [(p["y"], p["x"]) for p in entry["patches"]] == [divmod(n, GRID) for n in range(GRID * GRID)]
        np.testing.assert_allclose([p["norm"] for p in entry["patches"]], vectors.norm(dim=1), rtol=1e-5)

        y, x = divmod(int(vectors.norm(dim=1).argmax()), GRID)
        assert entry["patch"] == pytest.approx(
            {"y": y, "x": x, "norm": float(vectors[y * GRID + x].norm()), "chosen": "largest norm"}
        )
        at_patch = expected[:, y, x]
        order = sorted(range(CHANNELS), key=lambda unit: -float(at_patch[unit]))[:4]
        assert [unit["unit"] for unit in entry["dictionary"]] == order
        np.testing.assert_allclose([unit["activation"] for unit in entry["dictionary"]], at_patch[order], rtol=1e-5)
        values = [unit["activation"] for unit in entry["dictionary"]]
        assert values == sorted(values, reverse=True)
        new = [unit for unit in order if unit not in rendered_units]  # a unit's image is rendered once per run
        assert [o.label for o in call["objectives"][GRID * GRID :]] == [f"channel:{unit}" for unit in new]
        rendered_units |= set(order)
        assert all((tmp_path / "out" / unit["image"]).is_file() for unit in entry["dictionary"])

    kinds = [figure["kind"] for figure in record["figures"]]
    assert kinds.count("activation-grid") == kinds.count("semantic-dictionary") == 2
    unit_figures = [figure["unit"] for figure in record["figures"] if figure["kind"] == "feature-viz"]
    assert sorted(unit_figures) == sorted(rendered_units)
    assert all(figure["unit"] is None for figure in record["figures"] if figure["kind"] != "feature-viz")
    assert all((tmp_path / "out" / figure["path"]).is_file() for figure in record["figures"])
    assert record["summary"].startswith(f"activation grids of 1 ({GRID} x {GRID} patches, channels) for 2 images")


def test_the_grid_has_one_tile_per_patch_in_the_layers_layout_and_the_same_seed_gives_the_same_png(images, tmp_path):
    bundle = patch_model()
    record = run_grid(bundle, images / "image0.png", tmp_path / "a", patch=(1, 2), dictionary_size=2, size=20)
    entry = record["images"][0]
    left, top, right, bottom = entry["grid_box"]
    assert (right - left, bottom - top) == (GRID * 20, GRID * 20)  # tiles of 20 px side by side, no gaps
    with Image.open(tmp_path / "a" / entry["picture"]) as opened:
        picture = np.asarray(opened.convert("RGB"))
    assert picture.shape[1] >= right and picture.shape[0] >= bottom
    for patch in entry["patches"]:
        y, x = top + 20 * patch["y"], left + 20 * patch["x"]
        tile = picture[y : y + 20, x : x + 20]
        with Image.open(tmp_path / "a" / patch["image"]) as saved:
            np.testing.assert_array_equal(tile, np.asarray(saved.convert("RGB")))
    assert entry["patch"]["chosen"] == "given" and (entry["patch"]["y"], entry["patch"]["x"]) == (1, 2)
    at_patch = reference_activations(bundle, images / "image0.png")[:, 1, 2]
    assert [unit["unit"] for unit in entry["dictionary"]] == at_patch.argsort(descending=True, stable=True)[:2].tolist()

    again = run_grid(bundle, images / "image0.png", tmp_path / "b", patch=(1, 2), dictionary_size=2, size=20)
    other = run_grid(bundle, images / "image0.png", tmp_path / "c", patch=(1, 2), dictionary_size=2, size=20, seed=1)
    first = (tmp_path / "a" / entry["picture"]).read_bytes()
    assert (tmp_path / "b" / again["images"][0]["picture"]).read_bytes() == first
    assert (tmp_path / "c" / other["images"][0]["picture"]).read_bytes() != first


def test_with_an_sae_the_patches_are_latent_codes_decoded_into_directions(images, renders, tmp_path):
    bundle = patch_model()
    sae = convlens.registry.create("sae", "relu-l1", input_dim=CHANNELS, latent_dim=10, seed=3).eval()
    sae.set_normalisation(torch.linspace(0.1, 0.6, CHANNELS), 2.0)  # decode(0) is then the mean, not a direction
    record = run_grid(bundle, images / "image1.png", tmp_path / "out", sae=sae, dictionary_size=3)
    entry = record["images"][0]
    assert record["unit_kind"] == "latent"
    activations = reference_activations(bundle, images / "image1.png")
    with torch.no_grad():
        codes = sae.double().encode(activations[None])[0]  # [latents, H, W]
        rows = codes.flatten(1).T
        expected = 2.0 * (rows @ sae.decoder_directions())  # the code's decoder atoms, summed, scaled back
        assert float((sae.decode(codes[None])[0] - expected.T.reshape(CHANNELS, GRID, GRID)).abs().min()) > 0.05
    assert float(rows.max()) > 0
    torch.testing.assert_close(direction_vectors(renders[0], GRID * GRID), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([p["norm"] for p in entry["patches"]], rows.norm(dim=1), rtol=1e-4, atol=1e-6)
    y, x = divmod(int(rows.norm(dim=1).argmax()), GRID)
    assert (entry["patch"]["y"], entry["patch"]["x"]) == (y, x)
    order = codes[:, y, x].argsort(descending=True, stable=True)[:3].tolist()
    assert [unit["unit"] for unit in entry["dictionary"]] == order
    np.testing.assert_allclose([unit["activation"] for unit in entry["dictionary"]], codes[order, y, x], rtol=1e-4)
    assert [o.label for o in renders[0]["objectives"][GRID * GRID :]] == [f"latent:{unit}" for unit in order]
    assert renders[0]["sae"] is sae


def test_units_limit_the_dictionary_and_bad_input_is_one_clear_error(images, tmp_path):
    bundle = patch_model()
    record = run_grid(bundle, images / "image0.png", tmp_path / "units", units=(4, 1), dictionary_size=8)
    assert sorted(unit["unit"] for unit in record["images"][0]["dictionary"]) == [1, 4]
    with pytest.raises(ConvlensError, match=r"patch \(4, 0\) is outside the 4 x 4 grid of layer '1'"):
        run_grid(bundle, images, tmp_path / "bad", patch=(4, 0))
    with pytest.raises(ConvlensError, match="channels 9 out of range"):
        run_grid(bundle, images, tmp_path / "bad", units=(9,))
    with pytest.raises(ConvlensError, match="--data"):
        convlens.registry.create("visualizer", "activation-grid").run(VisualTarget(bundle, "1"), tmp_path / "bad")


def test_check_component():
    check_component("visualizer", "activation-grid", steps=2, size=8)


def test_activation_grid_through_the_cli(images, tmp_path):
    model = ["--model", "tiny-cnn", "--model-blocks", "3", "--model-width", "8", "--model-input-size", "32"]
    out = tmp_path / "grid"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "activation-grid-viz",
            *model,
            "--layer",
            "block2",
            "--data",
            str(images),
            "--steps",
            "2",
            "--size",
            "8",
            "--dictionary-size",
            "3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "activation grids of block2 (8 x 8 patches, channels) for 1 image; dictionary of patch" in result.output
    record = json.loads((out / "activation_grid.json").read_text())
    entry = record["images"][0]
    assert entry["grid"] == [8, 8] and len(entry["patches"]) == 64 and len(entry["dictionary"]) == 3
    assert all((out / path).is_file() for path in (entry["picture"], entry["dictionary_picture"]))
    failed = CliRunner().invoke(
        cli,
        [
            "visualize",
            "activation-grid",
            *model,
            "--layer",
            "block2",
            "--data",
            str(images),
            "--steps",
            "2",
            "--patch",
            "9,9",
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert failed.exit_code != 0 and "Traceback" not in failed.output
    assert "patch (9, 9) is outside the 8 x 8 grid of layer 'block2'" in failed.output
