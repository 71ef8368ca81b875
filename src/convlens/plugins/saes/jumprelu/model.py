"""The ``jumprelu`` module (Rajamanoharan et al. 2024, "Jumping Ahead", sec. 3-4).

z = JumpReLU_theta(W_enc (x - b_dec) + b_enc), theta = exp(log_threshold) per latent, loss = ||x - x^||^2 +
lambda * ||z||_0. The step function H(pre - theta) has no useful gradient; the straight-through estimator
gives theta the pseudo-derivatives of eqs. 11-12 with a rectangle kernel K(u) = 1 for |u| < 1/2:
d JumpReLU / d theta = -(theta / eps) K((pre - theta) / eps), d H / d theta = -(1 / eps) K((pre - theta) / eps).
The pre-activations get the ordinary gradient of the JumpReLU output and none from the L0 term.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from convlens import SparseAutoencoder, squared_error, unit_rows


def _rectangle(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return (((pre - threshold) / bandwidth).abs() < 0.5).to(pre.dtype)


class JumpReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_threshold = (-(threshold / ctx.bandwidth) * _rectangle(pre, threshold, ctx.bandwidth) * grad).sum(dim=0)
        return grad_pre, grad_threshold, None


class StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_threshold = (-(1.0 / ctx.bandwidth) * _rectangle(pre, threshold, ctx.bandwidth) * grad).sum(dim=0)
        return torch.zeros_like(pre), grad_threshold, None


class JumpReLUSAE(SparseAutoencoder):
    def __init__(self, params):
        super().__init__(params.input_dim, params.latents)
        self.l0, self.bandwidth = params.l0, params.bandwidth
        atoms = unit_rows(self.latent_dim, self.input_dim, params.seed)
        self.decoder = nn.Parameter(atoms)
        self.encoder = nn.Parameter(atoms.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(self.latent_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(self.input_dim))
        self.log_threshold = nn.Parameter(torch.full((self.latent_dim,), math.log(params.threshold)))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def sparsity(self):
        return {"l0": self.l0}

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        # W_enc (x - b_dec) + b_enc = W_enc x + (b_enc - W_enc b_dec): b_dec's gradient through a matrix-vector
        # product rather than a full matmul back to the input rows
        return torch.addmm(torch.addmv(self.encoder_bias, self.encoder, self.decoder_bias, alpha=-1), x, self.encoder.T)

    def preactivation_vectors(self, x):
        return self.pre_activations(x)

    def encode_vectors(self, x):
        return JumpReLUFunction.apply(self.pre_activations(x), self.threshold, self.bandwidth)

    def decode_vectors(self, latents):
        return latents @ self.decoder + self.decoder_bias

    def encode_decode(self, x):
        pre = self.pre_activations(x)
        latents = JumpReLUFunction.apply(pre, self.threshold, self.bandwidth)
        self._pending = (x, pre)  # for loss_terms, which receives (x, reconstruction, latents) only
        return latents, self.decode_vectors(latents)

    def loss_terms(self, x, reconstruction, latents):
        pending, self._pending = self._pending, None
        pre = pending[1] if pending is not None and pending[0] is x else self.pre_activations(x)
        active = StepFunction.apply(pre, self.threshold, self.bandwidth).sum(dim=-1).mean()
        return {"reconstruction": squared_error(reconstruction, x), "l0": self.l0 * active}

    def decoder_directions(self):
        return self.decoder
