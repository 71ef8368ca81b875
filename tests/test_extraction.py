import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from convlens.activations.sampling import sample_activations, sampling_probabilities
from convlens.activations.store import ActivationStore
from convlens.core.errors import ConvlensError
from convlens.data.shapes import write_shapes


def test_sample_frequencies_match_the_weights():
    weights = torch.tensor([[[0.0, 1.0], [2.0, 5.0]]])
    activations = torch.arange(4.0).view(1, 1, 2, 2)
    draws = 20000
    samples = sample_activations(activations, weights, torch.tensor([7]), per_image=draws, seed=0)
    observed = torch.bincount(samples.vectors[:, 0].long(), minlength=4).double()
    expected = torch.tensor([0.0, 1.0, 2.0, 5.0]).double() / 8 * draws
    assert observed[0] == 0  # a zero-weight patch is never drawn
    chi2 = float(((observed[1:] - expected[1:]) ** 2 / expected[1:]).sum())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    assert samples.position[:, 0].tolist()[:5] == (samples.vectors[:5, 0].long() // 2).tolist()
    # the same image index gives the same draws whatever batch it is in
    again = sample_activations(
        torch.cat([activations * 0, activations]),
        torch.cat([weights, weights]),
        torch.tensor([3, 7]),
        per_image=draws,
        seed=0,
    )
    assert torch.equal(again.vectors[draws:], samples.vectors)


def test_all_zero_and_all_nan_maps_fall_back_and_nan_patches_are_never_drawn():
    weights = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[float("nan")] * 2] * 2, [[float("nan"), 1.0], [0.0, 0.0]]])
    probabilities, fallback = sampling_probabilities(weights)
    assert fallback.tolist() == [True, True, False]
    assert torch.allclose(probabilities[0], torch.full((4,), 0.25, dtype=torch.float64))
    assert probabilities[2].tolist() == [0.0, 1.0, 0.0, 0.0]
    samples = sample_activations(torch.randn(3, 5, 2, 2), weights, torch.arange(3), per_image=500, seed=1)
    assert int(samples.fallback.sum()) == 2
    third = samples.position[1000:].long()
    assert set((third[:, 0] * 2 + third[:, 1]).tolist()) == {1}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract") / "shapes"
    write_shapes(root, n=40, size=32, seed=2)
    return root


def extract_command(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "convlens",
        "extract",
        "--model",
        "tiny-cnn",
        "--model-input-size",
        "32",
        "--model-width",
        "4",
        "--layer",
        "block3",
        "--data",
        str(data),
        "--out",
        str(out),
        "--images-per-shard",
        "8",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--json",
        *extra,
    ]


def samples_of(store_path):
    store = ActivationStore(store_path)
    parts = [store.read_shard(i) for i in range(len(store.shards))]
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.argsort(merged["image_index"] * 10_000 + torch.arange(len(merged["image_index"])) % 10_000)
    return {k: v[order] for k, v in merged.items()}


