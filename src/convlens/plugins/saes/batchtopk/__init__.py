"""BatchTopK SAE (Bussmann, Leask and Nanda 2024, "BatchTopK Sparse Autoencoders"): the k x batch largest activations
of the whole batch kept while training; at inference one learned threshold, so a sample's latents need no batch."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import SAESpec, hookimpl, param
from convlens.plugins.saes.topk.api import TopKParams


@dataclass(frozen=True)
class BatchTopKParams(TopKParams):
    k: int = param(
        32, min=1, help="latents kept per sample on average: a training batch of B samples keeps its k x B largest"
    )
    threshold_lr: float = param(
        0.01,
        min=1e-6,
        max=1.0,
        help="rate of the running mean that gives the inference threshold (the mean over the first 1/rate batches, "
        "then an exponential moving average)",
    )
    topk_warmup: float = param(
        0.5,
        min=0.0,
        max=1.0,
        help="share of the training steps at the start that keep each sample's k largest (TopK) before the batch's "
        "k x B largest: from random directions, the batch-wide choice settles on mixtures of features",
    )


@hookimpl
def register_saes(register):
    register(
        SAESpec(
            name="batchtopk",
            factory="convlens.plugins.saes.batchtopk.model:BatchTopKSAE",
            params=BatchTopKParams,
            summary="k x batch largest activations of the whole batch; a learned threshold at inference "
            "(Bussmann, Leask and Nanda 2024); sparse decoding, AuxK",
            aliases=("batch-topk",),
        )
    )
