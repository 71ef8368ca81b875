"""The channel graph: tracing through additions, concatenations and grouped convolutions, gated runs, and gate
derivatives checked against removing components (exactly, where the target is linear in the gate) and against
finite differences (float64)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convlens.core.errors import ConvlensError, UnknownComponentError
from convlens.plugins.visualizers.circuit.graph import ChannelGraph, Gates, gate_derivatives


class Residual(nn.Module):
    """stem -> relu -> (a -> relu -> b) + stem -> [relu] -> head: the head is linear in everything after relu(a)."""

    def __init__(self, relu_after_add: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 5, 3, padding=1)
        self.b = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.head = nn.Conv2d(4, 3, 3, stride=2, padding=1)
        self.relu_after_add = relu_after_add

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.b(torch.relu(self.a(x))) + x
        if self.relu_after_add:
            x = torch.relu(x)
        return self.head(x)


class Dense(nn.Module):
    """A concatenation and a depthwise convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 2, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        first = torch.tanh(self.first(x))
        joined = torch.cat([first, nn.functional.leaky_relu(self.second(first))], dim=1)
        return self.out(torch.tanh(self.depthwise(joined)))


def images(count: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def head_channel(value: torch.Tensor) -> torch.Tensor:
    return value[:, 1].mean(dim=(1, 2))


def target_with(graph: ChannelGraph, x: torch.Tensor, gates: Gates) -> torch.Tensor:
    with torch.no_grad():
        return head_channel(graph.run(x, gates))


def one_gate(shape, index, value: float) -> torch.Tensor:
    gate = torch.ones(shape, dtype=torch.float64)
    gate[index] = value
    return gate


def test_the_graph_follows_a_residual_addition():
    graph = ChannelGraph.trace(Residual().double(), (8, 8))
    assert [(layer.name, layer.kind, layer.channels) for layer in graph.layers] == [
        ("input", "input", 3),
        ("stem", "conv", 4),
        ("a", "conv", 5),
        ("b", "conv", 4),
        ("add", "add", 4),
        ("head", "conv", 3),
    ]
    add = graph.layer["add"]
    assert [[segment.layer for segment in sources] for sources in add.inputs] == [["b"], ["stem"]]
    assert add.edge_shape == (2, 4) and graph.layer["b"].edge_shape == (4, 5)
    assert add.edge_source(1, 2) == ("stem", 2) and graph.layer["head"].edge_source(0, 3) == ("add", 3)
    assert graph.edge_count() == 4 * 3 + 5 * 4 + 4 * 5 + 2 * 4 + 3 * 4
    nodes, edges = graph.ancestors({"head": torch.tensor([False, True, False])})
    assert edges["head"].tolist() == [[False] * 4, [True] * 4, [False] * 4]
    assert nodes["add"].all() and nodes["stem"].all() and nodes["input"].all()


def test_removing_an_edge_through_a_residual_addition_changes_the_target_by_its_taylor_derivative():
    model = Residual().double().eval()
    graph = ChannelGraph.trace(model, (8, 8))
    x = images()
    derivatives = gate_derivatives(graph, x, head_channel, None)
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-12)
    full = target_with(graph, x, Gates())
    # the head is linear in these gates, so the first-order change is the exact change of removing the component
    removals = {
        "skip branch": (Gates(edges={"add": one_gate((2, 4), (1, 2), 0.0)}), derivatives.edge_taylor["add"][:, 1, 2]),
        "residual branch": (
            Gates(edges={"add": one_gate((2, 4), (0, 3), 0.0)}),
            derivatives.edge_taylor["add"][:, 0, 3],
        ),
        "kernel inside the branch": (
            Gates(edges={"b": one_gate((4, 5), (3, 1), 0.0)}),
            derivatives.edge_taylor["b"][:, 3, 1],
        ),
        "sum node": (Gates(nodes={"add": one_gate(4, 0, 0.0)}), derivatives.node_taylor["add"][:, 0]),
    }
    for name, (gates, taylor) in removals.items():
        change = full - target_with(graph, x, gates)
        assert torch.allclose(taylor, change, rtol=1e-9, atol=1e-12), name
        assert change.abs().min() > 1e-5, name  # the check is not vacuous


@pytest.mark.parametrize("relu_after_add", [False, True])
def test_gate_derivatives_match_finite_differences(relu_after_add):
    graph = ChannelGraph.trace(Residual(relu_after_add).double().eval(), (8, 8))
    x = images()
    derivatives = gate_derivatives(graph, x, head_channel, None)
    full = target_with(graph, x, Gates())
    step = 1e-6
    cases = [
        (Gates(edges={"a": one_gate((5, 4), (2, 1), 1 - step)}), derivatives.edge_taylor["a"][:, 2, 1]),
        (Gates(edges={"stem": one_gate((4, 3), (0, 2), 1 - step)}), derivatives.edge_taylor["stem"][:, 0, 2]),
        (Gates(edges={"add": one_gate((2, 4), (1, 1), 1 - step)}), derivatives.edge_taylor["add"][:, 1, 1]),
        (Gates(nodes={"stem": one_gate(4, 3, 1 - step)}), derivatives.node_taylor["stem"][:, 3]),
        (Gates(nodes={"input": one_gate(3, 0, 1 - step)}), derivatives.node_taylor["input"][:, 0]),
    ]
    for gates, taylor in cases:
        assert torch.allclose((full - target_with(graph, x, gates)) / step, taylor, rtol=1e-4, atol=1e-8)


