"""The third-party example plugin under examples/plugins/convlens-gated-sae: a gated SAE added purely through its
own ``convlens`` entry point.

The entry-point tests need the example installed (the README install command does it:
``pip install -e examples/plugins/convlens-gated-sae``) and fail with that instruction otherwise; the forward
tests import the package from the example folder when it is not installed.
Recovery of a planted dictionary through the shared trainer is in ``test_saes.py``.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import require_installed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "convlens-gated-sae"
DIST = "convlens-gated-sae"

try:
    from convlens_gated_sae import GatedParams
except ModuleNotFoundError:  # not installed: use the source folder (the entry point is then absent)
    sys.path.insert(0, str(EXAMPLE))
    from convlens_gated_sae import GatedParams
from convlens_gated_sae.model import GatedSAE  # noqa: E402  (after the fallback above)


@pytest.fixture
def installed_example():
    """The README's install command installs the example; without it the entry-point tests fail, not skip."""
    require_installed(DIST, EXAMPLE)


# --- (1) discovery through the entry point ---------------------------------------------------------------------
def test_registry_lists_gated_from_the_example_distribution(installed_example, convlens_registry):
    entry_points = [ep for ep in importlib.metadata.entry_points(group="convlens") if ep.dist.name == DIST]
    assert [(ep.name, ep.value) for ep in entry_points] == [(DIST, "convlens_gated_sae")]

    listed = [c for c in convlens_registry.list("sae") if c.name == "gated"]
    assert [(c.dist, c.version, c.qualified_name) for c in listed] == [(DIST, "0.1.0", f"{DIST}:gated")]
    assert {"relu-l1", "topk", "jumprelu", "gated"} <= {c.name for c in convlens_registry.list("sae")}
    info = {p.dist: p for p in convlens_registry.plugins()}[DIST]
    assert info.status == "ok" and info.counts["sae"] == 1

    described = convlens_registry.describe("sae", f"{DIST}:gated")
    assert described["source"] == "convlens_gated_sae.model:GatedSAE"
    assert {p["name"] for p in described["params"]} == {
        "input_dim",
        "latent_dim",
        "expansion",
        "seed",
        "init_directions",
        "l1",
    }

    sae = convlens_registry.create("sae", "gated", input_dim=16, latent_dim=64, l1=0.25)
    assert isinstance(sae, GatedSAE) and sae.sparsity == {"l1": 0.25}
    from convlens.testing import check_component

    check_component("sae", "gated", registry=convlens_registry, input_dim=16, latent_dim=64)


def test_checkpoint_round_trip_through_the_registry(installed_example, convlens_registry, tmp_path):
    import convlens
    from convlens.sae.base import save_sae

    params = {"input_dim": 8, "latent_dim": 24, "l1": 0.2, "seed": 3}
    sae = convlens_registry.create("sae", "gated", **params)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    save_sae(sae, tmp_path / "sae.safetensors", name="gated", params=params)
    loaded = convlens.load_sae(tmp_path / "sae.safetensors", input_dim=8)
    assert isinstance(loaded, GatedSAE) and loaded.sparsity == {"l1": 0.2}
    x = torch.randn(5, 8, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).latents, sae(x).latents)


