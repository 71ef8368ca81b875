import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import convlens
from convlens.activations.store import ActivationStore, store_from_tensors
from convlens.cli import cli
from convlens.core.errors import ConvlensError
from convlens.sae.base import read_sae_metadata
from convlens.sae.bench import BenchPoint, installed_saes, run_bench
from convlens.sae.planted import PlantedSpec
from convlens.sae.training import SAETrainingParams, evaluate, train_sae


def planted_dictionary(dim=64, atoms=256, samples=8192, active=4, seed=0):
    """x = s D with unit-norm atoms (rows of D) and non-negative codes with ``active`` atoms per sample. The
    generator's seed is not an SAE's: with seed 0 the dictionary was the decoder's initialisation, found at step 0."""
    generator = torch.Generator().manual_seed(seed + 7919)
    dictionary = torch.randn(atoms, dim, generator=generator)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    chosen = torch.rand(samples, atoms, generator=generator).argsort(dim=1)[:, :active]
    magnitudes = torch.rand(samples, active, generator=generator) + 0.5
    codes = torch.zeros(samples, atoms).scatter(1, chosen, magnitudes)
    return codes @ dictionary, dictionary


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    data, dictionary = planted_dictionary()
    split = (torch.arange(len(data)) % 10 == 0).to(torch.uint8)
    return store_from_tensors(tmp_path_factory.mktemp("planted") / "store", data, split=split), dictionary


def train(store, name, out, steps=600, training=None, **params):
    sae = convlens.registry.create("sae", name, input_dim=store.dim, latent_dim=256, **params)
    settings = SAETrainingParams(
        steps=steps, batch_size=256, lr=3e-3, log_every=100, val_samples=1024, **(training or {})
    )
    summary = train_sae(
        sae,
        {"name": name, "params": {"input_dim": store.dim, "latent_dim": 256, **params}},
        store,
        out,
        settings,
        progress=False,
    )
    return sae, summary


# the example package under examples/plugins (via its entry point) is trained like the built-ins
ARCHITECTURES = ["relu-l1", "topk", "jumprelu", "batchtopk", "matryoshka", "gated"]


@pytest.mark.slow
def test_every_architecture_recovers_a_planted_dictionary_with_its_defaults(tmp_path):
    # defaults and the true L0 as the target (k for the TopK family), as `convlens bench sae` trains them, on a
    # dictionary planted apart from the decoders' initialisation: 128 atoms in 64 dimensions, 3 active per sample
    point = BenchPoint(
        "planted",
        PlantedSpec(input_dim=64, atoms_per_dim=2, active=3),
        train_samples=32_768,
        val_samples=4_096,
        steps=1500,
        batch_size=256,
        lr=1e-3,
    )
    summary = run_bench([point], installed_saes(ARCHITECTURES), tmp_path / "bench", seed=0)
    scores = {row["sae"]: (row["error"], row.get("mmcs"), row.get("l0")) for row in summary["results"]}
    assert set(scores) == set(ARCHITECTURES)
    for name, (error, mmcs, l0) in scores.items():
        assert error is None and mmcs >= 0.9, (name, scores)
        assert abs(l0 - summary["results"][0]["true_l0"]) <= 0.1 * summary["results"][0]["true_l0"], (name, scores)


def test_topk_never_keeps_more_than_k_and_decodes_like_a_dense_topk(planted):
    store, _ = planted
    sae = convlens.registry.create("sae", "topk", input_dim=64, latent_dim=256, k=5, seed=3)
    x = store.split("val")["vectors"][:300]
    output = sae(x)
    assert int((output.latents != 0).sum(dim=1).max()) <= 5
    pre = (x - sae.decoder_bias) @ sae.encoder.T + sae.encoder_bias
    top = pre.topk(5, dim=1)
    dense = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(output.latents, dense)
    torch.testing.assert_close(output.reconstruction, dense @ sae.decoder + sae.decoder_bias, rtol=1e-5, atol=1e-5)


