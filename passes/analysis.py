"""The analysis pass: find every chain of convolutions that could merge, and every valid block.

>>> import torch, torchvision, fxmerge
>>> analysis = fxmerge.analyze(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),))
>>> [len(c.layers) for c in analysis.chains][:3]
[1, 4, 2]

Vocabulary (DESIGN.md): a *layer* is a conv with an optional zero pad before and BatchNorm after;
*position* p of a chain is the map after layer p (0 is the chain's input); an *activation at p*
is a registered nonlinearity on that map; a *skip* (s, t) is an identity residual
``x_t = y_t + x_s``; a *forced break* is a position no merged conv may cross; a *block* (i, j]
is layers i+1..j merged into one conv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx
from tabulate import tabulate

from fxmerge.algebra import ConvGeometry, merged_geometry

from . import patterns
from .tracing import shape_of


@dataclass(frozen=True)
class BlockLimits:
    """Which multi-layer blocks are worth considering (single layers are always valid).

    Deep chains have O(L²) blocks and the long ones have absurd kernels, which only slow the
    latency table and the merge down. A block of two or more layers is a candidate only when,
    in every spatial dimension, its merged kernel spans at most ``max_kernel`` pixels and at
    most ``max_kernel_ratio`` times the block's input map, and when the merged conv needs at
    most ``max_macs_ratio`` times the multiply-adds of the layers it replaces (None turns a
    limit off). The paper's MobileNetV2 candidate set needs up to 33x the MACs (a 384->576
    7x7 conv); the default keeps all of it but its four most expensive blocks, and
    ``BlockLimits(max_macs_ratio=None)`` keeps every one.
    """

    max_kernel: int = 15
    max_kernel_ratio: float = 1.5
    max_macs_ratio: float | None = 12.0

    def allows(self, spec: ConvGeometry, layers: Sequence["Layer"]) -> bool:
        input_shape = layers[0].input_shape
        spatial = list(input_shape[2:]) if input_shape is not None else [None] * spec.ndim
        for k, d, size in zip(spec.kernel, spec.dilation, spatial):
            extent = d * (k - 1) + 1
            if extent > self.max_kernel:
                return False
            if size is not None and extent > self.max_kernel_ratio * size:
                return False
        if self.max_macs_ratio is not None and all(l.output_shape for l in layers):
            merged = conv_macs(spec, layers[-1].output_shape)
            return merged <= self.max_macs_ratio * sum(conv_macs(l.geometry, l.output_shape) for l in layers)
        return True


def conv_macs(geometry: ConvGeometry, output_shape: Sequence[int]) -> int:
    """Multiply-adds of one convolution producing ``output_shape`` (batch included)."""
    return (math.prod(output_shape) * geometry.in_channels // geometry.groups) * math.prod(geometry.kernel)


@dataclass(frozen=True)
class Layer:
    """One convolution with its optional zero pad before and BatchNorm after."""

    conv: str
    pad: str | None
    bn: str | None
    geometry: ConvGeometry  # padding includes the explicit pad
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None

    def to_dict(self) -> dict:
        return {"conv": self.conv, "pad": self.pad, "bn": self.bn}


@dataclass(frozen=True)
class Skip:
    """An identity residual from position ``source`` to position ``target`` via node ``add``."""

    source: int
    target: int
    add: str


@dataclass
class Chain:
    """A run of layers linked through single-consumer edges, activations and identity skips."""

    index: int
    layers: list[Layer]
    positions: list[str]  # node name of the map at each position 0..L
    activations: dict[int, tuple[str, str]]  # position -> (node name, kind)
    skips: list[Skip]
    breaks: dict[int, str]  # interior forced breaks -> reason
    end_reason: str
    valid_blocks: list[tuple[int, int]] = field(default_factory=list)
    specs: dict[tuple[int, int], ConvGeometry] = field(default_factory=dict)
    input_shapes: dict[int, tuple[int, ...] | None] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.layers)

    @property
    def droppable(self) -> list[int]:
        """Interior positions whose activation a plan may drop."""
        return sorted(p for p in self.activations if 0 < p < self.length and p not in self.breaks)

    @property
    def forced(self) -> list[int]:
        """Interior breaks that carry an activation: it stays, whatever the plan."""
        return sorted(p for p in self.breaks if p in self.activations)

    @property
    def kept_candidates(self) -> list[int]:
        """Positions that can be consecutive kept activations: the chain's ends, its droppable
        activations and its forced ones."""
        return [0] + sorted(set(self.droppable) | set(self.forced)) + [self.length]

    def skip_pairs(self) -> list[tuple[int, int]]:
        return [(s.source, s.target) for s in self.skips]

    def name(self) -> str:
        first, last = self.layers[0].conv, self.layers[-1].conv
        return first if first == last else f"{first}..{last}"


def is_valid_block(i: int, j: int, breaks: Sequence[int], skips: Sequence[tuple[int, int]]) -> bool:
    """METHOD.md §3: no forced break strictly inside, every skip nested in or disjoint from it."""
    if any(i < b < j for b in breaks):
        return False
    return all(not (i < s < j < t) and not (s < i < t < j) for s, t in skips)


def block_skips(i: int, j: int, skips: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Skips nested in block (i, j], relative to i."""
    return [(s - i, t - i) for s, t in skips if i <= s and t <= j]


