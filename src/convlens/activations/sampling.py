"""Sampling activation vectors by filter weights (001 sec. 7.2.6, Figure 7).

Per image: NaN weights become zero; a map that is all zero (or was all NaN) falls back to uniform sampling
and is counted; the weights are normalised to probabilities and ``per_image`` positions are drawn with
replacement. Each image draws from its own generator seeded by (seed, image index), so the samples do not
depend on batch size, batch order or the number of processes.
"""

from __future__ import annotations

import dataclasses

import torch

from convlens.runtime.seeding import torch_generator


@dataclasses.dataclass
class Samples:
    """``per_image`` samples for each of ``B`` images, flattened image-major: ``S = B * per_image`` rows."""

    vectors: torch.Tensor  # [S, C]
    image_index: torch.Tensor  # [S] int64, the image's index in the dataset
    position: torch.Tensor  # [S, 2] int16, (y, x) on the activation grid
    weight: torch.Tensor  # [S] float32, the filter weight at that position (NaN read as 0)
    fallback: torch.Tensor  # [B] bool, True where the image was sampled uniformly


def sampling_probabilities(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities [B, H*W] float64, fallback [B] bool)`` from filter weights ``[B, H, W]``."""
    flat = torch.nan_to_num(weights.detach().double().flatten(1), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    totals = flat.sum(dim=1, keepdim=True)
    fallback = totals.squeeze(1) <= 0
    uniform = torch.full_like(flat, 1.0 / flat.shape[1])
    probabilities = torch.where(fallback[:, None], uniform, flat / totals.clamp_min(torch.finfo(flat.dtype).tiny))
    return probabilities, fallback


def draw_positions(
    probabilities: torch.Tensor, image_index: torch.Tensor, *, per_image: int, seed: int
) -> torch.Tensor:
    """``[B, per_image]`` flat positions drawn with replacement, each image from its own (seed, index) generator."""
    return torch.stack(
        [
            torch.multinomial(
                probabilities[row],
                per_image,
                replacement=True,
                generator=torch_generator(seed, "sample", int(image_index[row])),
            )
            for row in range(probabilities.shape[0])
        ]
    )


def sample_activations(
    activations: torch.Tensor,
    weights: torch.Tensor,
    image_index: torch.Tensor,
    *,
    per_image: int,
    seed: int,
) -> Samples:
    """Draw ``per_image`` positions per image from ``weights [B, H, W]`` and gather ``activations [B, C, H, W]``."""
    batch, channels, height, width = activations.shape
    probabilities, fallback = sampling_probabilities(weights.cpu())
    picks = draw_positions(probabilities, image_index, per_image=per_image, seed=seed)
    flat_activations = activations.flatten(2)  # [B, C, H*W]
    gathered = flat_activations.gather(2, picks.to(activations.device)[:, None, :].expand(-1, channels, -1))
    vectors = gathered.permute(0, 2, 1).reshape(batch * per_image, channels)
    flat_weights = torch.nan_to_num(weights.detach().cpu().float().flatten(1), nan=0.0)
    return Samples(
        vectors=vectors.detach().cpu().float(),
        image_index=image_index.cpu().long().repeat_interleave(per_image),
        position=torch.stack([picks // width, picks % width], dim=-1).reshape(-1, 2).to(torch.int16),
        weight=flat_weights.gather(1, picks).reshape(-1),
        fallback=fallback,
    )
