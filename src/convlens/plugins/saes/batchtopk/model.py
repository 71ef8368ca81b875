"""The ``batchtopk`` module (Bussmann, Leask and Nanda 2024, "BatchTopK Sparse Autoencoders").

Training: z = BatchTopK(ReLU(W_enc (x - b_dec) + b_enc)), x^ = W_dec z + b_dec, where BatchTopK keeps the k x B
largest activations of the whole batch of B samples, so a sample keeps any number of latents and the batch k per
sample on average. The gradients are TopK's (through the kept values only), on topk's sparse path with ragged pairs.

Inference: a JumpReLU with one threshold for every latent, z = pre * (pre > theta), so a sample's latents do not
depend on its batch. theta estimates the expected smallest positive kept activation of a training batch (the paper's
sec. 3): the running mean over the first 1 / threshold_lr training batches, then an exponential moving average at
that rate, so it follows the encoder as it trains. Until a training batch has set theta, inference keeps the batch's
top k x B as training does. AuxK as topk's.

Warm-up: over the first ``topk_warmup`` share of the training steps each sample keeps its own k largest (TopK),
the batch-wide choice only after. Chosen by measurement, on planted dictionaries of the ``convlens bench sae``
default grid: from random directions the batch-wide choice settles on mixtures of atoms where the dictionary is most
superposed (32 dimensions, 512 atoms, 2 active: MMCS 0.87, Matryoshka 0.82; 64 dimensions, 1,024 atoms: 0.93, 0.90),
while TopK recovers them (0.997, 0.988); with half of the steps per sample first, BatchTopK recovers them too
(0.989, 0.996; Matryoshka 0.957, 0.993; with 30 %: 0.986, 0.990; Matryoshka 0.939, 0.988). On convolutional
activations the warm-up did not cost variance explained (2,000 steps, tiny-cnn's block 3 on shapes /
efficientnet-lite0's block 3 on 20 photos: 0.858 -> 0.865 / 0.704 -> 0.713, Matryoshka 0.859 -> 0.864 / 0.713 ->
0.720).
"""

from __future__ import annotations

import math

import torch

from convlens.plugins.saes.topk.api import LatentBags, TopKSAE

# On CPU torch.topk over one flat tensor runs on one thread (several times topk's row-wise top-k); the k x B largest
# are then searched among the entries at or above a lower bound of the (k x B)-th largest, the bound taken from a
# sample of SAMPLE_ROWS rows at a rank SAMPLE_MARGIN times its share of k x B. On CUDA the flat top-k is fast and
# the search would wait for the device.
SAMPLE_ROWS = 64
SAMPLE_MARGIN = 1.25


def batch_largest(pre: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, flat indices) of the ``count`` largest entries of ``pre [B, L]``, in row-major order."""
    flat = pre.reshape(-1)
    candidates = None if pre.is_cuda or len(pre) < 2 * SAMPLE_ROWS else _candidates(pre, count)
    if candidates is None:
        top, index = flat.topk(count, sorted=False)
        index, order = index.sort(stable=True)
        return top[order], index
    values = flat.take(candidates)
    smallest = values.topk(count, sorted=False).values.min()  # the count-th largest
    above, tied = values > smallest, values == smallest
    # of the entries equal to the count-th largest, the first in row-major order fill the count (no sort needed)
    kept = above | (tied & (tied.cumsum(0) <= count - above.sum()))
    position = kept.nonzero().squeeze(1)
    return values[position], candidates[position]


def _candidates(pre: torch.Tensor, count: int) -> torch.Tensor | None:
    """Flat indices (ascending) of the entries at or above a lower bound of the ``count``-th largest of ``pre``, or
    None when the sample's bound was too high (fewer than ``count`` entries reach it)."""
    sample = pre[:: len(pre) // SAMPLE_ROWS].reshape(-1)
    rank = min(sample.numel(), math.ceil(SAMPLE_MARGIN * count * sample.numel() / pre.numel()))
    bound = sample.topk(rank, sorted=False).values.min()
    candidates = (pre.reshape(-1) >= bound).nonzero().squeeze(1)
    return candidates if len(candidates) >= count else None


class BatchTopKSAE(TopKSAE):
    penalty_term = None  # no penalty: k is its own target, as TopK's

    def __init__(self, params):
        super().__init__(params)
        self.threshold_lr, self.topk_warmup = params.threshold_lr, params.topk_warmup
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.int64))

    def _select(self, centred: torch.Tensor, pre: torch.Tensor):
        """Training (and inference before any training batch): the batch's k x B largest pre-activations, each
        training batch moving theta (in the warm-up: each sample's k largest); inference: those above theta."""
        if self.training and self.training_progress < self.topk_warmup:
            return self._each_samples_largest(centred, pre)
        if not self.training and bool(self.threshold_batches):
            flat = (pre > self.threshold).reshape(-1).nonzero().squeeze(1)
            return self._ragged(centred, pre.reshape(-1).take(flat), flat, len(pre))
        top, flat = batch_largest(pre, self.k * len(pre))
        if self.training:
            self._update_threshold(top)
        return self._ragged(centred, top, flat, len(pre))

    def _each_samples_largest(self, centred: torch.Tensor, pre: torch.Tensor):
        """(values after ReLU, bags) of each sample's k largest pre-activations, ordered by latent."""
        top, index = pre.topk(self.k, dim=-1, sorted=False)
        index, order = index.sort(dim=1)
        return self._gathered(centred, top.gather(1, order), LatentBags(index, self.latent_dim))

    def _ragged(self, centred: torch.Tensor, top: torch.Tensor, flat: torch.Tensor, rows: int):
        """(values after ReLU, bags) of the kept pre-activations ``top`` at row-major ``flat`` indices."""
        row = torch.div(flat, self.latent_dim, rounding_mode="floor")
        bags = LatentBags.ragged(row, flat - row * self.latent_dim, rows, self.latent_dim)
        return self._gathered(centred, top, bags)

    @torch.no_grad()
    def _update_threshold(self, top: torch.Tensor) -> None:
        """theta moves toward the batch's smallest positive kept activation, on the device (nothing waits for it)."""
        smallest = torch.where(top > 0, top, math.inf).min().to(self.threshold.dtype)
        found = torch.isfinite(smallest)
        rate = (self.threshold_batches + 1).reciprocal().to(self.threshold.dtype).clamp_min(self.threshold_lr)
        self.threshold.add_(torch.where(found, rate * (smallest - self.threshold), 0.0))
        self.threshold_batches.add_(found.to(torch.int64))
