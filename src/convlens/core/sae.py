"""The base every sparse-autoencoder plugin derives from (paper 001, sec. 8.7).

An SAE acts on the channel axis (axis 1): ``[N, C]`` vectors or ``[N, C, H, W]`` conv maps alike. Subclasses
implement :meth:`encode_vectors` and :meth:`decode_vectors` on ``[B, C]`` rows and :meth:`loss_terms`; the
base moves the channel axis so the same SAE applies to a conv map position by position.
"""

from __future__ import annotations

import abc
import dataclasses

import torch
from torch import nn

from .errors import ContractError


@dataclasses.dataclass
class SAEOutput:
    reconstruction: torch.Tensor
    latents: torch.Tensor
    losses: dict[str, torch.Tensor]

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values(), torch.zeros((), device=self.reconstruction.device))


class SparseAutoencoder(nn.Module, abc.ABC):
    axis: int = 1

    def __init__(self, input_dim: int, latent_dim: int):
        super().__init__()
        if input_dim < 1 or latent_dim < 1:
            raise ContractError(f"SAE dimensions must be positive (input {input_dim}, latent {latent_dim})")
        self.input_dim = input_dim
        self.latent_dim = latent_dim

    @abc.abstractmethod
    def encode_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, latent_dim]`` for rows ``[B, input_dim]``."""

    @abc.abstractmethod
    def decode_vectors(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[B, input_dim]`` for latents ``[B, latent_dim]``."""

    @abc.abstractmethod
    def loss_terms(self, x: torch.Tensor, reconstruction: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named scalar loss terms (on rows) whose sum is the training loss."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        rows, restore = self._to_rows(x, self.input_dim)
        return restore(self.encode_vectors(rows))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rows, restore = self._to_rows(latents, self.latent_dim)
        return restore(self.decode_vectors(rows))

    def forward(self, x: torch.Tensor) -> SAEOutput:
        rows, restore = self._to_rows(x, self.input_dim)
        latents = self.encode_vectors(rows)
        reconstruction = self.decode_vectors(latents)
        losses = self.loss_terms(rows, reconstruction, latents)
        return SAEOutput(restore(reconstruction), restore(latents), losses)

    def _to_rows(self, x: torch.Tensor, dim: int):
        """Rows ``[B, dim]`` of ``x`` (axis 1 is the feature axis) and a function mapping rows back."""
        if x.ndim < 2 or x.shape[1] != dim:
            raise ContractError(
                f"{type(self).__name__} expects {dim} features on axis 1, got shape {tuple(x.shape)}"
            )
        if x.ndim == 2:
            return x, lambda rows: rows
        moved = x.movedim(1, -1)
        spatial = moved.shape[:-1]

        def restore(rows: torch.Tensor) -> torch.Tensor:
            return rows.reshape(*spatial, rows.shape[-1]).movedim(-1, 1)

        return moved.reshape(-1, dim), restore
