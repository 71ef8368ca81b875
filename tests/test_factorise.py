"""NMF against planted factors and scikit-learn, and the factorise visualizer on a planted colour model (with
negative activations, with an SAE) and through the CLI."""

import copy
import json
import warnings

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
from convlens.plugins.visualizers.factorise import nmf
from convlens.runtime.seeding import derive_seed
from convlens.testing import check_component

SIDE = 16
FAST = {"steps": 3, "size": 16, "overlay_size": 32}


def planted(groups=4, channels=16, positions=64, seed=0):
    """``A = W0 H0``: every group has a private channel (W0 holds a scaled identity) and its own positions (the rows
    of H0 have disjoint supports), which makes the factorisation unique up to order and scale."""
    generator = torch.Generator().manual_seed(seed)
    w0 = torch.rand(channels, groups, generator=generator, dtype=torch.float64)
    w0 *= torch.rand(channels, groups, generator=generator) < 0.6
    w0[:groups] = torch.diag(1 + torch.rand(groups, generator=generator, dtype=torch.float64))
    owner = (torch.arange(positions) % groups)[torch.randperm(positions, generator=generator)]
    h0 = torch.zeros(groups, positions, dtype=torch.float64)
    h0[owner, torch.arange(positions)] = 0.5 + torch.rand(positions, generator=generator, dtype=torch.float64)
    return w0, h0


def matched_cosines(truth, found):
    """Per true factor (column), the cosine with its best found factor; also whether the matches are distinct."""
    cosines = (truth / truth.norm(dim=0)).T @ (found / found.norm(dim=0))
    best = cosines.max(dim=1)
    return best.values, len(set(best.indices.tolist())) == truth.shape[1]


@pytest.mark.parametrize("seed", range(4))
def test_nmf_recovers_planted_factors_with_disjoint_supports(seed):
    w0, h0 = planted(seed=seed)
    found = nmf(w0 @ h0, 4, iterations=500, seed=seed)
    assert found.error < 1e-3
    cosines, distinct = matched_cosines(w0, found.directions)
    assert distinct and bool((cosines > 0.99).all()), cosines
    cosines, distinct = matched_cosines(h0.T, found.maps.T)  # the spatial supports
    assert distinct and bool((cosines > 0.99).all()), cosines
    assert bool((found.directions >= 0).all()) and bool((found.maps >= 0).all())
    torch.testing.assert_close(found.directions.norm(dim=0), torch.ones(4, dtype=torch.float64))
    sums = found.maps.sum(dim=1)
    assert bool((sums[:-1] >= sums[1:]).all())  # groups by their share of the activations


def test_nmf_error_matches_a_float64_recomputation_and_scikit_learn():
    from sklearn.decomposition import NMF

    generator = torch.Generator().manual_seed(7)
    matrix = torch.rand(40, 60, generator=generator)
    for groups in (2, 4, 6):
        found = nmf(matrix, groups, seed=groups)
        a = matrix.double()
        recomputed = float(torch.linalg.norm(a - found.directions @ found.maps) / torch.linalg.norm(a))
        assert found.error == pytest.approx(recomputed, rel=1e-12)
        assert bool((found.directions >= 0).all()) and bool((found.maps >= 0).all())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's convergence warning at its iteration limit
            reference = NMF(n_components=groups, max_iter=1000, random_state=0)
            w = reference.fit_transform(matrix.numpy().astype(np.float64))
        theirs = np.linalg.norm(matrix.numpy() - w @ reference.components_) / np.linalg.norm(matrix.numpy())
        print(f"k={groups}: relative error {found.error:.5f}, scikit-learn {theirs:.5f}")
        assert found.error <= 1.05 * theirs


