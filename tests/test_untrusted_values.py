"""Values from untrusted places (model outputs, SAE files, option strings) are checked before they are used."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import convlens
from convlens.activations.store import ActivationStore, store_from_tensors
from convlens.cli import cli
from convlens.cli.visualize import parse_units
from convlens.core.component_registry import default_registry
from convlens.core.errors import ConvlensError
from convlens.sae.base import METADATA_KEY, load_sae, read_sae_metadata, save_sae

POISONED_MODEL = """\
import torch
from torch import nn


class PoisonedConv(nn.Conv2d):
    # NaN activations for bright images (normalised mean above zero)
    def forward(self, x):
        out = super().forward(x)
        bright = x.mean(dim=(1, 2, 3)) > 0
        return torch.where(bright[:, None, None, None], torch.full_like(out, float("nan")), out)


def build():
    return nn.Sequential(
        PoisonedConv(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
"""


@pytest.fixture
def poisoned(tmp_path):
    """A model file whose layer '0' gives NaN on the white images, and a folder of dark and white images."""
    model = tmp_path / "poisoned.py"
    model.write_text(POISONED_MODEL)
    data = tmp_path / "images"
    data.mkdir()
    for name, colour in [("dark0", 10), ("dark1", 40), ("white0", 250), ("dark2", 20), ("white1", 240)]:
        Image.new("RGB", (16, 16), (colour,) * 3).save(data / f"{name}.png")
    return model, data


def extract_poisoned(model, data, out, *extra):
    return CliRunner().invoke(
        cli,
        [
            "extract",
            "--model",
            "python",
            "--model-target",
            f"{model}:build",
            "--model-input-size",
            "16",
            "--model-mean",
            "0.5,0.5,0.5",
            "--model-std",
            "0.5,0.5,0.5",
            "--data",
            str(data),
            "--out",
            str(out),
            "--per-image",
            "4",
            "--images-per-shard",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            *extra,
        ],
    )


def test_extract_skips_images_with_nan_activations_and_names_them(poisoned, tmp_path):
    model, data = poisoned
    result = extract_poisoned(model, data, tmp_path / "store")
    assert result.exit_code == 0, result.output
    assert "white0.png" in result.output and "white1.png" in result.output
    assert "2 images with non-finite activations" in result.output
    store = ActivationStore(tmp_path / "store")
    assert store.manifest["images_used"] == 3 and len(store) == 3 * 4
    for number in range(len(store.shards)):
        assert torch.isfinite(store.read_shard(number)["vectors"]).all()
    skipped = {item["path"]: item["reason"] for item in store.manifest["skipped"]}
    assert set(skipped) == {"white0.png", "white1.png"} and "non-finite" in skipped["white0.png"]


def test_extract_on_nonfinite_stop_names_the_first_image(poisoned, tmp_path):
    model, data = poisoned
    result = extract_poisoned(model, data, tmp_path / "store", "--on-nonfinite", "stop")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert "white0.png" in result.output and "non-finite" in result.output and "--on-nonfinite" in result.output


def test_store_reader_refuses_nan_and_inf_vectors_naming_the_shard(tmp_path):
    vectors = torch.randn(40, 3)
    vectors[25, 1] = float("nan")
    vectors[27, 0] = float("inf")
    store = store_from_tensors(tmp_path / "store", vectors, samples_per_shard=10)
    assert torch.isfinite(store.read_shard(0)["vectors"]).all()  # clean shards read as before
    with pytest.raises(ConvlensError, match=r"shard shards/shard-00002\.safetensors .*2 non-finite"):
        list(store.batches(8, split=None, shuffle=False))
    with pytest.raises(ConvlensError, match=r"shard-00002.*non-finite"):
        store.split("train")
    with pytest.raises(ConvlensError, match=r"shard-00002.*non-finite"):
        store[25]


def small_sae(tmp_path, name="sae.safetensors", **params):
    params = {"input_dim": 8, "latent_dim": 16, "k": 2, **params}
    sae = convlens.registry.create("sae", "topk", **params)
    path = tmp_path / name
    save_sae(sae, path, name="topk", params=params)
    return sae, path


def rewrite(path, *, metadata=None, tensors=None):
    """``path`` with its metadata text and/or tensors replaced."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata()[METADATA_KEY]
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    state.update(tensors or {})
    save_file(state, str(path), {METADATA_KEY: raw if metadata is None else metadata})
    return path


class RefusingRegistry:
    """A registry that fails the test when asked to build anything: the checks must come first."""

    def get(self, kind, name):
        return default_registry().get(kind, name)

    def create(self, *args, **kwargs):
        raise AssertionError("the SAE was built before its file was checked")


def test_load_sae_checks_metadata_dimensions_against_the_stored_tensors_before_building(tmp_path):
    _, path = small_sae(tmp_path)
    metadata = read_sae_metadata(path)
    huge = {**metadata, "params": {"input_dim": 8, "expansion": 1e7, "k": 2}, "latent_dim": 80_000_000}
    rewrite(path, metadata=json.dumps(huge))
    with pytest.raises(ConvlensError, match=r"sae\.safetensors.*latent"):
        load_sae(path, registry=RefusingRegistry())  # the registry fails the test if anything is built
    rewrite(path, metadata=json.dumps({**huge, "latent_dim": 16}))
    with pytest.raises(ConvlensError, match=r"sae\.safetensors.*'params' gives latent_dim 80000000"):
        load_sae(path, registry=RefusingRegistry())
    wider = {**metadata, "params": {**metadata["params"], "input_dim": 4096}, "input_dim": 4096}
    rewrite(path, metadata=json.dumps(wider))
    with pytest.raises(ConvlensError, match=r"sae\.safetensors.*input_dim"):
        load_sae(path, registry=RefusingRegistry())


@pytest.mark.parametrize(
    "metadata, key",
    [
        ("{not json", "convlens_sae"),
        ("[1, 2]", "convlens_sae"),
        (json.dumps({"format": "convlens-sae/1", "params": {}, "input_dim": 8, "latent_dim": 16}), "sae"),
        (json.dumps({"sae": "topk", "params": [1, 2], "input_dim": 8, "latent_dim": 16}), "params"),
        (json.dumps({"sae": ["topk"], "params": {}, "input_dim": 8, "latent_dim": 16}), "sae"),
        (json.dumps({"sae": "topk", "params": {"k": 2}, "input_dim": "8", "latent_dim": 16}), "input_dim"),
        (json.dumps({"sae": "topk", "params": {"k": 2}, "input_dim": 8, "latent_dim": 16, "store": [1]}), "store"),
        ('{"sae": "topk", "params": {"k": ' + "[" * 100_000 + "]" * 100_000 + "}}", "convlens_sae"),
        (
            json.dumps({"sae": "topk", "params": {"k": 2, "seed": {"a": {"b": {}}}}, "input_dim": 8, "latent_dim": 16}),
            "params",
        ),
    ],
    ids=["not-json", "a-list", "no-sae", "list-params", "list-name", "text-dim", "list-store", "deep", "nested"],
)
def test_malformed_sae_metadata_is_one_message_naming_the_file_and_key(tmp_path, metadata, key):
    _, path = small_sae(tmp_path)
    rewrite(path, metadata=metadata)
    with pytest.raises(ConvlensError, match=key) as error:
        load_sae(path)
    assert str(path) in str(error.value)
    info = CliRunner().invoke(cli, ["sae-info", str(path)])
    assert info.exit_code == 1 and info.output.startswith("Error: ") and key in info.output, info.output


def test_wrong_tensor_shapes_name_the_tensor(tmp_path):
    _, path = small_sae(tmp_path)
    rewrite(path, tensors={"encoder": torch.randn(16, 9)})
    with pytest.raises(ConvlensError, match=r"sae\.safetensors.*'encoder'.*\(16, 9\).*\(16, 8\)"):
        load_sae(path)


@pytest.mark.parametrize(
    "tensor, problem",
    [(torch.ones(16, 8, dtype=torch.int8), "int8"), (torch.full((16, 8), float("nan")), "128 non-finite")],
    ids=["int8", "nan"],
)
def test_load_sae_refuses_non_float_or_non_finite_weights_naming_the_tensor(tmp_path, tensor, problem):
    _, path = small_sae(tmp_path)
    rewrite(path, tensors={"decoder": tensor})
    with pytest.raises(ConvlensError, match=rf"sae\.safetensors.*'decoder'.*{problem}"):
        load_sae(path)


def test_units_ranges_are_checked_against_the_count_before_expanding():
    # expanding these ranges would hold 10^8 ints: the check must come first
    with pytest.raises(ConvlensError, match=r"--units: '0-99999999' .* 0\.\.15"):
        parse_units("0-99999999", 16)
    with pytest.raises(ConvlensError, match=r"--units: '0-99999999'"):
        parse_units("0-99999999", None)
    with pytest.raises(ConvlensError, match=r"--units: '3-16' .* 0\.\.15"):
        parse_units("3-16", 16)
    assert parse_units("0-3,2,15", 16) == (0, 1, 2, 3, 15)
    assert parse_units("3,16", 16) == (3, 16)  # single numbers are checked where the units are used


def test_visualize_with_a_huge_units_range_fails_at_once(tmp_path):
    image = tmp_path / "grey.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).save(image)
    result = CliRunner().invoke(
        cli,
        [
            "visualize",
            "activation-maps",
            "--model",
            "tiny-cnn",
            "--model-input-size",
            "32",
            "--model-width",
            "4",
            "--layer",
            "block3",
            "--units",
            "0-99999999",
            "--data",
            str(image),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1 and result.output.startswith("Error: --units"), result.output


def test_topk_k_at_or_above_the_latent_count_is_refused():
    with pytest.raises(ConvlensError, match=r"k = 16 .* 16 latents"):
        convlens.registry.create("sae", "topk", input_dim=8, latent_dim=16, k=16)
    with pytest.raises(ConvlensError, match=r"k = 5000 .* 64 latents"):
        convlens.registry.create("sae", "topk", input_dim=8, expansion=8, k=5000)
    assert convlens.registry.create("sae", "topk", input_dim=8, latent_dim=16, k=15).k == 15


def test_train_sae_with_k_above_the_latents_fails_before_training(tmp_path):
    store_from_tensors(tmp_path / "store", torch.randn(64, 8))
    result = CliRunner().invoke(
        cli,
        [
            "train-sae",
            "--store",
            str(tmp_path / "store"),
            "--sae",
            "topk",
            "--k",
            "5000",
            "--expansion",
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "k = 5000" in result.output
    assert "16 latents" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


RECIPE = """\
[data]
shapes = {{ n = 8, size = 32, seed = 0 }}

[model]
name = "tiny-cnn"
params = {{ input_size = 32, width = 4 }}
layer = "block3"

[extract]
filters = ["magnitude"]

[[sae]]
name = "topk"
params = {params}
"""


def test_a_recipe_with_k_above_the_latents_fails_before_any_work_naming_the_place(tmp_path):
    (tmp_path / "bad.toml").write_text(RECIPE.format(params="{ k = 5000, expansion = 2 }"))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert "[[sae]] #1" in result.output and "k = 5000" in result.output
    assert not (tmp_path / "run" / "activations").exists() and not (tmp_path / "run" / "data").exists()
    from convlens.workflow.recipes import load_recipe

    (tmp_path / "good.toml").write_text(RECIPE.format(params="{ k = 8, expansion = 2 }"))
    assert load_recipe(tmp_path / "good.toml").saes[0].component.params["k"] == 8


@pytest.mark.parametrize(
    "manifest, message",
    [
        (b"\x00\x01garbage", "not JSON text"),
        (b"[1, 2]", "holds a list, not an object"),
        (b'{"format": "convlens-activations/1", "channels": 4, "shards": 5}', "'shards' must be a list"),
        (b'{"format": "convlens-activations/1", "channels": "four", "shards": []}', "'channels' must be a positive"),
        (
            b'{"format": "convlens-activations/1", "channels": 4, "shards": [{"file": "../../x", "samples": 1, '
            b'"sha256": "0"}]}',
            "shards[0]: 'file' must be a path inside the store",
        ),
        (
            b'{"format": "convlens-activations/1", "channels": 4, "shards": [{"file": "a", "samples": "many", '
            b'"sha256": "0"}]}',
            "shards[0]: 'samples' must be a whole number",
        ),
    ],
)
def test_a_garbage_manifest_is_one_message_naming_the_file_and_key(tmp_path, manifest, message):
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_bytes(manifest)
    with pytest.raises(ConvlensError, match="manifest.json") as raised:
        ActivationStore(store)
    assert message in str(raised.value)
    result = CliRunner().invoke(
        cli, ["train-sae", "--sae", "topk", "--store", str(store), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and message in result.output and "unexpected" not in result.output, result.output
