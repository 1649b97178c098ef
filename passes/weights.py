"""A layer's weights as merging sees them: its conv's weight and bias with the BatchNorm after it
folded in (running statistics, its own ``eps``), in the precision merging composes in.

>>> import torch, torch.nn as nn, fxmerge
>>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
>>> a = fxmerge.analyze(m, (torch.randn(1, 3, 8, 8),))
>>> layer = a.chains[0].layers[0]
>>> folded_weights(a.graph_module, layer.conv, layer.bn)[0].dtype
torch.float64
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxmerge import algebra

from . import patterns

# Merged weights are composed in float64 and cast to the model's dtype once: long products of
# float32 kernels lose digits (deep drop-all merges were 3e-3 off in float32, 5e-7 with this).
COMPOSE_DTYPE = torch.float64


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


@torch.no_grad()
def folded_weights(gm: fx.GraphModule, conv: str, bn: str | None, dtype: torch.dtype = COMPOSE_DTYPE,
                   nodes: dict[str, fx.Node] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, patterns.ConvCall]:
    """``(weight, bias, conv call)`` of the layer whose conv node is ``conv`` and BatchNorm node
    ``bn`` (or None), BatchNorm folded, in ``dtype``. ``nodes`` (name -> node) saves a search."""
    call, norm = _calls(gm, conv, bn, nodes)
    weight, bias = _folded_rows(gm, call, norm, dtype, slice(None))
    return weight, bias, call


@torch.no_grad()
def folded_weights_cast(gm: fx.GraphModule, conv: str, bn: str | None, dtype: torch.dtype,
                        nodes: dict[str, fx.Node] | None = None, block: int = 1 << 18
                        ) -> tuple[torch.Tensor, torch.Tensor, patterns.ConvCall]:
    """:func:`folded_weights` folded in ``COMPOSE_DTYPE`` and cast to ``dtype`` (the bias zero
    where the layer has none), a block of about ``block`` weights at a time: a conv absorbing
    its BatchNorm then needs no kernel-sized float64 tensor (an ASPP conv's weight is 9 MB in
    float32; whole, its float64 copy and its folded twin were 35 MB more at the peak)."""
    call, norm = _calls(gm, conv, bn, nodes)
    ref = patterns.get_tensor(gm, call.weight_target)
    weight = torch.empty(ref.shape, dtype=dtype, device=ref.device)
    bias = torch.zeros(ref.shape[0], dtype=dtype, device=ref.device)
    step = max(1, block // max(1, ref[0].numel()))
    for start in range(0, ref.shape[0], step):
        rows = slice(start, start + step)
        w, b = _folded_rows(gm, call, norm, COMPOSE_DTYPE, rows)
        weight[rows] = w
        if b is not None:
            bias[rows] = b
    return weight, bias, call


def _calls(gm: fx.GraphModule, conv: str, bn: str | None, nodes: dict[str, fx.Node] | None):
    find = (lambda name: nodes[name]) if nodes is not None else (lambda name: node_named(gm, name))
    return patterns.conv_call(gm, find(conv))[0], None if bn is None else patterns.batchnorm_call(gm, find(bn))


def _folded_rows(gm: fx.GraphModule, call: patterns.ConvCall, norm, dtype: torch.dtype, rows: slice):
    """The folded weight and bias of output channels ``rows`` (per-channel: BatchNorm scales
    each output channel on its own), in ``dtype``."""

    def tensor(target: str | None) -> torch.Tensor | None:
        t = patterns.get_tensor(gm, target)
        return None if t is None else t.detach()[rows].to(dtype)

    weight, bias = tensor(call.weight_target), tensor(call.bias_target)
    if norm is not None:
        weight, bias = algebra.fold_batchnorm(weight, bias, *(tensor(t) for t in (norm.mean, norm.var, norm.weight,
                                                                                  norm.bias)), norm.eps)
    return weight, bias
