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
    find = (lambda name: nodes[name]) if nodes is not None else (lambda name: node_named(gm, name))
    call = patterns.conv_call(gm, find(conv))[0]

    def tensor(target: str | None) -> torch.Tensor | None:
        t = patterns.get_tensor(gm, target)
        return None if t is None else t.detach().to(dtype)

    weight, bias = tensor(call.weight_target), tensor(call.bias_target)
    if bn is not None:
        bc = patterns.batchnorm_call(gm, find(bn))
        weight, bias = algebra.fold_batchnorm(weight, bias, *(tensor(t) for t in (bc.mean, bc.var, bc.weight, bc.bias)),
                                              bc.eps)
    return weight, bias, call
