"""One rule for relative paths in a recipe: every one is taken from the recipe's folder, whatever the current
directory: [data] path, the `python` model's file, weights files and the path parameters of any plugin."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from convlens.models.loading import load_model
from convlens.workflow.recipes import RecipeError, load_recipe, recipe_path

BUILDER = """
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
"""

RECIPE = """
[data]
path = "../images"

[model]
name = "python"
params = {{ target = "{target}", checkpoint = "{checkpoint}", input_size = 16 }}

[extract]
filters = ["magnitude"]

[visualize]
visualizers = ["dissection"]
[visualize.dissection]
concept_masks = "./masks"
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """project/recipes/{recipe.toml, models/net.py, weights/net.safetensors}, project/images/<3 classes>; the
    current directory is elsewhere."""
    recipes = tmp_path / "project" / "recipes"
    (recipes / "models").mkdir(parents=True)
    (recipes / "weights").mkdir()
    (recipes / "models" / "net.py").write_text(BUILDER)
    torch.manual_seed(3)
    weights = {
        "0.weight": torch.randn(4, 3, 3, 3),
        "0.bias": torch.randn(4),
        "4.weight": torch.randn(3, 4),
        "4.bias": torch.randn(3),
    }
    save_file(weights, str(recipes / "weights" / "net.safetensors"))
    for name in ("a", "b", "c"):
        folder = tmp_path / "project" / "images" / name
        folder.mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), 60, np.uint8)).save(folder / "0.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return recipes, weights


def write(recipes, target="models/net.py:build", checkpoint="weights/net.safetensors"):
    path = recipes / "recipe.toml"
    path.write_text(RECIPE.format(target=target, checkpoint=checkpoint))
    return path


def test_the_python_models_file_and_weights_are_read_from_the_recipes_folder(project):
    recipes, weights = project
    recipe = load_recipe(write(recipes))
    assert recipe.model_params["target"] == f"{recipes / 'models' / 'net.py'}:build"
    assert recipe.model_params["checkpoint"] == str(recipes / "weights" / "net.safetensors")
    assert recipe.data_path == recipes.parent / "images"
    assert recipe.visualizers[0].params["concept_masks"] == str(recipes / "masks")
    bundle, _ = load_model(recipe.model, recipe.model_params)
    state = bundle.module.state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items())


def test_a_missing_file_is_named_where_the_recipe_points(project):
    recipes, _ = project
    with pytest.raises(RecipeError, match=f"model file not found: {recipes / 'models' / 'other.py'}$"):
        load_recipe(write(recipes, target="models/other.py:build"))
    with pytest.raises(RecipeError, match=f"checkpoint not found: {recipes / 'weights' / 'other.safetensors'}"):
        load_recipe(write(recipes, checkpoint="weights/other.safetensors"))


def test_the_recipe_text_given_with_its_path_resolves_alike(project):
    recipes, _ = project
    path = write(recipes)
    recipe = load_recipe(path, text=path.read_text())
    assert recipe.model_params["target"] == f"{recipes / 'models' / 'net.py'}:build"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("weights.safetensors", "BASE/weights.safetensors"),
        ("runs/tiny/model.safetensors", "BASE/runs/tiny/model.safetensors"),
        ("../shared/net.py:build", "PARENT/shared/net.py:build"),
        ("./photos", "BASE/photos"),
        ("last.ckpt", "BASE/last.ckpt"),
        ("/elsewhere/net.pt", "/elsewhere/net.pt"),
        ("resnet18", "resnet18"),
        ("resnet18.a1_in1k", "resnet18.a1_in1k"),
        ("layer4.1", "layer4.1"),
        ("IMAGENET1K_V1", "IMAGENET1K_V1"),
        ("none", "none"),
        ("", ""),
        ("hf-hub:timm/resnet18", "hf-hub:timm/resnet18"),
        ("package.module:build", "package.module:build"),
        ("channel:3 - 0.5*channel:7; neuron:2@4,4", "channel:3 - 0.5*channel:7; neuron:2@4,4"),
        (3, 3),
    ],
)
def test_which_values_are_paths(tmp_path, value, expected):
    base = tmp_path / "recipes"
    if isinstance(expected, str):
        expected = expected.replace("BASE", str(base)).replace("PARENT", str(tmp_path))
    assert recipe_path(value, base) == expected


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert recipe_path("~/weights/net.pt", Path("/recipes")) == str(tmp_path / "weights" / "net.pt")