def assert_same_samples(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_extract_killed_and_rerun_gives_exactly_the_uninterrupted_samples(shapes_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        extract_command(shapes_data, tmp_path / "straight", "--filter", "gradcam"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert straight.returncode == 0, straight.stderr
    summary = json.loads(straight.stdout)
    assert summary["images"] == 40 and summary["total_samples"] == 40 * 16

    process = subprocess.Popen(
        extract_command(shapes_data, tmp_path / "killed", "--filter", "gradcam"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(shards.glob("*.json"))) < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(shards.glob("*.json")))
    assert 2 <= written and not (tmp_path / "killed" / "manifest.json").exists()
    rerun = subprocess.run(
        extract_command(shapes_data, tmp_path / "killed", "--filter", "gradcam"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["chunks_reused"] == written or written == 5
    assert_same_samples(samples_of(tmp_path / "straight"), samples_of(tmp_path / "killed"))

    changed = subprocess.run(
        extract_command(shapes_data, tmp_path / "killed", "--filter", "magnitude"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert changed.returncode == 1 and "holds an extraction with other settings (filter differ)" in changed.stderr


@pytest.mark.slow
def test_torchrun_with_two_processes_gives_the_same_samples(shapes_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(extract_command(shapes_data, tmp_path / "one"), capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "convlens",
        *extract_command(shapes_data, tmp_path / "two")[3:],
    ]
    double = subprocess.run(torchrun, capture_output=True, text=True, env=env)
    assert double.returncode == 0, double.stderr
    assert json.loads(double.stdout)["world_size"] == 2
    assert_same_samples(samples_of(tmp_path / "one"), samples_of(tmp_path / "two"))


def test_store_reads_splits_batches_and_reports_a_corrupted_shard(shapes_data, tmp_path):
    from click.testing import CliRunner

    from convlens.cli import cli

    result = CliRunner().invoke(
        cli,
        extract_command(shapes_data, tmp_path / "s", "--per-image", "5", "--val-fraction", "0.25", "--save-maps")[3:],
    )
    assert result.exit_code == 0, result.output
    store = ActivationStore(tmp_path / "s")
    assert len(store) == 200 and store.dim == 16 and store.manifest["grid"] == [4, 4]
    train, val = store.split("train"), store.split("val")
    assert len(val["vectors"]) == 10 * 5 and len(train["vectors"]) == 30 * 5
    assert not set(train["image_index"].tolist()) & set(val["image_index"].tolist())
    item = store[37]
    merged = samples_of(tmp_path / "s")
    assert item["vectors"].shape == (16,)
    batches = list(store.batches(16, split=None, seed=1))
    assert sum(len(b) for b in batches) == 200
    assert torch.allclose(torch.cat(batches).sum(0), merged["vectors"].sum(0), atol=1e-3)  # a permutation
    assert torch.equal(torch.cat(list(store.batches(16, split=None, seed=1))), torch.cat(batches))
    maps = store.read_shard(0, ("maps", "map_image_index"))
    assert maps["maps"].shape == (8, 4, 4) and maps["map_image_index"].tolist() == list(range(8))

    shard = tmp_path / "s" / "shards" / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ConvlensError, match="shard shards/shard-00002.safetensors of .* is corrupted"):
        ActivationStore(tmp_path / "s").split("train")


def _extract_in_process(data, out, *extra):
    from click.testing import CliRunner

    from convlens.cli import cli

    result = CliRunner().invoke(cli, extract_command(data, out, *extra)[3:])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_workers_and_batch_sizes_give_exactly_the_same_store(shapes_data, tmp_path):
    reference = samples_of_store(_extract_in_process(shapes_data, tmp_path / "w0", "--filter", "median"))
    for workers, batch in [("2", "4"), ("1", "3")]:
        summary = _extract_in_process(
            shapes_data, tmp_path / f"w{workers}", "--filter", "median", "--workers", workers, "--batch-size", batch
        )
        assert summary["decode"] == "cpu"
        assert_same_samples(reference, samples_of_store(summary))


def samples_of_store(summary):
    return samples_of(summary["out"])


def test_device_decoding_gives_the_same_samples_within_the_pixel_tolerance(tmp_path):
    """JPEGs decoded by torchvision (the device path, here on the CPU) against PIL: the same sampled positions
    under the uniform filter, activation vectors agreeing to a correlation above 0.999."""
    from PIL import Image

    write_shapes(tmp_path / "shapes", n=24, size=45, seed=2)  # resized to the model's 32 px
    jpegs = tmp_path / "jpegs"
    for path in sorted((tmp_path / "shapes").rglob("*.png")):
        target = jpegs / path.parent.name / f"{path.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").save(target, quality=92)
    cpu = _extract_in_process(jpegs, tmp_path / "cpu", "--filter", "uniform", "--decode", "cpu")
    device = _extract_in_process(jpegs, tmp_path / "device", "--filter", "uniform", "--decode", "device")
    assert (cpu["decode"], device["decode"]) == ("cpu", "device")
    a, b = samples_of(tmp_path / "cpu"), samples_of(tmp_path / "device")
    assert torch.equal(a["image_index"], b["image_index"]) and torch.equal(a["position"], b["position"])
    correlation = torch.corrcoef(torch.stack([a["vectors"].flatten(), b["vectors"].flatten()]))[0, 1]
    assert correlation > 0.999 and not torch.equal(a["vectors"], b["vectors"])


def test_bfloat16_compute_agrees_with_float32_and_float16_needs_a_gpu(shapes_data, tmp_path):
    from click.testing import CliRunner

    from convlens.cli import cli

    full = _extract_in_process(shapes_data, tmp_path / "f32", "--filter", "uniform")
    half = _extract_in_process(shapes_data, tmp_path / "bf16", "--filter", "uniform", "--dtype", "bfloat16")
    a, b = samples_of_store(full), samples_of_store(half)
    assert b["vectors"].dtype == torch.float32 and torch.equal(a["position"], b["position"])
    scale = a["vectors"].abs().max()
    assert (a["vectors"] - b["vectors"]).abs().max() <= 0.05 * scale  # the README's bfloat16 tolerance
    assert json.loads((tmp_path / "bf16" / "extraction.json").read_text())["compute_dtype"] == "bfloat16"
    assert "compute_dtype" not in json.loads((tmp_path / "f32" / "extraction.json").read_text())
    refused = CliRunner().invoke(cli, extract_command(shapes_data, tmp_path / "f16", "--dtype", "float16")[3:])
    assert refused.exit_code == 1 and "--dtype float16 needs a GPU" in refused.output
    stored_half = _extract_in_process(shapes_data, tmp_path / "s16", "--filter", "uniform", "--store-dtype", "float16")
    assert samples_of_store(stored_half)["vectors"].dtype == torch.float16
