"""Unit statistics (firing, magnitude share, dead units, concept selectivity) against brute force on planted units."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F

import convlens
from convlens import ConvlensError, ModelBundle
from convlens.data.concepts import load_concepts
from convlens.data.images import Preprocessing, SkippedImageWarning, open_rgb, scan_images
from convlens.data.shapes import write_shapes
from convlens.models.layers import activations_at
from convlens.units.statistics import auroc, unit_statistics

FIELDS = ("frequency", "image_frequency", "mean", "max", "mean_image_max", "max_image_mean", "share")


class Planted(nn.Module):
    """Five known channels on a 4 x 4 pooled grid: 0 redness (red minus the larger of green and blue, clipped at 0),
    1 constant 0 (dead), 2 constant -1 (dead), 3 green minus blue (signed), 4 redness - 2 (dead, yet ordered by
    redness)."""

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        redness = (r - torch.maximum(g, b)).relu()
        channels = torch.stack([redness, torch.zeros_like(r), -torch.ones_like(r), g - b, redness - 2], 1)
        return F.avg_pool2d(channels, 4)


def planted_model() -> ModelBundle:
    module = nn.Sequential(
        OrderedDict(feat=Planted(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(5, 8))
    )
    return ModelBundle(module.eval(), (32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), default_layer="feat")


def copying_sae():
    """A relu-l1 SAE whose latent 0 copies channel 0 (redness), latent 1 channel 3 (green - blue, clipped at 0) and
    latent 2 its negative (blue - green: both blue and magenta); the others are random."""
    sae = convlens.registry.create("sae", "relu-l1", input_dim=5, latent_dim=6, seed=3).eval()
    with torch.no_grad():
        sae.encoder[0] = torch.tensor([1.0, 0, 0, 0, 0])
        sae.encoder[1] = torch.tensor([0, 0, 0, 1.0, 0])
        sae.encoder[2] = torch.tensor([0, 0, 0, -1.0, 0])
        sae.pre_bias.zero_()
        sae.latent_bias.copy_(torch.tensor([0, 0, 0, -0.2, 0.05, 0]))
    return sae


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, n=96, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def reference(shapes):
    """Maps of every image, computed one image at a time, and the concept records, in index order."""
    index = scan_images(shapes)
    bundle = planted_model()
    transform = Preprocessing.of(bundle).eval_transform
    maps = torch.cat(
        [
            activations_at(bundle.module, transform(open_rgb(path))[None], "feat").activations["feat"]
            for path in index.paths
        ]
    )
    concepts = load_concepts(shapes)
    record_of = concepts.positions_in(index)
    records = [concepts.images[record_of[i]] for i in range(len(index))]
    return index, maps, records


@pytest.fixture(scope="module")
def result(shapes, reference, tmp_path_factory):
    index, _, _ = reference
    out = tmp_path_factory.mktemp("statistics")
    record = unit_statistics(
        planted_model(),
        "feat",
        index,
        out,
        saes={"l1": copying_sae()},
        concepts=load_concepts(shapes),
        batch_size=10,
        progress=False,
    )
    return record, out


def brute_force(maps: np.ndarray) -> dict[str, np.ndarray]:
    flat = maps.astype(np.float64).reshape(maps.shape[0], maps.shape[1], -1)
    peaks = flat.max(axis=2)
    magnitude = np.abs(flat).sum(axis=(0, 2))
    return {
        "frequency": (flat > 0).mean(axis=(0, 2)),
        "image_frequency": (peaks > 0).mean(axis=0),
        "mean": flat.mean(axis=(0, 2)),
        "max": peaks.max(axis=0),
        "mean_image_max": peaks.mean(axis=0),
        "max_image_mean": flat.mean(axis=2).max(axis=0),
        "share": magnitude / magnitude.sum(),
        "dead": ~(flat > 0).any(axis=(0, 2)),
        "peaks": peaks,
    }


def assert_matches(group: dict, expected: dict) -> None:
    for field in FIELDS:
        np.testing.assert_allclose(
            [u[field] for u in group["units"]], expected[field], rtol=1e-9, atol=1e-12, err_msg=field
        )
    assert [u["dead"] for u in group["units"]] == expected["dead"].tolist()
    order = np.lexsort((np.arange(len(expected["share"])), -expected["share"]))
    assert [group["units"][unit]["rank"] for unit in order] == list(range(1, len(order) + 1))
    assert group["summary"]["units"] == group["count"] == len(group["units"]) == len(expected["share"])
    assert group["summary"]["dead"] == int(expected["dead"].sum())


def test_auroc_equals_sklearn_with_ties():
    generator = np.random.default_rng(1)
    scores = generator.integers(0, 6, size=(200, 7)).astype(np.float32)  # few distinct values: many ties
    scores[:, 3] = 2.0  # a constant unit: every pair ties
    positive = generator.random(200) < 0.3
    got = auroc(torch.from_numpy(scores), torch.from_numpy(positive))
    assert got.dtype == torch.float64 and got.shape == (7,)
    expected = [roc_auc_score(positive, scores[:, unit]) for unit in range(7)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    assert got[3] == 0.5
    flipped = auroc(torch.from_numpy(-scores), torch.from_numpy(positive))
    np.testing.assert_allclose(flipped.numpy(), 1 - np.array(expected), atol=1e-12)


def test_auroc_is_nan_when_one_side_is_empty():
    scores = torch.randn(10, 3)
    assert torch.isnan(auroc(scores, torch.ones(10, dtype=torch.bool))).all()
    assert torch.isnan(auroc(scores, torch.zeros(10, dtype=torch.bool))).all()
    with pytest.raises(ConvlensError, match="same images"):
        auroc(scores, torch.ones(9, dtype=torch.bool))


def test_channel_statistics_equal_brute_force(result, reference):
    record, out = result
    index, maps, _ = reference
    expected = brute_force(maps.numpy())
    cnn = record["groups"]["cnn"]
    assert cnn["kind"] == "channel" and cnn["count"] == 5
    assert record["images"] == len(index) == 96 and record["positions_per_image"] == 64
    assert_matches(cnn, expected)
    units = cnn["units"]
    assert units[1]["dead"] and units[2]["dead"] and not units[0]["dead"] and not units[3]["dead"]
    assert units[1]["max"] == 0.0 and units[2]["max"] == -1.0 and units[2]["mean"] == -1.0
    assert units[1]["share"] == 0.0 and units[2]["share"] > units[0]["share"]  # |-1| everywhere outweighs redness
    assert json.loads((out / "statistics.json").read_text()) == record
    tensors = load_file(out / "maxima.safetensors")
    assert tensors["positions"].dtype == torch.int64 and tensors["positions"].tolist() == list(range(96))
    assert tensors["maxima.cnn"].dtype == torch.float32
    np.testing.assert_array_equal(tensors["maxima.cnn"].numpy(), expected["peaks"].astype(np.float32))


def test_red_channel_is_selective_for_red_and_dead_channels_are_not(result, reference):
    record, _ = result
    _, maps, records = reference
    assert record["concepts"] == {
        "shape": list(convlens.data.shapes.SHAPES),
        "colour": list(convlens.data.shapes.COLOURS),
        "texture": list(convlens.data.shapes.TEXTURES),
    }
    red = np.array([r["colour"] == "red" for r in records])
    assert record["concept_counts"]["colour"]["red"] == red.sum() > 3
    units = record["groups"]["cnn"]["units"]
    assert units[0]["best_concept"]["attribute"] == "colour" and units[0]["best_concept"]["value"] == "red"
    peaks = maps.flatten(2).amax(2)[:, 0].numpy()
    assert units[0]["best_concept"]["auroc"] == pytest.approx(roc_auc_score(red, peaks), abs=1e-12)
    assert units[0]["best_concept"]["auroc"] > 0.97
    assert units[0]["selective"] == "colour=red"
    for dead in (units[1], units[2]):
        assert dead["selective"] is None
        assert dead["best_concept"]["auroc"] == 0.5  # a constant unit separates nothing
    assert units[4]["dead"] and units[4]["max"] < -1
    assert units[4]["best_concept"] == units[0]["best_concept"]  # ordered like redness, but never fires
    assert units[4]["selective"] is None
    summary = record["groups"]["cnn"]["summary"]
    selective = [u["selective"] for u in units if u["selective"]]
    assert summary["selective"] == len(selective) >= 1
    assert summary["selective_by_attribute"] == {
        attribute: sum(s.startswith(f"{attribute}=") for s in selective) for attribute in ("shape", "colour", "texture")
    }


@pytest.mark.parametrize("group", ["cnn", "l1"])
def test_selectivity_equals_sklearn_for_every_unit(result, reference, group):
    record, out = result
    _, _, records = reference
    peaks = load_file(out / "maxima.safetensors")[f"maxima.{group}"].numpy()
    threshold = record["selective_auroc"]
    assert threshold == 0.9
    for unit in record["groups"][group]["units"]:
        scores = {
            (attribute, value): roc_auc_score([r[attribute] == value for r in records], peaks[:, unit["unit"]])
            for attribute, values in record["concepts"].items()
            for value in values
        }
        best = max(scores, key=scores.get)
        assert unit["best_concept"]["auroc"] == pytest.approx(scores[best], abs=1e-12)
        assert scores[unit["best_concept"]["attribute"], unit["best_concept"]["value"]] == pytest.approx(
            scores[best], abs=1e-12
        )
        passing = [f"{attribute}={value}" for (attribute, value), score in scores.items() if score >= threshold]
        if group == "l1" and unit["unit"] == 2:
            assert {"colour=blue", "colour=magenta"} <= set(passing) and not unit["dead"]
        assert unit["selective"] == (passing[0] if len(passing) == 1 and not unit["dead"] else None)


def test_sae_latent_statistics_equal_encoding_the_maps(result, reference):
    record, out = result
    _, maps, _ = reference
    sae = copying_sae()
    with torch.no_grad():
        latents = sae.encode(maps)
    expected = brute_force(latents.numpy())
    group = record["groups"]["l1"]
    assert group["kind"] == "latent" and group["count"] == 6
    assert_matches(group, expected)
    np.testing.assert_allclose([u["max"] for u in group["units"][:1]], record["groups"]["cnn"]["units"][0]["max"])
    assert group["units"][0]["best_concept"] == record["groups"]["cnn"]["units"][0]["best_concept"]
    assert group["units"][0]["selective"] == "colour=red"
    tensors = load_file(out / "maxima.safetensors")
    assert tensors["maxima.l1"].shape == (96, 6)
    np.testing.assert_allclose(tensors["maxima.l1"].numpy(), expected["peaks"], rtol=1e-6)


def test_max_images_draws_a_seeded_subset(shapes, reference, tmp_path):
    index, maps, _ = reference
    first = unit_statistics(
        planted_model(), "feat", index, tmp_path / "a", max_images=20, seed=5, batch_size=7, progress=False
    )
    again = unit_statistics(
        planted_model(), "feat", index, tmp_path / "b", max_images=20, seed=5, batch_size=20, progress=False
    )
    other = unit_statistics(
        planted_model(), "feat", index, tmp_path / "c", max_images=20, seed=6, progress=False, device="cpu"
    )
    positions = load_file(tmp_path / "a" / "maxima.safetensors")["positions"]
    assert positions.tolist() == sorted(set(positions.tolist())) and len(positions) == 20
    assert load_file(tmp_path / "b" / "maxima.safetensors")["positions"].tolist() == positions.tolist()
    assert load_file(tmp_path / "c" / "maxima.safetensors")["positions"].tolist() != positions.tolist()
    assert first["images"] == 20 and list(first["concepts"]) == ["class"] and first["seed"] == 5  # the folders
    for field in FIELDS:
        assert [u[field] for u in first["groups"]["cnn"]["units"]] == pytest.approx(
            [u[field] for u in again["groups"]["cnn"]["units"]], rel=1e-12
        )
    assert other["images"] == 20
    maxima = load_file(tmp_path / "a" / "maxima.safetensors")["maxima.cnn"]
    assert maxima.shape == (20, 5)
    assert torch.equal(maxima, maps[positions].flatten(2).amax(2))
    assert_matches(first["groups"]["cnn"], brute_force(maps[positions].numpy()))


def test_mismatched_sae_names_both_dimensions(reference, tmp_path):
    index, _, _ = reference
    sae = convlens.registry.create("sae", "relu-l1", input_dim=4, latent_dim=8)
    with pytest.raises(ConvlensError, match=r"SAE 'narrow' reads 4 channels but layer 'feat' has 5"):
        unit_statistics(planted_model(), "feat", index, tmp_path, saes={"narrow": sae}, max_images=4, progress=False)


def test_unknown_layer_and_non_finite_activations_are_clear_errors(reference, tmp_path):
    index, _, _ = reference
    with pytest.raises(ConvlensError, match="no layer 'fet'.*feat"):
        unit_statistics(planted_model(), "fet", index, tmp_path, progress=False)
    bundle = planted_model()
    bundle.module.feat.forward = lambda x: torch.full((len(x), 2, 3, 3), float("nan"))
    with pytest.raises(ConvlensError, match="layer 'feat' gives NaN"):
        unit_statistics(bundle, "feat", index, tmp_path, max_images=3, progress=False)


def test_unreadable_image_is_skipped_and_listed(tmp_path):
    root = tmp_path / "shapes"
    write_shapes(root, n=16, size=32, seed=1)
    (root / "images" / "circle" / "broken.png").write_bytes(b"not a png")
    index = scan_images(root)
    assert len(index) == 17
    with pytest.warns(SkippedImageWarning, match="broken.png"):
        record = unit_statistics(
            planted_model(), "feat", index, tmp_path / "out", concepts=load_concepts(root), batch_size=4, progress=False
        )
    assert record["images"] == 16
    assert record["skipped"] == [{"path": "circle/broken.png", "reason": "not an image"}]
    positions = load_file(tmp_path / "out" / "maxima.safetensors")["positions"].tolist()
    broken = index.paths.index(root / "images" / "circle" / "broken.png")
    assert broken not in positions and len(positions) == 16
    assert sum(record["concept_counts"]["shape"].values()) == 16


def test_auroc_ranks_units_in_chunks_alike(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 9), generator=generator).float()
    positives = torch.rand(3, 50, generator=generator) < 0.4
    whole = convlens.units.statistics.concept_aurocs(scores, positives)
    monkeypatch.setattr(convlens.units.statistics, "RANK_ELEMENTS", 120)  # two units per chunk
    chunked = convlens.units.statistics.concept_aurocs(scores, positives)
    assert torch.equal(whole, chunked)
    for row, positive in enumerate(positives):
        assert torch.equal(chunked[row], auroc(scores, positive))
