"""JumpReLU SAE (Rajamanoharan et al. 2024; paper 001 sec. 8.2.5): learned thresholds and an L0 penalty."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import SAEParams, SAESpec, hookimpl, param


@dataclass(frozen=True)
class JumpReLUParams(SAEParams):
    l0: float = param(0.01, min=0.0, help="lambda: weight of the L0 penalty (expected active latents per sample)")
    bandwidth: float = param(0.05, min=1e-9, help="epsilon: width of the rectangle kernel of the pseudo-derivative")
    threshold: float = param(
        0.5, min=1e-9, help="initial threshold of every latent (pre-activations of normalised inputs are of order 1)"
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
