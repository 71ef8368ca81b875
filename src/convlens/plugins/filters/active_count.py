"""Number-of-activated-neurons filter (paper 001, sec. 7.2.2): f(A)_j = sum_i 1(|A_ij| > epsilon)."""

from __future__ import annotations

from dataclasses import dataclass

from convlens import ActivationFilter, FilterSpec, Params, hookimpl, param


@dataclass(frozen=True)
class ActiveCountParams(Params):
    epsilon: float = param(
        0.1, help="a channel counts as active where |activation| > epsilon (paper sec. 7.3 uses 0.1)", min=0.0
    )


class ActiveCountFilter(ActivationFilter):
    def weights(self, activations, context):
        return (activations.abs() > self.params.epsilon).sum(dim=1).to(activations.dtype)


@hookimpl
def register_filters(register):
    register(
        FilterSpec(
            name="active-count",
            factory=ActiveCountFilter,
            params=ActiveCountParams,
            summary="number of channels with |activation| > epsilon (paper sec. 7.2.2)",
            aliases=("neurons",),
        )
    )