def test_listing_the_plugin_does_not_import_torch(installed_example):
    code = (
        "import sys, convlens.registry as r\n"
        "assert [c.dist for c in r.list('sae', 'gated')] == ['convlens-gated-sae']\n"
        "assert 'torch' not in sys.modules, 'listing imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- (2) the forward pass, computed by hand ----------------------------------------------------------------------
def _scrambled_sae(input_dim=6, latent_dim=10, seed=0) -> GatedSAE:
    """A float64 gated SAE whose every parameter is moved away from its initial value."""
    sae = GatedSAE(GatedParams(input_dim=input_dim, latent_dim=latent_dim, l1=0.3, seed=seed)).double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return sae


def _by_hand(sae: GatedSAE, x: torch.Tensor):
    """Latents, reconstruction and losses straight from the paper's equations (W as [latent, input] rows)."""
    w_gate, b_gate, b_mag, r_mag = sae.gate, sae.gate_bias, sae.magnitude_bias, sae.log_magnitude_scale
    w_dec, b_dec = sae.decoder, sae.decoder_bias
    centred = x - b_dec
    pi_gate = centred @ w_gate.T + b_gate
    f_gate = (pi_gate > 0).double()
    w_mag = torch.exp(r_mag)[:, None] * w_gate
    f_mag = torch.relu(centred @ w_mag.T + b_mag)
    latents = f_gate * f_mag
    reconstruction = latents @ w_dec + b_dec
    frozen = torch.relu(pi_gate) @ w_dec.detach() + b_dec.detach()
    losses = {
        "reconstruction": ((reconstruction - x) ** 2).sum(dim=1).mean(),
        "sparsity": sae.l1 * (torch.relu(pi_gate) * w_dec.norm(dim=1)).sum(dim=1).mean(),
        "auxiliary": ((x - frozen) ** 2).sum(dim=1).mean(),
    }
    return pi_gate, centred @ w_mag.T + b_mag, latents, reconstruction, losses


def test_forward_matches_the_equations_in_float64():
    sae = _scrambled_sae()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pi_gate, pi_mag, latents, reconstruction, losses = _by_hand(sae, x)
    # the draw exercises every case: gate shut, gate open with f_mag > 0, gate open with f_mag clipped to 0
    assert bool((pi_gate <= 0).any()) and bool(((pi_gate > 0) & (pi_mag > 0)).any())
    assert bool(((pi_gate > 0) & (pi_mag <= 0)).any())

    output = sae(x)
    torch.testing.assert_close(output.latents, latents, rtol=0, atol=1e-12)
    torch.testing.assert_close(output.reconstruction, reconstruction, rtol=0, atol=1e-12)
    assert set(output.losses) == set(losses)
    for name, value in losses.items():
        torch.testing.assert_close(output.losses[name], value, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(sae.encode(x), latents, rtol=0, atol=1e-12)
    # loss_terms called on its own (after a stray encode_decode of other rows) recomputes pi_gate for its rows
    sae.encode_decode(x.flip(0))
    alone = sae.loss_terms(x, reconstruction.detach(), latents.detach())
    for name, value in losses.items():
        torch.testing.assert_close(alone[name], value, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(sae.decode(latents), reconstruction, rtol=0, atol=1e-12)

    # the same rows as a conv map [N, C, H, W] give the same latents, position by position
    grid = x[:6].T.reshape(1, 6, 2, 3)
    torch.testing.assert_close(sae.encode(grid), latents[:6].T.reshape(1, 10, 2, 3), rtol=0, atol=1e-12)

    # gradients of the whole loss agree with autograd through the hand-written equations
    output.loss.backward()
    module_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    sum(_by_hand(sae, x)[4].values()).backward()
    for name, parameter in sae.named_parameters():
        torch.testing.assert_close(module_grads[name], parameter.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_gradient_routing_of_the_loss_terms():
    sae = _scrambled_sae(seed=4)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def grads(term):
        sae.zero_grad(set_to_none=True)
        sae(x).losses[term].backward()
        return {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in sae.named_parameters()}

    auxiliary = grads("auxiliary")
    assert torch.count_nonzero(auxiliary["decoder"]) == 0  # the decoder weights are frozen in this term
    # b_dec is frozen in the decoding too: its only gradient is through the encoder's centring x - b_dec
    with torch.no_grad():
        pi_gate = (x - sae.decoder_bias) @ sae.gate.T + sae.gate_bias
        residual = x - (torch.relu(pi_gate) @ sae.decoder + sae.decoder_bias)
        d_pi_gate = -2 / len(x) * (residual @ sae.decoder.T) * (pi_gate > 0)
    torch.testing.assert_close(auxiliary["decoder_bias"], -(d_pi_gate @ sae.gate).sum(dim=0), rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(auxiliary["gate"]) > 0 and torch.count_nonzero(auxiliary["gate_bias"]) > 0
    assert torch.count_nonzero(auxiliary["log_magnitude_scale"]) == 0  # the gate path only

    reconstruction = grads("reconstruction")
    assert torch.count_nonzero(reconstruction["gate_bias"]) == 0  # b_gate acts only through the Heaviside step
    for name in ("decoder", "decoder_bias", "gate", "log_magnitude_scale", "magnitude_bias"):
        assert torch.count_nonzero(reconstruction[name]) > 0, name

    sparsity = grads("sparsity")
    assert torch.count_nonzero(sparsity["magnitude_bias"]) == 0 and torch.count_nonzero(sparsity["gate_bias"]) > 0

    # finite differences agree with the analytic gradient of the full loss in the input
    assert torch.autograd.gradcheck(lambda rows: sae(rows).loss, (x.clone().requires_grad_(),))


def test_initialisation_follows_the_paper_and_the_seed():
    sae = GatedSAE(GatedParams(input_dim=16, latent_dim=48, seed=7))
    torch.testing.assert_close(sae.decoder.norm(dim=1), torch.ones(48))
    assert torch.equal(sae.gate, sae.decoder) and sae.gate.data_ptr() != sae.decoder.data_ptr()
    for name in ("decoder_bias", "gate_bias", "log_magnitude_scale", "magnitude_bias"):
        assert torch.count_nonzero(getattr(sae, name)) == 0, name
    assert sae.decoder_directions() is sae.decoder
    assert torch.equal(GatedSAE(GatedParams(input_dim=16, latent_dim=48, seed=7)).decoder, sae.decoder)
    assert not torch.equal(GatedSAE(GatedParams(input_dim=16, latent_dim=48, seed=8)).decoder, sae.decoder)
    assert GatedSAE(GatedParams(input_dim=16, expansion=2)).latent_dim == 32
