"""TopK SAE (Gao et al. 2024; paper 001 sec. 8.2.4) with the optional AuxK loss for dead latents."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import ParameterError, SAEParams, SAESpec, hookimpl, param


@dataclass(frozen=True)
class TopKParams(SAEParams):
    k: int = param(32, min=1, help="latents kept per sample: the k largest pre-activations")
    aux_k: int = param(256, min=0, help="AuxK: dead latents used to model the residual (0: off)")
    aux_coefficient: float = param(1 / 32, min=0.0, help="weight of the AuxK loss (Gao et al. use 1/32)")
    dead_after: int = param(100_000, min=1, help="a latent is dead after this many training samples without firing")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k >= self.latents:
            owner = getattr(self, "_convlens_owner", None) or "sae 'topk'"
            source = "latent_dim" if self.latent_dim is not None else f"{self.input_dim} inputs x {self.expansion:g}"
            raise ParameterError(
                f"{owner}: k = {self.k} must be below the number of latents, here {self.latents} latents "
                f"({source}); lower k or raise latent_dim / expansion"
            )


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
