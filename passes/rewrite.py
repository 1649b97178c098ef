"""The rewrite pass: ``linearize`` (drop activations, move padding) and ``merge`` (fuse convs).

>>> import torch, torchvision, fxmerge
>>> model = torchvision.models.mobilenet_v2().eval()
>>> x = torch.randn(1, 3, 64, 64)
>>> plan = fxmerge.Plan.drop_all(fxmerge.analyze(model, (x,)))
>>> trainable = fxmerge.linearize(model, plan)        # fine-tune this one
>>> deployed = fxmerge.merge(trainable, plan)         # equal to trainable.eval()
>>> bool((deployed(x) - trainable(x)).abs().max() < 1e-3)
True

Both passes work on a private deep copy, never on the user's model; they first re-trace the
model (at the plan's recorded input shapes) and check its structure against the plan's record.
Activations are dropped by rewiring their users (a shared activation module keeps serving its
other calls); merged weights are composed in float64 and cast once; every output is linted,
recompiled and returned in eval mode.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxmerge import algebra
from fxmerge.algebra import ConvGeometry, Pads
from fxmerge.arguments import check_inputs
from fxmerge.convs import make_conv
from fxmerge.errors import InvalidArgumentError, PlanMismatchError
from fxmerge.plans import ChainPlan, Plan
from fxmerge.records import LayerNodes, NestedSkip, Segment

from . import patterns
from .analysis import analyze_graph, layer_geometry
from .model_checks import unwrap
from .parts import PARTS_RECORD, replace_parts, split_graph
from .private_copies import detach_from, private_copy
from .tracing import TraceOptions, check_trace, inputs_from_specs, prepare
from .weights import COMPOSE_DTYPE, folded_weights, folded_weights_cast

RECORD = "fxmerge"  # key in GraphModule.meta
# The merged model's plan, as JSON text in a plain attribute: GraphModule.meta is dropped by
# pickle and torch.save, attributes are kept, so a saved compressed model still knows its plan
# (and a model with compressed parts, not a GraphModule itself, carries it the same way).
PLAN_ATTRIBUTE = "fxmerge_plan_json"


# --------------------------------------------------------------------------- helpers


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _set_conv_padding(gm: fx.GraphModule, conv: fx.Node, padding: tuple[int, ...]) -> None:
    if conv.op == "call_module":
        gm.get_submodule(conv.target).padding = padding
    elif len(conv.args) > 4:
        conv.args = conv.args[:4] + (padding,) + conv.args[5:]
    else:
        conv.kwargs = {**conv.kwargs, "padding": padding}


def _insert_pad(graph: fx.Graph, before: fx.Node, source: fx.Node, padding: Pads, name: str) -> fx.Node:
    with graph.inserting_before(before):
        return graph.create_node("call_function", F.pad, (source, algebra.flat_pad(padding)), name=name)


def _geometries(gm: fx.GraphModule, nodes: dict[str, fx.Node], layers: Sequence[tuple]) -> list[ConvGeometry]:
    return [_junction_geometry(nodes[l.conv]) if l.junction else
            layer_geometry(gm, nodes[l.conv], nodes[l.pad] if l.pad else None) for l in layers]


def _junction_geometry(add: fx.Node) -> ConvGeometry:
    """A junction (the add of ``x_s + act(z)``) computes the identity on its map."""
    shape = add.meta["tensor_meta"].shape
    return ConvGeometry.identity(shape[1], len(shape) - 2)


def _is_linearized(gm: Any) -> bool:
    return isinstance(gm, fx.GraphModule) and "segments" in gm.meta.get(RECORD, {})


# --------------------------------------------------------------------------- linearize


def linearize(model: nn.Module, plan: Plan, *, example_inputs: Sequence[torch.Tensor] | None = None,
              trace: TraceOptions | None = None) -> fx.GraphModule:
    """The model with the plan's activations dropped, its pruned convs (with their BatchNorm)
    replaced by the identity, and each multi-layer segment's padding moved to its first kept
    layer (skip inputs padded or cropped to match). BatchNorm stays, so the
    result trains (call ``.train()``; it comes back in eval mode); ``merge(result, plan)`` equals
    it in eval mode up to float error.

    The model is re-traced at the plan's recorded input shapes (or ``example_inputs``) and its
    structure compared with the plan's record: :class:`~fxmerge.PlanMismatchError` names the
    first difference. ``trace`` (:class:`~fxmerge.TraceOptions`) as for :func:`fxmerge.analyze`.
    """
    return detach_from(_linearized(model, plan, example_inputs, trace), model)


def _linearized(model: nn.Module, plan: Plan, example_inputs: Sequence[torch.Tensor] | None,
                trace: TraceOptions | None) -> fx.GraphModule:
    """:func:`linearize`'s result before it owns its parameters: it shares those it did not
    change with ``model`` (merge replaces most of them, so it never pays for a copy of each)."""
    if not isinstance(plan, Plan):
        raise InvalidArgumentError(f"plan must be an fxmerge.Plan; got {type(plan).__name__}")
    if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        raise InvalidArgumentError(f"model must be a torch.nn.Module (or an ExportedProgram); got {type(model).__name__}")
    model = unwrap(model) if isinstance(model, nn.Module) else model
    if _is_linearized(model):
        if model.meta[RECORD]["plan"] != plan.fingerprint():
            raise PlanMismatchError("this model was linearized with a different plan; linearize the original model")
        return private_copy(model).eval()
    if plan.modules and _parts_linearized(model, plan):  # a linearized whole model: parts already done
        return private_copy(model).eval()
    gm = _prepare_for(model, plan, example_inputs, check_trace(trace))
    nodes = _nodes(gm)
    segments = []
    for chain in plan.chains:
        geometries = _geometries(gm, nodes, chain.layers)
        for p in chain.dropped:
            act = nodes.pop(chain.activations[p])
            act.replace_all_uses_with(act.args[0])
            gm.graph.erase_node(act)
        # each segment's input (a merged conv reads it directly), followed through pruning
        starts = {a: nodes[chain.layers[a][1] or chain.layers[a][0]].args[0].name for a, _ in chain.segments()}
        renamed: dict[str, str] = {}
        for p in chain.pruned:
            geometries[p - 1] = ConvGeometry.identity(geometries[p - 1].in_channels, geometries[p - 1].ndim)
            gone, now = _prune_layer(gm, nodes, chain.layers[p - 1])
            renamed[gone] = now
        for a, b in chain.segments():
            if chain.kept_layers(a, b):  # a fully pruned segment is gone (its residual adds stay: x + x)
                start = _follow(renamed, starts[a])
                segments.append(_linearize_segment(gm, nodes, chain, a, b, geometries[a:b], start))
    gm.meta[RECORD] = {"plan": plan.fingerprint(), "segments": segments}
    gm = _finish(gm)
    return _put_parts_back(model, gm, plan) if plan.modules else gm


def _put_parts_back(model: nn.Module, gm: fx.GraphModule, plan: Plan) -> nn.Module:
    """A copy of ``model`` whose planned submodules are the pieces of the linearized graph of
    its parts, each carrying the segments it holds (so each merges on its own)."""
    pieces = []
    for piece, names in split_graph(gm, gm.meta[PARTS_RECORD]):
        piece.meta[RECORD] = {"plan": plan.fingerprint(),
                              "segments": [s.renamed(names) for s in gm.meta[RECORD]["segments"] if s.end in names]}
        pieces.append(piece)
    return replace_parts(model, plan.modules, pieces)


def _parts_linearized(model: nn.Module, plan: Plan) -> bool:
    """Whether ``model``'s planned submodules are pieces :func:`linearize` made with ``plan``."""
    try:
        parts = [model.get_submodule(name) for name in plan.modules]
    except AttributeError:
        return False
    return all(_is_linearized(p) and p.meta[RECORD]["plan"] == plan.fingerprint() for p in parts)


