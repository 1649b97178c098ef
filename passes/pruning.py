"""The pruning pass (LayerMerge, Kim et al. ICML 2024): the ways each candidate block can replace
some of its layers by the identity, so its merged kernel stays small.

>>> import torch, torchvision, fxmerge
>>> a = fxmerge.analyze(torchvision.models.mobilenet_v2(), (torch.randn(1, 3, 64, 64),), prune_layers=True)
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
geometries will grow alike whatever follows (``_Run.state``) keep only the larger norm, so the
work is the number of distinct geometries, not of subsets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

from fxmerge.algebra import ConvGeometry, fold_batchnorm

from . import patterns
from .analysis import Analysis, BlockLimits, Chain, _Run, cuts_a_skip


@dataclass(frozen=True)
class PruneOption:
    """Block (i, j] with layers ``pruned`` (numbered like positions) replaced by the identity:
    ``spec`` is the merged conv of the kept layers (None: none kept, the block is the identity),
    ``norm`` the summed L1 norm of its kept prunable layers (the representative rule)."""

    pruned: tuple[int, ...]
    spec: ConvGeometry | None
    norm: float


def add_prune_options(analysis: Analysis) -> Analysis:
    """Fill ``chain.options`` for every chain of ``analysis`` (in place; done once) and return it."""
    if getattr(analysis, "prune_layers", False):
        return analysis
    for chain in analysis.chains:
        norms = {p: layer_norm(analysis.graph_module, chain, p) for p in chain.prunable}
        chain.options = block_options(chain, analysis.limits, norms)
    analysis.prune_layers = True
    return analysis


def layer_norm(gm: fx.GraphModule, chain: Chain, p: int) -> float:
    """L1 norm of layer p's weight with its BatchNorm folded in (what the layer scales by)."""
    layer = chain.layers[p - 1]
    nodes = {n.name: n for n in gm.graph.nodes}
    call = patterns.conv_call(gm, nodes[layer.conv])[0]

    def tensor(target):
        t = patterns.get_tensor(gm, target)
        return None if t is None else t.detach().double()

    weight = tensor(call.weight_target)
    if layer.bn is not None:
        bn = patterns.batchnorm_call(gm, nodes[layer.bn])
        weight, _ = fold_batchnorm(weight, tensor(call.bias_target),
                                   *(tensor(t) for t in (bn.mean, bn.var, bn.weight, bn.bias)), bn.eps)
    with torch.no_grad():
        return float(weight.abs().sum())


def block_options(chain: Chain, limits: BlockLimits, norms: dict[int, float]) -> dict[tuple[int, int], list[PruneOption]]:
    """Every block's pruning options (see the module docstring), by block."""
    out: dict[tuple[int, int], list[PruneOption]] = {}
    skips, points = chain.skip_pairs(), set(chain.kept_candidates)
    for i in sorted(points - {chain.length}):
        # state -> (norm of kept prunable layers, pruned layers, any layer kept, the run)
        states: dict[tuple, tuple[float, tuple[int, ...], bool, _Run]] = {(): (0.0, (), False, _Run(chain, i))}
        unpruned = _Run(chain, i)
        for j in range(i + 1, chain.length + 1):
            if j - 1 > i and (j - 1) in chain.breaks:
                break  # as for unpruned blocks: nothing merges across a forced break
            unpruned_spec = unpruned.extend(j)
            states, specs = _grow(chain, states, j, norms)
            if j - i > 1:
                states = {k: v for k, v in states.items() if not v[3].too_large(limits)}
                specs = {k: v for k, v in specs.items() if k is None or _allowed(chain, limits, i, j, k, v)}
            if not states:
                break
            if j not in points or cuts_a_skip(i, j, skips):
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
    grown: dict[tuple, tuple[float, tuple[int, ...], bool, _Run]] = {}
    specs: dict[ConvGeometry | None, tuple[float, tuple[int, ...], _Run]] = {}
    for norm, pruned, kept_any, run in states.values():
        variants = [(norm + norms.get(j, 0.0), pruned, True, None)]
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


def _allowed(chain: Chain, limits: BlockLimits, i: int, j: int, spec: ConvGeometry, best: tuple) -> bool:
    run = best[2]
    return limits.allows(spec, chain.layers[i].input_shape, chain.layers[j - 1].output_shape, run.macs)


def pruned_spec(chain: Chain, a: int, b: int, pruned: Iterable[int]) -> ConvGeometry | None:
    """The merged geometry of block (a, b] with layers ``pruned`` replaced by the identity
    (None when none is left: the block is the identity)."""
    pruned = tuple(sorted(set(pruned)))
    for option in chain.options.get((a, b), ()):  # the DP's options carry theirs: planning asks often
        if option.pruned == pruned:
            return option.spec
    if all(p in pruned for p in range(a + 1, b + 1)):
        return None
    run = _Run(chain, a)
    for p in range(a + 1, b + 1):
        g = chain.layers[p - 1].geometry
        spec = run.extend(p, ConvGeometry.identity(g.in_channels, g.ndim) if p in pruned else None)
    return spec
