"""ReLU SAE with an L1 penalty (Cunningham et al. 2023; paper 001 sec. 8.2.3, eqs. 6-10, and sec. 8.3)."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import SAEParams, SAESpec, hookimpl, param


@dataclass(frozen=True)
class ReluL1Params(SAEParams):
    l1: float = param(
        0.05,
        min=0.0,
        help="lambda: weight of the L1 penalty on the latents (eq. 6); the start of the controller when training "
        "with a target L0",
    )
    weighted: bool = param(
        True,
        help="weight each latent's L1 by its decoder atom's norm (Conerly et al. 2024), so shrinking latents "
        "while growing atoms does not lower the penalty; off: the paper's plain L1 (use with unit_norm_decoder)",
    )
    tied: bool = param(False, help="share weights: W_enc = W_dec^T and b_enc = -b_dec (eqs. 9-10)")
    bias: bool = param(True, help="use the biases b_enc, b_latent and b_dec; off: the paper's simplified variant")
    clip: float = param(
        0.0, min=0.0, help="latents below this value are set to zero (0: off; 0.1 in the paper's runs, sec. 8.3)"
    )


@hookimpl
def register_saes(register):
    register(
        SAESpec(
            name="relu-l1",
            factory="convlens.plugins.saes.relu_l1.model:ReluL1SAE",
            params=ReluL1Params,
            summary="ReLU encoder with pre-encoder bias and an L1 penalty; tied, bias-free and clipped variants "
            "(paper sec. 8.2.3)",
            aliases=("l1",),
        )
    )
