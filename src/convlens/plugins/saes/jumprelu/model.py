"""The ``jumprelu`` module (Rajamanoharan et al. 2024, "Jumping Ahead", sec. 3-4).

z = JumpReLU_theta(W_enc (x - b_dec) + b_enc), theta = exp(log_threshold) per latent, loss = ||x - x^||^2 +
lambda * ||z||_0. The step function H(pre - theta) has no useful gradient; the straight-through estimator
gives theta the pseudo-derivatives of eqs. 11-12 with a rectangle kernel K(u) = 1 for |u| < 1/2:
d JumpReLU / d theta = -(theta / eps) K((pre - theta) / eps), d H / d theta = -(1 / eps) K((pre - theta) / eps).
The pre-activations get the ordinary gradient of the JumpReLU output and none from the L0 term.

Unless given, the thresholds and the bandwidth come from the data at the start of training
(:meth:`JumpReLUSAE.initialise_from_data`): each latent's threshold starts at the quantile of its pre-activations
above which it fires on ``target L0 / latents`` of the samples (``FIRING_WITHOUT_TARGET`` without a target), so the
SAE is as sparse as asked from the first step, and epsilon is ``BANDWIDTH_SHARE`` times the median spread (standard
deviation) of the pre-activations, the scale the thresholds move on. Started near 0 instead (the paper's theta =
0.001), every latent fires at first, the latents settle as mixtures of atoms in that dense phase, and the L0 penalty
then only raises thresholds: on a planted dictionary (64 dimensions, 256 atoms, 4 active, 1,500 steps) the atoms
were recovered with MMCS 0.56 instead of 0.77 (0.95 in 4,000 steps).

Warm-up: from random directions, thresholds that select what fires settle on mixtures of features where they
are most superposed, and most latents die in the first tenth of the steps (raising a threshold is the quickest
way to drop a latent whose direction does not yet help). So over the first ``topk_warmup`` share of the steps each
sample keeps its k largest pre-activations instead (TopK, k = the target L0, or the start's 1 in 20 of the latents
without one), with no threshold and no penalty; the (k x B)-th largest pre-activation of each batch is averaged
meanwhile (a running mean, then a moving average, as BatchTopK's inference threshold), and at the end of the
warm-up every threshold starts there. Measured on the ``convlens bench sae`` default grid: on its most superposed
point (32 dimensions, 512 atoms, 2 active) MMCS 0.75 without the warm-up, 0.93 with it.

A latent whose pre-activations all lie below its threshold gets no gradient from either term and stays dead. The
pre-activation loss (Anthropic, "Circuits Updates - January 2025", JumpReLU training) gives the latents dead for
``dead_after`` samples the gradient of ``pre_act * sum_i ReLU(theta_i - pre_i) ||d_i||``, which raises their
pre-activations until they fire again; live latents do not feel it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from convlens import SparseAutoencoder, squared_error, unit_rows


def _rectangle(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
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


FIRING_WITHOUT_TARGET = 0.05  # the share of samples each latent fires on at the start without a target L0
MIN_THRESHOLD_SHARE = 0.05  # no initial threshold below this share of the median spread of the pre-activations
BANDWIDTH_SHARE = 0.1  # epsilon, as a share of that spread
# Adam moves log(theta) by about the learning rate per step whatever the gradient: the thresholds, which carry the
# L0 controller's corrections, move 10x faster than the weights and do not decay with them, so the L0 follows the
# target to the last step
THRESHOLD_LR_SCALE = 10.0
# the warm-up's estimate of the thresholds: the running mean of the first 1 / rate batches, then a moving average
WARMUP_THRESHOLD_RATE = 0.01
DEFAULT_THRESHOLD = 0.5  # the initial threshold when neither given nor set from the data


class JumpReLUSAE(SparseAutoencoder):
    penalty_term = "l0_penalty"  # not "l0": the trainer reports the L0 itself under that name
    optional_state = ("bandwidth", "warmup_k", "warmup_threshold", "warmup_batches", "warmed_up")

    def __init__(self, params):
        super().__init__(params.input_dim, params.latents)
        self.l0, self.pre_act, self.dead_after = params.l0, params.pre_act, params.dead_after
        self.given_threshold, self.given_bandwidth = params.threshold, params.bandwidth
        self.init_directions, self.seed = params.init_directions, params.seed
        atoms = unit_rows(self.latent_dim, self.input_dim, params.seed)
        self.decoder = nn.Parameter(atoms)
        self.encoder = nn.Parameter(atoms.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(self.latent_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(self.input_dim))
        threshold = params.threshold if params.threshold is not None else DEFAULT_THRESHOLD
        self.log_threshold = nn.Parameter(torch.full((self.latent_dim,), math.log(threshold)))
        self.register_buffer("bandwidth", torch.tensor(params.bandwidth if params.bandwidth is not None else 0.05))
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (x, pre; None in the warm-up)
        self.topk_warmup = params.topk_warmup
        # set by initialise_from_data; a loaded or directly trained SAE has no warm-up pending
        self.register_buffer("warmup_k", torch.zeros((), dtype=torch.int64))
        self.register_buffer("warmup_threshold", torch.zeros(()))
        self.register_buffer("warmup_batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("warmed_up", torch.ones((), dtype=torch.bool))
        self._warm_k: int | None = None  # warmup_k while warming up, read from the device once; None: not read
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_warm_k", None))

    def parameter_groups(self):
        others = [parameter for name, parameter in self.named_parameters() if name != "log_threshold"]
        return [{"params": others}, {"params": [self.log_threshold], "lr_scale": THRESHOLD_LR_SCALE, "lr_decay": False}]

    @torch.no_grad()
    def initialise_from_data(self, x, target_l0=None):
        if self.init_directions == "data":
            self.start_on_data_directions_(x, self.seed, self.decoder, self.encoder)
        pre = self.pre_activations(x).float()
        spread = pre.std(dim=0).median().clamp_min(1e-6)
        if self.given_threshold is None:
            firing = target_l0 / self.latent_dim if target_l0 is not None else FIRING_WITHOUT_TARGET
            rank = min(len(pre), max(1, math.ceil((1.0 - min(firing, 1.0)) * len(pre))))
            quantile = pre.kthvalue(rank, dim=0).values
            self.log_threshold.copy_(quantile.clamp_min(spread * MIN_THRESHOLD_SHARE).log())
        if self.given_bandwidth is None:
            self.bandwidth.copy_(spread * BANDWIDTH_SHARE)
        firing = target_l0 if target_l0 is not None else FIRING_WITHOUT_TARGET * self.latent_dim
        self.warmup_k.fill_(min(self.latent_dim, max(1, round(firing))))
        self.warmed_up.fill_(self.topk_warmup == 0)
        self._warm_k = None

    @torch.no_grad()
    def resample_latents_(self, latents, directions):
        alive = torch.ones(self.latent_dim, dtype=torch.bool, device=latents.device)
        alive[latents] = False
        norm = self.encoder[alive].norm(dim=1).mean() if bool(alive.any()) else torch.ones(())
        threshold = self.log_threshold[alive].median() if bool(alive.any()) else self.log_threshold.mean()
        self.decoder[latents] = directions.to(self.decoder.dtype)
        self.encoder[latents] = directions.to(self.encoder.dtype) * norm
        self.encoder_bias[latents] = 0
        self.log_threshold[latents] = threshold
        return [self.decoder, self.encoder, self.encoder_bias, self.log_threshold]

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
        if self.training and self._warming_up():
            if self.training_progress < self.topk_warmup:
                return self._warm_up_step(x, pre)
            self._end_warm_up()
        latents = JumpReLUFunction.apply(pre, self.threshold, self.bandwidth)
        self._pending = (x, pre)  # for loss_terms, which receives (x, reconstruction, latents) only
        return latents, self.decode_vectors(latents)

    def _warming_up(self) -> bool:
        if self._warm_k is None:
            self._warm_k = 0 if bool(self.warmed_up) else int(self.warmup_k)
        return self._warm_k > 0

    def _warm_up_step(self, x: torch.Tensor, pre: torch.Tensor):
        """Each sample's k largest pre-activations (after ReLU) kept; the batch's (k x B)-th largest averaged."""
        k = self._warm_k or 1
        top, index = pre.topk(k, dim=-1, sorted=False)
        latents = torch.zeros_like(pre).scatter(1, index, torch.relu(top))
        with torch.no_grad():
            smallest_kept = pre.reshape(-1).topk(k * len(pre), sorted=False).values.min()
            rate = (self.warmup_batches + 1).reciprocal().to(pre.dtype).clamp_min(WARMUP_THRESHOLD_RATE)
            self.warmup_threshold.add_(rate * (smallest_kept - self.warmup_threshold))
            self.warmup_batches.add_(1)
        self._pending = (x, None)
        return latents, self.decode_vectors(latents)

    @torch.no_grad()
    def _end_warm_up(self) -> None:
        self.log_threshold.copy_(self.warmup_threshold.clamp_min(1e-6).log().expand_as(self.log_threshold))
        self.warmed_up.fill_(True)
        self._warm_k = 0

    def loss_terms(self, x, reconstruction, latents):
        pending, self._pending = self._pending, None
        pre = pending[1] if pending is not None and pending[0] is x else self.pre_activations(x)
        if pre is None:  # a warm-up step: no penalty
            return {"reconstruction": squared_error(reconstruction, x), "l0_penalty": reconstruction.new_zeros(())}
        active = StepFunction.apply(pre, self.threshold, self.bandwidth).sum(dim=-1).mean()
        terms = {"reconstruction": squared_error(reconstruction, x), "l0_penalty": self.l0 * active}
        if self.training and self.pre_act > 0:
            terms["pre_act"] = self._pre_activation_loss(pre)
        return terms

    def _pre_activation_loss(self, pre: torch.Tensor) -> torch.Tensor:
        """``pre_act`` times the batch mean of ``sum_i ReLU(theta_i - pre_i) ||d_i||`` over the dead latents."""
        weight = self.dead_latents(self.dead_after) * self.decoder.norm(dim=1)
        return self.pre_act * ((self.threshold - pre).relu() @ weight).mean()

    def decoder_directions(self):
        return self.decoder
