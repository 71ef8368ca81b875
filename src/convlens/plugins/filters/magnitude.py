"""Magnitude filter (paper 001, sec. 7.2.1): f(A) = sum over channels of |A|."""

from __future__ import annotations

from convlens import ActivationFilter, FilterSpec, hookimpl


class MagnitudeFilter(ActivationFilter):
    def weights(self, activations, context):
        return activations.abs().sum(dim=1)


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name="magnitude",
            factory=MagnitudeFilter,
            summary="sum over channels of |activation| (Gorton 2024; paper sec. 7.2.1)",
            aliases=("abs-sum",),
        )
    )
