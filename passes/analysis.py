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

from fxmerge.algebra import ConvGeometry

from . import patterns
from .tracing import TRACE_RECORD, shape_of


@dataclass(frozen=True)
class BlockLimits:
    """Which multi-layer blocks are worth considering (single layers are always valid).

    Deep chains have O(L²) blocks and the long ones have absurd kernels, which only slow the
    latency table and the merge down. A block of two or more layers is a candidate only when,
    in every spatial dimension, its merged kernel spans at most ``max_kernel`` pixels and at
    most ``max_kernel_ratio`` times the block's input map, and when the merged conv needs at
    most ``max_macs_ratio`` times the multiply-adds of the layers it replaces, and has at most
    ``max_params`` weights (None turns a limit off). The paper's MobileNetV2 candidate set
    needs up to 33x the MACs (a 384->576 7x7 conv); the default keeps all of it but its four
    most expensive blocks, and ``BlockLimits(max_macs_ratio=None)`` keeps every one. The weight
    cap (2^24, about 16.8 M: two thirds of all of ResNet-50's) drops kernels such as ResNet's
    two-bottleneck 1024->1024 5x5 (26 M weights, 12x the MACs of what it replaces): never a
    speed-up on any hardware, and seconds to compose and to time. It keeps every block of the
    paper's MobileNetV2 table that the MACs limit keeps.
    """

    max_kernel: int = 15
    max_kernel_ratio: float = 1.5
    max_macs_ratio: float | None = 12.0
    max_params: int | None = 1 << 24

    def allows(self, spec: ConvGeometry, input_shape: Sequence[int] | None, output_shape: Sequence[int] | None,
               replaced_macs: int | None) -> bool:
        """Whether a multi-layer block with merged geometry ``spec`` is a candidate, given its
        input and output shapes and the multiply-adds of the layers it replaces."""
        spatial = list(input_shape[2:]) if input_shape is not None else [None] * spec.ndim
        for k, d, size in zip(spec.kernel, spec.dilation, spatial):
            extent = d * (k - 1) + 1
            if extent > self.max_kernel:
                return False
            if size is not None and extent > self.max_kernel_ratio * size:
                return False
        if self.max_params is not None and conv_params(spec) > self.max_params:
            return False
        if self.max_macs_ratio is not None and output_shape is not None and replaced_macs:
            return conv_macs(spec, output_shape) <= self.max_macs_ratio * replaced_macs
        return True


def conv_params(geometry: ConvGeometry) -> int:
    """Weights of one convolution (bias left out)."""
    return geometry.out_channels * geometry.in_channels // geometry.groups * math.prod(geometry.kernel)


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

    def prune_blocker(self) -> str | None:
        """Why replacing this layer (conv, pad and BatchNorm) by the identity would change a
        shape, or None when it may be pruned (LayerMerge): identity cannot change the channel
        count, downsample, or grow or shrink the map the way unpadded or over-padded convs do."""
        g = self.geometry
        if g.in_channels != g.out_channels:
            return f"changes channels ({g.in_channels} -> {g.out_channels})"
        if any(s != 1 for s in g.stride):
            return f"strided ({'x'.join(map(str, g.stride))})"
        if any(lo + hi != d * (k - 1) for (lo, hi), d, k in zip(g.padding, g.dilation, g.kernel)):
            return "changes the map size (its padding is not 'same')"
        return None


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
    borders: list[int] = field(default_factory=list)  # see `border_positions`
    valid_blocks: list[tuple[int, int]] = field(default_factory=list)
    specs: dict[tuple[int, int], ConvGeometry] = field(default_factory=dict)
    input_shapes: dict[int, tuple[int, ...] | None] = field(default_factory=dict)
    # block -> ways to prune layers inside it (filled by passes.pruning when asked for)
    options: dict[tuple[int, int], list] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.layers)

    @property
    def droppable(self) -> list[int]:
        """Interior positions whose activation a plan may drop."""
        return sorted(p for p in self.activations if 0 < p < self.length and p not in self.breaks)

    @property
    def prunable(self) -> list[int]:
        """Layers (numbered 1..L like positions) a plan may replace by the identity."""
        return [p for p, layer in enumerate(self.layers, start=1) if layer.prune_blocker() is None]

    @property
    def forced(self) -> list[int]:
        """Interior breaks that carry an activation: it stays, whatever the plan."""
        return sorted(p for p in self.breaks if p in self.activations)

    @property
    def kept_candidates(self) -> list[int]:
        """Positions a plan may keep as they are: the chain's ends, its droppable and forced
        activations, and its border positions (kept = a merge boundary there, so no padding
        moves across it). Consecutive kept positions are what importance scores."""
        return [0] + sorted(set(self.droppable) | set(self.forced) | set(self.borders)) + [self.length]

    def is_exact(self, i: int, j: int) -> bool:
        """Whether merging block (i, j] equals the original layers, borders included: no padded
        layer after its first, so no padding has to move."""
        return not any(i < p < j and self.layers[p].geometry.has_padding for p in range(i + 1, j))

    def signature(self) -> dict:
        """The chain's structure as plans record it: layers by node name and geometry,
        activation kinds, identity skips, forced breaks and what consumes its end."""
        return {
            "layers": [[l.conv, l.pad, l.bn, l.geometry.describe()] for l in self.layers],
            "activations": {str(p): [n, k] for p, (n, k) in sorted(self.activations.items())},
            "skips": [[s.source, s.target, s.add] for s in self.skips],
            "breaks": {str(p): r for p, r in sorted(self.breaks.items())},
            "end": self.end_reason,
        }

    def skip_pairs(self) -> list[tuple[int, int]]:
        return [(s.source, s.target) for s in self.skips]

    def name(self) -> str:
        first, last = self.layers[0].conv, self.layers[-1].conv
        return first if first == last else f"{first}..{last}"


