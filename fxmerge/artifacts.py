"""Saving and loading compressed models without pickled code.

``torch.save(graph_module)`` pickles the module's class and code: loading it needs
``torch.load(weights_only=False)``, which runs whatever the file says, and the plan is lost.
An fxmerge artifact holds only JSON text and tensors — the plan and the compressed model's
state dict — so ``torch.load(path, weights_only=True)`` reads it; :func:`load` rebuilds the
compressed GraphModule from the original architecture with :func:`fxmerge.merge` and loads the
state dict into it, strictly.

>>> compressed = fxmerge.merge(model, fxmerge.Plan.drop_all(analysis))
>>> fxmerge.save_compressed(compressed, "m.pt")
>>> again = fxmerge.load_compressed("m.pt", model)
>>> bool(torch.equal(again(x), compressed(x)))
True

(``fxmerge.save`` / ``fxmerge.load`` are the old names of these two, kept for a release.)
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.errors import FxMergeError, InvalidArgumentError, MalformedFileError, PlanMismatchError
from fxmerge.passes.rewrite import merge, merged_plan_record
from fxmerge.passes.tracing import TraceOptions
from fxmerge.plans import Plan
from fxmerge.serialization import check_header, check_output_folder

FORMAT, VERSION = "fxmerge.artifact", 1


def save_compressed(compressed: nn.Module, path: str | os.PathLike) -> None:
    """Save a module made by :func:`fxmerge.merge` / :func:`fxmerge.compress` as its plan (JSON
    text) and state dict, loadable with ``torch.load(path, weights_only=True)``."""
    record = merged_plan_record(compressed)  # kept through pickling and torch.save too
    if record is None:
        raise InvalidArgumentError("save needs a module returned by fxmerge.merge or fxmerge.compress (it carries its "
                                   f"plan); got {type(compressed).__name__}")
    target = _output_path(path)
    data = {"format": FORMAT, "version": VERSION, "plan": json.dumps(record),
            "state_dict": compressed.state_dict()}
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:  # written beside the target and renamed over it: an interrupted save never leaves a partial artifact
        torch.save(data, tmp)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FxMergeError(f"could not save the compressed model to {target}: {' '.join(str(exc).split())[:200]}") \
            from None


def _output_path(path: Any) -> Path:
    """``path`` as a file the artifact can be written to: not a folder, in a folder that exists."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidArgumentError(f"path must be a file name (str or os.PathLike), e.g. 'model.pt'; got {path!r}")
    target = Path(path)
    if target.is_dir():
        raise InvalidArgumentError(f"path {str(target)!r} is a folder; give a file name, e.g. {str(target / 'model.pt')!r}")
    check_output_folder(target)
    return target


def load_compressed(path: str | os.PathLike, model: nn.Module, *, map_location: Any = None,
                    trace: TraceOptions | None = None) -> fx.GraphModule:
    """The compressed model saved in ``path``, rebuilt as ``fxmerge.merge(model, plan)`` from
    ``model`` — the original architecture (its weights do not matter: the saved ones replace
    them) — with the saved state dict loaded strictly. ``trace`` is what the model needs to be
    traced (as for :func:`fxmerge.analyze`). Returned in eval mode. Only tensors and JSON are
    deserialised."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be the original architecture (the nn.Module the artifact was "
                                   f"compressed from; its weights do not matter); got {type(model).__name__}")
    data = _read(path, map_location)
    plan = Plan.from_dict(data["plan"], source=f"{path} (its plan)")
    rebuilt = merge(model, plan, trace=trace)
    load_state_strictly(rebuilt, data["state_dict"], what=f"{path}: the saved state dict",
                        target="the model rebuilt from this architecture", error=PlanMismatchError,
                        remedy="pass the model the artifact was compressed from")
    return rebuilt.eval()


# the old names (a release of grace)
save, load = save_compressed, load_compressed


def load_state_strictly(module: nn.Module, state: Any, *, what: str, target: str, error: type[FxMergeError],
                        remedy: str = "") -> None:
    """Load ``state`` into ``module`` only if it holds exactly the module's keys with fitting
    shapes; otherwise ``error`` says "``what`` does not fit ``target``" and which keys are
    missing or unexpected (``remedy``, if given, says what to do)."""
    tail = f"; {remedy}" if remedy else ""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{what} does not hold a state dict (a mapping name -> tensor){tail}")
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise error(f"{what} does not fit {target}: {_listed('missing', missing)}"
                    f"{'; ' if missing and unexpected else ''}{_listed('unexpected', unexpected)}{tail}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes differ
        raise error(f"{what} does not fit {target}: {' '.join(str(exc).split())[:400]}{tail}") from None


def _listed(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    return f"{len(keys)} {what} keys ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"


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
