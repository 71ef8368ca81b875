"""The paper's gradient-flow modification (001, sec. 5.1 and 6.1) for any CNN built from modules.

Every ``nn.MaxPool2d`` becomes an ``nn.AvgPool2d`` with the same kernel, stride, padding and ceil mode
(padding is left out of the average, as max pooling ignores it), and every ``nn.ReLU`` a ``nn.LeakyReLU``
with the given negative slope. Neither has weights, so the network keeps its parameters. ReLUs applied as
functions inside a module's ``forward`` cannot be swapped; they are reported by module type.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from torch import nn

_FUNCTIONAL_RELU = re.compile(r"(?:\bF\.relu|\btorch\.relu|\bfunctional\.relu|(?<!self)\.relu_?)\(")


@dataclasses.dataclass
class SmoothReport:
    pools_replaced: list[str] = dataclasses.field(default_factory=list)
    relus_replaced: list[str] = dataclasses.field(default_factory=list)
    not_replaced: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return dataclasses.asdict(self)


def smooth_network(module: nn.Module, negative_slope: float = 0.01) -> SmoothReport:
    """Replace max pooling and ReLU modules in place; returns what was and was not replaced."""
    report = SmoothReport()
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.MaxPool2d):
                if child.dilation not in (1, (1, 1)) or child.return_indices:
                    report.not_replaced.append(f"{full}: MaxPool2d with dilation or return_indices")
                    continue
                setattr(
                    parent,
                    child_name,
                    nn.AvgPool2d(
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        ceil_mode=child.ceil_mode,
                        count_include_pad=False,
                    ),
                )
                report.pools_replaced.append(full)
            elif type(child) is nn.ReLU:
                setattr(parent, child_name, nn.LeakyReLU(negative_slope, inplace=child.inplace))
                report.relus_replaced.append(full)
    seen_types = set()
    for name, sub in module.named_modules():
        kind = type(sub)
        if kind in seen_types or kind.__module__.startswith("torch.nn."):
            continue
        seen_types.add(kind)
        try:
            source = inspect.getsource(kind.forward)
        except (OSError, TypeError):
            continue
        if _FUNCTIONAL_RELU.search(source):
            report.not_replaced.append(f"{kind.__name__}.forward calls relu as a function (e.g. {name or 'model'})")
    return report