def cuts_a_skip(i: int, j: int, skips: Sequence[tuple[int, int]]) -> bool:
    """METHOD.md §3: a block is valid only if every skip span is nested in it or disjoint
    from it (touching endpoints allowed), and the spans inside it nest among themselves (two
    that cross, x2 = f(x1) + x0 and x3 = g(x2) + x1, have no order to compose in); forced
    breaks are handled by the enumeration."""
    if any(i < s < j < t or s < i < t < j for s, t in skips):
        return True
    inside = [(s, t) for s, t in skips if i <= s and t <= j]
    return any(s1 < s2 < t1 < t2 for s1, t1 in inside for s2, t2 in inside)


@dataclass
class Analysis:
    """What the analysis pass found; ``print(analysis)`` shows it as tables."""

    graph_module: fx.GraphModule
    chains: list[Chain]
    limits: BlockLimits
    unmergeable: dict[str, str]  # conv node (or kept-whole module) -> why it is no layer
    inputs: list[dict] = field(default_factory=list)  # example input shapes and dtypes
    prune_layers: bool = False  # whether chains carry pruning options (passes.pruning)

    @property
    def num_layers(self) -> int:
        return sum(c.length for c in self.chains)

    def signature(self) -> list[dict]:
        """Every chain's structure (see :meth:`Chain.signature`)."""
        return [c.signature() for c in self.chains]

    def summary_table(self) -> str:
        rows = []
        for c in self.chains:
            breaks = "; ".join(f"@{p}: {r}" for p, r in sorted(c.breaks.items()))
            rows.append([c.index, c.name(), c.length, len(c.droppable), len(c.skips), len(c.borders),
                         len(c.valid_blocks), breaks or "-", c.end_reason])
        return tabulate(rows, headers=["chain", "layers", "L", "droppable", "skips", "borders", "valid blocks",
                                       "forced breaks", "ends at"], tablefmt="simple")

    def layer_table(self) -> str:
        rows = []
        for c in self.chains:
            skip_at = {s.target: f"+x{s.source}" for s in c.skips}
            for p, layer in enumerate(c.layers, start=1):
                act = c.activations.get(p)
                mark = "" if act is None else (act[1] if p in c.droppable else f"{act[1]} (kept)")
                note = "break" if p in c.breaks else ("border" if p in c.borders else "")
                rows.append([c.index, p, layer.conv, layer.geometry.describe(), "BN" if layer.bn else "",
                             skip_at.get(p, ""), mark, note])
        return tabulate(rows, headers=["chain", "pos", "conv", "geometry", "bn", "skip", "activation", ""],
                        tablefmt="simple")

    def _pruning_summary(self) -> str:
        if not self.prune_layers:
            return ""
        options = sum(len(o) for c in self.chains for o in c.options.values())
        return f", {sum(len(c.prunable) for c in self.chains)} prunable convs, {options} pruning options"

    def __str__(self) -> str:
        head = (f"fxmerge analysis: {len(self.chains)} chains, {self.num_layers} layers, "
                f"{sum(len(c.droppable) for c in self.chains)} droppable activations, "
                f"{sum(len(c.valid_blocks) for c in self.chains)} valid blocks{self._pruning_summary()} "
                f"(limits: kernel <= {self.limits.max_kernel} and <= {self.limits.max_kernel_ratio}x input, "
                f"MACs <= {self.limits.max_macs_ratio}x, weights <= {self.limits.max_params})")
        legend = ("\n'border': no activation there, but the next conv pads its input; a merge across it moves "
                  "that padding and changes the output near the borders, so only budgeted plans do it "
                  "(priced like dropping an activation).") if any(c.borders for c in self.chains) else ""
        extra = ""
        if self.unmergeable:
            extra = "\nconvs left alone:\n" + "\n".join(f"  {k}: {v}" for k, v in self.unmergeable.items())
        return f"{head}\n\n{self.summary_table()}\n\n{self.layer_table()}{legend}{extra}"


