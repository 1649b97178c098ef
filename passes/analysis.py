"""The analysis pass: find every chain of convolutions that could merge, and every valid block.

>>> import torch, torchvision, fxmerge
>>> analysis = fxmerge.analyze(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),))
>>> [len(c.layers) for c in analysis.chains][:3]
[1, 4, 2]

Vocabulary (ARCHITECTURE.md, :mod:`fxmerge.records`): a *layer* is a conv with an optional zero pad before and BatchNorm after;
*position* p of a chain is the map after layer p (0 is the chain's input); an *activation at p*
is a registered nonlinearity on that map; a *skip* (s, t) is an identity residual
``x_t = y_t + x_s``; a *forced break* is a position no merged conv may cross; a *block* (i, j]
is layers i+1..j merged into one conv.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.algebra import ConvGeometry
from fxmerge.arguments import check_flag, check_inputs
from fxmerge.errors import InvalidArgumentError
from fxmerge.geometry import MergedRun, conv_macs
from fxmerge.records import Analysis, BlockLimits, Chain, Layer, Skip, residual_conflict

from . import patterns
from .parts import check_module_list
from .pruning import with_prune_options
from .tracing import TRACE_RECORD, TraceOptions, captured_by, check_trace, input_specs, prepare, shape_of


def analyze(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, trace: TraceOptions | None = None,
            limits: BlockLimits | None = None, prune_layers: bool = False,
            modules: Sequence[str] | None = None) -> Analysis:
    """Trace ``model`` (an ``nn.Module``, a ``torch.compile``d one, or a GraphModule) and find its
    mergeable chains, droppable activations, identity skips, forced breaks, border positions
    and valid blocks.

    ``example_inputs`` is a tuple of tensors, as for ``torch.export``; shapes come from running
    them through the traced graph once, and padding that depends on the input size is fixed for
    them. The model is analysed in eval mode on a private copy (a model in train mode gets a
    warning and is left as it is). Submodules fx cannot trace are kept whole; convs inside them
    are listed in ``print(analysis)``. ``trace`` (:class:`~fxmerge.TraceOptions`) helps with
    models fx cannot trace as they are. ``limits`` bounds the candidate blocks.
    ``prune_layers=True`` also finds each block's ways of pruning layers (LayerMerge;
    ``chain.options``, :mod:`fxmerge.passes.pruning`). ``modules=["backbone", ...]`` analyses
    only those submodules, side by side, on the inputs they get when the whole model runs on
    ``example_inputs`` (:mod:`fxmerge.passes.parts`); plans from it rewrite only them.

    >>> import torch, torchvision, fxmerge
    >>> a = fxmerge.analyze(torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 64, 64),))
    >>> a.chains[0].length, len(a.chains[0].droppable)
    (52, 34)
    """
    example_inputs = check_inputs("example_inputs", example_inputs)
    check_flag("prune_layers", prune_layers)
    if limits is not None and not isinstance(limits, BlockLimits):
        raise InvalidArgumentError(f"limits must be fxmerge.BlockLimits(...) or None; got {type(limits).__name__}")
    modules = check_module_list(modules) if modules is not None else []
    gm = prepare(model, example_inputs, check_trace(trace), modules=modules)
    analysis = analyze_graph(gm, limits, inputs=input_specs(example_inputs))
    analysis.modules = modules
    return with_prune_options(analysis) if prune_layers else analysis


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
            junction = _junction_after(g, act, positions, layers) if not skips or skips[-1].target != p else None
            if junction is not None:  # x_s + act(z_p): the add is a layer of its own, the identity
                positions.append(node)
                layers.append(junction[0])
                skips.append(Skip(junction[1], len(layers), junction[0].conv))
                node = g.nodes[junction[0].conv]
                if g.activation_after(node) is not None:  # act(x_s + act(z)): not modelled; the chain ends here
                    positions.append(node)
                    break
        positions.append(node)
        nxt = [l for l in g.by_input.get(node.name, []) if l.conv not in taken]
        current = nxt[0] if len(nxt) == 1 else None
    chain = Chain(index, layers, [n.name for n in positions], activations, skips, {}, "")
    _mark_breaks(g, chain, positions)
    chain.borders = border_positions(chain)
    return chain


def _junction_after(g: _Graph, act: fx.Node, positions: list[fx.Node], layers: list[Layer]) -> tuple[Layer, int] | None:
    """``(junction layer, source position)`` when ``act``'s only consumer is an identity residual
    add ``act + x_s`` for an earlier position s of this chain (an activation before the add)."""
    add = _sole_consumer(g.gm, act)
    s = _identity_skip(g.gm, add, act, positions, layers) if add is not None else None
    shape = shape_of(act)
    if s is None or shape is None:
        return None
    identity = ConvGeometry.identity(shape[1], len(shape) - 2)
    return Layer(add.name, None, None, identity, shape, shape_of(add), junction=True), s


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
    (ARCHITECTURE.md, "Exactness"), so keeping the original function needs a merge boundary there."""
    return [p for p in range(1, chain.length)
            if p not in chain.activations and p not in chain.breaks and chain.layers[p].geometry.has_padding]


# --------------------------------------------------------------------------- valid blocks


def _add_blocks(chain: Chain, limits: BlockLimits) -> None:
    skips = chain.skip_pairs()
    chain.input_shapes = {p: (chain.layers[p].input_shape if p < chain.length else chain.layers[-1].output_shape)
                          for p in range(chain.length + 1)}
    geometries = [l.geometry for l in chain.layers]
    for i in range(chain.length):
        run, replaced = MergedRun(geometries, skips, i), 0
        for j in range(i + 1, chain.length + 1):
            if j - 1 > i and (j - 1) in chain.breaks:
                break  # a forced break strictly inside: no longer block from i either
            spec = run.extend(j)
            layer = chain.layers[j - 1]
            if layer.output_shape is not None and not layer.junction:  # what the block replaces
                replaced += conv_macs(layer.geometry, layer.output_shape)
            if j - i > 1 and not limits.kernel_fits(run.spans, chain.input_shapes[i]):
                break  # kernels only grow with j
            if residual_conflict(i, j, skips):
                continue
            runs_conv = chain.runs_conv(i, j)
            if j - i > 1 and runs_conv and not limits.allows(spec, chain.input_shapes[i], layer.output_shape, replaced):
                continue
            chain.valid_blocks.append((i, j))
            chain.specs[(i, j)] = spec if runs_conv else None  # a junction alone runs only its add


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
    return Analysis(gm, chains, limits, unmergeable, list(inputs or []), capture=captured_by(gm))