def _prune_layer(gm: fx.GraphModule, nodes: dict[str, fx.Node], layer: tuple) -> tuple[str, str]:
    """Replace a layer (pad, conv and BatchNorm calls) by the identity: its users read its input.
    Only these calls go; a module they called stays for its other calls. Returns the names of
    the layer's output node (gone) and of the node that now stands for it."""
    conv, pad, bn, _ = layer
    source, out = nodes[pad or conv].args[0], nodes[bn or conv]
    out.replace_all_uses_with(source)
    gone = out.name
    _erase_dead(gm.graph, out, keep=source, nodes=nodes)
    return gone, source.name


def _follow(renamed: dict[str, str], name: str) -> str:
    """The node that now stands for node ``name`` after some were replaced."""
    while name in renamed:
        name = renamed[name]
    return name


def _prepare_for(model: nn.Module, plan: Plan, example_inputs: Sequence[torch.Tensor] | None,
                 trace: TraceOptions) -> fx.GraphModule:
    """The private trace of ``model`` the plan applies to, structure checked."""
    if example_inputs is not None:
        gm = prepare(model, check_inputs("example_inputs", example_inputs), trace, capture=plan.capture,
                     modules=plan.modules)
    elif plan.inputs:
        try:
            gm = prepare(model, inputs_from_specs(plan.inputs, model), trace, capture=plan.capture,
                         modules=plan.modules)
        except InvalidArgumentError as exc:
            shapes = [spec["shape"] for spec in plan.inputs]
            raise PlanMismatchError(f"plan built for a different model: this model cannot run inputs of the shapes "
                                    f"the plan was made at, {shapes} ({exc})") from exc
    else:
        raise InvalidArgumentError("this plan records no input shapes: pass example_inputs=(x,)")
    plan.check_structure(analyze_graph(gm, blocks=False))
    return gm


