"""Private copies of the user's model that cost no second set of weights.

Every pass works on a copy, so the user's model is never changed. A deep copy of a large model
doubled the passes' memory for weights nothing writes: analysis only reads them, and merge
reads them to compose new kernels. :func:`private_copy` copies the module objects and the
buffers (their attributes, such as a conv's padding, are edited by the rewrite; a forward pass
may update a buffer in place) and shares the parameters. Whatever a pass returns to the user
goes through :func:`detach_from` first, so it owns every parameter it still shares with the
model (a fine-tuned result never changes the original).

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
>>> copy = private_copy(model)
>>> copy[0] is model[0], copy[0].weight is model[0].weight, copy[1].running_mean is model[1].running_mean
(False, True, False)
>>> detach_from(copy, model)[0].weight is model[0].weight
False
"""
from __future__ import annotations

import copy

import torch.nn as nn


def private_copy(model: nn.Module) -> nn.Module:
    """``model``'s modules and buffers copied, its parameters shared (tied ones stay tied)."""
    shared = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, shared)


def detach_from(module: nn.Module, model: nn.Module) -> nn.Module:
    """``module`` (in place, returned) with its own copy of every parameter it shares with
    ``model``; parameters tied inside ``module`` stay tied."""
    shared = {id(p) for p in model.parameters()} if isinstance(model, nn.Module) else set()
    clones: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and id(p) in shared:
                if id(p) not in clones:
                    clones[id(p)] = nn.Parameter(p.detach().clone(), p.requires_grad)
                sub._parameters[name] = clones[id(p)]
    return module