@dataclass
class Analysis:
    """What the analysis pass found; ``print(analysis)`` shows it as tables."""

    graph_module: fx.GraphModule
    chains: list[Chain]
    limits: BlockLimits
    unmergeable: dict[str, str]  # conv node -> why it is no layer

    @property
    def num_layers(self) -> int:
        return sum(c.length for c in self.chains)

    def summary_table(self) -> str:
        rows = []
        for c in self.chains:
            breaks = "; ".join(f"@{p}: {r}" for p, r in sorted(c.breaks.items()))
            rows.append([c.index, c.name(), c.length, len(c.droppable), len(c.skips), len(c.valid_blocks),
                         breaks or "-", c.end_reason])
        return tabulate(rows, headers=["chain", "layers", "L", "droppable", "skips", "valid blocks",
                                       "forced breaks", "ends at"], tablefmt="simple")

    def layer_table(self) -> str:
        rows = []
        for c in self.chains:
            skip_at = {s.target: f"+x{s.source}" for s in c.skips}
            for p, layer in enumerate(c.layers, start=1):
                act = c.activations.get(p)
                mark = "" if act is None else (act[1] if p in c.droppable else f"{act[1]} (kept)")
                rows.append([c.index, p, layer.conv, layer.geometry.describe(), "BN" if layer.bn else "",
                             skip_at.get(p, ""), mark, "break" if p in c.breaks else ""])
        return tabulate(rows, headers=["chain", "pos", "conv", "geometry", "bn", "skip", "activation", ""],
                        tablefmt="simple")

    def __str__(self) -> str:
        head = (f"fxmerge analysis: {len(self.chains)} chains, {self.num_layers} layers, "
                f"{sum(len(c.droppable) for c in self.chains)} droppable activations, "
                f"{sum(len(c.valid_blocks) for c in self.chains)} valid blocks "
                f"(limits: kernel <= {self.limits.max_kernel} and <= {self.limits.max_kernel_ratio}x input, "
                f"MACs <= {self.limits.max_macs_ratio}x)")
        extra = ""
        if self.unmergeable:
            extra = "\nconvs left alone:\n" + "\n".join(f"  {k}: {v}" for k, v in self.unmergeable.items())
        return f"{head}\n\n{self.summary_table()}\n\n{self.layer_table()}{extra}"


# --------------------------------------------------------------------------- finding layers


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_layers(gm: fx.GraphModule) -> tuple[list[Layer], dict[str, str]]:
    """Every convolution that can take part in a merge, in graph order, and why the others can't."""
    layers, unmergeable = [], {}
    weight_uses: dict[str, int] = {}
    calls = []
    for node in gm.graph.nodes:
        call, why = patterns.conv_call(gm, node)
        if why:
            unmergeable[node.name] = why
        if call is None:
            continue
        calls.append((node, call))
        weight_uses[call.weight_target] = weight_uses.get(call.weight_target, 0) + 1
    for node, call in calls:
        if weight_uses[call.weight_target] > 1:
            unmergeable[node.name] = (f"conv weight '{call.weight_target}' is shared by "
                                      f"{weight_uses[call.weight_target]} calls")
            continue
        layers.append(_layer(gm, node, call))
    return layers, unmergeable


def layer_geometry(gm: fx.GraphModule, conv: fx.Node, pad: fx.Node | None) -> ConvGeometry:
    """A layer's conv geometry with the explicit zero pad before it folded into ``padding``."""
    geom = patterns.conv_call(gm, conv)[0].geometry
    if pad is None:
        return geom
    extra = patterns.zero_pad(gm, pad, geom.ndim)
    padding = tuple((a + c, b + d) for (a, b), (c, d) in zip(geom.padding, extra))
    return ConvGeometry(geom.in_channels, geom.out_channels, geom.kernel, geom.stride, padding,
                        geom.dilation, geom.groups)


def _layer(gm: fx.GraphModule, conv: fx.Node, call: patterns.ConvCall) -> Layer:
    pad_node, inp = None, conv.args[0]
    if isinstance(inp, fx.Node) and len(inp.users) == 1 and patterns.zero_pad(gm, inp, call.geometry.ndim):
        pad_node = inp
    geom = layer_geometry(gm, conv, pad_node)
    bn_node = None
    user = _sole_user(conv)
    if user is not None:
        bn = patterns.batchnorm_call(gm, user)
        if bn is not None and bn.num_features == geom.out_channels:
            bn_node = user
    inp = pad_node.args[0] if pad_node is not None else conv.args[0]
    out = bn_node or conv
    return Layer(conv.name, pad_node.name if pad_node else None, bn_node.name if bn_node else None, geom,
                 shape_of(inp), shape_of(out))


# --------------------------------------------------------------------------- chains


