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

from convlens import SparseAutoencoder, SparseLatents, squared_error, unit_rows


class LatentBags:
    """The kept ``(sample, slot)`` pairs of an ``index [B, k]`` grouped by latent, computed on first use and shared
    by the backward passes that need them: ``out[l] = sum over (b, j) with index[b, j] = l of w[b, j] * rows[b]``
    is then one embedding-bag sum per latent (about half the time of the same product as a sparse COO matmul)."""

    def __init__(self, index: torch.Tensor, latent_dim: int):
        self.index, self.latent_dim = index, latent_dim
        self._grouped: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def grouped(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._grouped is None:
            flat = self.index.reshape(-1)
            order = flat.argsort()
            counts = torch.bincount(flat, minlength=self.latent_dim)
            offsets = torch.zeros(self.latent_dim, dtype=torch.long, device=flat.device)
            torch.cumsum(counts[:-1], 0, out=offsets[1:])
            self._grouped = order, torch.div(order, self.index.shape[1], rounding_mode="floor"), offsets
        return self._grouped

    def rows_sum(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[latent_dim, D]``: per latent, the sum of ``rows[b]`` over its kept pairs weighted by ``weights[b, j]``."""
        order, sample, offsets = self.grouped()
        return F.embedding_bag(sample, rows, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])

    def gathered_dot(self, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``[B, k]``: ``rows[b] . table[index[b, j]]``, without gathering a ``[B, k, D]`` tensor."""
        count, kept = self.index.shape
        device = self.index.device
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            rows,
            table,
            self.index.reshape(-1),
            torch.arange(0, count * kept, kept, device=device),
            torch.arange(count, device=device).repeat_interleave(kept),
            0,
        ).view(count, kept)


class GatheredLinear(torch.autograd.Function):
    """``out[b, j] = x[b] . weight[index[b, j]] + bias[index[b, j]]``, forward given (``precomputed``), with a
    backward that touches only the gathered rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, bags, precomputed):
        ctx.save_for_backward(x, weight)
        ctx.bags = bags
        return precomputed

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        bags: LatentBags = ctx.bags
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(bags.index, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            grad_weight = bags.rows_sum(grad.to(x.dtype), x).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device).index_add_(
                0, bags.index.reshape(-1), grad.reshape(-1)
            )
        return grad_x, grad_weight, grad_bias, None, None


class SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * decoder[index[b, j]]`` (an embedding-bag sum). Its backward avoids
    embedding_bag's own weight gradient, which sorts every index (slower on CPU than the whole product)."""

    @staticmethod
    def forward(ctx, values, decoder, bags):
        ctx.save_for_backward(values, decoder)
        ctx.bags = bags
        return F.embedding_bag(bags.index, decoder, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, decoder = ctx.saved_tensors
        bags: LatentBags = ctx.bags
        grad_values = grad_decoder = None
        if ctx.needs_input_grad[0]:
            grad_values = bags.gathered_dot(grad, decoder)
        if ctx.needs_input_grad[1]:
            grad_decoder = bags.rows_sum(values.to(grad.dtype), grad)
        return grad_values, grad_decoder, None


class TopKSAE(SparseAutoencoder):
    def __init__(self, params):
        super().__init__(params.input_dim, params.latents)
        self.k = params.k
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
        if candidates is None:
            top, index = pre.topk(count, dim=-1, sorted=False)
        else:
            among = candidates.nonzero().squeeze(1)
            top, position = pre.index_select(1, among).topk(count, dim=-1, sorted=False)
            index = among[position]
        bags = LatentBags(index, self.latent_dim)
        values = GatheredLinear.apply(centred, self.encoder, self.encoder_bias, bags, top)
        return torch.relu(values), bags

    def _sparse_encode(self, x: torch.Tensor):
        centred = x - self.decoder_bias
        with torch.no_grad():
            pre = torch.addmm(self.encoder_bias, centred, self.encoder.T)
        values, bags = self._kept(centred, pre, self.k)
        return centred, pre, values, bags

    def encode_vectors(self, x):
        _, _, values, bags = self._sparse_encode(x)
        return SparseLatents(bags.index, values, self.latent_dim)()

    def preactivation_vectors(self, x):
        return torch.addmm(self.encoder_bias, x - self.decoder_bias, self.encoder.T)

    def decode_vectors(self, latents):
        return latents @ self.decoder + self.decoder_bias

    def encode_decode(self, x):
        centred, pre, values, bags = self._sparse_encode(x)
        reconstruction = SparseDecode.apply(values, self.decoder, bags) + self.decoder_bias
        # loss_terms receives (x, reconstruction, latents) only: keep what AuxK needs, tagged with its rows
        self._pending = (x, centred, pre) if self.training and self.aux_k > 0 and self.aux_coefficient > 0 else None
        # dense only if someone reads SAEOutput.latents (the loss does not; the trainer counts from the pairs)
        return SparseLatents(bags.index, values, self.latent_dim), reconstruction

    def loss_terms(self, x, reconstruction, latents):
        losses = {"reconstruction": squared_error(reconstruction, x)}
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is x:
            dead = self.dead_latents(self.dead_after)
            count = min(self.aux_k, int(dead.sum()))
            if count:
                _, centred, pre = pending
                values, bags = self._kept(centred, pre, count, dead)
                residual = (x - reconstruction).detach()
                modelled = SparseDecode.apply(values, self.decoder, bags)
                losses["auxk"] = self.aux_coefficient * squared_error(modelled, residual)
        return losses

    def decoder_directions(self):
        return self.decoder
