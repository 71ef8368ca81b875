"""The visualizers on CUDA against the CPU on the same small input, through the CLI (skipped by name without a
GPU): feature-viz, gradcam, dataset-examples and circuit in float32, and gradcam and feature-viz in bfloat16.

Tolerances (README, "Precision"), against the CPU in float32; cuDNN may run float32 convolutions in TF32, which
keeps more mantissa than bfloat16, so float32 on the GPU is held to the bfloat16 tolerances:

- gradcam (class maps scaled to [0, 1]): every map's correlation > 0.99, max |difference| < 0.05;
- feature-viz: the objective of the start image (the same on both devices) within 2 %, the mean final objective
  within 5 % (the optimisation is chaotic: single images follow other paths);
- dataset-examples: on average >= 80 % of the top-5 images shared per unit, the values at each rank within 2 %;
- circuit: edge scores correlated > 0.999, the subgraphs' IoU >= 0.9, the best subgraph's validation
  correlation within 0.05.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from convlens.cli import cli
from test_precision import correlations

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
LAYER = "block3"


def visualize(model_and_data, out: Path, device: str, *args: str, dtype: str = "float32") -> dict:
    """``convlens circuit ARGS...`` or ``convlens visualize ARGS...`` on the model and its images; the JSON record."""
    command = ["circuit", *args[1:]] if args[0] == "circuit" else ["visualize", *args]
    result = CliRunner().invoke(
        cli,
        [
            *command,
            "--model",
            str(model_and_data.model),
            "--layer",
            LAYER,
            "--data",
            str(model_and_data.data),
            "--device",
            device,
            "--dtype",
            dtype,
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    return json.loads(result.output)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradcam_on_cuda_matches_the_cpu(small_trained_model, tmp_path, dtype):
    args = ("gradcam", "--class-index", "2", "--max-images", "32")
    visualize(small_trained_model, tmp_path / "cpu", "cpu", *args)
    visualize(small_trained_model, tmp_path / "gpu", DEVICE, *args, dtype=dtype)
    cpu, gpu = (load_file(str(tmp_path / side / "maps.safetensors"))["maps"][:, 0] for side in ("cpu", "gpu"))
    assert gpu.dtype == torch.float32
    assert float(correlations(cpu, gpu).min()) > 0.99
    assert float((cpu - gpu).abs().max()) < 0.05


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_feature_viz_on_cuda_reaches_the_cpu_objectives(small_trained_model, tmp_path, dtype):
    args = ("feature-viz", "--units", "0-5", "--steps", "40", "--seed", "1")
    cpu = visualize(small_trained_model, tmp_path / "cpu", "cpu", *args)["objectives"]
    gpu = visualize(small_trained_model, tmp_path / "gpu", DEVICE, *args, dtype=dtype)["objectives"]
    start = np.array([[entry["activation_start"] for entry in side] for side in (cpu, gpu)])
    np.testing.assert_allclose(start[1], start[0], rtol=0.02, atol=1e-3)
    final = np.array([[entry["activation_final"] for entry in side] for side in (cpu, gpu)])
    assert final[1].mean() == pytest.approx(final[0].mean(), rel=0.05)
    assert (final > 2 * start).all()


def test_feature_viz_diversity_transparency_and_redirection_on_cuda_match_the_cpu(small_trained_model, tmp_path):
    """The GPU paths of the redirected ReLU (no host check of dead images), the diversity penalty and the RGBA
    compositing against the CPU's."""
    args = ("feature-viz", "--units", "0-3", "--steps", "40", "--seed", "2", "--preset", "fourier")
    args += ("--diversity", "2", "--transparency", "0.3", "--redirect-steps", "40", "--objectives", "class:1 - 0.01*l2")
    cpu = visualize(small_trained_model, tmp_path / "cpu", "cpu", *args)["objectives"]
    gpu = visualize(small_trained_model, tmp_path / "gpu", DEVICE, *args)["objectives"]
    start = np.array([[entry["activation_start"] for entry in side] for side in (cpu, gpu)])
    np.testing.assert_allclose(start[1], start[0], rtol=0.02, atol=1e-3)
    final = np.array([[entry["activation_final"] for entry in side] for side in (cpu, gpu)])
    assert final[1].mean() == pytest.approx(final[0].mean(), rel=0.1)
    similarity = np.array([[entry["activation_similarity"] for entry in side] for side in (cpu, gpu)])
    assert np.abs(similarity[1] - similarity[0]).mean() < 0.1


def test_dataset_examples_on_cuda_match_the_cpu(small_trained_model, tmp_path):
    args = ("dataset-examples", "--units", "0-7", "--k", "5")
    cpu = visualize(small_trained_model, tmp_path / "cpu", "cpu", *args)["units"]
    gpu = visualize(small_trained_model, tmp_path / "gpu", DEVICE, *args)["units"]
    shared = []
    for on_cpu, on_gpu in zip(cpu, gpu, strict=True):
        shared.append(len({e["position"] for e in on_cpu["top"]} & {e["position"] for e in on_gpu["top"]}) / 5)
        values = np.array([[e["value"] for e in side["top"]] for side in (on_cpu, on_gpu)])
        np.testing.assert_allclose(values[1], values[0], rtol=0.02, atol=1e-3)
    assert np.mean(shared) >= 0.8


def test_circuit_on_cuda_matches_the_cpu(small_trained_model, tmp_path):
    args = ("circuit", "--units", "4", "--max-images", "24", "--feature-viz-nodes", "0", "--sparsities", "0.5")
    records = [
        visualize(small_trained_model, tmp_path / side, device, *args)
        for side, device in (("cpu", "cpu"), ("gpu", DEVICE))
    ]
    cpu, gpu = (load_file(str(tmp_path / side / "unit-4" / "scores.safetensors")) for side in ("cpu", "gpu"))
    assert cpu.keys() == gpu.keys()
    edges = [
        torch.cat([side[key].flatten() for key in sorted(side) if key.startswith("edges/")]) for side in (cpu, gpu)
    ]
    assert edges[1].dtype == torch.float32
    assert float(torch.corrcoef(torch.stack(edges))[0, 1]) > 0.999
    kept = [
        torch.cat([side[key].flatten() for key in sorted(side) if key.startswith("subgraph/")]).bool()
        for side in (cpu, gpu)
    ]
    assert float((kept[0] & kept[1]).sum() / (kept[0] | kept[1]).sum()) >= 0.9
    best = [record["units"][0]["validation"][0]["best"] for record in records]
    assert best[1] == pytest.approx(best[0], abs=0.05)
