"""SAE training, sweeps and evaluation on CUDA against the CPU on the same small inputs (skipped by name without a
GPU), the target-L0 controller, BatchTopK and Matryoshka included, and `bench sae` on the GPU.

Tolerances: batches read from a store reach the GPU bit for bit, streamed or held in memory; the same SAE
evaluated on both devices agrees within 1e-4 relative (only the summation order differs); a train-sae or sweep run
on both devices (float32 matmuls without TF32, but other summation orders, which Adam's normalised steps amplify
for near-zero gradients) ends with train loss, validation MSE, variance explained and L0 within 1 % relative and
decoder atoms of mean cosine similarity >= 0.99; evaluate-sae's layer metrics agree within 1 %, its KL divergences
within 5 % and its top-1 within two images of forty (cuDNN may pick TF32 convolutions, which can flip a near tie).
"""

import json

import pytest
import torch
from click.testing import CliRunner

import convlens
from convlens.activations.store import store_from_tensors
from convlens.cli import cli
from convlens.sae.training import evaluate

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
DEVICES = ("cpu", DEVICE)
RELATIVE = 0.01


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """4,096 samples of 32 channels from 128 planted unit atoms, three active per sample; a tenth validation."""
    generator = torch.Generator().manual_seed(0)
    atoms = torch.randn(128, 32, generator=generator)
    atoms /= atoms.norm(dim=1, keepdim=True)
    chosen = torch.rand(4096, 128, generator=generator).argsort(dim=1)[:, :3]
    codes = torch.zeros(4096, 128).scatter(1, chosen, torch.rand(4096, 3, generator=generator) + 0.5)
    split = (torch.arange(4096) % 10 == 0).to(torch.uint8)
    folder = tmp_path_factory.mktemp("cuda-sae") / "store"
    return store_from_tensors(folder, codes @ atoms, split=split, samples_per_shard=1000)


def invoke(*arguments):
    result = CliRunner().invoke(cli, [str(argument) for argument in arguments])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def assert_relatively_close(cpu, device, what):
    assert device == pytest.approx(cpu, rel=RELATIVE), what


def mean_atom_cosine(a, b):
    a = a.decoder_directions().detach().cpu()
    b = b.decoder_directions().detach().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def test_store_batches_reach_the_gpu_bit_for_bit(store):
    for split in ("train", "val"):
        expected = list(store.batches(100, split, seed=3, epoch=1))
        streamed = list(store.batches(100, split, seed=3, epoch=1, device=DEVICE))
        resident = store.load_into_memory(split, DEVICE)
        held = list(store.batches(100, split, seed=3, epoch=1, resident=resident))
        assert all(batch.device.type == torch.device(DEVICE).type for batch in streamed + held)
        for want, got, got_held in zip(expected, streamed, held, strict=True):
            assert torch.equal(want, got.cpu()) and torch.equal(want, got_held.cpu())


