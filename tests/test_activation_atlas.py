"""The activation-atlas visualizer: planted clusters against a float64 PCA (scikit-learn), cells and means against a
direct computation from the saved points, the atlas's pixels, SAE codes, determinism, and the CLI."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import convlens
from convlens import ConvlensError, ModelBundle, VisualTarget
from convlens.cli import cli
from convlens.data.images import Preprocessing, open_rgb, scan_images
from convlens.data.shapes import write_shapes
from convlens.plugins.visualizers.activation_atlas import MARGIN, resolve_projection
from convlens.plugins.visualizers.feature_viz import render as feature_viz_render
from convlens.testing import check_component

SIDE = 16  # input pixels; the 1x1 conv keeps them, so the layer's map is 16 x 16
GRID = 4
CELL = 16  # the size parameter: pixels of each inverted cell
FAST = {"grid": GRID, "min_count": 2, "projection": "pca", "steps": 3, "size": CELL, "render_batch": 5}


def cluster_model() -> ModelBundle:
    """A 1x1 conv with four known channels of the pixel (r, g, b) in [0, 1]: 2r - 2b (red against blue: the two
    clusters), g (spread within a cluster), r + b, and the constant 0.5."""
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0], conv.weight[0, 2, 0, 0] = 2.0, -2.0
        conv.weight[1, 1, 0, 0] = 1.0
        conv.weight[2, 0, 0, 0], conv.weight[2, 2, 0, 0] = 1.0, 1.0
        conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    module = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    return ModelBundle(module, (SIDE, SIDE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), default_layer="0")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 reddish and 12 bluish images (alternating), with green noise over [0, 160] and a little noise on red and
    blue per pixel."""
    folder = tmp_path_factory.mktemp("clusters")
    rng = np.random.default_rng(0)
    for number in range(24):
        red = number % 2 == 0
        pixels = np.zeros((SIDE, SIDE, 3), dtype=np.float64)
        pixels[..., 0] = (200 if red else 30) + rng.uniform(-8, 8, (SIDE, SIDE))
        pixels[..., 2] = (30 if red else 200) + rng.uniform(-8, 8, (SIDE, SIDE))
        pixels[..., 1] = rng.uniform(0, 160, (SIDE, SIDE))
        Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB").save(folder / f"image{number:02d}.png")
    return folder


def run_atlas(bundle, folder, out, sae=None, **params):
    visualizer = convlens.registry.create("visualizer", "atlas", **{**FAST, **params})
    visualizer.progress = False
    record = visualizer.run(VisualTarget(bundle, "0", sae=sae, data=folder), out)
    assert json.loads((out / "activation_atlas.json").read_text()) == record
    return record, load_file(out / "points.safetensors")


def layer_vector(bundle, path, y, x):
    """The layer's channels at (y, x) for one image, computed without the visualizer."""
    pixels = Preprocessing.of(bundle).eval_transform(open_rgb(path))
    with torch.no_grad():
        return bundle.module[0](pixels[None])[0, :, y, x]


def cells_of(coordinates, grid):
    """The documented cell rule, in float64: column from x, row from y with row 0 at the top (largest y)."""
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    bins = np.minimum(np.floor((coordinates - low) / (high - low) * grid).astype(int), grid - 1)
    return grid - 1 - bins[:, 1], bins[:, 0]


