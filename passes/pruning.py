"""The pruning pass (LayerMerge, Kim et al. ICML 2024): the ways each candidate block can replace
some of its layers by the identity, so its merged kernel stays small.

>>> import torch, torchvision, fxmerge
>>> a = fxmerge.analyze(torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 64, 64),), prune_layers=True)
>>> sum(len(options) for c in a.chains for options in c.options.values()) > 0
True

A layer is *prunable* when the identity keeps every shape (``Layer.prune_blocker``). A block
(i, j] between two positions a plan may keep (``chain.kept_candidates``: the DP chooses pruning
for a whole segment between kept activations, merged into one conv, as LayerMerge does) has as
*options* the subsets of its prunable layers to prune; an option's merged spec is
built from the kept layers only (depthwise only if every kept conv is). Subsets explode, and
the latency table prices specs, not subsets, so each block keeps **one representative per
distinct merged spec**: the subset whose kept prunable layers have the largest summed L1 norm
(BatchNorm folded in) — LayerMerge's rule, applied per spec instead of per kernel size. The
spec of the unpruned block is not an option (pruning nothing has the largest norm there), and
a block whose every layer is pruned is the identity (``spec`` None: nothing runs but the adds
of residuals inside it, which stay explicit: ``x + x``).

Subsets are enumerated by a DP over layer states: two prefixes of a block whose merged
geometries will grow alike whatever follows (``MergedRun.state``) keep only the larger norm, so the
work is the number of distinct geometries, not of subsets.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch.fx as fx

from fxmerge.algebra import ConvGeometry
from fxmerge.geometry import MergedRun, conv_macs
from fxmerge.records import Analysis, BlockLimits, Chain, PruneOption, residual_conflict

from .weights import folded_weights


def with_prune_options(analysis: Analysis) -> Analysis:
    """A copy of ``analysis`` whose chains carry their pruning options (``chain.options``);
    ``analysis`` itself is left as it is. An analysis that has them is returned as it is."""
    if analysis.prune_layers:
        return analysis
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    chains = []
    for chain in analysis.chains:
        norms = {p: layer_norm(analysis.graph_module, chain, p, nodes) for p in chain.prunable}
        chains.append(dataclasses.replace(chain, options=block_options(chain, analysis.limits, norms)))
    return dataclasses.replace(analysis, chains=chains, prune_layers=True)


def layer_norm(gm: fx.GraphModule, chain: Chain, p: int, nodes: dict[str, fx.Node] | None = None) -> float:
    """L1 norm of layer p's weight with its BatchNorm folded in (what the layer scales by)."""
    layer = chain.layers[p - 1]
    weight, _, _ = folded_weights(gm, layer.conv, layer.bn, nodes=nodes)
    return float(weight.abs().sum())


def _run(chain: Chain, start: int) -> MergedRun:
    return MergedRun([l.geometry for l in chain.layers], chain.skip_pairs(), start)


def _replaced_macs(chain: Chain, i: int, j: int) -> int:
    """Multiply-adds of the original layers of block (i, j] (what a merged conv replaces)."""
    return sum(conv_macs(l.geometry, l.output_shape) for l in chain.layers[i:j] if l.output_shape is not None)


def block_options(chain: Chain, limits: BlockLimits, norms: dict[int, float]) -> dict[tuple[int, int], list[PruneOption]]:
    """Every block's pruning options (see the module docstring), by block."""
    out: dict[tuple[int, int], list[PruneOption]] = {}
    skips, points = chain.skip_pairs(), set(chain.kept_candidates)
    for i in sorted(points - {chain.length}):
        # state -> (norm of kept prunable layers, pruned layers, any layer kept, the run)
        states: dict[tuple, tuple[float, tuple[int, ...], bool, MergedRun]] = {(): (0.0, (), False, _run(chain, i))}
        unpruned = _run(chain, i)
        for j in range(i + 1, chain.length + 1):
            if j - 1 > i and (j - 1) in chain.breaks:
                break  # as for unpruned blocks: nothing merges across a forced break
            unpruned_spec = unpruned.extend(j)
            states, specs = _grow(chain, states, j, norms)
            if j - i > 1:
                fits = chain.layers[i].input_shape
                states = {k: v for k, v in states.items() if limits.kernel_fits(v[3].spans, fits)}
                replaced = _replaced_macs(chain, i, j)
                specs = {k: v for k, v in specs.items()
                         if k is None or limits.allows(k, fits, chain.layers[j - 1].output_shape, replaced)}
            if not states:
                break
            if j not in points or residual_conflict(i, j, skips):
                continue
            specs.pop(unpruned_spec, None)  # pruning nothing is the depth-only block itself
            options = [PruneOption(pruned, spec, norm) for spec, (norm, pruned, _) in specs.items() if pruned]
            if options:
                out[(i, j)] = sorted(options, key=lambda o: (len(o.pruned), o.pruned))
    return out


def _grow(chain: Chain, states: dict, j: int, norms: dict[int, float]) -> tuple[dict, dict]:
    """Add layer j, kept and (if prunable) pruned, to every state; merge equal states. Also
    return, per merged spec of (i, j] (None: nothing kept), the best (norm, pruned, run)."""
    layer = chain.layers[j - 1]
    identity = ConvGeometry.identity(layer.geometry.in_channels, layer.geometry.ndim)
    grown: dict[tuple, tuple[float, tuple[int, ...], bool, MergedRun]] = {}
    specs: dict[ConvGeometry | None, tuple[float, tuple[int, ...], MergedRun]] = {}
    for norm, pruned, kept_any, run in states.values():
        # a junction (residual add) is the identity: it keeps no conv
        variants = [(norm, pruned, kept_any, None)] if layer.junction else [(norm + norms.get(j, 0.0), pruned, True, None)]
        if j in norms:
            variants.append((norm, pruned + (j,), kept_any, identity))
        for v_norm, v_pruned, v_kept, geometry in variants:
            v_run = run.copy()
            spec = v_run.extend(j, geometry)
            key = (v_kept, v_run.state())
            if key not in grown or v_norm > grown[key][0]:
                grown[key] = (v_norm, v_pruned, v_kept, v_run)
            spec_key = spec if v_kept else None
            if spec_key not in specs or v_norm > specs[spec_key][0]:
                specs[spec_key] = (v_norm, v_pruned, v_run)
    return grown, specs


def pruned_spec(chain: Chain, a: int, b: int, pruned: Iterable[int]) -> ConvGeometry | None:
    """The merged geometry of block (a, b] with layers ``pruned`` replaced by the identity
    (None when none is left: the block is the identity)."""
    pruned = tuple(sorted(set(pruned)))
    for option in chain.options.get((a, b), ()):  # the DP's options carry theirs: planning asks often
        if option.pruned == pruned:
            return option.spec
    if not chain.runs_conv(a, b, pruned):
        return None
    run = _run(chain, a)
    for p in range(a + 1, b + 1):
        g = chain.layers[p - 1].geometry
        spec = run.extend(p, ConvGeometry.identity(g.in_channels, g.ndim) if p in pruned else None)
    return spec
