"""A CNN as a graph of channels (VISCNN, 004 sec. 2.1), followed through additions and concatenations, and run
with gates on its nodes and edges.

Nodes are the output channels of 2-D convolutions and of additions, plus the colour channels of the input. A
``Conv2d`` subclass whose forward pads and then calls ``conv2d`` with its own weight and settings (TensorFlow "same"
padding) is traced through: its padding is channel-wise and the ``conv2d`` call is the convolution. An
addition (a ResNet block's sum) is a node of its own so that every edge has exactly one source. Edges are the 2-D
kernels ``W[d, c]`` of a convolution, from the node that feeds its input channel ``c`` to its output channel
``d``, and the branches of an addition: channel ``c`` of each summand into channel ``c`` of the sum (an identity
kernel). Channel-wise operations between them (batch norm, activations, pooling, dropout) belong to the node before
them: a node's value is what its consumers read. Concatenations along the channel axis only relabel channels.

:meth:`ChannelGraph.run` runs the traced model with a multiplicative gate on every node (applied where a
convolution or an addition reads it) and on every edge (a kernel scaled by its gate, a summand's channel scaled by
its gate). Gates of 0 remove components, so a subgraph runs as a model; per-image gates of 1 that require a
gradient give, through :func:`gate_derivatives`, the derivative of a target with respect to every component: the
first-order change of the target when the component is removed (004 eqs. 1-3).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from convlens import ConvlensError, UnknownComponentError, autocast, full_precision, suggest

INPUT_LAYER = "input"
_WEIGHT_GRADIENT_ELEMENTS = 1 << 24  # per-image weight gradients held at once (64 MiB in float32)

_ADDITIONS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_CONCATENATIONS = {torch.cat, torch.concat, "cat"}
_CHANNEL_MIXING_FUNCTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose2d,
    F.linear,
    torch.matmul,
    torch.bmm,
    torch.einsum,
    operator.matmul,
}
_CHANNEL_MIXING_MODULES = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.MultiheadAttention,
    nn.LayerNorm,
    nn.GroupNorm,
)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Channels ``start .. start + count - 1`` of graph layer ``layer``."""

    layer: str
    start: int
    count: int


Sources = tuple[Segment, ...]  # where each channel of a tensor comes from, in channel order


