"""The one-call entry points of the data flow: ``compress`` (plan, linearize, merge) and
``plan_of`` (the plan a compressed module was built with). The passes themselves are
:func:`fxmerge.analyze`, :func:`fxmerge.plan`, :func:`fxmerge.linearize` and :func:`fxmerge.merge`.

>>> import torch, torchvision, fxmerge
>>> model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
>>> merged = fxmerge.merge(model, fxmerge.Plan.keep_all(fxmerge.analyze(model, (x,))))
>>> fxmerge.plan_of(merged).is_exact
True
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge.errors import FxMergeError
from fxmerge.importance import ImportanceTable
from fxmerge.latency import LatencyTable
from fxmerge.passes.rewrite import merge, merged_plan_record
from fxmerge.passes.tracing import TraceOptions
from fxmerge.planner import plan
from fxmerge.plans import Plan
from fxmerge.records import Analysis


def compress(model: nn.Module, latency_table: LatencyTable, *, budget: float | None = None,
             budget_ms: float | None = None, importance: ImportanceTable | Mapping[tuple, float] | None = None,
             example_inputs: Sequence[torch.Tensor] | None = None, resolution: float | None = None,
             measure_missing: bool = False, analysis: Analysis | None = None, backend: str | None = None,
             verify: bool = False, verify_rounds: int = 3, prune_layers: bool = False,
             save_to: str | os.PathLike | None = None, trace: TraceOptions | None = None,
             modules: Sequence[str] | None = None) -> nn.Module:
    """``plan`` -> ``linearize`` -> ``merge`` in one call: the faster, equivalent GraphModule.

    The arguments are :func:`fxmerge.plan`'s (without a budget every activation stays and
    convs merge only where the table says it is faster: the result equals the model). The plan
    stays retrievable with :func:`fxmerge.plan_of`. With ``modules``, a copy of the whole model
    whose named submodules are compressed (a GraphModule otherwise).

    >>> compressed = fxmerge.compress(model, table, budget=0.9)
    >>> fxmerge.plan_of(compressed).report.predicted_planned_ms <= 0.9 * fxmerge.plan_of(compressed).report.original_ms
    True
    """
    chosen = plan(model, latency_table, budget=budget, budget_ms=budget_ms, importance=importance,
                  example_inputs=example_inputs, resolution=resolution, measure_missing=measure_missing,
                  analysis=analysis, backend=backend, verify=verify, verify_rounds=verify_rounds,
                  prune_layers=prune_layers, save_to=save_to, trace=trace, modules=modules)
    return merge(model, chosen, example_inputs=example_inputs, trace=trace)


def plan_of(module: nn.Module) -> Plan:
    """The plan a module returned by :func:`merge` / :func:`compress` was built with."""
    record = merged_plan_record(module)
    if record is None:
        raise FxMergeError("this module was not produced by fxmerge.merge / fxmerge.compress")
    return Plan.from_dict(record)
