"""The ``topk`` module: z = TopK(W_enc (x - b_dec) + b_enc) with the kept values through ReLU, x^ = W_dec z + b_dec.

Only the k kept latents of a sample take part after the encoder matmul: their pre-activations are gathered,
the reconstruction is an embedding-bag sum of k decoder rows, and the backward pass touches k rows of the
encoder and decoder per sample (:class:`GatheredLinear`), so a step costs about one dense matmul instead of
the five of a dense SAE. AuxK (Gao et al. 2024, sec. A.2) models the detached residual with the aux_k largest
dead latents, without the decoder bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convlens.core.sae import SparseAutoencoder

from .relu_l1_sae import unit_rows


class GatheredLinear(torch.autograd.Function):
    """``out[b, j] = x[b] . weight[index[b, j]] + bias[index[b, j]]``, forward given (``precomputed``), with a
    backward that touches only the gathered rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, precomputed):
        ctx.save_for_backward(x, weight, index)
        return precomputed

    @staticmethod
    def backward(ctx, grad):
        x, weight, index = ctx.saved_tensors
        flat_index, flat_grad = index.reshape(-1), grad.reshape(-1)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(index, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            grad_weight = _rows_scatter(index, grad, x, weight.shape[0]).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device).index_add_(
                0, flat_index, flat_grad)
        return grad_x, grad_weight, grad_bias, None, None


class SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * decoder[index[b, j]]`` (an embedding-bag sum). Its backward avoids
    embedding_bag's own weight gradient, which sorts every index (slower on CPU than the whole product)."""

    @staticmethod
    def forward(ctx, values, index, decoder):
        ctx.save_for_backward(values, index, decoder)
        return F.embedding_bag(index, decoder, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, index, decoder = ctx.saved_tensors
        grad_values = grad_decoder = None
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                weights = values.detach().requires_grad_(True)
                bag = F.embedding_bag(index, decoder.detach(), per_sample_weights=weights, mode="sum")
                (grad_values,) = torch.autograd.grad(bag, weights, grad)
        if ctx.needs_input_grad[2]:
            grad_decoder = _rows_scatter(index, values, grad, decoder.shape[0])
        return grad_values, None, grad_decoder


def _rows_scatter(index: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    """``out[l] = sum over (b, j) with index[b, j] = l of weights[b, j] * rows[b]``, as a sparse product."""
    count, kept = index.shape
    sample = torch.arange(count, device=index.device).repeat_interleave(kept)
    scatter = torch.sparse_coo_tensor(torch.stack([index.reshape(-1), sample]), weights.reshape(-1).to(rows.dtype),
                                      (size, count), check_invariants=False)
    return torch.sparse.mm(scatter, rows).contiguous()


class TopKSAE(SparseAutoencoder):
    def __init__(self, params):
        super().__init__(params.input_dim, params.latents)
        self.k = min(params.k, self.latent_dim)
        self.aux_k, self.aux_coefficient, self.dead_after = params.aux_k, params.aux_coefficient, params.dead_after
        atoms = unit_rows(self.latent_dim, self.input_dim, params.seed)
        self.decoder = nn.Parameter(atoms)
        self.encoder = nn.Parameter(atoms.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(self.latent_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(self.input_dim))
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def sparsity(self):
        return {"k": self.k}

    def _kept(self, centred: torch.Tensor, pre: torch.Tensor, count: int, candidates: torch.Tensor | None = None):
        """(values after ReLU, indices) of the ``count`` largest pre-activations (among ``candidates``)."""
        masked = pre if candidates is None else pre.masked_fill(~candidates, float("-inf"))
        top, index = masked.topk(count, dim=-1, sorted=False)
        values = GatheredLinear.apply(centred, self.encoder, self.encoder_bias, index, top)
        return torch.relu(values), index

    def _sparse_encode(self, x: torch.Tensor):
        centred = x - self.decoder_bias
        with torch.no_grad():
            pre = torch.addmm(self.encoder_bias, centred, self.encoder.T)
        values, index = self._kept(centred, pre, self.k)
        return centred, pre, values, index

    def encode_vectors(self, x):
        _, _, values, index = self._sparse_encode(x)
        return torch.zeros(x.shape[0], self.latent_dim, dtype=values.dtype, device=x.device).scatter_(1, index, values)

    def decode_vectors(self, latents):
        return latents @ self.decoder + self.decoder_bias

    def encode_decode(self, x):
        centred, pre, values, index = self._sparse_encode(x)
        reconstruction = SparseDecode.apply(values, index, self.decoder) + self.decoder_bias

        def latents() -> torch.Tensor:  # built only if someone reads SAEOutput.latents; the loss does not
            return torch.zeros(x.shape[0], self.latent_dim, dtype=values.dtype, device=x.device).scatter_(
                1, index, values)

        # loss_terms receives (x, reconstruction, latents) only: keep what AuxK needs, tagged with its rows
        self._pending = (x, centred, pre) if self.training and self.aux_k > 0 and self.aux_coefficient > 0 else None
        return latents, reconstruction

    def loss_terms(self, x, reconstruction, latents):
        losses = {"reconstruction": (reconstruction - x).pow(2).sum(dim=-1).mean()}
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is x:
            dead = self.dead_latents(self.dead_after)
            count = min(self.aux_k, int(dead.sum()))
            if count:
                _, centred, pre = pending
                values, index = self._kept(centred, pre, count, dead)
                residual = (x - reconstruction).detach()
                modelled = SparseDecode.apply(values, index, self.decoder)
                losses["auxk"] = self.aux_coefficient * (modelled - residual).pow(2).sum(dim=-1).mean()
        return losses

    def decoder_directions(self):
        return self.decoder
