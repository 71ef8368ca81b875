"""The class labels of an ImageFolder are a concept category: unit statistics score class selectivity on a folder
without concepts.json, beside the concepts of one that has them (unless a concept already names the classes)."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from convlens import ModelBundle
from convlens.cli import cli
from convlens.data.concepts import load_concepts, repeats_the_classes
from convlens.data.images import scan_images
from convlens.data.shapes import write_shapes
from convlens.units.statistics import unit_statistics

COLOURS = {"blue": (0, 0, 1), "green": (0, 1, 0), "red": (1, 0, 0)}
PER_CLASS = 8


class Colours(nn.Module):
    """Channel 0: redness, 1: greenness (each clipped at 0), 2: brightness, 3: the constant 1 (one value: no
    selectivity)."""

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        channels = [(r - torch.maximum(g, b)).relu(), (g - torch.maximum(r, b)).relu(), (r + g + b) / 3]
        return torch.stack([*channels, torch.ones_like(r)], 1)


def colour_model():
    module = nn.Sequential(OrderedDict(feat=Colours(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten()))
    return ModelBundle(module.eval(), (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), default_layer="feat")


def brightness(number):
    return 0.4 + 0.6 * number / (PER_CLASS - 1)


def write_colour_folder(root):
    """root/<colour>/<k>.png: PER_CLASS images of each colour, at increasing brightness."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for number in range(PER_CLASS):
            pixels = np.array(colour, np.float64) * 255 * brightness(number)
            Image.fromarray(np.broadcast_to(pixels.astype(np.uint8), (16, 16, 3)).copy()).save(
                root / name / f"{number}.png"
            )


@pytest.fixture
def colours(tmp_path):
    root = tmp_path / "colours"
    write_colour_folder(root)
    return root


def expected_aurocs(index):
    """Per unit and class, sklearn's AUROC of the unit's per-image maximum for that class against the rest."""
    bundle = colour_model()
    with torch.no_grad():
        images = torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                for p in index.paths
            ]
        )
        peaks = bundle.module.feat(images).flatten(2).amax(2).numpy()
    labels = np.array(index.labels)
    return {
        (unit, name): roc_auc_score(labels == k, peaks[:, unit])
        for unit in range(peaks.shape[1])
        for k, name in enumerate(index.class_names)
        if np.ptp(peaks[:, unit]) > 0
    }


def test_an_image_folder_without_concepts_gets_class_selectivity(colours, tmp_path):
    index = scan_images(colours)
    record = unit_statistics(colour_model(), "feat", index, tmp_path / "out", progress=False)
    assert record["concepts"] == {"class": ["blue", "green", "red"]}
    assert record["concept_counts"] == {"class": {"blue": PER_CLASS, "green": PER_CLASS, "red": PER_CLASS}}
    units = record["groups"]["cnn"]["units"]
    assert [u["selective"] for u in units] == ["class=red", "class=green", None, None]
    expected = expected_aurocs(index)
    for unit in (0, 1, 2):
        best = max(auroc for (u, _), auroc in expected.items() if u == unit)
        concept = units[unit]["best_concept"]
        assert concept["attribute"] == "class" and concept["auroc"] == pytest.approx(best, abs=1e-12)
        assert expected[unit, concept["value"]] == pytest.approx(best, abs=1e-12)
    assert units[0]["best_concept"] == {"attribute": "class", "value": "red", "auroc": 1.0}
    assert units[3]["best_concept"]["auroc"] == 0.5  # a constant unit: every image ties
    summary = record["groups"]["cnn"]["summary"]
    assert summary["selective"] == 2 and summary["selective_by_attribute"] == {"class": 2}


def test_a_flat_folder_without_concepts_gets_none(colours, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in colours.rglob("*.png"):
        (flat / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    record = unit_statistics(colour_model(), "feat", scan_images(flat), tmp_path / "out", progress=False)
    assert record["concepts"] is None and record["concept_counts"] is None
    assert all(u["best_concept"] is None and u["selective"] is None for u in record["groups"]["cnn"]["units"])


def test_concepts_that_cross_the_classes_get_the_class_category_beside_them(tmp_path):
    root = tmp_path / "dataset"
    write_colour_folder(root / "images")
    records = [
        {"file": f"{name}/{k}.png", "mask": f"{name}/{k}.png", "light": "bright" if k >= PER_CLASS // 2 else "dim"}
        for name in COLOURS
        for k in range(PER_CLASS)
    ]
    concepts = {
        "image_root": "images",
        "categories": {"light": ["dim", "bright"]},
        "regions": {"light": "image"},
        "images": records,
    }
    (root / "concepts.json").write_text(json.dumps(concepts))
    record = unit_statistics(
        colour_model(), "feat", scan_images(root), tmp_path / "out", concepts=load_concepts(root), progress=False
    )
    assert record["concepts"] == {"light": ["dim", "bright"], "class": ["blue", "green", "red"]}
    units = record["groups"]["cnn"]["units"]
    assert units[2]["best_concept"] == {"attribute": "light", "value": "bright", "auroc": 1.0}
    assert units[0]["selective"] == "class=red"


def test_a_concept_that_names_the_classes_is_not_repeated(tmp_path):
    write_shapes(tmp_path / "shapes", n=24, size=32, seed=0)
    record = unit_statistics(
        colour_model(),
        "feat",
        scan_images(tmp_path / "shapes"),
        tmp_path / "out",
        concepts=load_concepts(tmp_path / "shapes"),
        progress=False,
    )
    assert list(record["concepts"]) == ["shape", "colour", "texture"]


@pytest.mark.parametrize(
    "values, classes, repeats",
    [
        (["a", "a", "b", None], [0, 0, 1, 1], True),
        (["a", "b", "b"], [0, 1, 1], True),
        (["a", "a", "b"], [0, 1, 1], False),  # class 1 shows two values
        (["a", "b", "a"], [0, 1, 2], False),  # value a covers two classes
        ([None, None], [0, 1], False),
    ],
)
def test_which_categories_repeat_the_classes(values, classes, repeats):
    assert repeats_the_classes(values, classes) is repeats


def test_the_pipeline_reports_class_selectivity_for_a_folder_without_concepts(colours, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[data]\npath = "{colours}"\n'
        '[model]\nname = "tiny-cnn"\nparams = { input_size = 16, width = 4, blocks = 2, num_classes = 3 }\n'
        '[extract]\nfilters = ["magnitude"]\nper_image = 2\n'
        "[visualize]\nvisualizers = []\n[report]\nenabled = false\n"
    )
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    statistics = json.loads((tmp_path / "run" / "statistics" / "statistics.json").read_text())
    assert statistics["concepts"] == {"class": ["blue", "green", "red"]}
    best = [u["best_concept"] for u in statistics["groups"]["cnn"]["units"] if not u["dead"]]
    assert best and all(b["attribute"] == "class" and 0.5 <= b["auroc"] <= 1.0 for b in best)
