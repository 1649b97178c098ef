"""The user-facing entry points: one function per arrow of the data flow (DESIGN.md)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.passes.analysis import Analysis, BlockLimits, analyze_graph
from fxmerge.passes.tracing import as_inputs, propagate_shapes, trace

if TYPE_CHECKING:
    from fxmerge.plans import Plan


def analyze(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, tracer: fx.Tracer | None = None,
            leaf_modules: Sequence[type] = (), concrete_args: dict[str, Any] | None = None,
            limits: BlockLimits | None = None) -> Analysis:
    """Trace ``model`` (an ``nn.Module``, a ``torch.compile``d one, or a GraphModule) and find its
    mergeable chains, droppable activations, identity skips, forced breaks and valid blocks.

    ``example_inputs`` is a tuple of tensors, as for ``torch.export``; shapes come from running
    them through the traced graph once. ``tracer`` / ``leaf_modules`` / ``concrete_args`` help
    with models fx cannot trace as they are. ``limits`` bounds the candidate blocks.

    >>> import torch, torchvision, fxmerge
    >>> a = fxmerge.analyze(torchvision.models.mobilenet_v2(), (torch.randn(1, 3, 64, 64),))
    >>> a.chains[0].length, len(a.chains[0].droppable)
    (52, 34)
    """
    example_inputs = as_inputs(example_inputs)
    gm = trace(model, tracer=tracer, leaf_modules=leaf_modules, concrete_args=concrete_args)
    propagate_shapes(gm, example_inputs)
    return analyze_graph(gm, limits)


def compress(model: nn.Module, latency_table: Any, **kwargs: Any) -> fx.GraphModule:
    """``plan`` -> ``linearize`` -> ``merge`` in one call: the faster, equivalent GraphModule.

    Keyword arguments go to :func:`fxmerge.plan` (``budget``, ``budget_ms``, ``importance``,
    ``example_inputs``, ...). The plan stays retrievable with :func:`fxmerge.plan_of`.

    >>> compressed = fxmerge.compress(model, table, budget=0.6)  # doctest: +SKIP
    >>> print(fxmerge.plan_of(compressed))                        # doctest: +SKIP
    """
    from fxmerge.passes.rewrite import merge
    from fxmerge.planning import plan

    trace_kwargs = {k: kwargs[k] for k in ("tracer", "leaf_modules", "concrete_args") if k in kwargs}
    chosen = plan(model, latency_table, **kwargs)
    return merge(model, chosen, **trace_kwargs)


def plan_of(module: fx.GraphModule) -> "Plan":
    """The plan a module returned by :func:`merge` / :func:`compress` was built with."""
    from fxmerge.errors import FxMergeError
    from fxmerge.plans import Plan

    record = getattr(module, "meta", {}).get("fxmerge", {})
    if "plan_json" not in record:
        raise FxMergeError("this module was not produced by fxmerge.merge / fxmerge.compress")
    return Plan.from_dict(record["plan_json"])