def test_nmf_is_deterministic_by_seed_and_refuses_bad_input():
    matrix = torch.rand(12, 30, generator=torch.Generator().manual_seed(1))
    first, again, other = (nmf(matrix, 3, iterations=50, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(first.directions, again.directions) and torch.equal(first.maps, again.maps)
    assert first.error == again.error
    assert not torch.equal(first.directions, other.directions)
    with pytest.raises(ConvlensError, match="NMF into 13 groups needs at least that many rows and columns"):
        nmf(matrix, 13)
    with pytest.raises(ConvlensError, match="needs a non-negative matrix"):
        nmf(matrix - 0.5, 2)
    with pytest.raises(ConvlensError, match="all zeros"):
        nmf(torch.zeros(4, 4), 2)


# red, green and blue each own a channel; channels 3 and 4 mix them
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 1, 0], [0, 1, 0.3]])


def colour_model(activation: nn.Module, weights: torch.Tensor = COLOURS) -> ModelBundle:
    conv = nn.Conv2d(3, len(weights), 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weights[:, :, None, None])
    module = nn.Sequential(conv, activation, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(len(weights), 2))
    return ModelBundle(module.eval(), (SIDE, SIDE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), default_layer="1")


@pytest.fixture
def quadrants(tmp_path):
    """Red, green and blue quadrants of varying brightness and a black one: three groups with disjoint supports."""
    pixels = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    half = SIDE // 2
    ramp = np.linspace(100, 255, half).round().astype(np.uint8)
    pixels[:half, :half, 0] = ramp[None, :]
    pixels[:half, half:, 1] = ramp[:, None]
    pixels[half:, :half, 2] = ramp[::-1][None, :]
    path = tmp_path / "quadrants.png"
    Image.fromarray(pixels, "RGB").save(path)
    return path


def layer_matrix(bundle, path, dtype=torch.float64):
    """The layer's activations ``[C, H * W]`` computed without the visualizer, in ``dtype``."""
    pixels = Preprocessing.of(bundle).eval_transform(open_rgb(path)).to(dtype)
    module = copy.deepcopy(bundle.module).to(dtype)
    return activations_at(module, pixels[None], "1").activations["1"][0].flatten(1)


def run_factorise(bundle, data, out, sae=None, **params):
    visualizer = convlens.registry.create("visualizer", "factorise", **{**FAST, **params})
    visualizer.progress = False
    record = visualizer.run(VisualTarget(bundle, "1", sae=sae, data=data), out)
    assert json.loads((out / "factorise.json").read_text()) == record
    return record


def group_directions(entry, units):
    """The groups' directions ``[units, k]`` from the record (top_units must list every unit)."""
    directions = torch.zeros(units, len(entry["groups"]), dtype=torch.float64)
    for column, group in enumerate(entry["groups"]):
        assert len(group["top_units"]) == units
        for unit in group["top_units"]:
            directions[unit["unit"], column] = unit["weight"]
    return directions


def test_factorise_recovers_the_planted_colour_groups_end_to_end(quadrants, renders, tmp_path):
    bundle = colour_model(nn.ReLU())
    record = run_factorise(bundle, quadrants, tmp_path / "out", groups=3, top_units=5)
    entry = record["images"][0]
    assert entry["shape"] == [5, SIDE, SIDE] and entry["error"] < 1e-3
    assert entry["clamped"]["count"] == 0 and "clamped" not in record["summary"]
    directions = group_directions(entry, 5)
    cosines, distinct = matched_cosines(COLOURS.double(), directions)
    assert distinct and bool((cosines > 0.99).all()), cosines
    assert [group["share"] for group in entry["groups"]] == pytest.approx([0.25] * 3)  # the black quadrant is no one's
    masses = [group["mass"] for group in entry["groups"]]
    assert masses == sorted(masses, reverse=True) and sum(masses) == pytest.approx(1.0)
    # the visualizer factorises the model's float32 activations: the same matrix gives the same factorisation
    reference = nmf(layer_matrix(bundle, quadrants, torch.float32), 3, seed=derive_seed(0, "factorise", 0))
    assert entry["error"] == pytest.approx(reference.error, rel=1e-9)
    (call,) = renders  # all groups' directions in one render
    objectives = call["objectives"]
    vectors = torch.stack([objective.terms[0].vector for objective in objectives]).double()
    torch.testing.assert_close(vectors, directions.T, rtol=1e-5, atol=1e-6)

    kinds = [figure["kind"] for figure in record["figures"]]
    assert kinds == ["factorisation"] + ["factor-map", "factor-direction"] * 3
    assert all(figure["unit"] is None for figure in record["figures"])
    assert all((tmp_path / "out" / figure["path"]).is_file() for figure in record["figures"])
    assert "group 0" in record["figures"][1]["caption"] and "group 2" in record["figures"][-1]["caption"]
    with Image.open(tmp_path / "out" / entry["groups"][0]["map"]) as overlay:
        assert overlay.size == (32, 32)
    assert record["summary"] == f"NMF of 1 (channels) into 3 groups for 1 image; relative error {entry['error']:.3g}"


