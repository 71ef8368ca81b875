"""Mixed precision (``--dtype``): Grad-CAM, feature visualisation, circuits, dataset examples and unit statistics run
under bfloat16 autocast on the CPU (the same code path as on a GPU) agree with float32 within the tolerances the
README states, write float32 outputs, and run the same on a channels-last model; float16 on the CPU is one clear
error; a recipe's dtype reaches its steps.

Tolerances against float32 (bfloat16 keeps 8 bits of mantissa, so single values differ by up to ~1 %):

- Grad-CAM maps (scaled to [0, 1]): class targets, every map's correlation > 0.99 and max |difference| < 0.05;
  unit targets at an earlier layer (the gradient crosses a bfloat16 convolution), mean correlation > 0.99 and
  every map's > 0.95; the raw gradients two blocks below the output, mean correlation > 0.98.
- Feature visualisation: the objective of the same start image within 2 %; the final value reported in bfloat16
  within 2 % of the float32 value of the same image; the mean final value over the objectives within 5 % (the
  optimisation is chaotic, so single images follow other paths).
- Circuits: Pearson correlation of the edge scores > 0.999, at least 45 of the top 50 edges shared, the IoU of the
  extracted subgraphs >= 0.9.
- Dataset examples: on average >= 80 % of the top-k images shared per unit, the values at each rank within 2 %.
- Unit statistics: every statistic within 3 % (relative) or 0.01 (absolute), at least 8 of the top 10 units shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import convlens
from convlens import ConvlensError, VisualTarget
from convlens.cli import cli
from convlens.data.images import Preprocessing, open_rgb, scan_images
from convlens.models.layers import activations_at, gradients_between
from convlens.models.loading import load_model
from convlens.plugins.visualizers.circuit.graph import ChannelGraph, flatten_edges
from convlens.plugins.visualizers.circuit.scoring import CircuitTarget, extract_subgraph, score_components
from convlens.plugins.visualizers.feature_viz import PRESETS
from convlens.plugins.visualizers.feature_viz.objectives import parse_objective
from convlens.plugins.visualizers.feature_viz.render import RenderSettings, render
from convlens.units.statistics import unit_statistics
from convlens.workflow.pipeline import PipelineRun
from convlens.workflow.recipes import RecipeError, load_recipe

LAYER, EARLIER = "block3", "block2"
DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def bundle(small_trained_model):
    return load_model(str(small_trained_model.model), {})[0]


@pytest.fixture
def channels_last_bundle(small_trained_model):
    """The same model with its weights in channels-last memory format (what ``--dtype`` gives on a GPU): its
    activations come out channels-last on the CPU too."""
    model = load_model(str(small_trained_model.model), {})[0]
    model.module.to(memory_format=torch.channels_last)
    assert model.module.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    return model


def correlations(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of maps ``[N, ...]``."""
    first, second = first.flatten(1).double(), second.flatten(1).double()
    first, second = first - first.mean(1, keepdim=True), second - second.mean(1, keepdim=True)
    return (first * second).sum(1) / (first.norm(dim=1) * second.norm(dim=1)).clamp_min(1e-12)


def run_visualizer(name: str, model, units, data, dtype: str, out: Path, **params) -> dict:
    visualizer = convlens.registry.create("visualizer", name, **params)
    visualizer.progress = False
    return visualizer.run(VisualTarget(model, LAYER, tuple(units), None, data, dtype), out)


def gradcam_maps_of(model, units, data, dtype: str, out: Path, **params) -> torch.Tensor:
    record = run_visualizer("gradcam", model, units, data, dtype, out, max_images=32, **params)
    assert record["dtype"] == dtype
    maps = load_file(str(out / "maps.safetensors"))["maps"]
    assert maps.dtype == torch.float32
    return maps.flatten(0, 1)


def test_gradcam_in_bfloat16_agrees_with_float32(bundle, small_trained_model, tmp_path):
    classes = {d: gradcam_maps_of(bundle, (), small_trained_model.data, d, tmp_path / d, class_index=2) for d in DTYPES}
    agreement = correlations(classes["float32"], classes["bfloat16"])
    assert float(agreement.min()) > 0.99
    assert float((classes["float32"] - classes["bfloat16"]).abs().max()) < 0.05
    units = {
        d: gradcam_maps_of(bundle, (3, 5), small_trained_model.data, d, tmp_path / f"units-{d}", map_layer=EARLIER)
        for d in DTYPES
    }
    agreement = correlations(units["float32"], units["bfloat16"])
    assert float(agreement.mean()) > 0.99 and float(agreement.min()) > 0.95


