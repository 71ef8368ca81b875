"""Named layers of a model and hook-safe capture of their activations and gradients.

Hooks live only inside :func:`hooked_outputs`; they are removed when it exits, also on an exception, and no
autograd graph is kept after :func:`capture` returns (design.md sec. 7: leaked hooks slow later calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from convlens.core.errors import ConvlensError, UnknownComponentError, suggest


def resolve_layer(module: nn.Module, name: str, model_name: str = "model") -> nn.Module:
    """The sub-module called ``name``; an unknown name is one error naming the closest valid names."""
    layers = {n: m for n, m in module.named_modules() if n}
    if name in layers:
        return layers[name]
    close = suggest(name, layers, n=5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    if "/" in name:
        hint += f"; layer names are separated by '.', not '/' (e.g. '{name.replace('/', '.')}')"
    raise UnknownComponentError(f"{model_name} has no layer '{name}'{hint} (run 'convlens layers' to list them)")


def first_tensor(output: Any) -> torch.Tensor | None:
    """A module's output tensor (the first one when it returns a tuple or list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def hooked_outputs(
    module: nn.Module, layers: Sequence[str], model_name: str = "model", calls: dict[str, int] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``layers`` during forward passes made inside the block.

    A layer whose module runs more than once in one forward pass (one activation module applied at several
    places) has no single output: that is an error, unless ``calls`` is given, which then counts the calls of
    each layer in the last forward pass.
    """
    targets = {name: resolve_layer(module, name, model_name) for name in layers}
    outputs: dict[str, torch.Tensor] = {}
    counted: dict[str, int] = calls if calls is not None else {}
    handles = [module.register_forward_pre_hook(lambda _module, _inputs: counted.clear())]
    try:
        for name, layer in targets.items():

            def hook(_module, _inputs, output, name=name):
                counted[name] = counted.get(name, 0) + 1
                if counted[name] > 1 and calls is None:
                    raise ConvlensError(_runs_repeatedly(name, model_name))
                outputs[name] = first_tensor(output)

            handles.append(layer.register_forward_hook(hook))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _runs_repeatedly(layer: str, model_name: str) -> str:
    return (
        f"layer '{layer}' of {model_name} runs more than once in one forward pass (one module applied at several "
        "places), so it has no single output; choose a layer that runs once (`convlens layers` marks the others)"
    )


REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when autocast left it in bfloat16 or float16; any other tensor unchanged."""
    return tensor.float() if tensor.dtype in REDUCED_PRECISION else tensor


@dataclasses.dataclass
class Capture:
    """Detached activations (and gradients of the target) per layer, plus the model's output."""

    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    logits: torch.Tensor | None


Target = Callable[[torch.Tensor], torch.Tensor]


def class_logit_target(classes: torch.Tensor | Sequence[int]) -> Target:
    """Target: per image, the logit of its class."""

    def target(logits: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(classes, device=logits.device).long().view(-1, 1)
        return logits.gather(1, index).squeeze(1)

    return target


def capture(
    module: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str],
    target: Target | None = None,
    model_name: str = "model",
) -> Capture:
    """Run ``module`` on ``images`` and record the outputs of ``layers``.

    With ``target`` (a function of the model output giving one value per image, e.g.
    :func:`class_logit_target`), also the gradient of ``target(output).sum()`` with respect to each
    recorded activation. Gradients flow only from the output back to the layers, not into the weights.
    """
    layers = list(dict.fromkeys(layers))
    with hooked_outputs(module, layers, model_name) as outputs:
        if target is None:
            with torch.no_grad():
                logits = module(images)
            return Capture({k: v.detach() for k, v in outputs.items()}, {}, first_tensor(logits))
        with torch.enable_grad():
            logits = module(images)
            missing = [name for name in layers if outputs.get(name) is None or not outputs[name].requires_grad]
            if missing:
                raise UnknownComponentError(
                    f"no gradient can reach layer(s) {', '.join(missing)} of {model_name} from its output"
                )
            objective = target(first_tensor(logits)).sum()
            grads = torch.autograd.grad(objective, [outputs[name] for name in layers])
    return Capture(
        {k: v.detach() for k, v in outputs.items()},
        {name: g.detach() for name, g in zip(layers, grads)},
        first_tensor(logits).detach(),
    )


