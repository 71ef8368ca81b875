"""Redirected gradients: ascent that starts through dead ReLUs and max pools without changing the model (lucid's
``redirected_relu_grad`` and ``redirected_relu6_grad``, the gradient counterpart of the paper's smooth ResNet,
001 sec. 5.1).

While :func:`redirected` is active and its switch is on, the backward pass of every ``nn.ReLU``, ``nn.ReLU6`` and
``nn.MaxPool2d`` module of the model is replaced; the forward pass gives the same values bit for bit.

- ReLU and ReLU6: per image, where the exact gradient through the module is zero everywhere (every unit the
  objective reaches is off), the upstream gradient passes unchanged except where it would push a unit further into
  its flat part (below 0, or above 6 for ReLU6). An image whose exact gradient is not zero keeps it, so this changes
  nothing once ascent has started.
- Max pooling: the gradient of the average pool over the same windows, which reaches every input of a window
  (as the smooth ResNet's average pooling does) instead of its maximum only.

Only modules are redirected: a ReLU called as a function (``F.relu``) in a model's ``forward`` keeps its gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class RedirectSwitch:
    """Whether the redirection is on; the render loop turns it off after its first steps."""

    def __init__(self, on: bool = True):
        self.on = on


class _RedirectedClamp(torch.autograd.Function):
    """``x.clamp(0, upper)`` (``upper`` None: ReLU) whose backward is lucid's redirected gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.upper = upper
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        inside = x > 0 if ctx.upper is None else (x > 0) & (x < ctx.upper)
        exact = grad * inside
        dead = (exact.flatten(1) == 0).all(dim=1).view(-1, *([1] * (x.ndim - 1)))
        if x.device.type == "cpu" and not bool(dead.any()):  # the common case; on a GPU the test would wait for it
            return exact, None
        # the loss is minimised: a positive gradient pushes a unit down, a negative one up
        deeper = (x <= 0) & (grad > 0)
        if ctx.upper is not None:
            deeper |= (x >= ctx.upper) & (grad < 0)
        return torch.where(dead, grad.masked_fill(deeper, 0), exact), None


class _RedirectedMaxPool(torch.autograd.Function):
    """A 2-D max pool whose backward is the average pool's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.pool = pool
        return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        pool = ctx.pool
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = F.avg_pool2d(
                leaf, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, count_include_pad=False
            )
            (passed,) = torch.autograd.grad(out, leaf, grad)
        return passed, None


def _redirected_forward(module: nn.Module, switch: RedirectSwitch):
    """The module's ``forward`` with the redirection while the switch is on, the module's own when it is off (so a
    step after the redirected ones costs what it did)."""
    own = module.forward
    if isinstance(module, nn.ReLU6):
        return lambda x: _RedirectedClamp.apply(x, 6.0) if switch.on else own(x)
    if type(module) is nn.ReLU:
        return lambda x: _RedirectedClamp.apply(x, None) if switch.on else own(x)
    if isinstance(module, nn.MaxPool2d) and not module.return_indices and module.dilation in (1, (1, 1)):
        return lambda x: _RedirectedMaxPool.apply(x, module) if switch.on else own(x)
    return None


@contextlib.contextmanager
def redirected(model: nn.Module, switch: RedirectSwitch) -> Iterator[int]:
    """The model's ReLU, ReLU6 and max-pool modules with redirected gradients while inside (their ``forward``
    replaced on the instance, restored on leaving); yields how many modules were redirected."""
    replaced = []
    try:
        for module in model.modules():
            forward = _redirected_forward(module, switch)
            if forward is not None:
                replaced.append((module, module.__dict__.get("forward")))
                module.forward = forward
        yield len(replaced)
    finally:
        for module, own in replaced:
            if own is None:
                del module.forward
            else:
                module.forward = own
