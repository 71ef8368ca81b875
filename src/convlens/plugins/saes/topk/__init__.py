"""TopK SAE (Gao et al. 2024; paper 001 sec. 8.2.4) with the optional AuxK loss for dead latents."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import SAEParams, SAESpec, hookimpl, param


@dataclass(frozen=True)
class TopKParams(SAEParams):
    k: int = param(32, min=1, help="latents kept per sample: the k largest pre-activations")
    aux_k: int = param(256, min=0, help="AuxK: dead latents used to model the residual (0: off)")
    aux_coefficient: float = param(1 / 32, min=0.0, help="weight of the AuxK loss (Gao et al. use 1/32)")
    dead_after: int = param(100_000, min=1, help="a latent is dead after this many training samples without firing")


@hookimpl
def register_saes(register):
    register(
        SAESpec(
            name="topk",
            factory="convlens.plugins.saes.topk.model:TopKSAE",
            params=TopKParams,
            summary="k largest latents kept; sparse decoding; AuxK loss for dead latents (paper sec. 8.2.4)",
            aliases=("top-k",),
        )
    )