def test_gradients_under_autocast_are_float32_and_close_to_float32(bundle, small_trained_model):
    images = images_of(bundle, small_trained_model.data, 8)
    exact = gradients_between(bundle.module, images, EARLIER, None, lambda logits: logits[:, 1])
    with convlens.autocast("cpu", "bfloat16"):
        reduced = gradients_between(bundle.module, images, EARLIER, None, lambda logits: logits[:, 1])
    for captured in (reduced.activations[EARLIER], reduced.gradients[EARLIER], reduced.logits):
        assert captured.dtype == torch.float32
    agreement = correlations(exact.gradients[EARLIER], reduced.gradients[EARLIER])  # two bfloat16 blocks deep
    assert float(agreement.mean()) > 0.98 and float(agreement.min()) > 0.95
    torch.testing.assert_close(reduced.activations[EARLIER], exact.activations[EARLIER], rtol=0.02, atol=0.02)


def images_of(model, data: Path, count: int) -> torch.Tensor:
    transform = Preprocessing.of(model).eval_transform
    return torch.stack([transform(open_rgb(path)) for path in scan_images(data).paths[:count]])


def test_feature_visualisation_in_bfloat16_reaches_the_objective_values_of_float32(bundle):
    objectives = [parse_objective(f"channel:{channel}") for channel in range(6)]
    settings = RenderSettings(**{**PRESETS["improved"], "steps": 40}, size=(32, 32), seed=1)
    rendered = {
        d: render(bundle.module, LAYER, objectives, settings, mean=bundle.mean, std=bundle.std, progress=False, dtype=d)
        for d in DTYPES
    }
    reduced = rendered["bfloat16"]
    assert all(r.image.dtype == torch.float32 for r in reduced)
    start = torch.tensor([[r.start_value for r in rendered[d]] for d in DTYPES])
    torch.testing.assert_close(start[1], start[0], rtol=0.02, atol=1e-3)
    images = torch.stack([r.image for r in reduced])
    with torch.no_grad():
        maps = activations_at(bundle.module, (images - 0.5) / 0.25, LAYER).activations[LAYER]
    in_float32 = maps[torch.arange(6), torch.arange(6)].mean(dim=(1, 2))
    torch.testing.assert_close(torch.tensor([r.final_value for r in reduced]), in_float32, rtol=0.02, atol=1e-3)
    final = torch.tensor([[r.final_value for r in rendered[d]] for d in DTYPES])
    assert float(final[1].mean()) == pytest.approx(float(final[0].mean()), rel=0.05)
    assert bool((final > 2 * start).all())  # both optimised, far beyond the start