def _linearize_segment(gm: fx.GraphModule, nodes: dict[str, fx.Node], chain: ChainPlan, a: int, b: int,
                       geoms: list[ConvGeometry], start: str) -> Segment:
    """Move a segment's padding and record what ``merge`` needs: its input node and the
    padding in front of it, its layers (pruned ones compose as the identity), nested skips
    with their kernel offsets, and its last node."""
    layers = [[l.conv, l.pad, l.bn] for l in chain.layers[a:b]]  # pads may move: mutable
    kept = [p - a - 1 for p in chain.kept_layers(a, b)]  # indices into layers
    skips = [(s - a, t - a, add) for s, t, add in chain.skips if a <= s and t <= b]
    offsets = algebra.skip_offsets(geoms, [(s, t) for s, t, _ in skips])
    if b - a > 1:
        _move_padding(gm, nodes, layers, kept, geoms, skips)
    # the segment's map is computed last by the last kept layer or a residual add after it
    ends = {t: add for _, t, add in skips}
    last = max([k + 1 for k in kept] + list(ends))
    conv, _, bn = layers[last - 1]
    return Segment(start=start, front=algebra.padding_enlargement(geoms)[0],
                   layers=tuple(LayerNodes(*l, junction=j.junction) for l, j in zip(layers, chain.layers[a:b])),
                   pruned={k: geoms[k].in_channels for k in range(b - a) if k not in kept},
                   skips=tuple(NestedSkip(s, t, add, tuple(offsets[t][1])) for s, t, add in skips),
                   end=ends.get(last, bn or conv))


