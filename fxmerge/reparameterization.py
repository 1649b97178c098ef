"""Re-parameterisable blocks (RepVGG, MobileOne, FastViT, ...) in their deploy form, so their
plain convs merge.

>>> import torch.nn as nn
>>> class Rep(nn.Module):
...     def __init__(self):
...         super().__init__(); self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)
...     def forward(self, x): return self.a(x) + self.b(x)
...     def fuse(self):
...         conv = nn.Conv2d(2, 2, 3, padding=1)
...         conv.weight.data = self.a.weight.data + nn.functional.pad(self.b.weight.data, [1, 1, 1, 1])
...         conv.bias.data = self.a.bias.data + self.b.bias.data
...         return conv
>>> type(reparameterize(nn.Sequential(Rep()))[0]).__name__
'Conv2d'
"""
from __future__ import annotations

import copy

import torch.nn as nn

from fxmerge.passes.model_checks import check_model

_REPARAMETERIZE_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")


def reparameterize(model: nn.Module) -> nn.Module:
    """A deploy-form copy of a model with train-time branches: every submodule exposing
    ``fuse()`` (which returns its replacement), ``reparameterize()`` or ``switch_to_deploy()``
    (in place) has it called, on a copy in eval mode — the convention timm's
    ``reparameterize_model`` follows; here for any model, with or without timm. Run it before
    fxmerge: the branches become plain convs, which fxmerge then merges across."""
    model = copy.deepcopy(check_model(model)).eval()

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            for hook in _REPARAMETERIZE_HOOKS:
                fn = getattr(child, hook, None)
                if callable(fn):
                    result = fn()
                    if hook == "fuse" and isinstance(result, nn.Module) and result is not child:
                        setattr(parent, name, result)
                        child = result
                    break
            visit(child)

    visit(model)
    return model.eval()
