"""The attribution methods and metrics on CUDA against the CPU on the same small input (skipped by name without a
GPU): every method's maps of a tiny-cnn's images, float32, correlated > 0.99 per image with the CPU's (cuDNN may run
float32 convolutions in TF32: the bfloat16 tolerances of README "Precision"); the metrics' means within 0.02; and
`bench attribution --device cuda` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import convlens
from convlens import ExplainTarget, MetricCase
from convlens.cli import cli
from test_precision import correlations

pytestmark = pytest.mark.cuda
METHODS = [
    "gradcam", "hirescam", "layercam", "xgradcam", "eigencam", "scorecam", "ablationcam", "saliency",
    "integrated-gradients", "input-x-gradient", "smoothgrad", "guided-backprop", "guided-gradcam", "occlusion",
]  # fmt: skip
METRICS = ["deletion", "insertion", "road", "cascading-randomisation", "independent-randomisation"]


@pytest.fixture(scope="module")
def case():
    bundle = convlens.registry.create("model", "tiny-cnn", seed=0, input_size=32, blocks=4, width=8)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        classes = bundle.module.eval()(images).argmax(1)
    return bundle, images, classes


def on(bundle, device):
    import copy
    import dataclasses

    return dataclasses.replace(bundle, module=copy.deepcopy(bundle.module).to(device).eval())


@pytest.mark.parametrize("method", METHODS)
def test_methods_on_cuda_match_the_cpu(case, method):
    bundle, images, classes = case
    visualizer = convlens.registry.create("visualizer", method)
    maps = {}
    for device in ("cpu", "cuda"):
        target = ExplainTarget(classes=classes.to(device))
        maps[device] = visualizer.explain(on(bundle, device), images.to(device), "block3", target).cpu()
    assert maps["cuda"].shape == maps["cpu"].shape
    assert min(correlations(maps["cpu"], maps["cuda"])) > 0.99, method


@pytest.mark.parametrize("metric", METRICS)
def test_metrics_on_cuda_match_the_cpu(case, metric):
    bundle, images, classes = case
    gradcam = convlens.registry.create("visualizer", "gradcam")
    scorer = convlens.registry.create("metric", metric)
    means = {}
    for device in ("cpu", "cuda"):
        model, target = on(bundle, device), ExplainTarget(classes=classes.to(device))
        maps = gradcam.explain(model, images.to(device), "block3", target)
        values = scorer.score(MetricCase(model, gradcam, images.to(device), "block3", target, maps))
        means[device] = float(values.cpu().nanmean())
    assert math.isfinite(means["cuda"]) and abs(means["cuda"] - means["cpu"]) < 0.02, means


def test_bench_attribution_runs_on_cuda(small_trained_model, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["bench", "attribution", "--model", str(small_trained_model.model), "--data", str(small_trained_model.data),
         "--max-images", "8", "--layer", "block3", "--device", "cuda", "--out", str(tmp_path / "out"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.output[result.output.index("{") :])
    assert record["device"].startswith("cuda") and all(row["error"] is None for row in record["methods"])
    assert all(row["error"] is None for row in record["results"])
