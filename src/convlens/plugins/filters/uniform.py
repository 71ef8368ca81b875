"""Uniform filter: equal weight on every patch, the unfiltered baseline (the paper's "original" dataset)."""

from __future__ import annotations

from convlens import ActivationFilter, FilterSpec, hookimpl


class UniformFilter(ActivationFilter):
    def weights(self, activations, context):
        n, _, h, w = activations.shape
        return activations.new_ones((n, h, w))


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name="uniform",
            factory=UniformFilter,
            summary="equal weights: unfiltered sampling, the paper's original-dataset baseline",
            aliases=("none",),
        )
    )
