"""BatchTopK (Bussmann, Leask and Nanda 2024) and Matryoshka (Bussmann et al. 2025) SAEs against dense float64
references of their loss, gradients and inference, and trained on a planted dictionary: the learned threshold's L0
and the prefixes' reconstruction errors."""

import pytest
import torch
from click.testing import CliRunner

import convlens
from convlens.activations.store import store_from_tensors
from convlens.cli import cli
from convlens.core.errors import ParameterError
from convlens.sae.training import SAETrainingParams, train_sae
from convlens.testing import check_component

PARAMETERS = ("encoder", "decoder", "encoder_bias", "decoder_bias")


def planted_dictionary(dim=32, atoms=128, samples=8192, active=4, seed=0):
    """x = s D with unit-norm atoms (rows of D) and non-negative codes with ``active`` atoms per sample."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, dim, generator=generator)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    chosen = torch.rand(samples, atoms, generator=generator).argsort(dim=1)[:, :active]
    codes = torch.zeros(samples, atoms).scatter(1, chosen, torch.rand(samples, active, generator=generator) + 0.5)
    return codes @ dictionary


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    data = planted_dictionary()
    split = (torch.arange(len(data)) % 8 == 0).to(torch.uint8)
    return store_from_tensors(tmp_path_factory.mktemp("planted") / "store", data, split=split)


def trained(store, out, name, steps=400, **params):
    record = {"input_dim": store.dim, "latent_dim": 128, "k": 4, "aux_k": 0, **params}
    sae = convlens.registry.create("sae", name, **record)
    settings = SAETrainingParams(steps=steps, batch_size=256, lr=3e-3, log_every=steps, val_samples=1024)
    summary = train_sae(sae, {"name": name, "params": record}, store, out, settings, progress=False)
    return sae, summary


def random_sae(name, **params):
    """A float64 SAE of 8 inputs and 32 latents with random biases, so every term of the formulas matters."""
    torch.manual_seed(0)
    sae = convlens.registry.create("sae", name, input_dim=8, latent_dim=32, k=3, **params).double()
    with torch.no_grad():
        sae.decoder_bias.normal_()
        sae.encoder_bias.normal_(0, 0.1)
    return sae


def dense_preactivations(sae, x):
    return (x - sae.decoder_bias) @ sae.encoder.T + sae.encoder_bias


def dense_batch_top_k(pre, k):
    """BatchTopK of the paper: ReLU, then the k x B largest of the whole batch kept, the rest zero."""
    activations = torch.relu(pre).reshape(-1)
    kept = activations.topk(k * len(pre)).indices
    return torch.zeros_like(activations).scatter(0, kept, activations[kept]).view(pre.shape)


def dense_top_k(pre, k):
    top = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))


def dense_auxk(sae, pre, reconstruction, x, dead, aux_k):
    """Gao et al. 2024 AuxK: each row's aux_k largest dead latents model the detached residual, without b_dec."""
    top = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=1)
    aux = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    residual = (x - reconstruction).detach()
    return sae.aux_coefficient * (aux @ sae.decoder - residual).pow(2).sum(dim=1).mean()


def assert_gradients_equal(sae, reference):
    for name in PARAMETERS:
        torch.testing.assert_close(getattr(sae, name).grad, getattr(reference, name).grad, msg=name)


def test_batchtopk_keeps_k_times_the_batch_and_equals_a_dense_reference_with_auxk():
    sae = random_sae("batchtopk", aux_k=4, dead_after=10)
    reference = random_sae("batchtopk", aux_k=0)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[20:] = True
    sae.samples_since_fired[dead] = 100
    x = torch.randn(16, 8, dtype=torch.float64)
    output = sae(x)

    pre = dense_preactivations(reference, x)
    latents = dense_batch_top_k(pre, 3)
    assert int((latents != 0).sum()) == 3 * 16  # enough positive pre-activations: every kept one is active
    reconstruction = latents @ reference.decoder + reference.decoder_bias
    main = (reconstruction - x).pow(2).sum(dim=1).mean()
    auxk = dense_auxk(reference, pre, reconstruction, x, dead, 4)
    assert output.latent_activity()[0] == 3 * 16
    torch.testing.assert_close(output.latents, latents)
    torch.testing.assert_close(output.reconstruction, reconstruction)
    assert set(output.losses) == {"reconstruction", "auxk"}
    torch.testing.assert_close(output.losses["reconstruction"], main)
    torch.testing.assert_close(output.losses["auxk"], auxk)
    output.loss.backward()
    (main + auxk).backward()
    assert_gradients_equal(sae, reference)


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
def test_the_warm_up_keeps_each_samples_k_largest_then_the_batchs(name):
    sae = random_sae(name, aux_k=0, topk_warmup=0.3)
    x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pre = dense_preactivations(sae, x).detach()
    sae.training_progress = 0.29  # the trainer's share of the steps done
    output = sae(x)
    torch.testing.assert_close(output.latents, dense_top_k(pre, 3))
    assert int(sae.threshold_batches) == 0  # the inference threshold learns from the batch-wide choice only
    sae.training_progress = 0.3
    output = sae(x)
    torch.testing.assert_close(output.latents, dense_batch_top_k(pre, 3))
    assert (output.latents != 0).sum(dim=1).unique().numel() > 1  # samples keep different counts now
    assert int(sae.threshold_batches) == 1


