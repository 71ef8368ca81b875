"""Gated SAE plugin for convlens (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders").

This module is what the ``convlens`` entry point loads: it only declares the parameters and registers the
SAE under the name ``gated``. It must not import torch, so that ``convlens list`` and ``--help`` stay fast;
the implementation lives in :mod:`convlens_gated_sae.model` and is imported by the registry only when a
``gated`` SAE is created.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens import SAEParams, SAESpec, hookimpl, param

__version__ = "0.1.0"


@dataclass(frozen=True)
class GatedParams(SAEParams):
    l1: float = param(
        0.5,
        min=0.0,
        help="lambda: weight of the L1 penalty on ReLU(pi_gate), the gate "
        "pre-activations, each weighted by its decoder row's norm",
    )


@hookimpl
def register_saes(register):
    register(
        SAESpec(
            name="gated",
            factory="convlens_gated_sae.model:GatedSAE",
            params=GatedParams,
            summary="Gated SAE: a Heaviside gate and a ReLU magnitude path sharing encoder weights; L1 on the "
            "gate only, plus an auxiliary loss through a frozen decoder (Rajamanoharan et al. 2024)",
        )
    )
