"""Median filter (paper 001, sec. 7.2.3): f(A) = max(median over channels of A, 0)."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import ActivationFilter, FilterSpec, Params, hookimpl, param


@dataclass(frozen=True)
class MedianParams(Params):
    even: str = param(
        "lower",
        help="median of an even number of channels: the lower middle value (torch.median, as the paper's "
        "median(A, dim=0)) or the mean of the two middle values",
        choices=("lower", "mean"),
    )


class MedianFilter(ActivationFilter):
    def weights(self, activations, context):
        if self.params.even == "mean" and activations.shape[1] % 2 == 0:
            middle = activations.shape[1] // 2
            ordered = activations.sort(dim=1).values
            median = (ordered[:, middle - 1] + ordered[:, middle]) / 2
        else:
            median = activations.median(dim=1).values
        return median.clamp_min(0)


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name="median",
            factory=MedianFilter,
            params=MedianParams,
            summary="max(median over channels, 0) (paper sec. 7.2.3)",
        )
    )