PATTERNS = [(300, "tied rows"), (1000, "tied rows"), (300, "tied latents"), (1000, "sampled rows larger")]


@pytest.mark.parametrize("rows, pattern", PATTERNS)
def test_a_large_batch_keeps_exactly_its_largest_activations(rows, pattern):
    sae = convlens.registry.create("sae", "batchtopk", input_dim=16, latent_dim=64, k=5, aux_k=0)
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(rows))
    if pattern == "tied rows":  # a third of the batch one row: its activations tie, the k x B-th largest among them
        x[: rows // 3] = x[0]
    elif pattern == "tied latents":  # one encoder row for all: a sample's 64 activations tie, and 5 x 300 / 64 is
        with torch.no_grad():  # not whole, so the batch keeps some of one sample's tied latents
            sae.encoder.copy_(sae.encoder[0].clone())
    else:  # the rows the CPU search samples for its lower bound (every B // 64-th) far larger: the bound misses
        x[:: rows // 64] *= 10
    output = sae(x)
    expected = dense_batch_top_k(dense_preactivations(sae, x).detach(), 5)
    assert int((output.latents != 0).sum()) == 5 * rows
    kept = output.latents[output.latents != 0].sort().values
    torch.testing.assert_close(kept, expected[expected != 0].sort().values)


def test_batchtopk_inference_is_a_jumprelu_at_the_threshold_of_the_smallest_kept_activations():
    sae = random_sae("batchtopk", aux_k=0, threshold_lr=0.25)
    batches = [torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    expected = torch.zeros((), dtype=torch.float64)
    for number, x in enumerate(batches):
        sae(x)
        activations = dense_batch_top_k(dense_preactivations(sae, x).detach(), 3)
        smallest = activations[activations > 0].min()
        expected += max(0.25, 1 / (number + 1)) * (smallest - expected)  # a running mean, then a moving average
    torch.testing.assert_close(sae.threshold, expected)
    assert int(sae.threshold_batches) == 6

    sae.eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    pre = dense_preactivations(sae, x).detach()
    latents = pre * (pre > expected)
    output = sae(x)
    torch.testing.assert_close(output.latents, latents)
    torch.testing.assert_close(output.reconstruction, latents @ sae.decoder + sae.decoder_bias)
    torch.testing.assert_close(sae.encode(x[:1]), latents[:1])  # one sample alone: no batch needed
    assert int(sae.threshold_batches) == 6  # inference leaves the threshold alone


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_matryoshka_loss_terms_and_gradients_equal_a_dense_reference(activation):
    sae = random_sae("matryoshka", aux_k=0, prefixes=(4, 12), activation=activation)
    reference = random_sae("matryoshka", aux_k=0, prefixes=(4, 12), activation=activation)
    assert sae.prefixes == (4, 12, 32)
    x = torch.randn(16, 8, dtype=torch.float64)
    output = sae(x)

    pre = dense_preactivations(reference, x)
    latents = dense_batch_top_k(pre, 3) if activation == "batchtopk" else dense_top_k(pre, 3)
    errors = {}
    for size in (4, 12, 32):  # each prefix reconstructs with its own latents and the decoder bias
        prefix = latents[:, :size] @ reference.decoder[:size] + reference.decoder_bias
        errors[f"reconstruction_{size}"] = (prefix - x).pow(2).sum(dim=1).mean()
    assert set(output.losses) == set(errors)
    for name, error in errors.items():
        torch.testing.assert_close(output.losses[name], error, msg=name)
    torch.testing.assert_close(output.reconstruction, latents @ reference.decoder + reference.decoder_bias)
    output.loss.backward()
    sum(errors.values()).backward()
    assert_gradients_equal(sae, reference)


def test_matryoshka_validation_metrics_are_each_prefixs_squared_error_in_raw_units_at_inference():
    sae = random_sae("matryoshka", aux_k=0, prefixes=(4, 12))
    sae.set_normalisation(torch.linspace(-1, 1, 8, dtype=torch.float64), 2.0)
    x = torch.randn(16, 8, dtype=torch.float64)
    sae(x)  # one training batch sets the threshold
    sae.eval()
    with torch.no_grad():
        metrics = sae.validation_metrics(x)
        normalised = (x - sae.input_mean) / 2.0
        pre = dense_preactivations(sae, normalised)
        latents = pre * (pre > sae.threshold)
    for size in (4, 12, 32):
        prefix = (latents[:, :size] @ sae.decoder[:size] + sae.decoder_bias) * 2.0 + sae.input_mean
        torch.testing.assert_close(metrics[f"mse_{size}"], (prefix - x).pow(2).sum() / 8, msg=str(size))


@pytest.mark.slow
def test_a_trained_batchtopk_threshold_gives_about_k_latents_per_validation_sample(planted, tmp_path):
    store = planted
    sae, summary = trained(store, tmp_path / "run", "batchtopk")
    validation = store.split("val")["vectors"]
    sae.eval()
    with torch.no_grad():
        l0 = float((sae.encode(validation) != 0).sum(dim=1).double().mean())
    assert l0 == pytest.approx(4, rel=0.1)
    assert summary["final"]["val"]["l0"] == pytest.approx(l0)  # the trainer evaluates at inference too
    assert summary["final"]["val"]["fve"] > 0.7

    path = tmp_path / "copy.safetensors"
    convlens.save_sae(sae, path, name="batchtopk", params={"input_dim": store.dim, "latent_dim": 128, "k": 4})
    loaded = convlens.load_sae(path).eval()
    assert torch.equal(loaded.threshold, sae.threshold) and float(loaded.threshold) > 0
    with torch.no_grad():
        assert torch.equal(loaded.encode(validation), sae.encode(validation))


@pytest.mark.slow
def test_a_trained_matryoshkas_prefix_errors_fall_as_the_prefix_grows(planted, tmp_path):
    store = planted
    sae, summary = trained(store, tmp_path / "run", "matryoshka", steps=200, prefixes=(8, 32))
    assert {"reconstruction_8", "reconstruction_32", "reconstruction_128"} <= set(summary["final"]["train"])
    sae.eval()
    with torch.no_grad():
        metrics = sae.validation_metrics(store.split("val")["vectors"])
    count = len(store.split("val")["vectors"])
    errors = [float(metrics[f"mse_{size}"]) / count for size in (8, 32, 128)]
    assert errors[0] > errors[1] > errors[2]
    reported = summary["final"]["val"]  # the trainer's evaluation, on the same validation samples
    assert [reported[f"mse_{size}"] for size in (8, 32, 128)] == pytest.approx(errors)
    assert errors[2] == pytest.approx(reported["mse"], rel=1e-6)  # the full prefix is the SAE's reconstruction


def test_both_pass_the_contract_checks_and_a_matryoshka_trains_from_the_cli(planted, tmp_path):
    check_component("sae", "batchtopk")
    check_component("sae", "matryoshka")
    check_component("sae", "matryoshka", activation="topk", prefix_count=3)
    arguments = ["train-sae", "--store", str(planted.path), "--sae", "matryoshka", "--k", "2", "--latent-dim", "16"]
    arguments += ["--prefixes", "4,8", "--steps", "3", "--batch-size", "256", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    loaded = convlens.load_sae(tmp_path / "run" / "sae.safetensors")
    # steps 0 and 1 of 3 in the warm-up (each sample's k largest), step 2 the batch's: one batch set the threshold
    assert loaded.prefixes == (4, 8, 16) and int(loaded.threshold_batches) == 1


def test_matryoshka_prefix_sizes_are_geometric_by_default_and_must_increase():
    sae = convlens.registry.create("sae", "matryoshka", input_dim=8, latent_dim=256, k=4, prefix_count=3)
    assert sae.prefixes == (64, 128, 256)
    with pytest.raises(ParameterError, match=r"prefix sizes \[8, 4, 256\] must increase"):
        convlens.registry.create("sae", "matryoshka", input_dim=8, latent_dim=256, k=4, prefixes=(8, 4))
    with pytest.raises(ParameterError, match="must increase"):
        convlens.registry.create("sae", "matryoshka", input_dim=8, latent_dim=16, k=4, prefix_count=6)
