"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders"): nested prefixes of the dictionary, each trained to reconstruct the input on its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from convlens import ParameterError, SAESpec, hookimpl, param
from convlens.plugins.saes.batchtopk.api import BatchTopKParams


@dataclass(frozen=True)
class MatryoshkaParams(BatchTopKParams):
    prefixes: tuple[int, ...] = param(
        (),
        min=1,
        help="the nested dictionary sizes m_1 < ... < m_n, e.g. 256,1024,4096 (the latent count is added as the last "
        "when missing); empty: prefix_count sizes, each twice the one before",
    )
    prefix_count: int = param(
        5, min=1, help="number of prefixes when prefixes is empty: latents / 2^(n-1), ..., latents / 2, latents"
    )
    activation: Literal["batchtopk", "topk"] = param(
        "batchtopk", help="batchtopk (as in the paper: k x batch per batch, a learned threshold at inference) or topk"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = self.prefix_sizes
        if sizes[0] < 1 or any(larger <= smaller for smaller, larger in zip(sizes, sizes[1:])):
            owner = getattr(self, "_convlens_owner", None) or "sae 'matryoshka'"
            raise ParameterError(
                f"{owner}: the prefix sizes {list(sizes)} must increase from at least 1 to the {self.latents} latents; "
                "give increasing prefixes below the latent count, or fewer prefix_count"
            )

    @property
    def prefix_sizes(self) -> tuple[int, ...]:
        """m_1 < ... < m_n = the latent count (not checked here: see ``__post_init__``)."""
        if not self.prefixes:
            return tuple(self.latents // 2 ** (self.prefix_count - 1 - j) for j in range(self.prefix_count))
        return self.prefixes if self.prefixes[-1] == self.latents else (*self.prefixes, self.latents)


@hookimpl
def register_saes(register):
    register(
        SAESpec(
            name="matryoshka",
            factory="convlens.plugins.saes.matryoshka.model:MatryoshkaSAE",
            params=MatryoshkaParams,
            summary="nested dictionary prefixes, each trained to reconstruct; BatchTopK or TopK activation "
            "(Bussmann et al. 2025); the error of every prefix reported",
        )
    )
