"""Rank statistics shared by comparisons and sanity checks (float64, batched over rows)."""

from __future__ import annotations

import math

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row of ``values [B, P]``, ties sharing their average rank (float64)."""
    values = values.double().contiguous()
    ordered = values.sort(dim=1).values
    below = torch.searchsorted(ordered, values, right=False)
    up_to = torch.searchsorted(ordered, values, right=True)
    return (below + up_to + 1).double() / 2


def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows of ``[B, P]`` tensors (float64); NaN where a row is all zero."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(
        norms > 0,
        (a * b).sum(dim=1) / norms.clamp_min(torch.finfo(torch.float64).tiny),
        torch.full_like(norms, math.nan),
    )


def rowwise_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of matching rows (Pearson correlation of average ranks); NaN for a constant row."""
    ranks_a, ranks_b = average_ranks(a), average_ranks(b)
    return rowwise_cosine(ranks_a - ranks_a.mean(dim=1, keepdim=True), ranks_b - ranks_b.mean(dim=1, keepdim=True))