def test_feature_viz_records_its_precision(bundle, tmp_path):
    record = run_visualizer("feature-viz", bundle, (0, 1), None, "bfloat16", tmp_path, steps=4, preset="naive")
    assert record["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "feature_viz.json").read_text())["dtype"] == "bfloat16"


def circuit_scores(bundle, images, unit: int, dtype: str):
    graph = ChannelGraph.trace(bundle.module, tuple(bundle.input_size))
    target = CircuitTarget(LAYER, unit)
    scores = score_components(graph, target, "taylor", [images[:16], images[16:]], dtype=dtype)
    return graph, target, scores


def test_circuit_scores_in_bfloat16_agree_with_float32(bundle, small_trained_model):
    images = images_of(bundle, small_trained_model.data, 32)
    for unit in (1, 4):
        (graph, target, exact), (_, _, reduced) = (circuit_scores(bundle, images, unit, d) for d in DTYPES)
        edges = torch.stack([flatten_edges(graph, exact.edges), flatten_edges(graph, reduced.edges)])
        assert edges.dtype == torch.float64
        assert float(torch.corrcoef(edges)[0, 1]) > 0.999
        top = [set(row.topk(50).indices.tolist()) for row in edges]
        assert len(top[0] & top[1]) >= 45
        kept = [extract_subgraph(graph, target, scores, 0.1).kept for scores in (exact, reduced)]
        assert float((kept[0] & kept[1]).sum() / (kept[0] | kept[1]).sum()) >= 0.9


def test_circuit_visualizer_in_bfloat16_writes_float32_scores(bundle, small_trained_model, tmp_path):
    records = {
        d: run_visualizer(
            "circuit",
            bundle,
            (4,),
            small_trained_model.data,
            d,
            tmp_path / d,
            max_images=24,
            feature_viz_nodes=0,
            sparsities=(0.5,),
        )
        for d in DTYPES
    }
    assert records["bfloat16"]["dtype"] == "bfloat16"
    scores = {d: load_file(str(tmp_path / d / "unit-4" / "scores.safetensors")) for d in DTYPES}
    assert all(value.dtype in (torch.float32, torch.uint8) for value in scores["bfloat16"].values())
    exact, reduced = scores["float32"]["edges/block3.0"], scores["bfloat16"]["edges/block3.0"]
    assert float(torch.corrcoef(torch.stack([exact.flatten(), reduced.flatten()]))[0, 1]) > 0.999
    validation = [records[d]["units"][0]["validation"][0]["best"] for d in DTYPES]
    assert validation[1] == pytest.approx(validation[0], abs=0.05)


def test_dataset_examples_in_bfloat16_keep_mostly_the_same_top_images(bundle, small_trained_model, tmp_path):
    records = {
        d: run_visualizer("dataset-examples", bundle, range(8), small_trained_model.data, d, tmp_path / d, k=5)
        for d in DTYPES
    }
    assert records["bfloat16"]["dtype"] == "bfloat16"
    shared = []
    for exact, reduced in zip(records["float32"]["units"], records["bfloat16"]["units"], strict=True):
        shared.append(len({e["position"] for e in exact["top"]} & {e["position"] for e in reduced["top"]}) / 5)
        values = np.array([[e["value"] for e in unit["top"]] for unit in (exact, reduced)])
        np.testing.assert_allclose(values[1], values[0], rtol=0.02, atol=1e-3)
    assert np.mean(shared) >= 0.8


def test_unit_statistics_in_bfloat16_agree_with_float32(bundle, small_trained_model, tmp_path):
    index = scan_images(small_trained_model.data)
    records = {d: unit_statistics(bundle, LAYER, index, tmp_path / d, max_images=120, dtype=d) for d in DTYPES}
    assert records["bfloat16"]["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "bfloat16" / "maxima.safetensors"))["maxima.cnn"].dtype == torch.float32
    exact, reduced = (records[d]["groups"]["cnn"]["units"] for d in DTYPES)
    for field in ("frequency", "image_frequency", "mean", "max", "mean_image_max", "share"):
        np.testing.assert_allclose(
            [u[field] for u in reduced], [u[field] for u in exact], rtol=0.03, atol=0.01, err_msg=field
        )
    top = [{u["unit"] for u in units if u["rank"] <= 10} for units in (exact, reduced)]
    assert len(top[0] & top[1]) >= 8


CHANNELS_LAST_RUNS = {
    "gradcam": {"max_images": 8, "map_layer": EARLIER},
    "dataset-examples": {"k": 3, "max_images": 24},
    "feature-viz": {"steps": 6},
    "circuit": {"max_images": 12, "feature_viz_nodes": 0, "sparsities": (0.5,)},
}


@pytest.mark.parametrize("name", CHANNELS_LAST_RUNS)
def test_a_channels_last_model_gives_the_results_of_a_contiguous_one(
    name, bundle, channels_last_bundle, small_trained_model, tmp_path
):
    """On a GPU ``--dtype`` runs the model channels-last: every view, reshape and gather must take such activations.
    (float32, so that only the memory format differs.)"""
    outputs = {}
    for label, model in (("contiguous", bundle), ("channels-last", channels_last_bundle)):
        out = tmp_path / label
        record = run_visualizer(
            name, model, (1, 4), small_trained_model.data, "float32", out, **CHANNELS_LAST_RUNS[name]
        )
        tensors = {path.relative_to(out).as_posix(): load_file(str(path)) for path in out.rglob("*.safetensors")}
        outputs[label] = (record, tensors)
    (record, tensors), (other_record, other_tensors) = outputs["contiguous"], outputs["channels-last"]
    assert other_tensors.keys() == tensors.keys()
    for path, values in tensors.items():
        for key, value in values.items():
            torch.testing.assert_close(other_tensors[path][key], value, rtol=1e-4, atol=1e-4)
    if name == "feature-viz":
        for entry, other in zip(record["objectives"], other_record["objectives"], strict=True):
            assert other["activation_final"] == pytest.approx(entry["activation_final"], rel=1e-3, abs=1e-4)


def test_unit_statistics_of_a_channels_last_model(bundle, channels_last_bundle, small_trained_model, tmp_path):
    index = scan_images(small_trained_model.data)
    records = [
        unit_statistics(model, LAYER, index, tmp_path / str(number), max_images=24)
        for number, model in enumerate((bundle, channels_last_bundle))
    ]
    for exact, other in zip(records[0]["groups"]["cnn"]["units"], records[1]["groups"]["cnn"]["units"], strict=True):
        assert other["max"] == pytest.approx(exact["max"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "command",
    [
        ["visualize", "gradcam", "--data", "DATA"],
        ["visualize", "feature-viz", "--units", "0"],
        ["circuit", "--units", "0", "--data", "DATA"],
    ],
)
def test_float16_on_the_cpu_is_one_clear_error(command, small_trained_model, tmp_path):
    args = [str(small_trained_model.data) if arg == "DATA" else arg for arg in command]
    result = CliRunner().invoke(
        cli,
        [
            *args,
            "--model",
            str(small_trained_model.model),
            "--layer",
            LAYER,
            "--device",
            "cpu",
            "--dtype",
            "float16",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --dtype float16 needs a GPU; on CPU use bfloat16 or float32"
    assert not (tmp_path / "config.json").exists()


def test_visualize_with_bfloat16_through_the_cli_records_the_precision(small_trained_model, tmp_path):
    out = tmp_path / "gradcam"
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "gradcam",
            "--model",
            str(small_trained_model.model),
            "--layer",
            LAYER,
            "--data",
            str(small_trained_model.data),
            "--max-images",
            "4",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "attribution.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(out / "maps.safetensors"))["maps"].dtype == torch.float32


RECIPE = """
title = "precision"
{dtype}
[data]
shapes = {{ n = 32, size = 32, seed = 1 }}

[model]
name = "tiny-cnn"
params = {{ input_size = 32, width = 8, blocks = 4 }}
layer = "block3"

[extract]
filters = ["magnitude"]

[visualize]
visualizers = ["gradcam"]
"""


def recipe_file(folder: Path, dtype_line: str) -> Path:
    path = folder / "recipe.toml"
    path.write_text(RECIPE.format(dtype=dtype_line))
    return path


def test_a_recipe_sets_the_precision_of_the_statistics_and_visualize_steps(tmp_path):
    plain = PipelineRun(load_recipe(recipe_file(tmp_path, "")), tmp_path / "run", device="cpu")
    reduced = PipelineRun(load_recipe(recipe_file(tmp_path, 'dtype = "bfloat16"')), tmp_path / "run", device="cpu")
    assert plain.dtype == "float32" and reduced.dtype == "bfloat16"
    plain_inputs, plain_digests = {step.name: step.inputs for step in plain.steps}, plain._digests()
    affected: set[str] = set()
    for step in reduced.steps:
        uses_the_model_on_images = step.name in ("statistics",) or step.name.startswith(("visualize:", "extract:"))
        assert step.inputs.get("dtype") == ("bfloat16" if uses_the_model_on_images else None), step.name
        assert "dtype" not in plain_inputs[step.name]  # float32 leaves the digests of earlier runs as they were
        if uses_the_model_on_images or affected & set(step.needs):  # a step reading a changed step reruns too
            affected.add(step.name)
        assert (reduced._digests()[step.name] != plain_digests[step.name]) == (step.name in affected), step.name
    assert any(name.startswith("extract:") for name in affected) and "data" not in affected
    with pytest.raises(RecipeError, match="dtype 'half' is not one of float32, bfloat16, float16"):
        load_recipe(recipe_file(tmp_path, 'dtype = "half"'))
    on_cpu = PipelineRun(load_recipe(recipe_file(tmp_path, 'dtype = "float16"')), tmp_path / "f16", device="cpu")
    with pytest.raises(ConvlensError, match="--dtype float16 needs a GPU"):
        on_cpu.run()
    assert not (tmp_path / "f16").exists()  # refused before any step