def test_topk_gradients_match_a_dense_reference_and_auxk_uses_only_dead_latents():
    torch.manual_seed(0)
    sae = convlens.registry.create("sae", "topk", input_dim=8, latent_dim=32, k=3, aux_k=4, dead_after=10).double()
    with torch.no_grad():
        sae.decoder_bias.normal_()
        sae.encoder_bias.normal_()
    reference = convlens.registry.create("sae", "topk", input_dim=8, latent_dim=32, k=3, aux_k=0).double()
    reference.load_state_dict(sae.state_dict())
    x = torch.randn(16, 8, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[20:] = True
    sae.samples_since_fired[dead] = 100
    output = sae(x)
    assert set(output.losses) == {"reconstruction", "auxk"}

    def dense_loss(module):
        pre = (x - module.decoder_bias) @ module.encoder.T + module.encoder_bias
        top = pre.topk(3, dim=1)
        latents = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        reconstruction = latents @ module.decoder + module.decoder_bias
        residual = (x - reconstruction).detach()
        aux_top = pre.masked_fill(~dead, float("-inf")).topk(4, dim=1)
        aux = torch.zeros_like(pre).scatter(1, aux_top.indices, torch.relu(aux_top.values))
        auxk = (aux @ module.decoder - residual).pow(2).sum(dim=1).mean() / 32  # no decoder bias in the aux path
        return (reconstruction - x).pow(2).sum(dim=1).mean(), auxk

    main, auxk = dense_loss(reference)
    torch.testing.assert_close(output.losses["reconstruction"], main)
    torch.testing.assert_close(output.losses["auxk"], auxk)
    output.loss.backward()
    (main + auxk).backward()
    for name in ("encoder", "decoder", "encoder_bias", "decoder_bias"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(reference, name).grad, msg=name)
    sae.zero_grad()
    sae(x).losses["auxk"].backward()
    assert torch.count_nonzero(sae.decoder.grad[~dead]) == 0  # the residual is detached: live atoms get nothing


def test_jumprelu_thresholds_move_and_l0_falls_as_the_penalty_rises(planted, tmp_path):
    store, _ = planted
    l0 = []
    for penalty in (0.001, 0.1):
        sae, summary = train(store, "jumprelu", tmp_path / f"l0-{penalty}", steps=300, l0=penalty)
        assert not torch.allclose(sae.threshold, torch.full_like(sae.threshold, 0.5))
        row = summary["final"]["train"]  # the penalty term beside the L0 it penalises, each under its own key
        assert row["l0_penalty"] == pytest.approx(penalty * row["l0"], rel=0.05)
        l0.append(summary["final"]["val"]["l0"])
    assert l0[1] < l0[0]


def test_jumprelu_warms_up_as_topk_then_starts_every_threshold_at_the_batches_kth_largest():
    torch.manual_seed(0)
    sae = convlens.registry.create("sae", "jumprelu", input_dim=8, latent_dim=32, topk_warmup=0.25).double()
    sae.initialise_from_data(torch.randn(256, 8, dtype=torch.float64), target_l0=3.0)
    before = sae.log_threshold.detach().clone()
    batches = [torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = torch.zeros((), dtype=torch.float64)
    for number, x in enumerate(batches):
        sae.training_progress = number / 16  # in the warm-up: each sample's 3 largest, no threshold, no penalty
        pre = ((x - sae.decoder_bias) @ sae.encoder.T + sae.encoder_bias).detach()
        output = sae(x)
        top = pre.topk(3, dim=1)
        torch.testing.assert_close(output.latents, torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()))
        assert set(output.losses) == {"reconstruction", "l0_penalty"} and float(output.losses["l0_penalty"]) == 0
        output.loss.backward()
        assert sae.log_threshold.grad is None
        kth = pre.reshape(-1).topk(3 * 16).values[-1]
        expected += max(1 / (number + 1), 0.01) * (kth - expected)
    torch.testing.assert_close(sae.log_threshold.detach(), before)
    torch.testing.assert_close(sae.warmup_threshold, expected)

    sae.training_progress = 0.25  # the warm-up is over: every threshold starts at the average
    x = batches[0]
    pre = ((x - sae.decoder_bias) @ sae.encoder.T + sae.encoder_bias).detach()
    output = sae(x)
    torch.testing.assert_close(sae.threshold, expected.expand(32))
    torch.testing.assert_close(output.latents, pre * (pre > expected))
    assert "l0_penalty" in output.losses and bool(sae.warmed_up)
    loaded = convlens.registry.create("sae", "jumprelu", input_dim=8, latent_dim=32).double()
    loaded.load_state_dict(sae.state_dict())
    loaded.training_progress = 0.0  # a saved SAE whose warm-up ended does not warm up again
    torch.testing.assert_close(loaded(x).latents, output.latents)


def test_tied_relu_l1_keeps_w_enc_equal_to_w_dec_transposed(planted, tmp_path):
    store, _ = planted
    sae, _ = train(store, "relu-l1", tmp_path / "tied", steps=100, tied=True)
    assert sae.encoder is None and sae.pre_bias is None  # one shared matrix: W_enc = W_dec^T, b_enc = -b_dec
    x = store.split("val")["vectors"][:50]
    expected = torch.relu((x - sae.decoder_bias) @ sae.decoder.T + sae.latent_bias)
    torch.testing.assert_close(sae.encode(x), expected)
    plain = convlens.registry.create("sae", "relu-l1", input_dim=64, latent_dim=128, bias=False, clip=0.1)
    latents = plain.encode(x)
    assert latents[(latents > 0) & (latents < 0.1)].numel() == 0
    assert {name for name, _ in plain.named_parameters()} == {"encoder", "decoder"}


@pytest.mark.parametrize("options", [{}, {"tied": True}, {"bias": False}, {"clip": 0.3}, {"tied": True, "clip": 0.3}])
def test_relu_l1_fused_training_pass_matches_autograd(options):
    """relu-l1's hand-written backward (used whenever gradients are on) gives autograd's gradients of eqs. 6-8."""
    sae = convlens.registry.create("sae", "relu-l1", input_dim=12, latent_dim=40, seed=3, **options).double()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in sae.parameters():  # non-zero biases, and roughly half of the latents active
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.5)
    x = torch.randn(30, 12, generator=generator, dtype=torch.float64)
    output = sae(x)
    weights = torch.randn(30, 40, generator=generator, dtype=torch.float64)  # an extra term on the latents
    fused = torch.autograd.grad(output.loss + (output.latents * weights).sum(), list(sae.parameters()))

    latents = sae.encode_vectors(x.clone().requires_grad_())  # the plain autograd graph of the same formula
    reconstruction = sae.decode_vectors(latents)
    reference_loss = sum(sae.loss_terms(x, reconstruction, latents).values()) + (latents * weights).sum()
    reference = torch.autograd.grad(reference_loss, list(sae.parameters()))
    assert 0.2 < float((output.latents > 0).double().mean()) < 0.8
    torch.testing.assert_close(output.loss, reference_loss - (latents * weights).sum())
    for name, got, expected in zip([name for name, _ in sae.named_parameters()], fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=name)


