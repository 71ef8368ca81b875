"""The ``topk`` module: z = TopK(W_enc (x - b_dec) + b_enc) with the kept values through ReLU, x^ = W_dec z + b_dec.

Only the k kept latents of a sample take part after the encoder matmul: their pre-activations are gathered,
the reconstruction is an embedding-bag sum of k decoder rows, and the backward pass touches k rows of the
encoder and decoder per sample (:class:`GatheredLinear`), so a step costs about one dense matmul instead of
the five of a dense SAE. AuxK (Gao et al. 2024, sec. A.2) models the detached residual with the aux_k largest
dead latents, without the decoder bias.

The kept pairs may also be ragged (a row keeps any number of latents, as BatchTopK's): :class:`LatentBags` then
holds them flat with each bag's offset, and the same autograd functions serve both (``topk.api`` exposes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convlens import SparseAutoencoder, SparseLatents, squared_error, unit_rows


class LatentOrder:
    """The pairs of ``latents`` (any shape, read flat) ordered by latent, and where each latent's pairs start; computed
    on first use, and shared by the bags that hold the same pairs (:meth:`LatentBags.regrouped`)."""

    def __init__(self, latents: torch.Tensor, latent_dim: int):
        self.latents, self.latent_dim = latents, latent_dim
        self._computed: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._computed is None:
            flat = self.latents.reshape(-1)
            # stable: with several threads on CPU several times faster than the unstable sort
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=self.latent_dim)
            starts = torch.zeros(self.latent_dim, dtype=torch.long, device=flat.device)
            torch.cumsum(counts[:-1], 0, out=starts[1:])
            self._computed = order, starts
        return self._computed


class LatentBags:
    """The kept ``(bag, latent)`` pairs of an encoding; the pairs of a bag sum into one output row. Either
    ``latents [B, k]``, bag b holding ``latents[b]`` (TopK: every bag the same size), or flat ``latents [P]`` in bag
    order with the bag of each pair ``bag [P]`` and where each bag starts, ``offsets [bags]`` (BatchTopK, and
    Matryoshka's bags of a row's latents in one prefix group: ragged, empty bags allowed; see :meth:`ragged`).

    Grouped by latent on first use and shared by the backward passes that need it: ``out[l] = sum over the pairs
    (b, l) of w * rows[b]`` is then one embedding-bag sum per latent (about half the time of the same product as a
    sparse COO matmul)."""

    def __init__(
        self,
        latents: torch.Tensor,
        latent_dim: int,
        bag: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        order: LatentOrder | None = None,
    ):
        self.latents, self.latent_dim = latents, latent_dim
        self.bag, self.offsets = bag, offsets
        self.order = order or LatentOrder(latents, latent_dim)
        self._grouped: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def ragged(
        cls, bag: torch.Tensor, latents: torch.Tensor, bags: int, latent_dim: int, order: LatentOrder | None = None
    ) -> LatentBags:
        """Flat pairs ordered by ``bag`` (non-decreasing), into ``bags`` bags."""
        starts = torch.searchsorted(bag, torch.arange(bags, device=bag.device))  # unlike bincount, no wait on cuda
        return cls(latents, latent_dim, bag, starts, order)

    def regrouped(self, bag: torch.Tensor, bags: int) -> LatentBags:
        """The same pairs in the same order, in ``bags`` other bags (``bag [P]`` non-decreasing), sharing the latent
        order (one sort for both)."""
        return LatentBags.ragged(bag, self.latents.reshape(-1), bags, self.latent_dim, self.order)

    @property
    def regular(self) -> bool:
        return self.offsets is None

    @property
    def count(self) -> int:
        """The number of bags."""
        return len(self.latents) if self.offsets is None else len(self.offsets)

    def pair_bags(self) -> torch.Tensor:
        """``[P]``: the bag of each pair, in pair order."""
        if self.bag is not None:
            return self.bag
        count, kept = self.latents.shape
        return torch.arange(count, device=self.latents.device).repeat_interleave(kept)

    def grouped(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pairs in latent order, their bags, where each latent's pairs start)."""
        if self._grouped is None:
            order, starts = self.order()
            if self.bag is None:
                bag = torch.div(order, self.latents.shape[1], rounding_mode="floor")
            else:
                bag = self.bag[order]
            self._grouped = order, bag, starts
        return self._grouped

    def bag_sum(self, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[bags, D]``: per bag, the sum of ``table[latent]`` over its pairs weighted by ``weights`` (per pair)."""
        return F.embedding_bag(self.latents, table, self.offsets, mode="sum", per_sample_weights=weights)

    def rows_sum(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[latent_dim, D]``: per latent, the sum of ``rows[bag]`` over its pairs weighted by ``weights``."""
        order, bag, offsets = self.grouped()
        return F.embedding_bag(bag, rows, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])

    def gathered_dot(self, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Per pair, ``rows[bag] . table[latent]`` (shaped like ``latents``), without gathering a ``[P, D]`` tensor."""
        offsets = self.offsets
        if offsets is None:
            count, kept = self.latents.shape
            offsets = torch.arange(0, count * kept, kept, device=self.latents.device)
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            rows, table, self.latents.reshape(-1), offsets, self.pair_bags(), 0
        ).view(self.latents.shape)


class GatheredLinear(torch.autograd.Function):
    """Per kept pair, ``x[bag] . weight[latent] + bias[latent]`` (the bags are the rows of ``x``), forward given
    (``precomputed``), with a backward that touches only the gathered rows."""

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
            grad_x = bags.bag_sum(weight, grad.to(weight.dtype))
        if ctx.needs_input_grad[1]:
            grad_weight = bags.rows_sum(grad.to(x.dtype), x).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device).index_add_(
                0, bags.latents.reshape(-1), grad.reshape(-1)
            )
        return grad_x, grad_weight, grad_bias, None, None


class SparseDecode(torch.autograd.Function):
    """``out[bag] = sum over its pairs of values * decoder[latent]`` (an embedding-bag sum). Its backward avoids
    embedding_bag's own weight gradient, which sorts every index (slower on CPU than the whole product)."""

    @staticmethod
    def forward(ctx, values, decoder, bags):
        ctx.save_for_backward(values, decoder)
        ctx.bags = bags
        return bags.bag_sum(decoder, values)

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


class RaggedLatents(SparseLatents):
    """:class:`SparseLatents` given by flat pairs: ``values [P]`` of the latents ``index [P]`` on the rows ``rows
    [P]`` of a batch of ``count`` rows (a row may hold any number of them)."""

    def __init__(self, rows: torch.Tensor, index: torch.Tensor, values: torch.Tensor, count: int, latent_dim: int):
        super().__init__(index, values, latent_dim)
        self.rows, self.count = rows, count

    def __call__(self) -> torch.Tensor:
        dense = torch.zeros(self.count, self.latent_dim, dtype=self.values.dtype, device=self.values.device)
        return dense.index_put((self.rows, self.index), self.values)


def kept_latents(values: torch.Tensor, bags: LatentBags) -> SparseLatents:
    """The latents of kept ``values`` whose bags are the rows of a batch."""
    if bags.regular:
        return SparseLatents(bags.latents, values, bags.latent_dim)
    return RaggedLatents(bags.pair_bags(), bags.latents, values, bags.count, bags.latent_dim)


class TopKSAE(SparseAutoencoder):
    def __init__(self, params):
        super().__init__(params.input_dim, params.latents)
        self.k = params.k
        self.aux_k, self.aux_coefficient, self.dead_after = params.aux_k, params.aux_coefficient, params.dead_after
        self.init_directions, self.seed = params.init_directions, params.seed
        atoms = unit_rows(self.latent_dim, self.input_dim, params.seed)
        self.decoder = nn.Parameter(atoms)
        self.encoder = nn.Parameter(atoms.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(self.latent_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(self.input_dim))
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def sparsity(self):
        return {"k": self.k}

    @torch.no_grad()
    def initialise_from_data(self, x, target_l0=None):
        """The latents on directions of ``x`` unless ``init_directions`` is random."""
        if self.init_directions == "data":
            self.start_on_data_directions_(x, self.seed, self.decoder, self.encoder)

    def _kept(self, centred: torch.Tensor, pre: torch.Tensor, count: int, candidates: torch.Tensor | None = None):
        """(values after ReLU, bags) of each row's ``count`` largest pre-activations (among ``candidates``)."""
        if candidates is None:
            top, index = pre.topk(count, dim=-1, sorted=False)
        else:
            among = candidates.nonzero().squeeze(1)
            top, position = pre.index_select(1, among).topk(count, dim=-1, sorted=False)
            index = among[position]
        return self._gathered(centred, top, LatentBags(index, self.latent_dim))

    def _gathered(self, centred: torch.Tensor, top: torch.Tensor, bags: LatentBags):
        """(values after ReLU, bags) of the kept pre-activations ``top`` of the pairs in ``bags`` (one bag per row),
        their gradient reaching only the kept rows of the encoder."""
        values = GatheredLinear.apply(centred, self.encoder, self.encoder_bias, bags, top)
        return torch.relu(values), bags

    def _select(self, centred: torch.Tensor, pre: torch.Tensor):
        """The activation, as (kept values after ReLU, their bags): here each row's k largest pre-activations."""
        return self._kept(centred, pre, self.k)

    def _sparse_encode(self, x: torch.Tensor):
        centred = x - self.decoder_bias
        with torch.no_grad():
            pre = torch.addmm(self.encoder_bias, centred, self.encoder.T)
        values, bags = self._select(centred, pre)
        return centred, pre, values, bags

    def encode_vectors(self, x):
        _, _, values, bags = self._sparse_encode(x)
        return kept_latents(values, bags)()

    def preactivation_vectors(self, x):
        return torch.addmm(self.encoder_bias, x - self.decoder_bias, self.encoder.T)

    def decode_vectors(self, latents):
        return latents @ self.decoder + self.decoder_bias

    def encode_decode(self, x):
        centred, pre, values, bags = self._sparse_encode(x)
        reconstruction = SparseDecode.apply(values, self.decoder, bags) + self.decoder_bias
        self._keep_for_auxk(x, centred, pre)
        # dense only if someone reads SAEOutput.latents (the loss does not; the trainer counts from the pairs)
        return kept_latents(values, bags), reconstruction

    def loss_terms(self, x, reconstruction, latents):
        return {"reconstruction": squared_error(reconstruction, x), **self._auxk_terms(x, reconstruction)}

    def _keep_for_auxk(self, x: torch.Tensor, centred: torch.Tensor, pre: torch.Tensor) -> None:
        # loss_terms receives (x, reconstruction, latents) only: keep what AuxK needs, tagged with its rows
        self._pending = (x, centred, pre) if self.training and self.aux_k > 0 and self.aux_coefficient > 0 else None

    def _auxk_terms(self, x: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
        """AuxK: the detached residual of ``reconstruction`` modelled by each row's aux_k largest dead latents."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not x:
            return {}
        dead = self.dead_latents(self.dead_after)
        count = min(self.aux_k, int(dead.sum()))
        if not count:
            return {}
        _, centred, pre = pending
        values, bags = self._kept(centred, pre, count, dead)
        residual = (x - reconstruction).detach()
        modelled = SparseDecode.apply(values, self.decoder, bags)
        return {"auxk": self.aux_coefficient * squared_error(modelled, residual)}

    def decoder_directions(self):
        return self.decoder
