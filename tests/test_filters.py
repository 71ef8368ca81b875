"""The paper's filters (001, sec. 7.2.1-7.2.4) and the uniform baseline against float64 references."""

import numpy as np
import pytest
import torch

import convlens
from convlens import ContractError
from convlens.testing import check_component


def reference(name, a, epsilon=0.1, even="lower"):
    """float64 numpy formulas; a is [N, C, H, W]."""
    a = a.astype(np.float64)
    if name == "magnitude":
        return np.abs(a).sum(axis=1)
    if name == "active-count":
        return (np.abs(a) > epsilon).sum(axis=1).astype(np.float64)
    if name == "median":
        ordered = np.sort(a, axis=1)
        c = a.shape[1]
        if c % 2 == 1:
            med = ordered[:, c // 2]
        elif even == "lower":
            med = ordered[:, c // 2 - 1]
        else:
            med = (ordered[:, c // 2 - 1] + ordered[:, c // 2]) / 2
        return np.maximum(med, 0.0)
    if name == "max":
        return np.maximum(a.max(axis=1), 0.0)
    if name == "uniform":
        return np.ones((a.shape[0], a.shape[2], a.shape[3]))
    raise KeyError(name)


FILTERS = ["magnitude", "active-count", "median", "max", "uniform"]


def inputs():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(4, 33, 7, 7, generator=g, dtype=torch.float64)
    even_channels = torch.randn(3, 16, 5, 6, generator=g, dtype=torch.float64) * 3
    all_negative = -(torch.rand(2, 12, 4, 4, generator=g, dtype=torch.float64) + 0.01)
    ties = torch.randint(-2, 3, (3, 10, 5, 5), generator=g).to(torch.float64) * 0.5
    at_epsilon = torch.full((1, 4, 2, 2), 0.1, dtype=torch.float64)
    at_epsilon[0, 0] = -0.1000001
    return {
        "random": random,
        "even": even_channels,
        "all-negative": all_negative,
        "ties": ties,
        "at-epsilon": at_epsilon,
    }


@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("case", list(inputs()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_filter_matches_float64_reference(name, case, dtype):
    a = inputs()[case]
    weights = convlens.registry.create("filter", name)(a.to(dtype))
    expected = reference(name, a.numpy())
    assert weights.shape == expected.shape
    assert weights.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(weights.double().numpy(), expected, rtol=tolerance, atol=tolerance)
    assert (weights >= 0).all()


def test_all_negative_activations_clamp_to_zero():
    a = inputs()["all-negative"]
    for name in ("median", "max"):
        assert torch.count_nonzero(convlens.registry.create("filter", name)(a)) == 0
    assert (convlens.registry.create("filter", "magnitude")(a) > 0).all()


def test_active_count_threshold_is_strict_and_a_parameter():
    a = inputs()["at-epsilon"]
    # |A| > 0.1 is false for exactly 0.1 and true for 0.1000001
    assert convlens.registry.create("filter", "active-count")(a).tolist() == [[[1.0, 1.0], [1.0, 1.0]]]
    a = inputs()["random"]
    for epsilon in (0.0, 0.5, 2.0):
        got = convlens.registry.create("filter", "active-count", epsilon=epsilon)(a)
        np.testing.assert_array_equal(got.numpy(), reference("active-count", a.numpy(), epsilon=epsilon))


def test_median_of_even_channel_count_either_definition():
    a = inputs()["even"]
    for even in ("lower", "mean"):
        got = convlens.registry.create("filter", "median", even=even)(a)
        np.testing.assert_allclose(got.numpy(), reference("median", a.numpy(), even=even), rtol=1e-12)
    lower = convlens.registry.create("filter", "median", even="lower")(a)
    mean = convlens.registry.create("filter", "median", even="mean")(a)
    assert not torch.equal(lower, mean)


@pytest.mark.parametrize("name", FILTERS + ["gradcam"])  # gradcam gets a small model from the check
def test_builtin_filters_pass_the_contract_check(name):
    check_component("filter", name)


def test_filter_rejects_wrong_input_rank():
    with pytest.raises(ContractError, match=r"expects activations of shape \[N, C, H, W\]"):
        convlens.registry.create("filter", "magnitude")(torch.ones(2, 3, 4))


def test_broken_filter_output_is_reported_with_its_name(register_plugin):
    class Negative(convlens.ActivationFilter):
        def weights(self, activations, context):
            return -activations.abs().sum(dim=1)

    class Plugin:
        @convlens.hookimpl
        def register_filters(self, register):
            register(convlens.FilterSpec(name="negative", factory=Negative))

    register_plugin(Plugin())
    with pytest.raises(ContractError, match="filter 'negative' returned negative weights"):
        check_component("filter", "negative")
