"""``convlens bench sae``: the planted dictionaries' statistics, the recovery metrics against hand-built decoders,
the command end to end (a third-party plugin included), and a failing plugin reported in the table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

import convlens
from convlens.cli import cli
from convlens.cli.bench import GRID_NAMES
from convlens.core.errors import ConvlensError
from convlens.report.bench_page import write_bench_page
from convlens.sae.bench import GRIDS, LATENTS_PER_ATOM, BenchPoint, installed_saes, recovery, run_bench
from convlens.sae.planted import PlantedSpec, plant


# --- the planted data ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zipf():
    spec = PlantedSpec(input_dim=32, atoms_per_dim=8, active=4, frequency_exponent=1.0)
    return spec, plant(spec, 120_000, seed=3)


def test_planted_frequencies_follow_the_power_law(zipf):
    spec, data = zipf
    ranked = data.frequencies.double().sort(descending=True).values
    ranks = torch.arange(1, spec.atoms + 1, dtype=torch.float64)
    torch.testing.assert_close(ranked / ranked[0], ranks.pow(-1.0), rtol=1e-5, atol=0)
    assert float(data.frequencies.sum()) == pytest.approx(4.0, rel=1e-5)

    samples = len(data.samples)
    fired = torch.zeros(spec.atoms, dtype=torch.float64).index_add_(
        0, data.codes.indices()[1], torch.ones(data.codes._nnz(), dtype=torch.float64)
    )
    planted = data.frequencies.double()
    binomial_sd = (planted * (1 - planted) / samples).sqrt()
    assert float(((fired / samples - planted).abs() / binomial_sd).max()) < 5
    slope = torch.linalg.lstsq(
        torch.stack([ranks.log(), torch.ones_like(ranks)], dim=1),
        (fired / samples)[planted.argsort(descending=True)].log()[:, None],
    ).solution[0, 0]
    assert float(slope) == pytest.approx(-1.0, abs=0.03)


def test_planted_samples_have_the_mean_active_count_and_magnitudes(zipf):
    spec, data = zipf
    counts = torch.zeros(len(data.samples)).index_add_(0, data.codes.indices()[0], torch.ones(data.codes._nnz()))
    planted = data.frequencies.double()
    standard_error = math.sqrt(float((planted * (1 - planted)).sum()) / len(counts))
    assert abs(float(counts.mean()) - spec.active) < 4 * standard_error
    assert data.true_l0 == pytest.approx(float(counts.mean()))
    magnitudes = data.codes.values()
    assert 0.5 <= float(magnitudes.min()) and float(magnitudes.max()) <= 1.5
    assert float(magnitudes.mean()) == pytest.approx(1.0, abs=0.01)
    torch.testing.assert_close(data.samples[:500], data.codes.to_dense()[:500] @ data.dictionary)


def test_planted_noise_has_the_relative_level_asked_for():
    spec = PlantedSpec(input_dim=64, atoms_per_dim=4, active=3, noise=0.05, frequency_exponent=0.5)
    noisy = plant(spec, 40_000, seed=1).samples.double()
    clean = plant(PlantedSpec(64, 4, 3, 0.0, 0.5), 40_000, seed=1).samples.double()
    noise = noisy - clean
    level = math.sqrt(float(noise.pow(2).sum(1).mean() / clean.pow(2).sum(1).mean()))
    assert level == pytest.approx(0.05, rel=0.01)
    per_coordinate = noise.std(dim=0)
    assert float(per_coordinate.max() / per_coordinate.min()) < 1.1  # isotropic
    assert float(noise.mean(0).abs().max()) < 5 * float(per_coordinate.mean()) / math.sqrt(len(noise))


def test_planted_atoms_are_unit_norm_and_correlated_in_groups_as_specified():
    spec = PlantedSpec(input_dim=48, atoms_per_dim=4, active=2, correlated_share=0.3, correlation=(0.2, 0.5))
    data = plant(spec, 100, seed=0)
    atoms = data.dictionary.double()
    torch.testing.assert_close(atoms.norm(dim=1), torch.ones(spec.atoms, dtype=torch.float64))
    groups = int(0.3 * 192) // 2
    assert int((data.group >= 0).sum()) == 2 * groups
    assert len(data.group_cosines) == groups
    assert 0.2 <= float(data.group_cosines.min()) and float(data.group_cosines.max()) <= 0.5
    cosines = atoms @ atoms.T
    for group, planted in enumerate(data.group_cosines.tolist()):
        first, second = (data.group == group).nonzero().flatten().tolist()
        assert float(cosines[first, second]) == pytest.approx(planted, abs=1e-5)
    ungrouped = (data.group < 0).nonzero().flatten()
    others = cosines[ungrouped][:, ungrouped]
    off_diagonal = others[~torch.eye(len(ungrouped), dtype=torch.bool)].abs()
    assert float(off_diagonal.mean()) == pytest.approx(math.sqrt(2 / (math.pi * 48)), rel=0.1)  # random unit vectors


def test_planted_data_is_seeded():
    spec = PlantedSpec(32, 4, 2, noise=0.02, correlated_share=0.2)
    first, again, other = plant(spec, 1000, seed=5), plant(spec, 1000, seed=5), plant(spec, 1000, seed=6)
    assert torch.equal(first.samples, again.samples) and torch.equal(first.dictionary, again.dictionary)
    assert not torch.equal(first.dictionary, other.dictionary)


def test_a_power_law_too_steep_for_the_active_count_is_refused():
    with pytest.raises(ConvlensError, match="more than every sample"):
        PlantedSpec(input_dim=32, atoms_per_dim=4, active=8, frequency_exponent=1.5)


# --- the metrics -----------------------------------------------------------------------------------------------
def test_a_decoder_holding_the_dictionary_recovers_every_atom():
    data = plant(PlantedSpec(32, 4, 2), 10, seed=0)
    shuffled = data.dictionary[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    decoder = torch.cat([shuffled * 3.0, torch.randn(20, 32)])  # scaled, reordered, and with extra latents
    assert recovery(data.dictionary, decoder) == pytest.approx({"mmcs": 1.0, "recovered": 1.0})


def test_recovery_of_a_half_planted_decoder_matches_a_direct_computation():
    data = plant(PlantedSpec(32, 4, 2), 10, seed=0)
    decoder = torch.cat([data.dictionary[:64], torch.randn(64, 32, generator=torch.Generator().manual_seed(1))])
    best = []
    for atom in data.dictionary.double():
        best.append(max(float(atom @ row / row.norm()) for row in decoder.double()))
    result = recovery(data.dictionary, decoder)
    assert result["mmcs"] == pytest.approx(sum(best) / len(best), abs=1e-9)
    assert result["recovered"] == pytest.approx(sum(b >= 0.9 for b in best) / len(best))
    assert 0.5 <= result["recovered"] < 0.6  # the planted half, and a random row rarely reaches 0.9


def test_a_random_decoder_recovers_far_less():
    data = plant(PlantedSpec(32, 4, 2), 10, seed=0)
    result = recovery(data.dictionary, torch.randn(128, 32, generator=torch.Generator().manual_seed(2)))
    assert result["recovered"] == 0.0
    assert result["mmcs"] < 0.6


# --- the command -----------------------------------------------------------------------------------------------
def test_the_cli_grid_names_are_the_bench_grids():
    assert set(GRID_NAMES) == set(GRIDS)


@pytest.mark.slow
def test_bench_sae_quick_runs_topk_and_the_third_party_gated_plugin(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        cli, ["bench", "sae", "--grid", "quick", "--sae", "topk", "--sae", "gated", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert {"bench.json", "bench.png", "bench.svg", "index.html"} <= {path.name for path in out.iterdir()}
    summary = json.loads((out / "bench.json").read_text())
    rows = {row["sae"]: row for row in summary["results"]}
    assert rows["gated"]["dist"] == "convlens-gated-sae" and rows["gated"]["error"] is None
    point = GRIDS["quick"][0]
    topk = rows["topk"]
    assert topk["params"]["latent_dim"] == LATENTS_PER_ATOM * point.planted.atoms
    assert topk["params"]["k"] == round(topk["true_l0"]) and topk["sparsity_control"] == "k"
    assert topk["training"]["steps"] == point.steps and topk["training"]["normalize_input"] is True
    assert topk["mmcs"] >= 0.9
    assert 0 <= topk["dead"] <= 1 and 0 < topk["fve"] <= 1
    page = (out / "index.html").read_text()
    assert "convlens-gated-sae" in page and 'data-metric="mmcs"' in page
    assert "MMCS >= 0.9 on grid points: topk 1/1" in result.output

    again = CliRunner().invoke(cli, ["bench", "sae", "--grid", "quick", "--sae", "topk", "--out", str(out)])
    assert again.exit_code != 0 and "already holds a bench" in again.output


@dataclass(frozen=True)
class BrokenParams(convlens.SAEParams):
    pass


class BrokenSAE(convlens.SparseAutoencoder):
    """Builds, then fails on its first training step."""

    def __init__(self, params: BrokenParams):
        super().__init__(params.input_dim, params.latents)
        self.decoder = torch.nn.Parameter(torch.randn(self.latent_dim, self.input_dim))

    def encode_vectors(self, x):
        return x @ self.decoder.T

    def decode_vectors(self, latents):
        return latents @ self.decoder

    def loss_terms(self, x, reconstruction, latents):
        raise RuntimeError("planted <failure> & more")


class BrokenPlugin:
    @convlens.hookimpl
    def register_saes(self, register):
        register(convlens.SAESpec(name="broken", factory=BrokenSAE, params=BrokenParams))


def test_a_failing_plugin_gets_its_error_in_the_table_and_the_others_go_on(register_plugin, tmp_path):
    register_plugin(BrokenPlugin())
    point = BenchPoint("tiny", PlantedSpec(16, 4, 2), train_samples=2048, val_samples=512, steps=40, batch_size=64)
    summary = run_bench([point], installed_saes(["broken", "relu-l1"]), tmp_path, seed=1)
    broken, relu = summary["results"]
    assert broken["sae"] == "broken" and broken["error"] == "RuntimeError: planted <failure> & more"
    assert "mmcs" not in broken
    assert relu["error"] is None and 0 < relu["mmcs"] <= 1
    assert relu["sparsity_control"] == ("target_l0" if summary["target_l0_supported"] else "none")
    assert relu["training"].get("target_l0") == (relu["true_l0"] if summary["target_l0_supported"] else None)

    page = write_bench_page(summary, tmp_path).read_text()
    assert "planted &lt;failure&gt; &amp; more" in page and "<failure>" not in page
