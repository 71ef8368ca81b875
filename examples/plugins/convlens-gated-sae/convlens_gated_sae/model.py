"""The ``gated`` SAE module (Rajamanoharan et al. 2024, sec. 3).

With centred rows x_c = x - b_dec and one shared encoder matrix W_gate (one row per latent):

    pi_gate = W_gate x_c + b_gate                     gate pre-activations
    f_gate  = 1[pi_gate > 0]                          which latents fire
    W_mag   = exp(r_mag) * W_gate                     per-latent rescaling of the same rows
    f_mag   = ReLU(W_mag x_c + b_mag)                 how strongly they fire
    f       = f_gate * f_mag,   x^ = W_dec f + b_dec

Since W_mag x_c = exp(r_mag) * (W_gate x_c), one matmul serves both paths. The loss is

    reconstruction  ||x - x^||^2
    sparsity        lambda * sum_i ||d_i|| ReLU(pi_gate)_i         (d_i: decoder atom i)
    auxiliary       ||x - (W_dec' ReLU(pi_gate) + b_dec')||^2      (W_dec', b_dec': detached copies)

each averaged over rows. The Heaviside gate passes no gradient, so the gate path learns only from the
sparsity and auxiliary terms, while the magnitude path (and through it the shared weights) learns from the
reconstruction; the auxiliary term trains the encoder without pulling the decoder towards the gate's
shrunken estimate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from convlens import SparseAutoencoder, squared_error


def random_unit_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    """``rows`` random directions of dimension ``columns``, each of unit norm, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(rows, columns, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)


class GatedSAE(SparseAutoencoder):
    """Gated sparse autoencoder; ``params`` is a :class:`convlens_gated_sae.GatedParams`."""

    penalty_term = "sparsity"  # the trainer warms it up and, with a target L0, adapts its weight

    def __init__(self, params):
        super().__init__(params.input_dim, params.latents)
        self.l1 = float(params.l1)
        self.init_directions, self.seed = params.init_directions, params.seed
        atoms = random_unit_rows(self.latent_dim, self.input_dim, params.seed)
        self.decoder = nn.Parameter(atoms)  # W_dec as rows: [L, C]
        self.decoder_bias = nn.Parameter(torch.zeros(self.input_dim))  # b_dec
        self.gate = nn.Parameter(atoms.clone())  # W_gate: [L, C]
        self.gate_bias = nn.Parameter(torch.zeros(self.latent_dim))  # b_gate
        self.log_magnitude_scale = nn.Parameter(torch.zeros(self.latent_dim))  # r_mag
        self.magnitude_bias = nn.Parameter(torch.zeros(self.latent_dim))  # b_mag
        self._gate_pre: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, pi_gate) of the last encode_decode

    @property
    def sparsity(self):
        return {"l1": self.l1}

    # --- the two encoder paths ----------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pi_gate, pi_mag)`` for rows ``x``: gate and magnitude pre-activations, from one matmul."""
        projected = (x - self.decoder_bias) @ self.gate.T
        pi_gate = projected + self.gate_bias
        pi_mag = projected * self.log_magnitude_scale.exp() + self.magnitude_bias
        return pi_gate, pi_mag

    @staticmethod
    def _combine(pi_gate: torch.Tensor, pi_mag: torch.Tensor) -> torch.Tensor:
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def encode_vectors(self, x):
        return self._combine(*self.pre_activations(x))

    def preactivation_vectors(self, x):
        return self.pre_activations(x)[1]  # the magnitude path: the latent's value wherever the gate is open

    def decode_vectors(self, latents):
        return latents @ self.decoder + self.decoder_bias

    def encode_decode(self, x):
        pi_gate, pi_mag = self.pre_activations(x)
        latents = self._combine(pi_gate, pi_mag)
        # loss_terms only receives (x, reconstruction, latents); keep pi_gate for it, tagged with the rows it
        # belongs to (forward passes the same tensor to both), so a stale value is never used.
        self._gate_pre = (x, pi_gate)
        return latents, self.decode_vectors(latents)

    # --- training -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialise_from_data(self, x, target_l0=None):
        """The atoms and gate rows on directions of ``x`` (unless ``init_directions`` is random), then each gate's
        bias so that it opens on ``target L0 / latents`` of ``x`` (5 % without a target): training starts near its
        sparsity instead of with every gate open on half the samples."""
        if self.init_directions == "data":
            self.start_on_data_directions_(x, self.seed, self.decoder, self.gate)
        self.gate_bias.zero_()
        pi_gate, _ = self.pre_activations(x)
        firing = min(target_l0 / self.latent_dim if target_l0 is not None else 0.05, 1.0)
        rank = min(len(x), max(1, math.ceil((1.0 - firing) * len(x))))
        self.gate_bias.copy_(-pi_gate.float().kthvalue(rank, dim=0).values)
        self.magnitude_bias.copy_(self.gate_bias)

    @torch.no_grad()
    def resample_latents_(self, latents, directions):
        """New atoms for dead latents along badly reconstructed residuals; gate rows along them at a fifth of the
        mean live row's norm, biases and the magnitude scale reset (Bricken et al. 2023)."""
        alive = torch.ones(self.latent_dim, dtype=torch.bool, device=latents.device)
        alive[latents] = False
        norm = self.gate[alive].norm(dim=1).mean() if bool(alive.any()) else torch.ones(())
        self.decoder[latents] = directions.to(self.decoder.dtype)
        self.gate[latents] = directions.to(self.gate.dtype) * 0.2 * norm
        for row in (self.gate_bias, self.magnitude_bias, self.log_magnitude_scale):
            row[latents] = 0
        return [self.decoder, self.gate, self.gate_bias, self.magnitude_bias, self.log_magnitude_scale]

    def loss_terms(self, x, reconstruction, latents):
        cached, self._gate_pre = self._gate_pre, None
        pi_gate = cached[1] if cached is not None and cached[0] is x else self.pre_activations(x)[0]
        gate_activity = torch.relu(pi_gate)
        atom_norms = self.decoder.norm(dim=1)
        frozen = gate_activity @ self.decoder.detach() + self.decoder_bias.detach()
        return {
            "reconstruction": squared_error(reconstruction, x),
            "sparsity": self.l1 * (gate_activity * atom_norms).sum(dim=-1).mean(),
            "auxiliary": squared_error(x, frozen),
        }

    def decoder_directions(self):
        return self.decoder
