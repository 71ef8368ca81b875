"""Maximum filter (paper 001, sec. 7.2.4): f(A) = max(max over channels of A, 0)."""

from __future__ import annotations

from convlens import ActivationFilter, FilterSpec, hookimpl


class MaximumFilter(ActivationFilter):
    def weights(self, activations, context):
        return activations.amax(dim=1).clamp_min(0)


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name="max",
            factory=MaximumFilter,
            summary="max(max over channels, 0) (paper sec. 7.2.4)",
            aliases=("maximum",),
        )
    )
