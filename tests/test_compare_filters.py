import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy import stats
from torch import nn

import convlens
from convlens import ActivationFilter
from convlens.activations.filter_comparison import (
    ComparisonSettings,
    compare_filters,
    paired_difference,
    patch_foreground,
)
from convlens.cli import cli
from convlens.core.contracts import ModelBundle
from convlens.data.concepts import load_concepts
from convlens.data.images import Preprocessing, scan_images
from convlens.data.shapes import write_shapes
from convlens.runtime.rank_statistics import average_ranks, rowwise_cosine, rowwise_spearman


def test_ranks_spearman_and_cosine_match_scipy_and_float64():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (6, 25), generator=generator).float()  # many ties
    b = torch.randn(6, 25, generator=generator)
    assert np.array_equal(average_ranks(a).numpy(), np.stack([stats.rankdata(row) for row in a.numpy()]))
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())]
    assert np.allclose(rowwise_spearman(a, b).numpy(), expected, atol=1e-12)
    a64, b64 = a.double().numpy(), b.double().numpy()
    cosine = (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)
    assert np.allclose(rowwise_cosine(a, b).numpy(), cosine, atol=1e-12)
    constant, zero = torch.ones(1, 9), torch.zeros(1, 9)
    assert torch.isnan(rowwise_spearman(constant, b[:1, :9])).all()
    assert torch.isnan(rowwise_cosine(zero, b[:1, :9])).all()
    assert rowwise_cosine(constant, constant).item() == pytest.approx(1.0)


def test_patch_foreground_follows_the_models_resize_and_crop():
    mask = np.zeros((32, 32), dtype=bool)
    mask[:, :16] = True  # left half
    same = Preprocessing((32, 32), (0, 0, 0), (1, 1, 1), 1.0)
    assert torch.equal(patch_foreground(mask, same, (4, 4)), torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4).double())
    mask = np.zeros((64, 64), dtype=bool)
    mask[4:12, 4:12] = True  # inside the 4 px border a centre crop of 56 from 64 removes
    cropped = Preprocessing((56, 56), (0, 0, 0), (1, 1, 1), 56 / 64)
    shares = patch_foreground(mask, cropped, (7, 7))
    assert shares[0, 0] == pytest.approx(1.0, abs=1e-6) and shares[1:, :].max() == 0 and shares[:, 1:].max() == 0


def test_paired_difference_verdicts():
    assert paired_difference(np.array([0.5, 0.6, 0.7]), np.array([0.1, 0.1, 0.2]))["verdict"] == "above uniform"
    assert paired_difference(np.array([0.0, 0.0, 0.1]), np.array([0.3, 0.2, 0.3]))["verdict"] == "below uniform"
    same = paired_difference(np.array([0.2, 0.3]), np.array([0.2, 0.3]))
    assert same["difference"] == 0 and same["verdict"] == "not distinguishable from uniform"