@pytest.fixture(scope="module")
def atlas(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    record, points = run_atlas(cluster_model(), images, out)
    return out, record, points


def test_planted_clusters_land_where_a_float64_pca_puts_them(images, atlas):
    from sklearn.decomposition import PCA

    out, record, points = atlas
    bundle, index = cluster_model(), scan_images(images)
    vectors, coordinates = points["vectors"].double().numpy(), points["coordinates"].numpy()
    assert record["projection"]["method"] == "pca" and record["images"] == 24 and len(vectors) == 24
    assert points["images"].tolist() == list(range(24))
    for image, (y, x), vector in zip(points["images"].tolist(), points["positions"].tolist(), points["vectors"]):
        assert 0 <= y < SIDE and 0 <= x < SIDE
        torch.testing.assert_close(vector, layer_vector(bundle, index.paths[image], y, x), rtol=1e-5, atol=1e-6)

    expected = PCA(n_components=2, svd_solver="full").fit_transform(vectors)
    signs = np.sign((coordinates * expected).sum(axis=0))
    assert np.abs(coordinates * signs - expected).max() <= 1e-6 * np.abs(expected).max()
    # the sign convention: PC1 is mostly channel 0 (2r - 2b) taken positive, so red images lie at large x
    assert signs[0] == 1.0
    red = np.arange(24) % 2 == 0
    rows, columns = cells_of(coordinates, GRID)
    assert (columns[red] == GRID - 1).all() and (columns[~red] == 0).all()
    assert record["bounds"]["x"] == pytest.approx([coordinates[:, 0].min(), coordinates[:, 0].max()], rel=1e-12)
    assert points["cells"].numpy().tolist() == np.stack([rows, columns], axis=1).tolist()
    for entry, point in zip(record["points"], points["coordinates"].tolist()):
        assert entry["xy"] == point and entry["image"] == index.relative(index.paths[entry["index"]])

    counts = np.zeros((GRID, GRID), dtype=int)
    np.add.at(counts, (rows, columns), 1)
    inverted = [(row, column) for row in range(GRID) for column in range(GRID) if counts[row, column] >= 2]
    assert [(cell["row"], cell["column"]) for cell in record["cells"]] == inverted
    assert {column for _, column in inverted} == {0, GRID - 1}
    for number, cell in enumerate(record["cells"]):
        members = (rows == cell["row"]) & (columns == cell["column"])
        mean = vectors[members].mean(axis=0)
        assert cell["count"] == counts[cell["row"], cell["column"]]
        np.testing.assert_allclose(points["cell_means"][number].numpy(), mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(points["cell_directions"][number].numpy(), mean, rtol=1e-6)
        assert [unit["unit"] for unit in cell["top_units"]] == np.argsort(-mean, kind="stable")[:4].tolist()
        width = np.ptp(coordinates, axis=0) / GRID
        low = coordinates.min(axis=0)
        assert cell["centre"] == pytest.approx(
            [low[0] + (cell["column"] + 0.5) * width[0], low[1] + (GRID - 1 - cell["row"] + 0.5) * width[1]], rel=1e-9
        )
        assert (out / cell["image"]).is_file()
    assert record["summary"] == f"atlas of 24 activations (PCA) on a 4 x 4 grid: {len(inverted)} cells inverted"
    kinds = [figure["kind"] for figure in record["figures"]]
    assert kinds == ["atlas", "projection"] + ["atlas-cell"] * len(inverted)
    assert all(figure["unit"] is None and (out / figure["path"]).is_file() for figure in record["figures"])


def test_atlas_png_places_cells_and_shades_them_by_count(atlas, images, tmp_path):
    out, record, _ = atlas
    atlas_png = np.asarray(Image.open(out / "atlas.png").convert("RGB"))
    side = GRID * CELL + 2 * MARGIN
    assert atlas_png.shape == (side, side, 3) and record["layout"]["width"] == side
    assert record["density"]["mode"] == "alpha"
    most = max(cell["count"] for cell in record["cells"])

    def box(row, column):
        top, left = MARGIN + row * CELL, MARGIN + column * CELL
        return atlas_png[top : top + CELL, left : left + CELL]

    filled = {(cell["row"], cell["column"]) for cell in record["cells"]}
    for row in range(GRID):
        for column in range(GRID):
            if (row, column) not in filled:
                assert (box(row, column) == 255).all()
    assert (atlas_png[:MARGIN] == 255).all() and (atlas_png[:, -MARGIN:] == 255).all()
    for cell in record["cells"]:
        alpha = 0.25 + 0.75 * np.log1p(cell["count"]) / np.log1p(most)
        assert cell["alpha"] == pytest.approx(alpha)
        picture = np.asarray(Image.open(out / cell["image"]).convert("RGB"), dtype=np.float64)
        assert picture.shape == (CELL, CELL, 3)
        np.testing.assert_array_equal(box(cell["row"], cell["column"]), np.rint(alpha * picture + (1 - alpha) * 255))
        assert (box(cell["row"], cell["column"]) != 255).any()
    scatter = Image.open(out / "projection.png")
    assert scatter.width > 400 and scatter.height > 400

    sized, _ = run_atlas(cluster_model(), images, tmp_path / "sized", density="size")
    picture = np.asarray(Image.open(tmp_path / "sized" / "atlas.png").convert("RGB"))
    smallest = min(sized["cells"], key=lambda cell: cell["count"])
    assert smallest["side"] == max(1, round(CELL * (0.25 + 0.75 * np.log1p(smallest["count"]) / np.log1p(most))))
    assert smallest["side"] < CELL
    top, left = MARGIN + smallest["row"] * CELL, MARGIN + smallest["column"] * CELL
    assert (picture[top, left : left + CELL] == 255).all()  # the rim around a shrunk image stays white


def test_same_seed_same_atlas_other_seed_other_positions(images, atlas, tmp_path):
    out, record, points = atlas
    again, again_points = run_atlas(cluster_model(), images, tmp_path / "again", batch_size=5)
    assert again["params"]["batch_size"] == 5
    assert {**again, "params": None} == {**record, "params": None}  # another batch size draws the same positions
    for name in ("atlas.png", "projection.png", "points.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    assert all(
        (tmp_path / "again" / c["image"]).read_bytes() == (out / c["image"]).read_bytes() for c in record["cells"]
    )
    other, other_points = run_atlas(cluster_model(), images, tmp_path / "other", seed=1)
    assert not torch.equal(other_points["positions"], points["positions"])
    subset, subset_points = run_atlas(cluster_model(), images, tmp_path / "subset", max_images=10, min_count=1)
    chosen = subset_points["images"].tolist()
    assert len(chosen) == 10 == subset["images"] and chosen == sorted(set(chosen)) and chosen != list(range(10))
    torch.testing.assert_close(subset_points["positions"], points["positions"][chosen], rtol=0, atol=0)
    assert run_atlas(cluster_model(), images, tmp_path / "subset2", max_images=10, min_count=1)[0] == subset


def test_sae_codes_are_projected_and_cell_means_decoded_before_inversion(images, tmp_path, monkeypatch):
    bundle, index = cluster_model(), scan_images(images)
    sae = convlens.registry.create("sae", "relu-l1", input_dim=4, latent_dim=6, seed=2).eval()
    with torch.no_grad():  # latents 0-3: red, blue, green and its absence; 4 and 5 stay random
        sae.encoder[:4] = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, -2.0, 0, 0]])
        sae.pre_bias.zero_()
        sae.latent_bias[:4] = torch.tensor([0.0, 0.0, -0.2, 0.3])
    sae.set_normalisation(torch.tensor([0.1, 0.3, 0.9, 0.5]), 2.0)
    inverted = []
    original = feature_viz_render.render

    def spy(module, layer, objectives, settings, **kwargs):
        inverted.extend(term.vector for objective in objectives for term in objective.terms)
        return original(module, layer, objectives, settings, **kwargs)

    monkeypatch.setattr(feature_viz_render, "render", spy)
    record, points = run_atlas(bundle, images, tmp_path / "sae", sae=sae, min_count=1)
    assert record["vectors"]["kind"] == "sae-latents" and points["vectors"].shape == (24, 6)
    for image, (y, x), code in zip(points["images"].tolist(), points["positions"].tolist(), points["vectors"]):
        pixels = Preprocessing.of(bundle).eval_transform(open_rgb(index.paths[image]))
        with torch.no_grad():
            expected = sae.encode(bundle.module[0](pixels[None]))[0, :, y, x]
        torch.testing.assert_close(code, expected, rtol=1e-5, atol=1e-6)
    rows, columns = cells_of(points["coordinates"].numpy(), GRID)
    codes = points["vectors"].double().numpy()
    assert len(inverted) == len(record["cells"]) > 1
    for number, cell in enumerate(record["cells"]):
        mean = codes[(rows == cell["row"]) & (columns == cell["column"])].mean(axis=0)
        np.testing.assert_allclose(points["cell_means"][number].numpy(), mean, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            code = torch.tensor(mean, dtype=torch.float32)[None]
            decoded = (sae.decode(code) - sae.decode(torch.zeros_like(code)))[0]
        assert decoded.shape == (4,)
        torch.testing.assert_close(points["cell_directions"][number], decoded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(inverted[number], decoded, rtol=1e-5, atol=1e-6)
        assert [unit["unit"] for unit in cell["top_units"]] == np.argsort(-mean, kind="stable")[:5].tolist()
        assert "top latents" in record["figures"][2 + number]["caption"]


def test_projection_choices_and_errors(images, tmp_path):
    has_umap = importlib.util.find_spec("umap") is not None
    assert resolve_projection("auto") == ("umap" if has_umap else "pca")
    if not has_umap:
        with pytest.raises(ConvlensError, match=r"umap-learn.*convlens\[atlas\]"):
            run_atlas(cluster_model(), images, tmp_path / "umap", projection="umap")
        assert not (tmp_path / "umap" / "points.safetensors").exists()  # refused before any work
    if importlib.util.find_spec("sklearn") is not None:
        record, points = run_atlas(cluster_model(), images, tmp_path / "tsne", projection="tsne", steps=1)
        assert record["projection"]["method"] == "tsne" and record["summary"].startswith(
            "atlas of 24 activations (t-SNE) on a 4 x 4 grid"
        )
        assert torch.isfinite(points["coordinates"]).all() and sum(c["count"] for c in record["cells"]) <= 24
    atlas = convlens.registry.create("visualizer", "activation-atlas")
    with pytest.raises(ConvlensError, match=r"\[N, C, H, W\]; layer '2' gives \(24, 4\)"):
        atlas.run(VisualTarget(cluster_model(), "2", data=images), tmp_path / "flat")
    with pytest.raises(ConvlensError, match="--data"):
        atlas.run(VisualTarget(cluster_model(), "0"), tmp_path)


def test_check_component():
    check_component("visualizer", "activation-atlas")


def test_atlas_through_the_cli(tmp_path):
    data = tmp_path / "shapes"
    write_shapes(data, n=16, size=32, seed=0)
    out = tmp_path / "out"
    base = [
        "visualize",
        "activation-atlas",
        "--model",
        "tiny-cnn",
        "--model-blocks",
        "3",
        "--model-input-size",
        "32",
        "--layer",
        "block3",
        "--data",
        str(data / "images"),
        "--grid",
        "4",
        "--steps",
        "5",
        "--size",
        "16",
        "--min-count",
        "1",
        "--projection",
        "pca",
    ]
    result = CliRunner().invoke(cli, [*base, "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "activation_atlas.json").read_text())
    assert record["images"] == 16 and record["grid"] == 4 and record["params"]["steps"] == 5
    assert record["summary"] in result.output and result.output.startswith("activation-atlas: block3 in ")
    assert len(list((out / "cells").glob("*.png"))) == len(record["cells"]) >= 2
    assert (out / "atlas.png").is_file() and (out / "projection.png").is_file() and (out / "config.json").is_file()
    assert Image.open(out / "atlas.png").size == (4 * 16 + 2 * MARGIN,) * 2
    if importlib.util.find_spec("umap") is None:
        failed = CliRunner().invoke(cli, [*base[:-1], "umap", "--out", str(tmp_path / "umap")])
        assert failed.exit_code != 0 and "Traceback" not in failed.output
        assert "umap-learn" in failed.output and "pip install 'convlens[atlas]'" in failed.output
        assert len(failed.output.strip().splitlines()) == 1