# --------------------------------------------------------------------------- finding layers


def _sole_consumer(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    users = patterns.consumers(gm, node)
    return users[0] if len(users) == 1 else None


def find_layers(gm: fx.GraphModule) -> tuple[list[Layer], dict[str, str]]:
    """Every convolution that can take part in a merge, in graph order, and why the others
    can't (convs kept inside opaque modules included: no conv disappears silently)."""
    layers, unmergeable = [], {}
    weight_uses: dict[str, int] = {}
    calls = []
    for node in gm.graph.nodes:
        call, why = patterns.conv_call(gm, node)
        if why:
            unmergeable[node.name] = why
        elif call is None and node.op == "call_module" and patterns.is_conv_like(gm.get_submodule(node.target)):
            unmergeable[node.name] = _opaque_reason(gm, node)
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


def _opaque_reason(gm: fx.GraphModule, node: fx.Node) -> str:
    module = gm.get_submodule(node.target)
    why = gm.meta.get(TRACE_RECORD, {}).get("leaves", {}).get(node.target, "kept whole by the tracer (a leaf module)")
    return (f"'{node.target}' ({type(module).__name__}) holds convs fxmerge cannot see into: {why}. "
            "If it computes a plain conv (+pad), it is merged automatically; otherwise make it traceable.")


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
    pad_node, inp = None, patterns.source(gm, conv.args[0])
    if isinstance(inp, fx.Node) and len(patterns.consumers(gm, inp)) == 1 and patterns.zero_pad(gm, inp, call.geometry.ndim):
        pad_node = inp
    geom = layer_geometry(gm, conv, pad_node)
    bn_node = None
    user = _sole_consumer(gm, conv)
    if user is not None and patterns.source(gm, user.args[0]) is conv:
        bn = patterns.batchnorm_call(gm, user)
        if bn is not None and bn.num_features == geom.out_channels:
            bn_node = user
    inp = patterns.source(gm, pad_node.args[0]) if pad_node is not None else inp
    out = bn_node or conv
    return Layer(conv.name, pad_node.name if pad_node else None, bn_node.name if bn_node else None, geom,
                 shape_of(inp), shape_of(out))


# --------------------------------------------------------------------------- chains


class _Graph:
    """Lookups over one GraphModule shared by the chain walk. A position is named by the node
    that computes it (never an identity-in-eval op after it)."""

    def __init__(self, gm: fx.GraphModule, layers: list[Layer]):
        self.gm = gm
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.by_input: dict[str, list[Layer]] = {}
        for layer in layers:
            self.by_input.setdefault(self.input_of(layer).name, []).append(layer)

    def input_of(self, layer: Layer) -> fx.Node:
        return patterns.source(self.gm, self.first_node(layer).args[0])

    def output_of(self, layer: Layer) -> fx.Node:
        return self.nodes[layer.bn or layer.conv]

    def first_node(self, layer: Layer) -> fx.Node:
        return self.nodes[layer.pad or layer.conv]

    def activation_after(self, node: fx.Node) -> fx.Node | None:
        """The registered activation that is ``node``'s only consumer, if any."""
        user = _sole_consumer(self.gm, node)
        if user is not None and patterns.activation_kind(self.gm, user) and patterns.source(self.gm, user.args[0]) is node:
            return user
        return None


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
        act = g.activation_after(node)
        if act is None:
            user = _sole_consumer(g.gm, node)
            skip = _identity_skip(g.gm, user, node, positions, layers) if user is not None else None
            if skip is not None:
                skips.append(Skip(skip, p, user.name))
                node = user
                act = g.activation_after(node)
        if act is not None:
            activations[p] = (act.name, patterns.activation_kind(g.gm, act))
            node = act
        positions.append(node)
        nxt = [l for l in g.by_input.get(node.name, []) if l.conv not in taken]
        current = nxt[0] if len(nxt) == 1 else None
    chain = Chain(index, layers, [n.name for n in positions], activations, skips, {}, "")
    _mark_breaks(g, chain, positions)
    chain.borders = border_positions(chain)
    return chain


def _identity_skip(gm: fx.GraphModule, add: fx.Node, node: fx.Node, positions: list[fx.Node],
                   layers: list[Layer]) -> int | None:
    """The source position if ``add`` is ``node + x_s`` for an earlier position s of this chain
    with the same shape and stride 1 over the span (so the identity fits in a merged kernel)."""
    operands = patterns.add_operands(add)
    if operands is None:
        return None
    a, b = (patterns.source(gm, o) for o in operands)
    if node not in (a, b) or a is b:
        return None
    other = b if a is node else a
    if other not in positions:
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
        extra = [u for u in patterns.consumers(g.gm, positions[p]) if u.name not in expected]
        if extra:
            chain.breaks[p] = "fan-out: also used by " + ", ".join(
                patterns.describe_consumer(g.gm, u) for u in extra)
    users = patterns.consumers(g.gm, positions[-1])
    if not users:
        chain.end_reason = "unused"
    elif len(users) == 1:
        chain.end_reason = patterns.describe_consumer(g.gm, users[0])
    else:
        chain.end_reason = f"fan-out to {len(users)} consumers: " + ", ".join(
            patterns.describe_consumer(g.gm, u) for u in users)


def border_positions(chain: Chain) -> list[int]:
    """Interior positions without an activation or forced break whose next layer pads its
    input: a merge across one moves that padding, which changes the output near the borders
    (METHOD.md §2.4), so keeping the original function needs a merge boundary there."""
    return [p for p in range(1, chain.length)
            if p not in chain.activations and p not in chain.breaks and chain.layers[p].geometry.has_padding]


# --------------------------------------------------------------------------- valid blocks


class _Run:
    """The merged geometry of layers i+1..j, grown one layer at a time (O(1) per step), so all
    blocks of a chain cost O(L^2) instead of O(L^4). Mirrors :func:`algebra.merged_geometry`."""

    def __init__(self, chain: Chain, i: int):
        self.chain, self.i, self.j = chain, i, i
        first = chain.layers[i].geometry
        ndim = first.ndim
        self.sigma = [1] * ndim  # product of the strides so far, per dimension
        self.extent, self.grid = [0] * ndim, [0] * ndim
        self.pad = [[0, 0] for _ in range(ndim)]
        self.groups, self.macs = 0, 0
        self.sigma_at: dict[int, list[int]] = {i: [1] * ndim}  # strides before each position
        self.pad_sum: dict[int, list[int]] = {i: [0] * ndim}  # front padding summed up to each position (stride-1 runs)

    def copy(self) -> "_Run":
        other = object.__new__(_Run)
        other.chain, other.i, other.j = self.chain, self.i, self.j
        other.sigma, other.extent, other.grid = list(self.sigma), list(self.extent), list(self.grid)
        other.pad = [list(p) for p in self.pad]
        other.groups, other.macs = self.groups, self.macs
        other.sigma_at, other.pad_sum = dict(self.sigma_at), dict(self.pad_sum)
        return other

    def state(self) -> tuple:
        """Everything later layers' merged geometry depends on: runs with equal states grow
        into equal geometries (pruning enumerates subsets by merging equal states)."""
        open_skips = tuple((s.source, tuple(self.sigma_at[s.source]), tuple(self.pad_sum[s.source]))
                           for s in self.chain.skips if self.i <= s.source <= self.j < s.target)
        return (tuple(self.sigma), tuple(self.extent), tuple(self.grid), tuple(map(tuple, self.pad)), self.groups,
                tuple(self.pad_sum[self.j]), open_skips)

    def extend(self, j: int, geometry: ConvGeometry | None = None) -> ConvGeometry:
        """Add layer j (the block becomes (i, j]) and return the block's merged geometry;
        ``geometry`` stands in for the layer's own (a pruned layer's is the identity)."""
        chain, g = self.chain, geometry or self.chain.layers[j - 1].geometry
        self.j = j
        for d in range(g.ndim):
            step = g.dilation[d] * self.sigma[d]
            self.extent[d] += (g.kernel[d] - 1) * step
            if g.kernel[d] > 1:
                self.grid[d] = math.gcd(self.grid[d], step)
            self.pad[d][0] += g.padding[d][0] * self.sigma[d]
            self.pad[d][1] += g.padding[d][1] * self.sigma[d]
            self.sigma[d] *= g.stride[d]
        self.groups = math.gcd(self.groups, g.groups)
        self.sigma_at[j] = list(self.sigma)
        self.pad_sum[j] = [a + p[0] for a, p in zip(self.pad_sum[j - 1], g.padding)]
        for s in chain.skips:
            if s.target == j and s.source >= self.i:  # nested: its identity term sits at this offset
                for d in range(g.ndim):
                    offset = self.sigma_at[s.source][d] * (self.pad_sum[j][d] - self.pad_sum[s.source][d])
                    self.grid[d] = math.gcd(self.grid[d], offset)
        if chain.layers[j - 1].output_shape is not None:  # what the block replaces: the original layers
            self.macs += conv_macs(chain.layers[j - 1].geometry, chain.layers[j - 1].output_shape)
        first = chain.layers[self.i].geometry
        grid = [gr or 1 for gr in self.grid]
        return ConvGeometry(first.in_channels, g.out_channels, tuple(e // gr + 1 for e, gr in zip(self.extent, grid)),
                            tuple(self.sigma), tuple((lo, hi) for lo, hi in self.pad), tuple(grid), self.groups)

    def too_large(self, limits: BlockLimits) -> bool:
        """Kernel bounds only grow with j: once exceeded, no longer block from i is a candidate."""
        shape = self.chain.layers[self.i].input_shape
        for d, e in enumerate(self.extent):
            span = e + 1  # the pixels the merged kernel's taps span, dilated or not
            if span > limits.max_kernel or (shape is not None and span > limits.max_kernel_ratio * shape[2 + d]):
                return True
        return False


def _add_blocks(chain: Chain, limits: BlockLimits) -> None:
    skips = chain.skip_pairs()
    chain.input_shapes = {p: (chain.layers[p].input_shape if p < chain.length else chain.layers[-1].output_shape)
                          for p in range(chain.length + 1)}
    for i in range(chain.length):
        run = _Run(chain, i)
        for j in range(i + 1, chain.length + 1):
            if j - 1 > i and (j - 1) in chain.breaks:
                break  # a forced break strictly inside: no longer block from i either
            spec = run.extend(j)
            if j - i > 1 and run.too_large(limits):
                break
            if cuts_a_skip(i, j, skips):
                continue
            if j - i > 1 and not limits.allows(spec, chain.input_shapes[i], chain.layers[j - 1].output_shape, run.macs):
                continue
            chain.valid_blocks.append((i, j))
            chain.specs[(i, j)] = spec


def analyze_graph(gm: fx.GraphModule, limits: BlockLimits | None = None, *, blocks: bool = True,
                  inputs: list[dict] | None = None) -> Analysis:
    """Run the analysis on a prepared GraphModule (its nodes carry shapes, ``tensor_meta``).
    ``blocks=False`` skips enumerating candidate blocks (enough to compare structures)."""
    limits = limits or BlockLimits()
    layers, unmergeable = find_layers(gm)
    g = _Graph(gm, layers)
    taken: set[str] = set()
    chains = []
    for layer in layers:
        if layer.conv in taken:
            continue
        chain = _walk(g, layer, taken, len(chains))
        if blocks:
            _add_blocks(chain, limits)
        chains.append(chain)
    return Analysis(gm, chains, limits, unmergeable, list(inputs or []))