def write_planted_squares(root, count=12):
    """White 8 px squares on black 32 px images, aligned with a 4 x 4 grid of 8 px cells; masks to match."""
    records = []
    rng = np.random.default_rng(0)
    for number in range(count):
        image = np.zeros((32, 32), dtype=np.uint8)
        for cell in rng.choice(16, size=1 + number % 4, replace=False):
            y, x = divmod(int(cell), 4)
            image[8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = 255
        name = f"square/{number:03d}.png"
        for folder, mode_image in (
            ("images", Image.fromarray(image).convert("RGB")),
            ("masks", Image.fromarray(image)),
        ):
            (root / folder / "square").mkdir(parents=True, exist_ok=True)
            mode_image.save(root / folder / name)
        records.append({"file": name, "mask": name, "shape": "square"})
    (root / "concepts.json").write_text(
        json.dumps(
            {
                "format": "convlens-concepts/1",
                "image_root": "images",
                "mask_root": "masks",
                "categories": {"shape": ["square"]},
                "regions": {"shape": "foreground"},
                "images": records,
            }
        )
    )
    return root


class BackgroundFilter(ActivationFilter):
    name = "background"

    def weights(self, activations, context):
        return (3 - activations.sum(dim=1)).clamp_min(0)


class EveryOtherImageEmpty(ActivationFilter):
    name = "sometimes-empty"

    def weights(self, activations, context):
        weights = activations.sum(dim=1)
        weights[::2] = float("nan")
        return weights


def test_planted_squares_give_exact_precisions_verdicts_and_fallbacks(tmp_path):
    data = write_planted_squares(tmp_path / "squares")
    bundle = ModelBundle(nn.Sequential(nn.AvgPool2d(8)), (32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "0")
    filters = {
        "magnitude": convlens.registry.create("filter", "magnitude"),
        "uniform": convlens.registry.create("filter", "uniform"),
        "background": BackgroundFilter(),
        "sometimes-empty": EveryOtherImageEmpty(),
    }
    result = compare_filters(
        bundle,
        filters,
        scan_images(data),
        tmp_path / "out",
        ComparisonSettings(layer="0", batch_size=4, overlays=3),
        concepts=load_concepts(data),
        progress=False,
    )
    precision = result["foreground_precision"]
    on_object = np.array([(1 + n % 4) / 16 for n in range(12)])
    assert precision["images"] == 12 and precision["uniform"] == pytest.approx(on_object.mean())
    magnitude = precision["filters"]["magnitude"]
    assert magnitude["sampled"] == 1.0 and magnitude["expected"] == pytest.approx(1.0)
    assert magnitude["verdict"] == "above uniform"
    assert precision["filters"]["background"]["sampled"] == 0.0
    assert precision["filters"]["background"]["verdict"] == "below uniform"
    assert precision["filters"]["uniform"]["verdict"] == "not distinguishable from uniform"
    assert result["fallbacks"]["sometimes-empty"] == {"images": 6, "rate": 0.5}
    assert result["fallbacks"]["magnitude"]["images"] == 0
    names = result["filters"]
    cosine = result["cosine"]["mean"]
    assert cosine[names.index("magnitude")][names.index("sometimes-empty")] == pytest.approx(1.0)
    assert result["cosine"]["images"][names.index("magnitude")][names.index("sometimes-empty")] == 6
    assert result["spearman"]["mean"][names.index("magnitude")][names.index("uniform")] is None  # constant map
    assert result["spearman"]["mean"][names.index("magnitude")][names.index("background")] == pytest.approx(-1.0)
    assert any("background" in line and "does not favour the object" in line for line in result["findings"])
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert written["foreground_precision"] == precision and len(written["overlays"]) == 3
    for name in ("cosine.png", "spearman.png", "foreground-precision.png", *written["overlays"]):
        with Image.open(tmp_path / "out" / name) as picture:
            assert picture.width > 100


@pytest.fixture(scope="module")
def trained_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    write_shapes(root / "shapes", n=480, size=32, seed=0)
    result = CliRunner().invoke(
        cli,
        [
            "train-model",
            "tiny-cnn",
            "--data",
            str(root / "shapes"),
            "--out",
            str(root / "run"),
            "--input-size",
            "32",
            "--width",
            "8",
            "--epochs",
            "6",
            "--batch-size",
            "32",
            "--lr",
            "0.005",
            "--no-augment",
            "--seed",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    return root


def test_compare_filters_on_shapes_finds_magnitude_above_uniform(trained_shapes, tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        cli,
        [
            "compare-filters",
            "--model",
            str(trained_shapes / "run"),
            "--layer",
            "block3",
            "--data",
            str(trained_shapes / "shapes"),
            "--filters",
            "magnitude,median,gradcam,uniform",
            "--filter-option",
            "median.even=mean",
            "--max-images",
            "200",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 200 and report["grid"] == [4, 4] and report["model"]["name"] == "convlens:tiny-cnn"
    assert report["filter_settings"]["median"]["params"]["even"] == "mean"
    precision = report["foreground_precision"]
    assert (
        precision["filters"]["magnitude"]["verdict"] == "above uniform"
    )  # the premise the paper takes from Gorton 2024
    assert precision["filters"]["magnitude"]["sampled"] > precision["uniform"]
    for name, row in precision["filters"].items():
        if row["verdict"] != "above uniform" and name != "uniform":
            assert any(line.startswith(f"{name}:") and "does not favour" in line for line in report["findings"])
    assert set(report["fallbacks"]) == {"magnitude", "median", "gradcam", "uniform"}
    assert (out / "cosine.png").is_file() and (out / "spearman.png").is_file()
    assert len(list((out / "overlays").glob("*.png"))) == 4

    text = CliRunner().invoke(
        cli,
        [
            "compare-filters",
            "--model",
            str(trained_shapes / "run"),
            "--layer",
            "block3",
            "--data",
            str(trained_shapes / "shapes"),
            "--filters",
            "magnitude,max",
            "--max-images",
            "20",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert text.exit_code == 0, text.output
    assert "magnitude: foreground precision" in text.output and "compared 2 filters at block3" in text.output


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--filters", "magnitude"], "at least two filters"),
        (["--filters", "magnitude,magnitude"], "names a filter twice"),
        (["--filters", "magnitude,medain"], "medain"),
        (["--filters", "magnitude,median", "--filter-option", "median=1"], "FILTER.PARAM=VALUE"),
        (["--filters", "magnitude,median", "--filter-option", "max.x=1"], "not among --filters"),
        (["--filters", "magnitude,median", "--filter-option", "median.even=lots"], "even"),
        (["--filters", "magnitude,median", "--layer", "block33"], "block3"),
    ],
)
def test_compare_filters_errors_are_one_clear_message(trained_shapes, tmp_path, arguments, message):
    result = CliRunner().invoke(
        cli,
        [
            "compare-filters",
            "--model",
            str(trained_shapes / "run"),
            "--data",
            str(trained_shapes / "shapes"),
            "--out",
            str(tmp_path / "x"),
            *arguments,
        ],
    )
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output