@dataclasses.dataclass
class GraphLayer:
    """A layer of nodes: the input, a convolution or an addition.

    ``inputs`` holds the sources of what the layer reads (a convolution: its input; an addition: each summand).
    ``view`` is a model layer whose output carries this layer's channels at the resolution they were computed, for
    pictures of the nodes (feature visualisation); ``None`` when no module's output is exactly that.
    """

    name: str
    kind: str  # "input", "conv" or "add"
    channels: int
    inputs: tuple[Sources, ...] = ()
    module: str | None = None  # the Conv2d's name
    view: str | None = None
    kernel_size: tuple[int, int] = (1, 1)
    groups: int = 1
    fx_node: str = ""

    @property
    def edge_shape(self) -> tuple[int, int]:
        """Shape of this layer's edge tensors: ``[out, in / groups]`` kernels, or ``[summands, channels]``."""
        if self.kind == "conv":
            return self.channels, self.in_channels // self.groups
        if self.kind == "add":
            return len(self.inputs), self.channels
        return 0, 0

    @property
    def in_channels(self) -> int:
        return sum(segment.count for segment in self.inputs[0]) if self.inputs else 0

    @property
    def edge_count(self) -> int:
        rows, columns = self.edge_shape
        return rows * columns

    def edge_source(self, row: int, column: int) -> tuple[str, int]:
        """The (layer, channel) node an edge of this layer starts at."""
        if self.kind == "conv":
            group = row // (self.channels // self.groups)
            return channel_node(self.inputs[0], group * (self.in_channels // self.groups) + column)
        return channel_node(self.inputs[row], column)

    def edge_target(self, row: int, column: int) -> int:
        """The channel of this layer an edge ends at."""
        return row if self.kind == "conv" else column

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "channels": self.channels,
            "module": self.module,
            "view": self.view,
            "kernel_size": list(self.kernel_size),
            "groups": self.groups,
            "inputs": [[dataclasses.asdict(segment) for segment in sources] for sources in self.inputs],
        }


def channel_node(sources: Sources, channel: int) -> tuple[str, int]:
    """The (layer, channel) node that channel ``channel`` of a tensor with ``sources`` comes from."""
    offset = 0
    for segment in sources:
        if channel < offset + segment.count:
            return segment.layer, segment.start + channel - offset
        offset += segment.count
    raise IndexError(f"channel {channel} is beyond the {offset} channels of these sources")


class _Reached(Exception):
    def __init__(self, value: Any):
        super().__init__("the run reached its stop node")
        self.value = value


@dataclasses.dataclass
class Gates:
    """Multiplicative gates; a missing entry is a gate of 1 everywhere.

    ``nodes[layer]``: ``[C]`` or per image ``[N, C]``; ``edges[layer]``: a convolution's ``[out, in / groups]``
    kernels (shared by every image) or an addition's ``[summands, C]`` / per image ``[N, summands, C]``.
    """

    nodes: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    edges: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Recorded:
    """What a recording run keeps: each convolution's gated input and output, each addition's gated summands,
    and for each node layer, where it is first read, the segment read and the ``[N, count]`` mean over positions of
    its absolute value."""

    conv_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    summands: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    node_magnitude: dict[str, tuple[Segment, torch.Tensor]] = dataclasses.field(default_factory=dict)


class ChannelGraph:
    """The channel graph of ``module`` (traced with torch.fx), runnable with gates. Build with :meth:`trace`."""

    def __init__(
        self,
        module: nn.Module,
        graph_module: fx.GraphModule,
        layers: list[GraphLayer],
        sources: dict[str, Sources | None],
        model_name: str,
    ):
        self.module = module
        self.graph_module = graph_module
        self.layers = layers
        self.layer = {layer.name: layer for layer in layers}
        self.sources = sources
        self.model_name = model_name
        self._layer_at_node = {layer.fx_node: layer for layer in layers if layer.kind != "input"}
        self._nodes = {node.name: node for node in graph_module.graph.nodes}

    # --- construction --------------------------------------------------------------------------------------------
    @classmethod
    def trace(cls, module: nn.Module, input_size: tuple[int, int], model_name: str = "model") -> ChannelGraph:
        """Trace ``module`` and follow its channels from the input through every convolution and addition."""
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            graph_module = fx.symbolic_trace(module)
        except Exception as exc:  # torch.fx raises many types for untraceable Python control flow
            raise ConvlensError(
                f"{model_name} cannot be traced with torch.fx ({type(exc).__name__}: {exc}); a "
                "circuit graph needs a model without data-dependent control flow"
            ) from exc
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in module.parameters()), torch.float32)
        training = module.training
        try:
            module.eval()
            with torch.no_grad():
                ShapeProp(graph_module).propagate(torch.zeros(1, 3, *input_size, device=device, dtype=dtype))
        finally:
            module.train(training)
        builder = _GraphBuilder(module, graph_module, model_name)
        for node in graph_module.graph.nodes:
            builder.visit(node)
        builder.assign_views()
        return cls(module, graph_module, builder.layers, builder.sources, model_name)

    # --- look-up -------------------------------------------------------------------------------------------------
    def node_of_layer(self, layer: str) -> fx.Node:
        """The traced operation whose output is model layer ``layer``'s output (the last one in its scope)."""
        found = None
        for node in self.graph_module.graph.nodes:
            if node.op == "call_module" and node.target == layer or layer in _scopes(node):
                found = node
        if found is None:
            names = [name for name, _ in self.module.named_modules() if name]
            close = suggest(layer, names, n=5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UnknownComponentError(
                f"{self.model_name} has no layer '{layer}'{hint} (run 'convlens layers' to list them)"
            )
        return found

    def sources_of_layer(self, layer: str) -> Sources:
        """Where the channels of model layer ``layer``'s output come from; one error when they cannot be followed."""
        sources = self.sources.get(self.node_of_layer(layer).name)
        if sources is None:
            raise ConvlensError(
                f"layer '{layer}' of {self.model_name} gives no feature map whose channels the graph "
                "follows (pick a convolution, a block or an activation)"
            )
        return sources

    def exit_sources(self) -> Sources:
        """The channels the model's output is computed from: every followed tensor read by an operation whose
        output the graph no longer follows (a flatten, a linear layer) or by the output itself; not one that reads
        only its shape (``x.size(0)``)."""
        found: list[Segment] = []
        for node in self.graph_module.graph.nodes:
            if self.sources.get(node.name) is not None or _reads_only_shape(node):
                continue
            for argument in _tensor_args(node) if node.op != "output" else _output_args(node):
                for segment in self.sources.get(argument.name) or ():
                    if segment not in found:
                        found.append(segment)
        return tuple(found)

    def conv_module(self, layer: GraphLayer) -> nn.Conv2d:
        """The ``Conv2d`` of a convolution layer."""
        return self.module.get_submodule(layer.module)

    @property
    def edge_layers(self) -> list[GraphLayer]:
        return [layer for layer in self.layers if layer.kind != "input"]

    def edge_count(self) -> int:
        return sum(layer.edge_count for layer in self.edge_layers)

    # --- structure -----------------------------------------------------------------------------------------------
    def ancestors(self, targets: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The nodes and edges with a path to the ``targets`` nodes (boolean ``[C]`` per layer): the feature graph.
        Returns boolean nodes per layer (targets included) and edges per edge layer."""
        nodes = {layer.name: torch.zeros(layer.channels, dtype=torch.bool) for layer in self.layers}
        for name, chosen in targets.items():
            nodes[name] |= chosen.cpu().bool()
        edges = {}
        for layer in reversed(self.edge_layers):
            reached = nodes[layer.name]
            rows, columns = layer.edge_shape
            if layer.kind == "conv":
                kept = reached[:, None].expand(rows, columns).clone()
                needed = kept.view(layer.groups, rows // layer.groups, columns).any(dim=1).flatten()
                _mark_sources(nodes, layer.inputs[0], needed)
            else:
                kept = reached[None, :].expand(rows, columns).clone()
                for sources in layer.inputs:
                    _mark_sources(nodes, sources, reached)
            edges[layer.name] = kept
        return nodes, {layer.name: edges[layer.name] for layer in self.edge_layers}

    # --- running -------------------------------------------------------------------------------------------------
    def run(
        self,
        images: torch.Tensor,
        gates: Gates | None = None,
        stop: fx.Node | None = None,
        recorded: Recorded | None = None,
    ) -> Any:
        """The model's output for ``images`` (or the value of ``stop``, where the run ends) with ``gates`` applied;
        ``recorded`` (filled in place) keeps what :func:`gate_derivatives` needs."""
        runner = _GatedRun(self, gates or Gates(), stop, recorded)
        try:
            return runner.run(images)
        except _Reached as reached:
            return reached.value

    def gated_sources(
        self, value: torch.Tensor, sources: Sources, gates: Gates, recorded: Recorded | None
    ) -> torch.Tensor:
        """``value`` with each channel scaled by the gate of the node it comes from."""
        if recorded is not None:
            offset = 0
            for segment in sources:
                if segment.layer not in recorded.node_magnitude:
                    piece = full_precision(value[:, offset : offset + segment.count].detach())
                    recorded.node_magnitude[segment.layer] = (segment, piece.abs().flatten(2).mean(dim=2))
                offset += segment.count
        if not any(segment.layer in gates.nodes for segment in sources):
            return value
        pieces = []
        for segment in sources:
            gate = gates.nodes.get(segment.layer)
            if gate is None:
                gate = value.new_ones(segment.count)
            pieces.append(gate[..., segment.start : segment.start + segment.count])
        gate = torch.cat(pieces, dim=-1)
        return value * (gate.view(1, -1, 1, 1) if gate.ndim == 1 else gate[:, :, None, None])


class _GatedRun(fx.Interpreter):
    def __init__(self, graph: ChannelGraph, gates: Gates, stop: fx.Node | None, recorded: Recorded | None):
        super().__init__(graph.graph_module, garbage_collect_values=True)
        self.channel_graph = graph
        self.gates = gates
        self.stop = stop
        self.recorded = recorded
        self.extra_traceback = False

    def run_node(self, node: fx.Node) -> Any:
        layer = self.channel_graph._layer_at_node.get(node.name)
        if layer is None:
            value = super().run_node(node)
        elif layer.kind == "conv":
            value = self._convolve(node, layer)
        else:
            value = self._add(node, layer)
        if node is self.stop:
            raise _Reached(value)
        return value

    def _convolve(self, node: fx.Node, layer: GraphLayer) -> torch.Tensor:
        args, _ = self.fetch_args_kwargs_from_env(node)
        conv = self.channel_graph.conv_module(layer)
        inputs = self.channel_graph.gated_sources(args[0], layer.inputs[0], self.gates, self.recorded)
        weight = conv.weight
        mask = self.gates.edges.get(layer.name)
        if mask is not None:
            weight = weight * mask.to(weight.dtype)[:, :, None, None]
        output = conv._conv_forward(inputs, weight, conv.bias)
        if self.recorded is not None:
            self.recorded.conv_io[layer.name] = (inputs, output)
        return output

    def _add(self, node: fx.Node, layer: GraphLayer) -> torch.Tensor:
        args, _ = self.fetch_args_kwargs_from_env(node)
        summands = [arg for arg in args if isinstance(arg, torch.Tensor)]
        gate = self.gates.edges.get(layer.name)
        total = None
        gated = []
        for index, (summand, sources) in enumerate(zip(summands, layer.inputs)):
            summand = self.channel_graph.gated_sources(summand, sources, self.gates, self.recorded)
            if gate is not None:
                branch = gate[index] if gate.ndim == 2 else gate[:, index]
                summand = summand * (branch.view(1, -1, 1, 1) if branch.ndim == 1 else branch[:, :, None, None])
            gated.append(summand)
            total = summand if total is None else total + summand
        if self.recorded is not None:
            self.recorded.summands[layer.name] = gated
        return total


def _scopes(node: fx.Node) -> set[str]:
    return {key.split("@")[0] for key in (node.meta.get("nn_module_stack") or {})}


def _reads_only_shape(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape``, ``x.ndim``: operations that read a tensor's shape, not its values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))


def _reused_scopes(graph_module: fx.GraphModule) -> set[str]:
    """The modules called more than once in the traced forward pass (torch.fx marks repeated calls ``name@n``)."""
    called: dict[str, int] = {}
    reused = set()
    for node in graph_module.graph.nodes:
        for key in node.meta.get("nn_module_stack") or {}:
            if "@" in key:
                reused.add(key.split("@")[0])
        if node.op == "call_module":
            called[str(node.target)] = called.get(str(node.target), 0) + 1
    return reused | {name for name, count in called.items() if count > 1}


def _mark_sources(nodes: dict[str, torch.Tensor], sources: Sources, chosen: torch.Tensor) -> None:
    offset = 0
    for segment in sources:
        nodes[segment.layer][segment.start : segment.start + segment.count] |= chosen[offset : offset + segment.count]
        offset += segment.count


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


class _GraphBuilder:
    """Walks the traced operations once, giving each tensor the sources of its channels."""

    def __init__(self, module: nn.Module, graph_module: fx.GraphModule, model_name: str):
        self.module = module
        self.graph_module = graph_module
        self.model_name = model_name
        self.layers: list[GraphLayer] = []
        self.sources: dict[str, Sources | None] = {}
        self._chains: dict[str, list[fx.Node]] = {}

    def visit(self, node: fx.Node) -> None:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is None or len(shape) != 4:
                self.sources[node.name] = None
                return
            self._new_layer(GraphLayer(INPUT_LAYER, "input", shape[1], fx_node=node.name), node)
            return
        if node.op in ("get_attr", "output"):
            self.sources[node.name] = None
            return
        carried = [arg for arg in _tensor_args(node) if self.sources.get(arg.name) is not None]
        if not carried:
            self.sources[node.name] = None
            return
        module = self.graph_module.get_submodule(node.target) if node.op == "call_module" else None
        called = self._called_conv(node)
        if isinstance(module, nn.Conv2d):
            self._conv(node, str(node.target), module, carried)
        elif called is not None:
            self._conv(node, *called, carried)
        elif node.op != "call_module" and node.target in _ADDITIONS and len(carried) >= 2:
            self._add(node, carried)
        elif node.op != "call_module" and node.target in _CONCATENATIONS:
            self._cat(node, carried)
        else:
            self._channel_wise(node, module, carried, shape)

    def _unsupported(self, node: fx.Node, why: str) -> ConvlensError:
        return ConvlensError(
            f"the circuit graph of {self.model_name} cannot follow channels through "
            f"'{node.name}' ({_target_name(node.target)}): {why}"
        )

    def _called_conv(self, node: fx.Node) -> tuple[str, nn.Conv2d] | None:
        """The name and module of the ``Conv2d`` whose own weight, bias and settings this ``conv2d`` call uses (a
        ``Conv2d`` subclass that pads in its forward); ``None`` for any other operation."""
        if node.op != "call_function" or node.target is not F.conv2d:
            return None
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        call = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, **dict(zip(names, node.args))}
        call.update(node.kwargs)
        weight = call.get("weight")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or not str(weight.target).endswith(".weight"):
            return None
        name = str(weight.target).rsplit(".", 1)[0]
        conv = self.module.get_submodule(name)
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
            return None
        bias = call["bias"].target if isinstance(call["bias"], fx.Node) else call["bias"]
        own = (
            f"{name}.bias" if conv.bias is not None else None,
            *(_pair(setting) for setting in (conv.stride, conv.padding, conv.dilation)),
            conv.groups,
        )
        given = (bias, *(_pair(call[key]) for key in ("stride", "padding", "dilation")), call["groups"])
        return (name, conv) if given == own else None

    def _conv(self, node: fx.Node, name: str, conv: nn.Conv2d, carried: list[fx.Node]) -> None:
        if node.args[0] is not carried[0] or len(carried) != 1:
            raise self._unsupported(node, "a convolution must read one feature map")
        layer = GraphLayer(
            name,
            "conv",
            conv.out_channels,
            (self.sources[carried[0].name],),
            module=name,
            kernel_size=tuple(conv.kernel_size),
            groups=conv.groups,
            fx_node=node.name,
        )
        self._new_layer(layer, node)

    def _add(self, node: fx.Node, carried: list[fx.Node]) -> None:
        tensors = _tensor_args(node)
        if len(tensors) != len(carried) or node.kwargs.get("alpha", 1) != 1:
            raise self._unsupported(node, "an addition of feature maps with constants or a scale")
        shapes = {tuple(_shape(arg) or ()) for arg in carried}
        if len(shapes) != 1:
            raise self._unsupported(node, f"summands of different shapes {sorted(shapes)}")
        owner = max(_scopes(node), key=len, default="")
        base = f"{owner}.add" if owner else "add"
        name, suffix = base, 1
        while any(layer.name == name for layer in self.layers):
            suffix += 1
            name = f"{base}{suffix}"
        layer = GraphLayer(
            name, "add", _shape(node)[1], tuple(self.sources[arg.name] for arg in carried), fx_node=node.name
        )
        self._new_layer(layer, node)

    def _cat(self, node: fx.Node, carried: list[fx.Node]) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        if dim not in (1, -3) or shape is None or len(shape) != 4:
            raise self._unsupported(node, "a concatenation along an axis other than the channels")
        sources: list[Segment] = []
        for tensor in tensors:
            found = self.sources.get(tensor.name) if isinstance(tensor, fx.Node) else None
            if found is None:
                raise self._unsupported(node, "a concatenation with a tensor whose channels are not followed")
            sources += found
        self.sources[node.name] = tuple(sources)

    def _channel_wise(
        self, node: fx.Node, module: nn.Module | None, carried: list[fx.Node], shape: tuple[int, ...] | None
    ) -> None:
        if len(carried) > 1:
            raise self._unsupported(node, "it combines feature maps other than by addition or concatenation")
        source = self.sources[carried[0].name]
        channels = sum(segment.count for segment in source)
        if shape is None or len(shape) != 4:
            self.sources[node.name] = None  # flattened, pooled to a vector, ...: the graph ends here
            return
        mixing = isinstance(module, _CHANNEL_MIXING_MODULES) or (
            node.op != "call_module" and node.target in _CHANNEL_MIXING_FUNCTIONS
        )
        if mixing:
            raise self._unsupported(node, "it mixes channels (only Conv2d layers may)")
        if shape[1] != channels:
            raise self._unsupported(node, f"it changes the channels from {channels} to {shape[1]}")
        self.sources[node.name] = source
        if len(source) == 1 and source[0].start == 0 and source[0].count == self.layer(source[0].layer).channels:
            self._chains[source[0].layer].append(node)

    def _new_layer(self, layer: GraphLayer, node: fx.Node) -> None:
        self.layers.append(layer)
        self.sources[node.name] = (Segment(layer.name, 0, layer.channels),)
        self._chains[layer.name] = [node]

    def layer(self, name: str) -> GraphLayer:
        return next(layer for layer in self.layers if layer.name == name)

    def assign_views(self) -> None:
        """Each layer's ``view``: the outermost module whose output is the latest operation of the layer's
        channel-wise chain that keeps the resolution it was computed at. A module that runs more than once per
        forward pass (one activation module reused) is no view: its output is not one tensor."""
        last_of_scope: dict[str, str] = {}
        for node in self.graph_module.graph.nodes:
            for scope in _scopes(node):
                last_of_scope[scope] = node.name
            if node.op == "call_module":
                last_of_scope[str(node.target)] = node.name
        for scope in _reused_scopes(self.graph_module):
            last_of_scope.pop(scope, None)
        for layer in self.layers:
            chain = self._chains.get(layer.name, [])
            size = (_shape(chain[0]) or (0, 0, 0, 0))[2:] if chain else None
            for node in reversed(chain):
                if (_shape(node) or (0, 0, 0, 0))[2:] != size:
                    continue
                closed = sorted(
                    (
                        scope
                        for scope in _scopes(node) | ({str(node.target)} if node.op == "call_module" else set())
                        if last_of_scope.get(scope) == node.name
                    ),
                    key=len,
                )
                if closed:
                    layer.view = closed[0]
                    break


def _pair(value: Any) -> Any:
    """A convolution setting as a tuple of two (an int repeated, a list as a tuple); strings and None unchanged."""
    if isinstance(value, int):
        return (value, value)
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda arg: found.append(arg) if _shape(arg) is not None else None)
    return list(dict.fromkeys(found))


def _output_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(node.args, found.append)
    return found


# --- derivatives of a target with respect to every gate -------------------------------------------------------------


@dataclasses.dataclass
class GateDerivatives:
    """Per image, signed: ``taylor`` = d target / d gate at gates of 1 (= sum over positions of activation x
    gradient for the component's output map, 004 eq. 3 applied to the whole map); ``activation`` = the mean over
    positions of the component's output map (a node: of its absolute value). Nodes ``[N, C]`` per layer; edges
    ``[N, out, in / groups]`` per convolution and ``[N, summands, C]`` per addition."""

    node_taylor: dict[str, torch.Tensor]
    edge_taylor: dict[str, torch.Tensor]
    node_activation: dict[str, torch.Tensor]
    edge_activation: dict[str, torch.Tensor]
    target: torch.Tensor  # [N] the target's value per image


def gate_derivatives(
    graph: ChannelGraph,
    images: torch.Tensor,
    objective: Callable[[Any], torch.Tensor],
    stop: fx.Node | None,
    dtype: str = "float32",
) -> GateDerivatives:
    """One forward and one backward pass (weights frozen) giving :class:`GateDerivatives` of ``objective`` (a
    function of the value at ``stop``, ``None``: the model's output, giving one value per image). The forward runs
    under autocast to ``dtype``; the objective, the gates and every derivative keep the images' type (float32 or
    wider)."""
    count = images.shape[0]
    ones = dict(device=images.device, dtype=images.dtype, requires_grad=True)
    gates = Gates(
        nodes={layer.name: torch.ones(count, layer.channels, **ones) for layer in graph.layers},
        edges={
            layer.name: torch.ones(count, *layer.edge_shape, **ones) for layer in graph.layers if layer.kind == "add"
        },
    )
    recorded = Recorded()
    frozen = [p for p in graph.module.parameters() if p.requires_grad]
    try:
        for parameter in frozen:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            with autocast(images.device, dtype):
                value = graph.run(images, gates, stop, recorded)
            target = objective(full_precision(value))
            if target.shape != (count,):
                raise ConvlensError(f"the circuit target gives shape {tuple(target.shape)}, expected ({count},)")
            convs = [name for name in recorded.conv_io]
            node_names = [name for name in gates.nodes if name in recorded.node_magnitude]
            add_names = [name for name in gates.edges if name in recorded.summands]
            wanted = (
                [gates.nodes[name] for name in node_names]
                + [gates.edges[name] for name in add_names]
                + [recorded.conv_io[name][1] for name in convs]
            )
            if not target.requires_grad:
                raise ConvlensError("the circuit target does not depend on any node of the graph")
            gradients = torch.autograd.grad(target.sum(), wanted, allow_unused=True)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    gradients = [full_precision(g if g is not None else torch.zeros_like(w)) for g, w in zip(gradients, wanted)]
    node_taylor = {name: gradients[i].detach() for i, name in enumerate(node_names)}
    offset = len(node_names)
    edge_taylor = {name: gradients[offset + i].detach() for i, name in enumerate(add_names)}
    offset += len(add_names)
    edge_activation = {
        name: torch.stack([full_precision(s.detach()).flatten(2).mean(dim=2) for s in recorded.summands[name]], dim=1)
        for name in add_names
    }
    for i, name in enumerate(convs):
        layer = graph.layer[name]
        conv = graph.conv_module(layer)
        inputs = full_precision(recorded.conv_io[name][0].detach())
        edge_taylor[name], edge_activation[name] = _kernel_derivatives(conv, inputs, gradients[offset + i])
    node_activation = {}
    for name, (segment, magnitude) in recorded.node_magnitude.items():
        full = images.new_zeros(count, graph.layer[name].channels)
        full[:, segment.start : segment.start + segment.count] = magnitude
        node_activation[name] = full
    return GateDerivatives(node_taylor, edge_taylor, node_activation, edge_activation, target.detach())


def _kernel_derivatives(
    conv: nn.Conv2d, inputs: torch.Tensor, output_gradient: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and kernel ``W[d, c]``: the sum over positions of its output map E times the gradient at output
    ``d`` (= sum over the kernel of W x the per-image weight gradient), and the mean over positions of E."""
    count = inputs.shape[0]
    groups = conv.groups
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        inputs, padding = F.pad(inputs, conv._reversed_padding_repeated_twice, mode=mode), 0
    else:
        padding = conv.padding
    patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    positions = patches.shape[-1]
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    per_group_in = conv.in_channels // groups
    per_group_out = conv.out_channels // groups
    patches = patches.view(count, groups, per_group_in * taps, positions)
    gradient = output_gradient.reshape(count, groups, per_group_out, positions)
    weight = conv.weight.detach().view(groups, per_group_out, per_group_in, taps)
    chunk = max(1, _WEIGHT_GRADIENT_ELEMENTS // max(conv.out_channels * per_group_in * taps, 1))
    taylor = torch.cat(
        [
            (
                torch.einsum("ngol,ngil->ngoi", gradient[i : i + chunk], patches[i : i + chunk]).view(
                    -1, groups, per_group_out, per_group_in, taps
                )
                * weight
            ).sum(dim=-1)
            for i in range(0, count, chunk)
        ]
    )
    patch_means = patches.mean(dim=-1).view(count, groups, 1, per_group_in, taps)
    activation = (patch_means * weight).sum(dim=-1)
    return (
        taylor.reshape(count, conv.out_channels, per_group_in),
        activation.reshape(count, conv.out_channels, per_group_in),
    )


def iter_edges(graph: ChannelGraph) -> Iterator[tuple[GraphLayer, int]]:
    """Every edge layer with the offset of its first edge in the flat order of :func:`flatten_edges`."""
    offset = 0
    for layer in graph.edge_layers:
        yield layer, offset
        offset += layer.edge_count


def flatten_edges(graph: ChannelGraph, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
    """Edge tensors of every edge layer as one flat vector (layer order, then row-major)."""
    return torch.cat([per_layer[layer.name].reshape(-1) for layer in graph.edge_layers])


def unflatten_edges(graph: ChannelGraph, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        layer.name: flat[offset : offset + layer.edge_count].view(layer.edge_shape)
        for layer, offset in iter_edges(graph)
    }
