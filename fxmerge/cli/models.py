"""MODEL arguments of the command line: a torchvision model name (``mobilenet_v2``),
``timm:NAME`` (random init), or a ``package.module:factory`` that returns an ``nn.Module``;
``--checkpoint PATH`` loads a state dict into it (tensors only, strictly).

>>> type(load_model("resnet18")).__name__
'ResNet'
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from fxmerge.artifacts import load_state_strictly, load_tensors
from fxmerge.errors import InvalidArgumentError, MalformedFileError


def load_model(spec: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A model (in eval mode) from MODEL: a torchvision name, ``timm:NAME`` or a
    ``package.module:factory``; with ``checkpoint``, its state dict is loaded into it."""
    if spec.startswith("timm:"):
        model = _timm_model(spec[len("timm:"):])
    elif ":" in spec:
        model = _factory_model(spec)
    else:
        model = _torchvision_model(spec)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, spec)
    return model.eval()


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError:
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InvalidArgumentError(f"unknown model '{name}'{hint}: use a torchvision name, timm:NAME or "
                                   "package.module:factory") from None


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise InvalidArgumentError(f"MODEL 'timm:{name}' needs timm, which is not installed: pip install timm") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InvalidArgumentError(f"unknown timm model '{name}'{hint}; timm.list_models('*{name}*') lists similar names")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:  # whatever the model's constructor raises: the user's to fix
        raise InvalidArgumentError(f"timm.create_model('{name}', pretrained=False) raised "
                                   f"{type(exc).__name__}: {exc}") from None


def _factory_model(spec: str) -> nn.Module:
    module_name, attr = spec.split(":", 1)
    if not module_name or not attr:
        raise InvalidArgumentError(f"MODEL '{spec}' must look like package.module:factory")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the console script does not search the current folder
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise InvalidArgumentError(f"cannot import module '{module_name}' (MODEL '{spec}'): there is no module "
                                       f"'{exc.name}'; check the spelling, and that its folder is on PYTHONPATH") from None
        raise InvalidArgumentError(f"importing module '{module_name}' (MODEL '{spec}') failed: {exc}") from None
    except Exception as exc:
        raise InvalidArgumentError(f"importing module '{module_name}' (MODEL '{spec}') raised "
                                   f"{type(exc).__name__}: {exc}") from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = [n for n in dir(factory) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InvalidArgumentError(f"'{module_name}' has no attribute '{attr}' (MODEL '{spec}'){hint}")
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise InvalidArgumentError(f"MODEL '{spec}' is of type {type(factory).__name__}, not an nn.Module or a "
                                   "function that returns one")
    try:
        model = factory()
    except Exception as exc:
        raise InvalidArgumentError(f"calling {spec}() raised {type(exc).__name__}: {exc}; MODEL must name a function "
                                   "or class that builds the model without arguments") from None
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"{spec}() returned a value of type {type(model).__name__}, not an nn.Module")
    return model


def _load_checkpoint(model: nn.Module, path: str | os.PathLike, spec: str) -> None:
    """Load a state dict saved with ``torch.save`` (only tensors are deserialised)."""
    if not Path(path).is_file():
        raise InvalidArgumentError(f"--checkpoint {path}: no such file")
    try:
        state = load_tensors(path, "checkpoint", map_location="cpu")
    except MalformedFileError as exc:
        raise InvalidArgumentError(f"--checkpoint {exc}") from None
    for key in ("state_dict", "model_state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    load_state_strictly(model, state, what=f"--checkpoint {path}", target=f"MODEL '{spec}'",
                        error=InvalidArgumentError)