def stop_at(step):
    def on_step(current):
        if current == step:
            raise KeyboardInterrupt

    return on_step


def test_interrupted_training_resumes_to_the_same_weights(planted, tmp_path):
    store, _ = planted
    settings = SAETrainingParams(
        epochs=2, batch_size=256, lr=3e-3, log_every=10, checkpoint_every=20, normalize_input=True
    )
    record = {"name": "topk", "params": {"input_dim": 64, "latent_dim": 128, "k": 4, "aux_k": 16, "dead_after": 512}}

    def fresh():
        return convlens.registry.create("sae", "topk", **record["params"])

    straight = fresh()
    train_sae(straight, record, store, tmp_path / "straight", settings, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_sae(fresh(), record, store, tmp_path / "resumed", settings, progress=False, on_step=stop_at(45))
    with pytest.raises(ConvlensError, match="--resume"):
        train_sae(fresh(), record, store, tmp_path / "resumed", settings, progress=False)
    resumed = fresh()
    train_sae(resumed, record, store, tmp_path / "resumed", settings, progress=False, resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == sorted({*range(10, 58, 10), 58})
    other = SAETrainingParams(epochs=2, batch_size=128, lr=3e-3, log_every=10, checkpoint_every=20)
    with pytest.raises(ConvlensError, match="training"):
        train_sae(fresh(), record, store, tmp_path / "resumed", other, progress=False, resume=True)


def test_checkpoint_round_trip_and_a_dimension_mismatch_names_both(planted, tmp_path):
    store, _ = planted
    sae, _ = train(store, "jumprelu", tmp_path / "run", steps=20, training={"normalize_input": True})
    loaded = convlens.load_sae(tmp_path / "run" / "sae.safetensors", input_dim=64)
    x = store.split("val")["vectors"][:20]
    torch.testing.assert_close(loaded(x).reconstruction, sae.eval()(x).reconstruction)
    with pytest.raises(ConvlensError, match=r"64-dimensional inputs, but the activations here have 32 channels"):
        convlens.load_sae(tmp_path / "run" / "sae.safetensors", input_dim=32)
    narrow = store_from_tensors(tmp_path / "narrow", torch.randn(100, 32))
    with pytest.raises(ConvlensError, match=r"64-dimensional inputs.*32-channel"):
        train_sae(loaded, {"name": "jumprelu", "params": {}}, narrow, tmp_path / "x", SAETrainingParams(steps=1))
    (tmp_path / "not-sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConvlensError, match="cannot read"):
        convlens.load_sae(tmp_path / "not-sae.safetensors")


def test_train_sae_cli_on_an_extracted_store_and_sae_info(tmp_path):
    from convlens.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", n=40, size=32, seed=0)
    extract = CliRunner().invoke(
        cli,
        [
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
            str(tmp_path / "shapes"),
            "--out",
            str(tmp_path / "store"),
            "--device",
            "cpu",
        ],
    )
    assert extract.exit_code == 0, extract.output
    result = CliRunner().invoke(
        cli,
        [
            "train-sae",
            "--store",
            str(tmp_path / "store"),
            "--sae",
            "topk",
            "--k",
            "4",
            "--expansion",
            "4",
            "--steps",
            "30",
            "--batch-size",
            "32",
            "--log-every",
            "10",
            "--out",
            str(tmp_path / "sae"),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["input_dim"] == 16 and summary["latent_dim"] == 64 and summary["steps"] == 30
    assert summary["final"]["val"]["l0"] <= 4
    for name in ("config.json", "metrics.jsonl", "curves.png", "sae.safetensors", "summary.json"):
        assert (tmp_path / "sae" / name).is_file(), name
    metadata = read_sae_metadata(tmp_path / "sae" / "sae.safetensors")
    assert metadata["sae"] == "convlens:topk" and metadata["layer"] == "block3"
    assert metadata["model"]["name"] == "convlens:tiny-cnn" and metadata["params"]["k"] == 4
    info = CliRunner().invoke(cli, ["sae-info", str(tmp_path / "sae" / "sae.safetensors")])
    assert info.exit_code == 0 and "convlens:topk (16 -> 64 latents)" in info.output and "layer block3" in info.output
    again = CliRunner().invoke(
        cli,
        [
            "train-sae",
            "--store",
            str(tmp_path / "store"),
            "--sae",
            "topk",
            "--steps",
            "5",
            "--out",
            str(tmp_path / "sae"),
        ],
    )
    assert again.exit_code != 0 and "--resume" in again.output
    unknown = CliRunner().invoke(cli, ["train-sae", "--store", str(tmp_path / "store"), "--sae", "topq"])
    assert unknown.exit_code != 0 and "topk" in unknown.output


@pytest.mark.slow
def test_one_process_and_two_torchrun_processes_agree(planted, tmp_path):
    store, _ = planted
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [
        "train-sae",
        "--store",
        str(store.path),
        "--sae",
        "relu-l1",
        "--latent-dim",
        "128",
        "--steps",
        "40",
        "--batch-size",
        "256",
        "--lr",
        "0.003",
        "--log-every",
        "20",
        "--device",
        "cpu",
        "--json",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "convlens", *base, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    double = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29518",
            "-m",
            "convlens",
            *base,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert double.returncode == 0, double.stderr
    one, two = load_file(tmp_path / "one" / "sae.safetensors"), load_file(tmp_path / "two" / "sae.safetensors")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def test_evaluate_reports_fraction_of_variance_explained_against_float64(planted):
    store, _ = planted
    sae = convlens.registry.create("sae", "relu-l1", input_dim=64, latent_dim=128, seed=1)
    x = store.split("val")["vectors"][:500]
    metrics = evaluate(sae, store, "val", 500, torch.device("cpu"))
    with torch.no_grad():
        reconstruction = sae(x).reconstruction.double()
    x64 = x.double()
    fve = 1 - (reconstruction - x64).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
    assert metrics["fve"] == pytest.approx(float(fve), rel=1e-6)
    assert metrics["l0"] == pytest.approx(float((sae(x).latents != 0).sum(1).double().mean()))
    assert metrics["compression"] == pytest.approx(64 / metrics["l0"])
    assert isinstance(ActivationStore(store.path).dim, int)


def test_pareto_front_keeps_only_undominated_points():
    from convlens.sae.sweep import pareto_front

    points = [(4, 0.5), (8, 0.3), (8, 0.4), (16, 0.3), (32, 0.1), (2, 0.9)]
    assert pareto_front(points) == [5, 0, 1, 4]


def test_sweep_reads_the_store_once_for_every_configuration(planted, tmp_path, monkeypatch):
    store, _ = planted
    reads = []
    original = ActivationStore.batches

    def counting(self, *args, **kwargs):
        reads.append(kwargs.get("split", args[1] if len(args) > 1 else "train"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ActivationStore, "batches", counting)
    config = [{"sae": "topk", "params": {"k": k, "latent_dim": 256, "aux_k": 0}} for k in (2, 4, 8)]
    config += [
        {"sae": "relu-l1", "params": {"l1": 0.05, "latent_dim": value}, "group": "latent-size"} for value in (64, 256)
    ]
    config += [
        {"sae": "relu-l1", "params": {"l1": 0.05, "latent_dim": 256, "clip": value}, "group": "clip"}
        for value in (0.0, 0.1)
    ]  # clip 0 is the latent-size group's 256 run again: trained once
    (tmp_path / "sweep.json").write_text(json.dumps(config))
    result = CliRunner().invoke(
        cli,
        [
            "sweep",
            "--store",
            str(store.path),
            "--config",
            str(tmp_path / "sweep.json"),
            "--epochs",
            "3",
            "--batch-size",
            "256",
            "--lr",
            "0.003",
            "--val-samples",
            "512",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.output)
    # one read per epoch feeds all six distinct configurations, and one of the first rows (the pool the SAEs
    # initialise from and resample dead latents from)
    assert reads.count("train") == 4
    assert sweep["trained"] == 6 and len(sweep["configs"]) == 7
    rows = {row["label"]: row for row in sweep["configs"]}
    shared = rows["relu-l1[clip=0,l1=0.05,latent_dim=256]"], rows["relu-l1[l1=0.05,latent_dim=256]"]
    assert shared[0]["checkpoint"] == shared[1]["checkpoint"] and shared[0]["fve"] == shared[1]["fve"]
    assert sweep["ablations"]["clip"]["values"] == [0.0, 0.1]
    assert [rows[f"topk[aux_k=0,k={k},latent_dim=256]"]["l0"] for k in (2, 4, 8)] == [2.0, 4.0, 8.0]
    front = sweep["frontier"]["convlens:topk"]
    assert front[:2] == [f"topk[aux_k=0,k={k},latent_dim=256]" for k in (2, 4)]  # k = 8 only if it beats k = 4
    fve = [rows[label]["fve"] for label in front]
    assert fve == sorted(fve)
    assert "convlens:relu-l1" not in sweep["frontier"]  # ablation runs are not sparsity settings
    assert sweep["ablations"]["latent-size"]["parameter"] == "latent_dim"
    assert sweep["ablations"]["latent-size"]["values"] == [64, 256]
    for name in ("sweep.json", "pareto.png", "ablations.png"):
        assert (tmp_path / "out" / name).is_file()
    # each configuration's checkpoint is the SAE its row scores: reloaded, it gives the row's numbers again
    row = sweep["configs"][1]
    reloaded = evaluate(convlens.load_sae(row["checkpoint"]), store, "val", 512, torch.device("cpu"))
    assert reloaded["fve"] == pytest.approx(row["fve"], abs=1e-5) and reloaded["l0"] == pytest.approx(row["l0"])


@pytest.mark.slow
def test_evaluate_sae_on_shapes_keeps_top1_and_reports_the_floor(tmp_path):
    from convlens.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", n=480, size=32, seed=0)
    runner = CliRunner()
    steps = [
        [
            "train-model",
            "tiny-cnn",
            "--data",
            str(tmp_path / "shapes"),
            "--out",
            str(tmp_path / "model"),
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
        ],
        [
            "extract",
            "--model",
            str(tmp_path / "model"),
            "--layer",
            "block3",
            "--data",
            str(tmp_path / "shapes"),
            "--out",
            str(tmp_path / "store"),
            "--device",
            "cpu",
        ],
        [
            "train-sae",
            "--store",
            str(tmp_path / "store"),
            "--sae",
            "topk",
            "--k",
            "16",
            "--expansion",
            "4",
            "--epochs",
            "20",
            "--lr",
            "0.002",
            "--normalize-input",
            "--out",
            str(tmp_path / "sae"),
            "--device",
            "cpu",
        ],
    ]
    for arguments in steps:
        result = runner.invoke(cli, arguments)
        assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli,
        [
            "evaluate-sae",
            "--model",
            str(tmp_path / "model"),
            "--sae",
            str(tmp_path / "sae" / "sae.safetensors"),
            "--data",
            str(tmp_path / "shapes"),
            "--ablate",
            "2",
            "--ablation-images",
            "64",
            "--out",
            str(tmp_path / "new" / "eval.json"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layer"] == "block3" and report["images"] == 480  # the layer comes from the checkpoint
    top1 = report["top1"]
    assert top1["model"] > 0.5 and top1["zero"] < top1["model"] - 0.2
    assert report["top1_drop"] == pytest.approx(top1["model"] - top1["sae"])
    assert report["top1_drop"] <= 0.05  # a well-trained SAE keeps top-1 within 5 points
    assert report["kl_sae"] < report["kl_zero_ablation"] and report["kl_recovered"] > 0.8
    assert len(report["ablation"]) == 2 and report["ablation_images"] == 64
    assert len(report["ablation"][0]["logit_change"]) == 8
    assert json.loads((tmp_path / "new" / "eval.json").read_text())["top1"] == top1
    text = runner.invoke(
        cli,
        [
            "evaluate-sae",
            "--model",
            str(tmp_path / "model"),
            "--sae",
            str(tmp_path / "sae" / "sae.safetensors"),
            "--data",
            str(tmp_path / "shapes"),
            "--ablate",
            "0",
            "--max-images",
            "50",
        ],
    )
    assert text.exit_code == 0 and "with the SAE (drop" in text.output
    wrong = runner.invoke(
        cli,
        [
            "evaluate-sae",
            "--model",
            str(tmp_path / "model"),
            "--layer",
            "block2",
            "--sae",
            str(tmp_path / "sae" / "sae.safetensors"),
            "--data",
            str(tmp_path / "shapes"),
        ],
    )
    assert wrong.exit_code != 0 and "32-dimensional inputs" in wrong.output and "16 channels" in wrong.output


def test_spliced_kl_matches_a_float64_reference():
    from convlens.sae.evaluation import kl_divergence

    p, q = torch.randn(5, 7), torch.randn(5, 7)
    reference = (p.double().softmax(1) * (p.double().log_softmax(1) - q.double().log_softmax(1))).sum(1)
    torch.testing.assert_close(kl_divergence(p, q), reference)
    assert torch.allclose(kl_divergence(p, p), torch.zeros(5, dtype=torch.float64))


def poison_at(sae, step):
    """Make ``sae``'s training loss NaN at its ``step``-th training forward pass (counted from 1)."""
    real, calls = sae.loss_terms, []

    def loss_terms(x, reconstruction, latents):
        losses = real(x, reconstruction, latents)
        if sae.training:
            calls.append(step)
            if len(calls) == step:
                losses["reconstruction"] = losses["reconstruction"] * float("nan")
        return losses

    sae.loss_terms = loss_terms
    return sae


TOPK_RECORD = {"name": "topk", "params": {"input_dim": 64, "latent_dim": 128, "k": 4, "aux_k": 16, "dead_after": 512}}


def topk_run(store, out, settings, **options):
    sae = convlens.registry.create("sae", "topk", **TOPK_RECORD["params"])
    summary = train_sae(sae, TOPK_RECORD, store, out, settings, progress=False, **options)
    return sae, summary


def test_training_from_memory_and_from_the_store_gives_the_same_run(planted, tmp_path):
    store, _ = planted
    common = {"epochs": 2, "batch_size": 256, "lr": 3e-3, "log_every": 10, "checkpoint_every": 20}
    held = SAETrainingParams(**common, normalize_input=True, store_in_memory="yes")
    streamed = SAETrainingParams(**common, normalize_input=True, store_in_memory="no")
    reference, summary = topk_run(store, tmp_path / "held", held)
    assert summary["store_in_memory"] is True
    other, summary = topk_run(store, tmp_path / "streamed", streamed)
    assert summary["store_in_memory"] is False
    with pytest.raises(KeyboardInterrupt):
        topk_run(store, tmp_path / "switched", streamed, on_step=stop_at(25))
    config_file = tmp_path / "switched" / "config.json"
    config = json.loads(config_file.read_text())
    del config["training"]["store_in_memory"]  # as a run of an earlier version wrote it
    config_file.write_text(json.dumps(config))
    switched, _ = topk_run(store, tmp_path / "switched", held, resume=True)  # the setting changes no result
    rows = {run: (tmp_path / run / "metrics.jsonl").read_text() for run in ("held", "streamed", "switched")}
    assert rows["held"] == rows["streamed"] == rows["switched"] and len(rows["held"].splitlines()) == 6
    for key, value in reference.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]) and torch.equal(value, switched.state_dict()[key]), key


def previous_training_step(sae, optimizer, local):
    """The trainer's step before its bookkeeping stayed on the device (a copy, for one process): the metric sums
    read to the host at every step."""
    sae.train()
    optimizer.zero_grad(set_to_none=True)
    output = sae(local)
    loss = output.loss
    loss.backward()
    optimizer.step()
    sae.after_step()
    with torch.no_grad():
        active = output.latents.detach() != 0
        sae.record_activity(active.any(0), len(local))
        return {
            "samples": float(len(local)),
            "loss": float(loss.detach()) * len(local),
            **{name: float(term.detach()) * len(local) for name, term in output.losses.items()},
            "squared_error": float((output.reconstruction - local).double().pow(2).sum()),
            "l0": float(active.sum()),
        }


@pytest.mark.parametrize(
    "name, params",
    [("topk", {"k": 4, "aux_k": 8, "dead_after": 256}), ("relu-l1", {"l1": 0.05}), ("jumprelu", {})],
    ids=["topk", "relu-l1", "jumprelu"],
)
def test_the_metric_sums_on_the_device_equal_the_previous_per_step_sums(planted, name, params):
    from convlens.sae.training import MetricTally, adam, training_step

    store, _ = planted
    saes = [convlens.registry.create("sae", name, input_dim=64, latent_dim=128, seed=4, **params) for _ in "ab"]
    optimizers = [adam(sae.parameters(), 3e-3) for sae in saes]
    previous, tally = {}, MetricTally(torch.device("cpu"))
    for number, batch in enumerate(store.batches(256, "train", seed=1)):
        if number == 12:
            break
        for key, value in previous_training_step(saes[0], optimizers[0], batch).items():
            previous[key] = previous.get(key, 0.0) + value
        loss_sum, sums = training_step(saes[1], optimizers[1], batch, len(batch))
        assert float(loss_sum) == float(sums["loss"])
        tally.add(sums)
    assert tally.read(1) == previous
    for key, value in saes[0].state_dict().items():
        assert torch.equal(value, saes[1].state_dict()[key]), key


def test_a_non_finite_loss_names_its_step_and_keeps_the_last_good_checkpoint(planted, tmp_path):
    from convlens.runtime.run_records import load_optimizer_state

    store, _ = planted
    # without warm-up and decay, the learning rate of the first 5 steps does not depend on the run's length
    settings = SAETrainingParams(
        steps=20, batch_size=256, lr=3e-3, log_every=5, checkpoint_every=5, lr_warmup=0, lr_decay=0
    )
    sae = poison_at(convlens.registry.create("sae", "topk", **TOPK_RECORD["params"]), 7)
    with pytest.raises(ConvlensError, match=r"the SAE loss became nan at step 7; the last checkpoint in .* is kept"):
        train_sae(sae, TOPK_RECORD, store, tmp_path / "run", settings, progress=False)
    assert [json.loads(row)["step"] for row in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [5]
    weights = {}
    _, metadata = load_optimizer_state(tmp_path / "run" / "checkpoints" / "train-state.safetensors", weights)
    assert metadata["step"] == 5 and all(torch.isfinite(value).all() for value in weights.values())
    clean, _ = topk_run(store, tmp_path / "clean", SAETrainingParams(**{**settings.to_dict(), "steps": 5}))
    for key, value in clean.state_dict().items():
        assert torch.equal(weights[key], value), key


def test_a_sweep_names_the_step_where_a_configuration_failed(planted, tmp_path):
    from convlens.sae.sweep import run_sweep
    from convlens.sae.training import build_sae

    store, _ = planted
    configs = [{"sae": "topk", "params": {"k": k, "latent_dim": 128, "aux_k": 0}} for k in (2, 4)]

    def build(config):
        sae, record = build_sae(config["sae"], config["params"], store.dim, 0)
        return (poison_at(sae, 3) if config["params"]["k"] == 4 else sae), record

    settings = SAETrainingParams(steps=12, batch_size=256, lr=3e-3, log_every=5, val_samples=256)
    sweep = run_sweep(configs, build, store, tmp_path / "sweep", settings, progress=False)
    rows = {row["params"]["k"]: row for row in sweep["configs"]}
    assert rows[4]["failed"] == "loss became nan at step 3" and rows[4]["fve"] is None
    assert rows[2]["failed"] is None and rows[2]["l0"] == 2.0 and sweep["steps"] == 12


def test_store_in_memory_follows_the_free_memory(planted, tmp_path, monkeypatch):
    from convlens.sae import training

    store, _ = planted
    monkeypatch.setattr(training, "free_memory", lambda device: 1 << 20)  # the split takes about 1.9 MiB
    _, summary = topk_run(store, tmp_path / "auto", SAETrainingParams(steps=2, batch_size=256))
    assert summary["store_in_memory"] is False
    with pytest.raises(
        ConvlensError,
        match=r"store_in_memory is 'yes', but the training split .* takes 1\.8 MiB and cpu has 1\.0 MiB free",
    ):
        topk_run(store, tmp_path / "yes", SAETrainingParams(steps=2, batch_size=256, store_in_memory="yes"))


def test_a_checkpoint_that_fails_in_the_background_is_one_message(planted, tmp_path, monkeypatch):
    import errno
    import os

    import safetensors.torch

    store, _ = planted
    real_write = safetensors.torch.save_file

    def full_for_checkpoints(tensors, filename, metadata=None):
        if ".train-state.safetensors." in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_for_checkpoints)
    arguments = ["train-sae", "--store", str(store.path), "--sae", "topk", "--k", "2", "--latent-dim", "16"]
    arguments += ["--steps", "4", "--batch-size", "256", "--checkpoint-every", "2", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the disk is full" in result.output and "train-state.safetensors" in result.output
    assert not (tmp_path / "run" / "sae.safetensors").exists()