def count_hooks(module: nn.Module) -> int:
    """Forward, pre-forward and backward hooks registered on ``module`` and its children."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in module.modules()
    )


def layer_table(module: nn.Module, input_size: tuple[int, int]) -> list[dict[str, Any]]:
    """Every named module with its type, output shape for one image of ``input_size`` and own parameters."""
    names = [n for n, _ in module.named_modules() if n]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    shapes: dict[str, list[int] | None] = {}
    calls: dict[str, int] = {}
    with hooked_outputs(module, names, calls=calls) as outputs, torch.no_grad():
        was_training = module.training
        module.eval()
        try:
            module(torch.zeros(1, 3, *input_size, device=device))
        finally:
            module.train(was_training)
        for name in names:
            tensor = outputs.get(name)
            shapes[name] = list(tensor.shape[1:]) if tensor is not None else None
    layers = dict(module.named_modules())
    return [
        {
            "name": name,
            "type": type(layers[name]).__name__,
            "output_shape": shapes[name],
            "params": sum(p.numel() for p in layers[name].parameters(recurse=False)),
            "calls": calls.get(name, 0),
        }
        for name in names
    ]


_CALL_COUNTS: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()


def call_counts(module: nn.Module, images: torch.Tensor) -> dict[str, int]:
    """How often each named sub-module runs in one forward pass: counted once per model object, on one image
    (empty when the model cannot run to its end on these inputs)."""
    counts = _CALL_COUNTS.get(module)
    if counts is None:
        counts = {}
        handles = [
            child.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
            for name, child in module.named_modules()
            if name
        ]
        was_training = module.training
        try:
            with torch.no_grad():
                module.eval()(images[:1])
        except Exception:  # a model that cannot run to its end on these inputs: its calls stay unknown
            counts.clear()
        finally:
            module.train(was_training)
            for handle in handles:
                handle.remove()
        _CALL_COUNTS[module] = counts
    return counts


def _check_runs_once(module: nn.Module, images: torch.Tensor, layers: Sequence[str | None], model_name: str) -> None:
    """One clear error for a layer whose module runs more than once per forward pass: a forward stopped at its
    first call would silently read only that call."""
    named = [layer for layer in layers if layer is not None]
    if not named:
        return
    counts = call_counts(module, images)
    for layer in named:
        if counts.get(layer, 0) > 1:
            raise ConvlensError(_runs_repeatedly(layer, model_name))


class _ReachedLayer(Exception):
    def __init__(self, output: torch.Tensor):
        super().__init__("forward stopped at the requested layer")
        self.output = output


def activations_at(
    module: nn.Module,
    images: torch.Tensor,
    layer: str,
    target: Target | None = None,
    model_name: str = "model",
) -> Capture:
    """The output of one layer for ``images``, computed with no more work than it needs.

    Without ``target`` the forward pass stops at the layer (later layers never run). With ``target``, the
    layer's output is detached and made the only tensor that requires a gradient, with the weights frozen for
    the call: the layers before it build no graph and the backward pass runs from the output to the layer
    only, never into the weights or down to the input.
    """
    if target is not None:
        return gradients_between(module, images, layer, None, target, model_name)

    def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
        raise _ReachedLayer(first_tensor(output))

    layer_module = resolve_layer(module, layer, model_name)
    _check_runs_once(module, images, [layer], model_name)
    handle = layer_module.register_forward_hook(stop)
    try:
        with torch.no_grad():
            module(images)
    except _ReachedLayer as reached:
        return Capture({layer: reached.output.detach()}, {}, None)
    finally:
        handle.remove()
    raise UnknownComponentError(f"layer '{layer}' of {model_name} did not run in the forward pass")


INPUT = "<input>"  # the key of the input images in a Capture of gradients_between(source_layer=None)


def gradients_between(
    module: nn.Module,
    images: torch.Tensor,
    source_layer: str | None,
    target_layer: str | None,
    objective: Target,
    model_name: str = "model",
) -> Capture:
    """The gradient of ``objective(output of target_layer).sum()`` with respect to the output of ``source_layer``.

    ``source_layer`` None: the input ``images`` (keyed :data:`INPUT` in the result); ``target_layer`` None: the
    model's output. The source's output is detached and made the only tensor that requires a gradient, the weights
    are frozen for the call and the forward pass stops once the target layer has run, so the backward pass runs
    from the target to the source only, never into the weights or further down. Returns the source's activations
    and gradient, the target layer's output among the activations, and the model's output as ``logits`` when the
    forward pass ran to the end. A target that does not run after the source and depend on it is one
    :class:`UnknownComponentError`. Under autocast the source is carried on in float32 (so its activations and
    gradient are float32), and the target's output and the logits are returned in float32.
    """
    source_module = resolve_layer(module, source_layer, model_name) if source_layer is not None else None
    target_module = resolve_layer(module, target_layer, model_name) if target_layer is not None else None
    _check_runs_once(module, images, [source_layer, target_layer], model_name)
    source_key = source_layer if source_layer is not None else INPUT
    source_name = f"layer '{source_layer}'" if source_layer is not None else "the input"
    target_name = f"layer '{target_layer}'" if target_layer is not None else "the output"
    recorded: dict[str, torch.Tensor] = {}
    inputs = images
    if source_layer is None:
        inputs = recorded[INPUT] = images.detach().requires_grad_(True)

    def make_leaf(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise UnknownComponentError(f"layer '{source_layer}' of {model_name} does not return a single tensor")
        recorded[source_key] = full_precision(output.detach()).requires_grad_(True)
        torch.set_grad_enabled(True)  # the graph starts here; the enclosing block restores the mode
        return recorded[source_key]

    def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
        raise _ReachedLayer(first_tensor(output))

    frozen = [p for p in module.parameters() if p.requires_grad]
    handles = []
    try:
        if source_module is not None:
            handles.append(source_module.register_forward_hook(make_leaf))
        if target_module is not None:  # registered second: on the same module it sees make_leaf's output
            handles.append(target_module.register_forward_hook(stop))
        for parameter in frozen:
            parameter.requires_grad_(False)
        with torch.set_grad_enabled(source_layer is None):  # the layers before the source skip autograd entirely
            logits, stopped = None, False
            try:
                logits = reached = first_tensor(module(inputs))
            except _ReachedLayer as reached_layer:
                reached, stopped = reached_layer.output, True
            if source_key not in recorded:
                if stopped:
                    raise UnknownComponentError(
                        f"{target_name} of {model_name} runs before {source_name}: no "
                        f"gradient reaches {source_name} from it"
                    )
                raise UnknownComponentError(f"{source_name} of {model_name} did not run in the forward pass")
            if target_layer is not None and not stopped:
                raise UnknownComponentError(f"{target_name} of {model_name} did not run in the forward pass")
            if reached is None or not reached.requires_grad:
                raise UnknownComponentError(
                    f"{target_name} of {model_name} does not depend on {source_name}: no "
                    f"gradient reaches {source_name} from it"
                )
            (gradient,) = torch.autograd.grad(objective(reached).sum(), [recorded[source_key]])
    finally:
        for handle in handles:
            handle.remove()
        for parameter in frozen:
            parameter.requires_grad_(True)
    activations = {source_key: recorded[source_key].detach()}
    if target_layer is not None:
        activations[target_layer] = full_precision(reached.detach())
    return Capture(
        activations,
        {source_key: full_precision(gradient.detach())},
        full_precision(logits.detach()) if logits is not None else None,
    )


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Where a unit of a layer looks in the input: the receptive field of the grid's centre cell, measured as the
    bounding box of the input pixels its gradient reaches, and the grid's stride in input pixels."""

    size: tuple[int, int]  # (height, width) in pixels, at most the input's
    stride: tuple[float, float]  # input pixels per grid step
    grid: tuple[int, int]
    input_size: tuple[int, int]
    centre: tuple[float, float]  # input-pixel centre of the receptive field of grid cell (grid // 2)

    @property
    def covers_input(self) -> bool:
        return self.size[0] >= self.input_size[0] and self.size[1] >= self.input_size[1]

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` (bottom and right exclusive) of cell ``(y, x)``'s field, inside the input."""
        edges = []
        for cell, centre_cell, centre, stride, size, limit in zip(
            (y, x), (self.grid[0] // 2, self.grid[1] // 2), self.centre, self.stride, self.size, self.input_size
        ):
            low = round(centre + (cell - centre_cell) * stride - (size - 1) / 2)
            low = min(max(low, 0), max(limit - size, 0))
            edges.append((low, min(low + size, limit)))
        return edges[0][0], edges[1][0], edges[0][1], edges[1][1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "stride": list(self.stride),
            "grid": list(self.grid),
            "covers_input": self.covers_input,
        }


def receptive_field(
    module: nn.Module,
    layer: str,
    input_size: tuple[int, int],
    samples: int = 4,
    seed: int = 0,
    model_name: str = "model",
) -> ReceptiveField:
    """The receptive field of ``layer``'s units: the input pixels on which its centre cell depends, found from the
    gradient of that cell (all channels) for ``samples`` noise images; works for any architecture."""
    layer_module = resolve_layer(module, layer, model_name)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(samples, 3, *input_size, generator=generator).to(device).requires_grad_(True)

    def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
        raise _ReachedLayer(first_tensor(output))

    frozen = [p for p in module.parameters() if p.requires_grad]
    handle = layer_module.register_forward_hook(stop)
    output = None
    try:
        for parameter in frozen:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            try:
                module(pixels)
            except _ReachedLayer as reached:
                output = reached.output
            if output is None or output.ndim != 4:
                raise UnknownComponentError(f"layer '{layer}' of {model_name} does not give a [N, C, H, W] map")
            grid = (output.shape[2], output.shape[3])
            (gradient,) = torch.autograd.grad(output[:, :, grid[0] // 2, grid[1] // 2].sum(), [pixels])
    finally:
        handle.remove()
        for parameter in frozen:
            parameter.requires_grad_(True)
    reached = gradient.abs().sum(dim=(0, 1)) > 0
    rows, columns = reached.any(dim=1).nonzero().flatten(), reached.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        raise UnknownComponentError(f"no gradient reaches the input from layer '{layer}' of {model_name}")
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])
    return ReceptiveField(
        size=(bottom - top + 1, right - left + 1),
        stride=(input_size[0] / grid[0], input_size[1] / grid[1]),
        grid=grid,
        input_size=tuple(input_size),
        centre=((top + bottom) / 2, (left + right) / 2),
    )
