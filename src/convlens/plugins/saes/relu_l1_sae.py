"""The ``relu-l1`` module: f_enc(x) = ReLU(W_enc (x + b_enc) + b_latent) (eq. 7), f_dec(z) = W_dec z + b_dec (eq. 8).

Weights are stored with one row per latent: ``decoder [L, C]`` holds the atoms (the columns of W_dec), and the
encoder rows are the rows of W_enc; tied, the encoder is the decoder itself and b_enc = -b_dec (eqs. 9-10).
"""

from __future__ import annotations

import torch
from torch import nn

from convlens.core.sae import SparseAutoencoder


def unit_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Random directions ``[rows, columns]`` of unit norm, from ``seed``."""
    directions = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    return directions / directions.norm(dim=1, keepdim=True)


class ReluL1SAE(SparseAutoencoder):
    def __init__(self, params):
        super().__init__(params.input_dim, params.latents)
        self.l1, self.tied, self.clip = params.l1, params.tied, params.clip
        atoms = unit_rows(self.latent_dim, self.input_dim, params.seed)
        self.decoder = nn.Parameter(atoms)
        self.encoder = None if params.tied else nn.Parameter(atoms.clone())
        self.pre_bias = nn.Parameter(torch.zeros(self.input_dim)) if params.bias and not params.tied else None
        self.latent_bias = nn.Parameter(torch.zeros(self.latent_dim)) if params.bias else None
        self.decoder_bias = nn.Parameter(torch.zeros(self.input_dim)) if params.bias else None

    @property
    def sparsity(self):
        return {"l1": self.l1, "clip": self.clip}

    def encoder_rows(self) -> torch.Tensor:
        return self.decoder if self.tied else self.encoder

    def encode_vectors(self, x):
        rows = self.encoder_rows()
        if self.latent_bias is not None:
            # W_enc (x + b_enc) + b_latent = W_enc x + (W_enc b_enc + b_latent): the pre-encoder bias then gets its
            # gradient through a matrix-vector product instead of a sixth [batch x latents x inputs] matmul
            pre_bias = -self.decoder_bias if self.tied else self.pre_bias
            pre = torch.addmm(torch.addmv(self.latent_bias, rows, pre_bias), x, rows.T)
        else:
            pre = x @ rows.T
        latents = pre.relu_()  # in place: addmm keeps its inputs for backward, not its output
        if self.clip > 0:
            latents = latents * (latents >= self.clip)
        return latents

    def decode_vectors(self, latents):
        if self.decoder_bias is not None:
            return torch.addmm(self.decoder_bias, latents, self.decoder)
        return latents @ self.decoder

    def loss_terms(self, x, reconstruction, latents):
        return {"reconstruction": (reconstruction - x).pow(2).sum(dim=-1).mean(),
                "l1": self.l1 * latents.sum() / len(latents)}  # latents are non-negative: |z| = z

    def decoder_directions(self):
        return self.decoder
