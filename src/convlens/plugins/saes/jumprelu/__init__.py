"""JumpReLU SAE (Rajamanoharan et al. 2024; paper 001 sec. 8.2.5): learned thresholds and an L0 penalty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from convlens import SAEParams, SAESpec, hookimpl, param


@dataclass(frozen=True)
class JumpReLUParams(SAEParams):
    l0: float = param(
        0.01,
        min=0.0,
        help="lambda: weight of the L0 penalty (expected active latents per sample); the start of the controller "
        "when training with a target L0",
    )
    bandwidth: Optional[float] = param(
        None,
        min=1e-9,
        help="epsilon: width of the rectangle kernel of the pseudo-derivative (default: from the data at the start "
        "of training, a share of the spread of the pre-activations)",
    )
    threshold: Optional[float] = param(
        None,
        min=1e-9,
        help="initial threshold of every latent (default: from the data at the start of training, each latent's "
        "quantile at which it fires on target L0 / latents of the samples, or 1 in 20 without a target)",
    )
    pre_act: float = param(
        1e-3,
        min=0.0,
        help="weight of the pre-activation loss that pulls dead latents' pre-activations up to their thresholds "
        "(0: off)",
    )
    dead_after: int = param(
        50_000, min=1, help="a latent is dead for the pre-activation loss after this many samples without firing"
    )
    topk_warmup: float = param(
        0.3,
        min=0.0,
        max=1.0,
        help="share of the training steps at the start in which each sample keeps its k largest pre-activations (k: "
        "the target L0), without thresholds or penalty; then every threshold starts where the batch's k x B largest "
        "ended (0: thresholds from the first step)",
    )


@hookimpl
def register_saes(register):
    register(
        SAESpec(
            name="jumprelu",
            factory="convlens.plugins.saes.jumprelu.model:JumpReLUSAE",
            params=JumpReLUParams,
            summary="JumpReLU with per-latent learned thresholds, straight-through estimator, L0 penalty "
            "(paper sec. 8.2.5)",
            aliases=("jump-relu",),
        )
    )
