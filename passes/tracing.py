"""Turning a user's model into a private, shape-annotated GraphModule.

The user's model is never touched: the traced GraphModule is deep-copied before anything writes
to it, so its submodules are ours to modify.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from fxmerge.errors import FxMergeError, TraceFailedError


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Example inputs as a tuple (a single tensor is accepted too, as a convenience)."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` wrappers (their ``_orig_mod`` is the real model)."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


def _tracer_with_context(tracer: fx.Tracer | None, leaf_modules: Sequence[type]) -> fx.Tracer:
    """A tracer that remembers which submodule it was inside when tracing failed."""
    base = type(tracer) if tracer is not None else fx.Tracer
    leaves = tuple(leaf_modules)

    class _ContextTracer(base):  # type: ignore[misc, valid-type]
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

        def call_module(self, m, forward, args, kwargs):
            self._fxmerge_stack.append(self.path_of_module(m) or type(m).__name__)
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self._fxmerge_failed_at is None:
                    self._fxmerge_failed_at = list(self._fxmerge_stack)
                raise
            finally:
                self._fxmerge_stack.pop()

    new = _ContextTracer.__new__(_ContextTracer)
    if tracer is not None:
        new.__dict__.update(copy.copy(tracer.__dict__))
    else:
        fx.Tracer.__init__(new)
    new._fxmerge_stack, new._fxmerge_failed_at = [], None
    return new


def trace(model: nn.Module, *, tracer: fx.Tracer | None = None, leaf_modules: Sequence[type] = (),
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """A private GraphModule of ``model`` (a deep copy when ``model`` already is one).

    Raises :class:`~fxmerge.TraceFailedError` naming the submodule where tracing failed and
    what to try (leaf modules, ``concrete_args``, a custom tracer).
    """
    model = unwrap(model)
    if isinstance(model, fx.GraphModule) and tracer is None and not leaf_modules and not concrete_args:
        return copy.deepcopy(model)
    t = _tracer_with_context(tracer, leaf_modules)
    try:
        graph = t.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
        where = " > ".join(t._fxmerge_failed_at or []) or type(model).__name__
        raise TraceFailedError(
            f"torch.fx could not trace {type(model).__name__}: the failure happened inside "
            f"'{where}': {type(exc).__name__}: {exc}. Make that submodule a leaf "
            f"(leaf_modules=[{type(_submodule(model, t._fxmerge_failed_at)).__name__}]), fix "
            f"data-dependent arguments with concrete_args={{...}}, or pass a custom tracer."
        ) from exc
    name = model.__class__.__name__
    gm = fx.GraphModule(model, graph, name)
    return copy.deepcopy(gm)


def _submodule(model: nn.Module, path: list[str] | None) -> nn.Module:
    if not path:
        return model
    try:
        return model.get_submodule(path[-1])
    except AttributeError:
        return model


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']`` (eval mode, no grad)."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise FxMergeError(f"running the example inputs {shapes} through the traced model failed: {exc}. "
                           "Pass inputs the model accepts, as a tuple (like torch.export).") from exc
    finally:
        gm.train(was_training)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