def _move_padding(gm: fx.GraphModule, nodes: dict[str, fx.Node], layers: list[list], kept: list[int],
                  geoms: list[ConvGeometry], skips: list[tuple[int, int, str]]) -> None:
    """Put the whole segment's padding in front of its first kept conv (pruned layers before it
    are identities) and re-align skip inputs."""
    graph, ndim = gm.graph, geoms[0].ndim
    for k in kept:
        conv, pad = nodes[layers[k][0]], layers[k][1]
        if pad is not None:
            pad_node = nodes.pop(pad)
            pad_node.replace_all_uses_with(pad_node.args[0])
            graph.erase_node(pad_node)
            layers[k][1] = None
        _set_conv_padding(gm, conv, (0,) * ndim)
    enlargement = algebra.padding_enlargement(geoms)
    front, first = enlargement[0], nodes[layers[kept[0]][0]]
    if algebra.is_symmetric(front):
        _set_conv_padding(gm, first, tuple(lo for lo, _ in front))
    elif any(lo or hi for lo, hi in front):
        pad_node = _insert_pad(graph, first, first.args[0], front, f"fxmerge_pad_{first.name}")
        first.replace_input_with(first.args[0], pad_node)
        nodes[pad_node.name] = pad_node
        layers[kept[0]][1] = pad_node.name

    def enlarged(q: int) -> Pads:  # maps up to the first kept conv's input are not padded
        return enlargement[q] if q > kept[0] else ((0, 0),) * ndim

    for s, t, add_name in skips:
        add = nodes[add_name]
        adjust = tuple((et[0] - es[0], et[1] - es[1]) for et, es in zip(enlarged(t), enlarged(s)))
        if all(lo == 0 and hi == 0 for lo, hi in adjust):
            continue  # (always so when the span keeps no conv: nothing in it pads)
        conv, _, bn = layers[max(k for k in kept if s <= k < t)]
        main = nodes[bn or conv]
        operands = patterns.add_operands(add)
        source = operands[1] if patterns.source(gm, operands[0]) is main else operands[0]
        pad_node = _insert_pad(graph, add, source, adjust, f"fxmerge_align_{add.name}")
        add.replace_input_with(source, pad_node)


# --------------------------------------------------------------------------- merge


def merge(model: nn.Module, plan: Plan, *, example_inputs: Sequence[torch.Tensor] | None = None,
          trace: TraceOptions | None = None) -> fx.GraphModule:
    """One convolution per planned segment: BatchNorm folded (with its own ``eps``), nested
    identity skips fused into the kernel, biases composed.

    ``model`` is the original model or the (possibly fine-tuned) output of
    :func:`linearize` with the same plan; the result equals ``linearize(model, plan)`` in eval
    mode up to float error. The result carries its plan (:func:`merged_plan_record`,
    ``fxmerge.plan_of``), pickled or saved with ``torch.save`` too.
    """
    gm = _linearized(model, plan, example_inputs, trace)
    if plan.modules and not _is_linearized(gm):  # the whole model, its parts linearized: merge each
        for name in plan.modules:
            gm.set_submodule(name, merge(gm.get_submodule(name), plan))
        setattr(gm, PLAN_ATTRIBUTE, json.dumps(plan.to_dict()))
        return detach_from(gm, model)
    nodes, renamed = _nodes(gm), {}
    for segment in gm.meta[RECORD]["segments"]:
        gone, now = _merge_segment(gm, nodes, segment, _follow(renamed, segment.start))
        renamed[gone] = now
    gm.meta[RECORD] = {"plan": plan.fingerprint(), "merged": True}
    setattr(gm, PLAN_ATTRIBUTE, json.dumps(plan.to_dict()))
    return detach_from(_finish(gm), model)


def merged_plan_record(module: nn.Module) -> dict | None:
    """The plan (as :meth:`Plan.to_dict`) a module returned by :func:`merge` carries, also after
    pickling or ``torch.save`` (which drop ``meta``); None for any other module."""
    text = getattr(module, PLAN_ATTRIBUTE, None)
    return json.loads(text) if isinstance(text, str) else None