class _Graph:
    """Lookups over one GraphModule shared by the chain walk."""

    def __init__(self, gm: fx.GraphModule, layers: list[Layer]):
        self.gm = gm
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.by_input: dict[str, list[Layer]] = {}
        for layer in layers:
            self.by_input.setdefault(self.input_of(layer).name, []).append(layer)

    def input_of(self, layer: Layer) -> fx.Node:
        first = self.nodes[layer.pad or layer.conv]
        return first.args[0]

    def output_of(self, layer: Layer) -> fx.Node:
        return self.nodes[layer.bn or layer.conv]

    def first_node(self, layer: Layer) -> fx.Node:
        return self.nodes[layer.pad or layer.conv]


def _walk(g: _Graph, start: Layer, taken: set[str], index: int) -> Chain:
    layers: list[Layer] = []
    positions: list[fx.Node] = [g.input_of(start)]
    activations: dict[int, tuple[str, str]] = {}
    skips: list[Skip] = []
    current: Layer | None = start
    while current is not None:
        layers.append(current)
        taken.add(current.conv)
        p = len(layers)
        node = g.output_of(current)
        user = _sole_user(node)
        kind = patterns.activation_kind(g.gm, user) if user is not None else None
        if kind:
            activations[p] = (user.name, kind)
            node = user
        elif user is not None and (skip := _identity_skip(user, node, positions, layers)) is not None:
            skips.append(Skip(skip, p, user.name))
            node = user
            after = _sole_user(node)
            kind = patterns.activation_kind(g.gm, after) if after is not None else None
            if kind:
                activations[p] = (after.name, kind)
                node = after
        positions.append(node)
        nxt = [l for l in g.by_input.get(node.name, []) if l.conv not in taken]
        current = nxt[0] if len(nxt) == 1 else None
    chain = Chain(index, layers, [n.name for n in positions], activations, skips, {}, "")
    _mark_breaks(g, chain, positions)
    return chain


def _identity_skip(add: fx.Node, node: fx.Node, positions: list[fx.Node], layers: list[Layer]) -> int | None:
    """The source position if ``add`` is ``node + x_s`` for an earlier position s of this chain
    with the same shape and stride 1 over the span (so the identity fits in a merged kernel)."""
    operands = patterns.add_operands(add)
    if operands is None or node not in operands:
        return None
    other = operands[1] if operands[0] is node else operands[0]
    if other is node or other not in positions:
        return None
    s = positions.index(other)
    if shape_of(other) is None or shape_of(other) != shape_of(node):
        return None
    if any(st != 1 for layer in layers[s:] for st in layer.geometry.stride):
        return None
    return s


def _mark_breaks(g: _Graph, chain: Chain, positions: list[fx.Node]) -> None:
    """Interior positions used by anything besides the next layer and the chain's own skip adds."""
    skip_users: dict[int, set[str]] = {}
    for s in chain.skips:
        skip_users.setdefault(s.source, set()).add(s.add)
    for p in range(1, chain.length):
        expected = {g.first_node(chain.layers[p]).name} | skip_users.get(p, set())
        extra = [u for u in positions[p].users if u.name not in expected]
        if extra:
            chain.breaks[p] = "fan-out: also used by " + ", ".join(
                patterns.describe_consumer(g.gm, u) for u in extra)
    end = positions[-1]
    users = list(end.users)
    if not users:
        chain.end_reason = "unused"
    elif len(users) == 1:
        chain.end_reason = patterns.describe_consumer(g.gm, users[0])
    else:
        chain.end_reason = f"fan-out to {len(users)} consumers: " + ", ".join(
            patterns.describe_consumer(g.gm, u) for u in users)


def _add_blocks(chain: Chain, limits: BlockLimits) -> None:
    breaks, skips = list(chain.breaks), chain.skip_pairs()
    chain.input_shapes = {p: (chain.layers[p].input_shape if p < chain.length else chain.layers[-1].output_shape)
                          for p in range(chain.length + 1)}
    for i in range(chain.length):
        for j in range(i + 1, chain.length + 1):
            if any(i < b < j for b in breaks):
                break
            if not is_valid_block(i, j, breaks, skips):
                continue
            geoms = [layer.geometry for layer in chain.layers[i:j]]
            spec = merged_geometry(geoms, block_skips(i, j, skips))
            if j - i > 1 and not limits.allows(spec, chain.layers[i:j]):
                continue
            chain.valid_blocks.append((i, j))
            chain.specs[(i, j)] = spec


def analyze_graph(gm: fx.GraphModule, limits: BlockLimits | None = None) -> Analysis:
    """Run the analysis on a GraphModule whose nodes already carry shapes (``tensor_meta``)."""
    limits = limits or BlockLimits()
    layers, unmergeable = find_layers(gm)
    g = _Graph(gm, layers)
    taken: set[str] = set()
    chains = []
    for layer in layers:
        if layer.conv in taken:
            continue
        chain = _walk(g, layer, taken, len(chains))
        _add_blocks(chain, limits)
        chains.append(chain)
    return Analysis(gm, chains, limits, unmergeable)