def test_negative_activations_are_clamped_and_reported(quadrants, tmp_path):
    weights = COLOURS.clone()
    weights[2] = torch.tensor([0.0, -1.0, 1.0])  # blue minus green: negative on the green quadrant
    bundle = colour_model(nn.LeakyReLU(0.1), weights)
    negative = int((layer_matrix(bundle, quadrants) < 0).sum())
    assert negative > 0
    record = run_factorise(bundle, quadrants, tmp_path / "out", groups=3)
    clamped = record["images"][0]["clamped"]
    assert clamped["count"] == negative and clamped["share"] == pytest.approx(negative / (5 * SIDE * SIDE))
    assert clamped["min"] < 0
    assert f"clamped {negative} negative values at 0" in record["summary"]


def test_with_an_sae_the_latent_codes_are_factorised_and_directions_decoded(quadrants, renders, tmp_path):
    bundle = colour_model(nn.ReLU())
    sae = convlens.registry.create("sae", "relu-l1", input_dim=5, latent_dim=8, seed=3).eval()
    sae.set_normalisation(torch.full((5,), 0.2), 1.5)
    record = run_factorise(bundle, quadrants, tmp_path / "out", sae=sae, groups=2, top_units=8)
    entry = record["images"][0]
    assert record["unit_kind"] == "latent" and entry["shape"] == [8, SIDE, SIDE]
    with torch.no_grad():
        codes = sae.encode(layer_matrix(bundle, quadrants, torch.float32).reshape(1, 5, SIDE, SIDE))[0].flatten(1)
        reference = nmf(codes, 2, seed=derive_seed(0, "factorise", 0))
        sae.double()
        decoded = 1.5 * (group_directions(entry, 8).T @ sae.decoder_directions())
    assert entry["error"] == pytest.approx(reference.error, rel=1e-9)
    vectors = torch.stack([objective.terms[0].vector for objective in renders[0]["objectives"]]).double()
    torch.testing.assert_close(vectors, decoded, rtol=1e-4, atol=1e-5)


def test_check_component():
    check_component("visualizer", "factorise", steps=2, size=8, iterations=20, overlay_size=32)


def test_factorise_through_the_cli(quadrants, tmp_path):
    model = ["--model", "tiny-cnn", "--model-blocks", "3", "--model-width", "8", "--model-input-size", "32"]
    out = tmp_path / "nmf"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "nmf",
            *model,
            "--layer",
            "block2",
            "--data",
            str(quadrants),
            "--groups",
            "3",
            "--iterations",
            "50",
            "--steps",
            "2",
            "--size",
            "8",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "NMF of block2 (channels) into 3 groups for 1 image; relative error" in result.output
    record = json.loads((out / "factorise.json").read_text())
    assert len(record["images"][0]["groups"]) == 3 and (out / record["images"][0]["overlay"]).is_file()
    failed = CliRunner().invoke(
        cli,
        [
            "visualize",
            "factorise",
            *model,
            "--layer",
            "block2",
            "--data",
            str(quadrants),
            "--groups",
            "17",
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert failed.exit_code != 0 and "Traceback" not in failed.output
    assert (
        "17 groups: layer 'block2' has 16 channels and 8 x 8 = 64 positions; give --groups at most 16" in failed.output
    )