@torch.no_grad()
def _merged_state(gm: fx.GraphModule, nodes: dict[str, fx.Node], segment: Segment,
                  weight_dtype: torch.dtype) -> algebra.ConvState:
    """The segment's merged conv, composed in ``COMPOSE_DTYPE``; a single conv absorbing its
    BatchNorm is folded straight into ``weight_dtype`` (nothing to compose, so no
    kernel-sized float64 tensor: :func:`.weights.folded_weights_cast`)."""
    alone = len(segment.layers) == 1 and not segment.pruned and not segment.skips
    convs = []
    for k, (conv, _, bn, _) in enumerate(segment.layers):
        if k in segment.pruned:  # the identity, as a depthwise 1x..x1 conv
            convs.append(_identity_conv(segment.pruned[k], gm, nodes, segment))
            continue
        weight, bias, call = folded_weights_cast(gm, conv, bn, weight_dtype, nodes=nodes) if alone else \
            folded_weights(gm, conv, bn, nodes=nodes)
        g = call.geometry
        convs.append(algebra.Conv(weight, bias, g.stride, g.dilation, g.groups))
    return algebra.compose_run(convs, [(s.source, s.target, s.offset) for s in segment.skips])


def _identity_conv(channels: int, gm: fx.GraphModule, nodes: dict[str, fx.Node], segment: Segment) -> algebra.Conv:
    ref = patterns.get_tensor(gm, patterns.conv_call(gm, nodes[segment.kept[0].conv])[0].weight_target)
    ndim = ref.dim() - 2
    weight = torch.ones((channels, 1) + (1,) * ndim, dtype=COMPOSE_DTYPE, device=ref.device)
    return algebra.Conv(weight, None, (1,) * ndim, (1,) * ndim, channels)


def _merge_segment(gm: fx.GraphModule, nodes: dict[str, fx.Node], segment: Segment, start: str) -> tuple[str, str]:
    """Replace a linearized segment by one conv reading ``start`` (the segment's input node);
    returns the names of the segment's last node (gone) and of the merged conv."""
    layers = segment.kept
    first = nodes[layers[0].conv]
    weight_dtype = patterns.get_tensor(gm, patterns.conv_call(gm, first)[0].weight_target).dtype
    state = _merged_state(gm, nodes, segment, weight_dtype)
    weight, bias, dilation = algebra.finalize(state)
    weight, bias = weight.to(weight_dtype), bias.to(weight_dtype)  # no copy where already cast
    front = segment.front  # the whole segment's padding, before its input
    source, padding = nodes[start], tuple(lo for lo, _ in front)
    end = nodes[segment.end]
    if not algebra.is_symmetric(front):  # e.g. padding="same" with an even kernel
        source = _insert_pad(gm.graph, end, source, front, f"fxmerge_pad_{first.name}_merged")
        padding = (0,) * len(front)
    name = _module_name(gm, layers)
    gm.add_submodule(name, make_conv(weight, bias, state.stride, padding, dilation, state.groups))
    with gm.graph.inserting_before(end):
        merged = gm.graph.create_node("call_module", name, (source,), name=name)
    nodes[merged.name] = merged
    end.replace_all_uses_with(merged)
    gone = end.name
    _erase_dead(gm.graph, end, keep=merged.args[0], nodes=nodes)
    return gone, merged.name


def _module_name(gm: fx.GraphModule, layers: list[LayerNodes]) -> str:
    first, last = layers[0].conv, layers[-1].conv
    base = f"folded__{first}" if first == last else f"merged__{first}__to__{last}"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _erase_dead(graph: fx.Graph, start: fx.Node, keep: fx.Node, nodes: dict[str, fx.Node]) -> None:
    """Erase ``start`` and everything upstream of it that only it used, stopping at ``keep``."""
    work = [start]
    while work:
        node = work.pop()
        if node is keep or node.users or node.op in ("placeholder", "output") or node.name not in nodes:
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        del nodes[node.name]
        work.extend(inputs)
