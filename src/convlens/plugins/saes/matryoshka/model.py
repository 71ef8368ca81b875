"""The ``matryoshka`` module (Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", sec. 3).

Nested prefixes m_1 < ... < m_n = L of the dictionary, each trained to reconstruct the input without the latents
after it: loss = sum over j of ||x - x^_j||^2 with x^_j = W_dec[:m_j] z[:m_j] + b_dec, z the BatchTopK latents (as
in the paper; at inference its learned threshold) or TopK's. The prefix reconstructions are cumulative, x^_j =
x^_{j-1} + the decode of the kept latents in [m_{j-1}, m_j): one sparse decode into a bag per (sample, prefix
group), then one pass each way over the running residual (:class:`PrefixErrors`), so a step costs about one sparse
decode; in training the reconstruction is the input less the last residual. Each prefix's error is a loss term
``reconstruction_<m_j>`` and a validation metric ``mse_<m_j>``. AuxK as topk's, on the full reconstruction.
"""

from __future__ import annotations

import torch

from convlens.plugins.saes.batchtopk.api import BatchTopKSAE
from convlens.plugins.saes.topk.api import LatentBags, SparseDecode, kept_latents


class PrefixErrors(torch.autograd.Function):
    """``errors [n]``: per prefix j, the mean over rows of ``||target - sum over i <= j of parts[:, i]||^2``, for the
    decoded ``parts [B, n, D]`` of each prefix group and ``target = x - b_dec [B, D]``. One pass each way over the
    running residual, with no ``[B, n, D]`` tensor of prefix reconstructions (nor cumsum's flips in its backward)."""

    @staticmethod
    def forward(ctx, parts, target):
        residual = target.clone()
        errors = []
        for part in parts.unbind(dim=1):
            residual.sub_(part)
            errors.append(torch.dot(residual.view(-1), residual.view(-1)))
        ctx.save_for_backward(parts, residual)
        final = residual.detach().clone()  # the whole dictionary's residual, for the reconstruction (no gradient)
        ctx.mark_non_differentiable(final)
        return torch.stack(errors) / max(len(target), 1), final

    @staticmethod
    def backward(ctx, grad, _final_grad):
        parts, residual = ctx.saved_tensors
        # d errors_j / d residual_j = 2 residual_j / B, and residual_j = target - (parts_1 + ... + parts_j): part i
        # gets minus the sum over j >= i of those, the target all of them
        weights = grad * (2 / max(len(residual), 1))
        residual = residual.clone()
        summed = torch.zeros_like(residual)
        grad_parts = torch.empty_like(parts)
        for j in reversed(range(parts.shape[1])):
            summed.addcmul_(residual, weights[j])
            torch.neg(summed, out=grad_parts[:, j])
            residual.add_(parts[:, j])
        return grad_parts, summed


class MatryoshkaSAE(BatchTopKSAE):
    def __init__(self, params):
        super().__init__(params)
        self.prefixes = params.prefix_sizes
        self.activation = params.activation
        # where the prefix groups after the first start: m_1, ..., m_{n-1}
        self.register_buffer("group_starts", torch.tensor(self.prefixes[:-1], dtype=torch.long), persistent=False)
        self._pending_errors: tuple[torch.Tensor, torch.Tensor] | None = None

    def _select(self, centred: torch.Tensor, pre: torch.Tensor):
        """The activation's kept pairs, ordered by latent within each sample (so a sample's pairs of one prefix
        group are contiguous)."""
        if self.activation == "batchtopk":
            return super()._select(centred, pre)
        return self._each_samples_largest(centred, pre)

    def prefix_parts(self, values: torch.Tensor, bags: LatentBags) -> torch.Tensor:
        """``[B, n, D]``: per sample, the decode of its kept latents of each prefix group [m_{j-1}, m_j)."""
        group = torch.bucketize(bags.latents.reshape(-1), self.group_starts, right=True)
        groups = len(self.prefixes)
        by_group = bags.regrouped(bags.pair_bags() * groups + group, bags.count * groups)
        return SparseDecode.apply(values.reshape(-1), self.decoder, by_group).view(bags.count, groups, -1)

    def encode_decode(self, x):
        centred, pre, values, bags = self._sparse_encode(x)
        parts = self.prefix_parts(values, bags)
        self._keep_for_auxk(x, centred, pre)
        if not self.training or x.requires_grad:  # a reconstruction to differentiate
            return kept_latents(values, bags), parts.sum(dim=1) + self.decoder_bias
        # training: the prefix errors now, and the reconstruction from their last residual (the loss differentiates
        # the errors, nothing the reconstruction)
        errors, residual = PrefixErrors.apply(parts, centred)
        self._pending_errors = (x, errors)  # for loss_terms, which receives (x, reconstruction, latents) only
        return kept_latents(values, bags), x - residual

    def loss_terms(self, x, reconstruction, latents):
        pending, self._pending_errors = self._pending_errors, None
        if pending is not None and pending[0] is x:
            errors = pending[1]
        else:
            centred, _, values, bags = self._sparse_encode(x)
            errors, _ = PrefixErrors.apply(self.prefix_parts(values, bags), centred)
        terms = {f"reconstruction_{size}": error for size, error in zip(self.prefixes, errors.unbind())}
        return {**terms, **self._auxk_terms(x, reconstruction)}

    def validation_metrics(self, x):
        """Per prefix m_j, ``mse_<m_j>``: the sum over the rows of x of the squared error of x^_j per input element,
        in raw units (the trainer divides by the samples, giving the prefix's MSE beside the full one)."""
        _, _, values, bags = self._sparse_encode(self.normalise(x))
        prefixes = self.denormalise(self.prefix_parts(values, bags).cumsum(dim=1) + self.decoder_bias)
        errors = (prefixes.double() - x.double().unsqueeze(1)).pow(2).sum(dim=(0, 2)) / self.input_dim
        return {f"mse_{size}": error for size, error in zip(self.prefixes, errors.unbind())}