def test_concatenations_and_grouped_convolutions():
    model = Dense().double().eval()
    graph = ChannelGraph.trace(model, (8, 8))
    depthwise = graph.layer["depthwise"]
    assert [(s.layer, s.start, s.count) for s in depthwise.inputs[0]] == [("first", 0, 4), ("second", 0, 2)]
    assert depthwise.edge_shape == (6, 1) and depthwise.edge_source(5, 0) == ("second", 1)
    x = images()
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-12)
    derivatives = gate_derivatives(graph, x, head_channel, None)
    full = target_with(graph, x, Gates())
    step = 1e-6
    for gates, taylor in [
        (Gates(edges={"depthwise": one_gate((6, 1), (5, 0), 1 - step)}), derivatives.edge_taylor["depthwise"][:, 5, 0]),
        (Gates(nodes={"second": one_gate(2, 1, 1 - step)}), derivatives.node_taylor["second"][:, 1]),
        (Gates(edges={"second": one_gate((2, 4), (1, 3), 1 - step)}), derivatives.edge_taylor["second"][:, 1, 3]),
    ]:
        assert torch.allclose((full - target_with(graph, x, gates)) / step, taylor, rtol=1e-4, atol=1e-8)


def test_edge_activation_is_the_mean_of_each_kernels_output_map():
    model = Dense().double().eval()
    graph = ChannelGraph.trace(model, (8, 8))
    x = images()
    derivatives = gate_derivatives(graph, x, head_channel, None)
    first = torch.tanh(model.first(x))
    conv = model.second
    for d in range(2):
        for c in range(4):
            own = nn.functional.conv2d(first[:, c : c + 1], conv.weight[d : d + 1, c : c + 1], padding=1)
            assert torch.allclose(derivatives.edge_activation["second"][:, d, c], own.mean(dim=(1, 2, 3)))
    assert torch.allclose(derivatives.node_activation["first"], first.abs().mean(dim=(2, 3)))


def test_a_torchvision_resnet18_runs_unchanged_and_names_its_blocks():
    model = torchvision.models.resnet18().eval()
    graph = ChannelGraph.trace(model, (32, 32), "resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-5)
    assert sum(layer.kind == "add" for layer in graph.layers) == 8
    assert graph.layer["layer2.0.add"].view == "layer2.0"
    assert [s.layer for s in graph.layer["layer2.0.add"].inputs[1]] == ["layer2.0.downsample.0"]
    assert [s.layer for s in graph.sources_of_layer("layer3")] == ["layer3.1.add"]
    assert [s.layer for s in graph.exit_sources()] == ["layer4.1.add"]
    with pytest.raises(UnknownComponentError, match="closest: layer3"):
        graph.node_of_layer("layer33")


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.second = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.first(x) * torch.sigmoid(self.second(x))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_models_the_graph_cannot_follow_get_one_clear_message():
    with pytest.raises(ConvlensError, match="cannot follow channels through 'mul'.*combines feature maps"):
        ChannelGraph.trace(Gated(), (8, 8), "gated")
    with pytest.raises(ConvlensError, match="branching cannot be traced with torch.fx"):
        ChannelGraph.trace(Branching(), (8, 8), "branching")


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 4).view(1, 4, 1, 1))
        self.second = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.second(self.first(x) * self.scale - 0.5)


def test_scaling_by_a_parameter_or_a_constant_is_channel_wise():
    model = LayerScale().double().eval()
    graph = ChannelGraph.trace(model, (8, 8))
    assert [layer.name for layer in graph.layers] == ["input", "first", "second"]
    assert [s.layer for s in graph.layer["second"].inputs[0]] == ["first"]
    x = images()
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-12)


class SamePaddingConv(nn.Conv2d):
    """TensorFlow 'same' padding as EfficientNet ports write it: a ZeroPad2d, then conv2d with the module's settings."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, 1, self.groups)


class Padded(nn.Module):
    """Padded stride-2 and depthwise convolutions, one ReLU6 module reused, and a flatten by x.size(0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stem = SamePaddingConv(3, 4, 2, stride=2)
        self.depthwise = SamePaddingConv(4, 4, 2, groups=4, bias=False)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = self.act(self.stem(x) * 3)
        x = self.act(self.depthwise(x)) + x
        return self.fc(x.view(x.size(0), -1))


def test_convolutions_that_pad_in_their_forward_are_followed():
    model = Padded().double().eval()
    graph = ChannelGraph.trace(model, (8, 8))
    assert [(layer.name, layer.kind, layer.groups) for layer in graph.layers] == [
        ("input", "input", 1),
        ("stem", "conv", 1),
        ("depthwise", "conv", 4),
        ("add", "add", 1),
    ]
    # the ReLU6 runs twice, so a hook on it sees two tensors: the views are the convolutions' own outputs
    assert graph.layer["stem"].view == "stem" and graph.layer["depthwise"].view == "depthwise"
    assert [segment.layer for segment in graph.exit_sources()] == ["add"]  # x.size(0) does not read the input
    x = images()
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-12)
    derivatives = gate_derivatives(graph, x, lambda logits: logits[:, 1], None)
    full = model(x)[:, 1].detach()
    step = 1e-6
    for name, index in (("depthwise", (2, 0)), ("stem", (1, 2))):
        gate = one_gate(graph.layer[name].edge_shape, index, 1 - step)
        with torch.no_grad():
            change = (full - graph.run(x, Gates(edges={name: gate}))[:, 1]) / step
        assert torch.allclose(change, derivatives.edge_taylor[name][(slice(None), *index)], rtol=1e-4, atol=1e-8)
        assert change.abs().max() > 1e-4, name
