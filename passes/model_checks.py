"""What fxmerge accepts as a model, before any capture: the checks both front-ends (fx
tracing in :mod:`.tracing`, torch.export in :mod:`.capture`) make, so a model is refused the
same way whichever captures it."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.errors import InvalidArgumentError, UnsupportedModelError

from . import patterns


def unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` wrappers (their ``_orig_mod`` is the real model)."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


def is_fxmerge_output(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and "fxmerge" in getattr(model, "meta", {})


# --------------------------------------------------------------------------- checks


def check_model(model: Any) -> nn.Module:
    """The model to trace, or a clear error for what fxmerge cannot handle faithfully."""
    if isinstance(model, torch.export.ExportedProgram):
        raise UnsupportedModelError(
            "got a torch.export ExportedProgram: fxmerge rewrites the eager nn.Module. Pass the module you "
            "exported, then export the compressed one (fxmerge's outputs export like any module).")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    model = unwrap(model)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd,) + patterns.BN_MODULES):
            continue
        for hook in module._forward_pre_hooks.values():
            kind = type(hook).__name__
            modern = {"WeightNorm": "torch.nn.utils.parametrizations.weight_norm",
                      "SpectralNorm": "torch.nn.utils.parametrizations.spectral_norm"}.get(kind)
            advice = (f"it is the old-style {kind}: use {modern} instead (fxmerge merges parametrized convs), "
                      f"or remove it (torch.nn.utils.remove_{'weight' if kind == 'WeightNorm' else 'spectral'}_norm)"
                      if modern else "remove the hook, or fold what it does into the weights first")
            raise UnsupportedModelError(
                f"'{name}' ({type(module).__name__}) has a forward pre-hook that may rewrite its weights or input, "
                f"which fxmerge would not see: {advice}.")
        if module._forward_hooks:
            raise UnsupportedModelError(
                f"'{name}' ({type(module).__name__}) has a forward hook; merging replaces the module, so the hook "
                "would silently stop running. Remove it before fxmerge and re-register it on the result.")
    return model
