"""The ``relu-l1`` module: f_enc(x) = ReLU(W_enc (x + b_enc) + b_latent) (eq. 7), f_dec(z) = W_dec z + b_dec (eq. 8).

Weights are stored with one row per latent: ``decoder [L, C]`` holds the atoms (the columns of W_dec), and the
encoder rows are the rows of W_enc; tied, the encoder is the decoder itself and b_enc = -b_dec (eqs. 9-10).

The penalty is lambda * sum_i z_i ||d_i|| with d_i the decoder atom of latent i (Conerly et al. 2024, "Circuits
Updates - April 2024"): without the norm, the SAE lowers the penalty by shrinking latents and growing atoms. With
``weighted`` off it is the paper's plain lambda * sum_i z_i (eq. 6). Dead latents can be resampled (Bricken et al.
2023): a new atom along a badly reconstructed residual, the encoder row along it at a fifth of the mean live
encoder row's norm, its bias 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from convlens import SparseAutoencoder, squared_error, unit_rows


class ReluSAEPass(torch.autograd.Function):
    """Encoder, ReLU (and clip) and decoder of a training step as one autograd node, ``(latents, reconstruction)``.

    The backward writes the latents' incoming gradient (the L1 term's constant) as the input of the decoder-gradient
    ``addmm`` instead of adding it to a separate ``[B, latents]`` tensor, masks that result in place, gets the
    pre-encoder bias's gradient as ``W_enc^T sum_b g_b`` (one matrix-vector product) and never computes the gradient
    of ``x``: two fewer passes over ``[B, latents]`` and no ``[latents, inputs]`` outer product than autograd's own
    graph of the same formula, and half the fresh memory per step. Checked against autograd in float64 in the tests.
    """

    @staticmethod
    def forward(ctx, x, encoder, pre_bias, latent_bias, decoder, decoder_bias, clip):
        shifted = x if pre_bias is None else x + pre_bias
        pre = shifted @ encoder.T if latent_bias is None else torch.addmm(latent_bias, shifted, encoder.T)
        latents = pre.relu_()
        if clip > 0:
            latents.masked_fill_(latents < clip, 0)
        reconstruction = latents @ decoder if decoder_bias is None else torch.addmm(decoder_bias, latents, decoder)
        ctx.save_for_backward(shifted, encoder, latents, decoder)
        ctx.biases = (pre_bias is not None, latent_bias is not None, decoder_bias is not None)
        ctx.set_materialize_grads(False)
        return latents, reconstruction

    @staticmethod
    @once_differentiable
    def backward(ctx, latents_grad, reconstruction_grad):
        shifted, encoder, latents, decoder = ctx.saved_tensors
        has_pre_bias, has_latent_bias, has_decoder_bias = ctx.biases
        decoder_grad = decoder_bias_grad = None
        if reconstruction_grad is None:
            pre_grad = latents_grad.clone(memory_format=torch.contiguous_format)
        else:
            decoder_grad = latents.T @ reconstruction_grad
            decoder_bias_grad = reconstruction_grad.sum(0) if has_decoder_bias else None
            pre_grad = (
                reconstruction_grad @ decoder.T
                if latents_grad is None
                else torch.addmm(latents_grad, reconstruction_grad, decoder.T)
            )
        # d latents / d pre is 1 where a latent is non-zero (ReLU, and the clip zeroes whole latents), else 0
        torch.ops.aten.threshold_backward.grad_input(pre_grad, latents, 0.0, grad_input=pre_grad)
        encoder_grad = pre_grad.T @ shifted
        summed = pre_grad.sum(0) if has_pre_bias or has_latent_bias else None
        pre_bias_grad = encoder.T @ summed if has_pre_bias else None
        return (
            None,
            encoder_grad,
            pre_bias_grad,
            summed if has_latent_bias else None,
            decoder_grad,
            decoder_bias_grad,
            None,
        )


FIRING_WITHOUT_TARGET = 0.05  # the share of samples each latent fires on at the start without a target L0


class ReluL1SAE(SparseAutoencoder):
    penalty_term = "l1"

    def __init__(self, params):
        super().__init__(params.input_dim, params.latents)
        self.l1, self.tied, self.clip, self.weighted = params.l1, params.tied, params.clip, params.weighted
        self.init_directions, self.seed = params.init_directions, params.seed
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
        latents = self.preactivation_vectors(x).relu_()  # in place: the matmul saves its inputs, not its output
        if self.clip > 0:
            latents = latents * (latents >= self.clip)
        return latents

    def preactivation_vectors(self, x):
        rows = self.encoder_rows()
        if self.latent_bias is not None:
            # W_enc (x + b_enc) + b_latent = W_enc x + (W_enc b_enc + b_latent): the pre-encoder bias then gets its
            # gradient through a matrix-vector product instead of a sixth [batch x latents x inputs] matmul
            pre_bias = -self.decoder_bias if self.tied else self.pre_bias
            return torch.addmm(torch.addmv(self.latent_bias, rows, pre_bias), x, rows.T)
        return x @ rows.T

    def encode_decode(self, x):
        if not torch.is_grad_enabled() or x.requires_grad:  # the fused backward gives no gradient for x
            return super().encode_decode(x)
        pre_bias = (-self.decoder_bias if self.tied else self.pre_bias) if self.latent_bias is not None else None
        return ReluSAEPass.apply(
            x, self.encoder_rows(), pre_bias, self.latent_bias, self.decoder, self.decoder_bias, self.clip
        )

    def decode_vectors(self, latents):
        if self.decoder_bias is not None:
            return torch.addmm(self.decoder_bias, latents, self.decoder)
        return latents @ self.decoder

    def loss_terms(self, x, reconstruction, latents):
        per_latent = latents.sum(0)  # latents are non-negative: |z| = z
        if self.weighted:
            per_latent = per_latent * self.decoder.norm(dim=1)
        return {"reconstruction": squared_error(reconstruction, x), "l1": self.l1 * per_latent.sum() / len(latents)}

    @torch.no_grad()
    def initialise_from_data(self, x, target_l0=None):
        """The latents on directions of ``x`` (unless ``init_directions`` is random), then each latent's bias so that
        it fires on ``target L0 / latents`` of ``x`` (5 % without a target): the sparsity training starts from
        instead of every latent firing on half the samples."""
        if self.init_directions == "data":
            rows = (self.decoder,) if self.encoder is None else (self.decoder, self.encoder)
            self.start_on_data_directions_(x, self.seed, *rows)
        if self.latent_bias is None:
            return
        self.latent_bias.zero_()
        pre = self.preactivation_vectors(x)
        firing = target_l0 / self.latent_dim if target_l0 is not None else FIRING_WITHOUT_TARGET
        rank = min(len(pre), max(1, math.ceil((1.0 - min(firing, 1.0)) * len(pre))))
        self.latent_bias.copy_(-pre.float().kthvalue(rank, dim=0).values)

    @torch.no_grad()
    def resample_latents_(self, latents, directions):
        self.decoder[latents] = directions.to(self.decoder.dtype)
        changed = [self.decoder]
        if not self.tied:
            alive = torch.ones(self.latent_dim, dtype=torch.bool, device=latents.device)
            alive[latents] = False
            norm = self.encoder[alive].norm(dim=1).mean() if bool(alive.any()) else torch.ones(())
            self.encoder[latents] = directions.to(self.encoder.dtype) * 0.2 * norm
            changed.append(self.encoder)
        if self.latent_bias is not None:
            self.latent_bias[latents] = 0
            changed.append(self.latent_bias)
        return changed

    def decoder_directions(self):
        return self.decoder
