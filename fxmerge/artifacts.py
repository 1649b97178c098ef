"""Saving and loading compressed models without pickled code.

``torch.save(graph_module)`` pickles the module's class and code: loading it needs
``torch.load(weights_only=False)``, which runs whatever the file says, and the plan is lost.
An fxmerge artifact holds only JSON text and tensors — the plan and the compressed model's
state dict — so ``torch.load(path, weights_only=True)`` reads it; :func:`load` rebuilds the
compressed GraphModule from the original architecture with :func:`fxmerge.merge` and loads the
state dict into it, strictly.

>>> fxmerge.artifacts.save(compressed, "m.pt")                            # doctest: +SKIP
>>> compressed = fxmerge.artifacts.load("m.pt", torchvision.models.mobilenet_v2())  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.errors import InvalidArgumentError, MalformedFileError, PlanMismatchError
from fxmerge.serialization import check_header

FORMAT, VERSION = "fxmerge.artifact", 1


def save(compressed: fx.GraphModule, path: str | os.PathLike) -> None:
    """Save a module made by :func:`fxmerge.merge` / :func:`fxmerge.compress` as its plan (JSON
    text) and state dict, loadable with ``torch.load(path, weights_only=True)``."""
    record = getattr(compressed, "meta", {}).get("fxmerge", {}) if isinstance(compressed, fx.GraphModule) else {}
    if "plan_json" not in record:
        raise InvalidArgumentError("save needs a module returned by fxmerge.merge or fxmerge.compress (it carries its "
                                   f"plan); got {type(compressed).__name__}")
    torch.save({"format": FORMAT, "version": VERSION, "plan": json.dumps(record["plan_json"]),
                "state_dict": compressed.state_dict()}, path)


def load(path: str | os.PathLike, model: nn.Module, *, map_location: Any = None, **trace_kwargs: Any) -> fx.GraphModule:
    """The compressed model saved in ``path``, rebuilt as ``fxmerge.merge(model, plan)`` from
    ``model`` — the original architecture (its weights do not matter: the saved ones replace
    them) — with the saved state dict loaded strictly. ``trace_kwargs`` (``tracer``,
    ``leaf_modules``, ``concrete_args``) are those the model needs to be traced. Returned in
    eval mode. Only tensors and JSON are deserialised."""
    from fxmerge.passes.rewrite import merge
    from fxmerge.plans import Plan

    data = _read(path, map_location)
    plan = Plan.from_dict(data["plan"])
    rebuilt = merge(model, plan, **trace_kwargs)
    state = data["state_dict"]
    expected = set(rebuilt.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise PlanMismatchError(f"{path}: the saved weights do not fit the model rebuilt from this architecture "
                                f"(missing {missing[:4]}, unexpected {unexpected[:4]}); pass the model the artifact "
                                "was compressed from")
    try:
        rebuilt.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PlanMismatchError(f"{path}: the saved weights do not fit the model rebuilt from this architecture: "
                                f"{' '.join(str(exc).split())[:400]}") from None
    return rebuilt.eval()


def load_tensors(path: str | os.PathLike, what: str, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code;
    :class:`MalformedFileError` naming the file (a ``what``) when it holds anything else."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch reports refused pickles and broken files alike, with a page of advice
        raise MalformedFileError(
            f"{path}: not a {what} that torch.load(weights_only=True) can read ({type(exc).__name__}): it is not a "
            "tensor file, or it holds pickled Python objects (such as a whole module saved with torch.save), which "
            "fxmerge never loads") from None


def _read(path: str | os.PathLike, map_location: Any) -> dict:
    data = load_tensors(path, "fxmerge artifact", map_location)
    check_header(data, FORMAT, VERSION, source=path)
    if not isinstance(data.get("plan"), str) or not isinstance(data.get("state_dict"), dict):
        raise MalformedFileError(f"{path}: an fxmerge artifact holds 'plan' (JSON text) and 'state_dict'; "
                                 "this one does not")
    try:
        data["plan"] = json.loads(data["plan"])
    except json.JSONDecodeError as exc:
        raise MalformedFileError(f"{path}: the plan inside is not valid JSON ({exc.msg})") from None
    return data