@pytest.mark.parametrize("name", ["topk", "relu-l1"])
def test_the_same_sae_evaluates_alike_on_both_devices(store, name):
    sae = convlens.registry.create("sae", name, input_dim=32, latent_dim=64, seed=1)
    metrics = {device: evaluate(sae.to(device), store, "val", 400, torch.device(device)) for device in DEVICES}
    for key, value in metrics["cpu"].items():
        assert metrics[DEVICE][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize(
    "name, options",
    [
        ("topk", ["--k", "3"]),
        ("relu-l1", ["--l1", "0.05"]),
        ("relu-l1", ["--target-l0", "3"]),  # the controller's state lives on the device
        ("jumprelu", ["--target-l0", "3"]),
        ("batchtopk", ["--k", "3"]),  # CUDA takes the flat top-k, the CPU its sampled candidates
        ("matryoshka", ["--k", "3"]),
    ],
    ids=["topk", "relu-l1", "relu-l1-target", "jumprelu-target", "batchtopk", "matryoshka"],
)
def test_train_sae_on_the_gpu_ends_where_the_cpu_run_does(store, tmp_path, name, options):
    summaries, saes = {}, {}
    for number, device in enumerate(DEVICES):
        out = tmp_path / f"run-{number}"
        settings = ["--steps", 40, "--batch-size", 256, "--lr", "0.001", "--log-every", 20, "--val-samples", 400]
        run = ["train-sae", "--store", store.path, "--sae", name, *options, "--latent-dim", 64, *settings]
        summaries[device] = invoke(*run, "--out", out, "--device", device, "--json")
        saes[device] = convlens.load_sae(out / "sae.safetensors")
    cpu, gpu = summaries["cpu"]["final"], summaries[DEVICE]["final"]
    assert summaries[DEVICE]["store_in_memory"] and summaries[DEVICE]["steps"] == 40
    assert_relatively_close(cpu["train"]["loss"], gpu["train"]["loss"], "train loss")
    for key in ("mse", "fve", "l0"):
        assert_relatively_close(cpu["val"][key], gpu["val"][key], f"validation {key}")
    assert mean_atom_cosine(saes["cpu"], saes[DEVICE]) >= 0.99


def test_a_sweep_on_the_gpu_ends_where_the_cpu_sweep_does(store, tmp_path):
    configs = [{"sae": "topk", "params": {"k": k, "latent_dim": 64, "aux_k": 0}} for k in (2, 4)]
    configs.append({"sae": "relu-l1", "params": {"l1": 0.05, "latent_dim": 64}})
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    settings = ["--steps", 30, "--batch-size", 256, "--lr", "0.001", "--val-samples", 400]
    run = ["sweep", "--store", store.path, "--config", tmp_path / "configs.json", *settings]
    sweeps = {
        device: invoke(*run, "--out", tmp_path / f"sweep-{number}", "--device", device, "--json")
        for number, device in enumerate(DEVICES)
    }
    for cpu, gpu in zip(sweeps["cpu"]["configs"], sweeps[DEVICE]["configs"], strict=True):
        assert cpu["label"] == gpu["label"] and cpu["failed"] is None and gpu["failed"] is None
        for key in ("mse", "fve", "l0"):
            assert_relatively_close(cpu[key], gpu[key], f"{cpu['label']} {key}")


def test_evaluate_sae_on_the_gpu_matches_the_cpu(tmp_path):
    from convlens.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", n=40, size=32, seed=0)
    model = ["--model", "tiny-cnn", "--model-input-size", "32", "--model-width", "4"]
    data = ["--data", tmp_path / "shapes"]
    invoke("extract", *model, "--layer", "block3", *data, "--out", tmp_path / "store", "--device", "cpu", "--json")
    sae = ["--sae", "topk", "--k", "4", "--expansion", "4", "--steps", 30, "--batch-size", 32]
    invoke("train-sae", "--store", tmp_path / "store", *sae, "--out", tmp_path / "sae", "--device", "cpu", "--json")
    checkpoint = ["--sae", tmp_path / "sae" / "sae.safetensors"]
    ablation = ["--ablate", "2", "--ablation-images", "16"]
    reports = {
        device: invoke("evaluate-sae", *model, *checkpoint, *data, *ablation, "--device", device, "--json")
        for device in DEVICES
    }
    cpu, gpu = reports["cpu"], reports[DEVICE]
    assert cpu["images"] == gpu["images"] == 40
    for key in ("model", "sae", "zero"):
        assert abs(cpu["top1"][key] - gpu["top1"][key]) <= 2 / 40, key
    for key in ("layer_fve", "layer_l0"):
        assert gpu[key] == pytest.approx(cpu[key], rel=RELATIVE), key
    for key in ("kl_sae", "kl_zero_ablation"):
        assert gpu[key] == pytest.approx(cpu[key], rel=0.05, abs=1e-4), key
    assert len(cpu["ablation"]) == len(gpu["ablation"]) == 2


def test_bench_sae_runs_on_the_gpu(tmp_path):
    arguments = ["bench", "sae", "--grid", "quick", "--sae", "topk", "--device", DEVICE, "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "bench.json").read_text())
    (row,) = summary["results"]
    assert summary["device"].startswith("cuda") and row["error"] is None and row["mmcs"] >= 0.9
