"""Redirected gradients (lucid's redirected ReLU and ReLU6; the average pool's gradient through max pools): the
forward pass is unchanged, the backward pass follows the rule written out here elementwise, the model is restored
afterwards, and a render whose unit starts dead everywhere ascends only with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.plugins.visualizers.feature_viz.objectives import parse_objective
from convlens.plugins.visualizers.feature_viz.redirect import RedirectSwitch, redirected
from convlens.plugins.visualizers.feature_viz.render import RenderSettings, render


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU6(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ).eval()


def expected_clamp_gradient(x: torch.Tensor, upstream: torch.Tensor, upper: float | None) -> torch.Tensor:
    """Lucid's rule, image by image: the exact gradient unless it is zero everywhere; then the upstream gradient,
    zeroed where it would push a unit further below 0 (or above ``upper``)."""
    result = torch.empty_like(upstream)
    for image in range(len(x)):
        xi, gi = x[image], upstream[image]
        inside = (xi > 0) if upper is None else (xi > 0) & (xi < upper)
        exact = gi * inside
        if bool((exact != 0).any()):
            result[image] = exact
            continue
        deeper = (xi <= 0) & (gi > 0)
        if upper is not None:
            deeper = deeper | ((xi >= upper) & (gi < 0))
        result[image] = torch.where(deeper, torch.zeros_like(gi), gi)
    return result


@pytest.mark.parametrize("module, upper", [(nn.ReLU(), None), (nn.ReLU(inplace=True), None), (nn.ReLU6(), 6.0)])
def test_clamp_gradient_follows_lucids_rule_per_image(module, upper):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=generator) * 4
    x[1] = -x[1].abs() - 0.1  # dead everywhere
    if upper is not None:
        x[2] = x[2].abs() + upper + 0.1  # saturated everywhere
    upstream = torch.randn(4, 3, 5, 5, generator=generator)
    switch = RedirectSwitch(on=True)
    with redirected(module, switch):
        leaf = x.clone().requires_grad_(True)
        output = module(leaf.clone())
        output.backward(upstream)
    assert torch.equal(output.detach(), x.clamp(0, upper))
    torch.testing.assert_close(leaf.grad, expected_clamp_gradient(x, upstream, upper), rtol=0, atol=0)
    assert not torch.equal(leaf.grad[1], torch.zeros_like(upstream[1]))  # the dead image gets a gradient


def test_max_pool_gradient_is_the_average_pools_while_on_and_exact_after():
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    upstream = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    switch = RedirectSwitch(on=True)
    with redirected(pool, switch):
        gradients = []
        for on in (True, False):
            switch.on = on
            leaf = x.clone().requires_grad_(True)
            output = pool(leaf)
            output.backward(upstream)
            gradients.append(leaf.grad)
            assert torch.equal(output.detach(), F.max_pool2d(x, 3, 2, 1))
    average, maximum = (x.clone().requires_grad_(True) for _ in range(2))
    F.avg_pool2d(average, 3, 2, 1, count_include_pad=False).backward(upstream)
    F.max_pool2d(maximum, 3, 2, 1).backward(upstream)
    torch.testing.assert_close(gradients[0], average.grad, rtol=0, atol=1e-7)
    torch.testing.assert_close(gradients[1], maximum.grad, rtol=0, atol=0)


def test_a_network_forwards_the_same_and_is_restored():
    model = network()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    expected = model(x.clone())
    leaf = x.clone().requires_grad_(True)
    model(leaf).sum().backward()
    exact = leaf.grad
    switch = RedirectSwitch(on=False)
    with redirected(model, switch) as count:
        assert count == 4
        assert torch.equal(model(x.clone()), expected)
        leaf = x.clone().requires_grad_(True)
        model(leaf).sum().backward()
        torch.testing.assert_close(leaf.grad, exact, rtol=0, atol=1e-6)  # switched off: the exact gradient
    assert not any("forward" in vars(module) for module in model.modules())
    assert torch.equal(model(x.clone()), expected)


def dead_detector() -> nn.Module:
    """One channel that sums the green values of a 3 x 3 window minus 7.5: silent on every noise image."""
    conv = nn.Conv2d(3, 1, 3, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 1] = 1.0
        conv.bias.fill_(-7.5)
    return nn.Sequential(conv, nn.ReLU()).eval()


def test_a_unit_dead_at_the_start_ascends_only_with_redirection():
    model = dead_detector()
    finals = {}
    for steps in (0, 16):
        settings = RenderSettings(
            steps=60,
            lr=0.2,
            decorrelate=False,
            tv_weight=0.0,
            blur=0.0,
            scale=(1.0, 1.0),
            rotation=0.0,
            translation=0.0,
            flip=0.0,
            size=(16, 16),
            batch_size=2,
            redirect_steps=steps,
        )
        rendered = render(
            model,
            "1",
            [parse_objective("channel:0"), parse_objective("neuron:0@3,3")],
            settings,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            progress=False,
        )
        assert [r.start_value for r in rendered] == [0.0, 0.0]
        finals[steps] = [r.final_value for r in rendered]
    assert finals[0] == [0.0, 0.0]
    assert min(finals[16]) > 0.5
