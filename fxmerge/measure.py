"""What a latency table measures, built and timed on a backend; the results come back as plain
data for :class:`~fxmerge.LatencyTable` to record.

* :func:`unit_builders` — one module per cost-model term, exactly as merge emits it: every
  distinct merged-conv spec of every valid block (and, with pruning, of every pruning option)
  at the real input shape of its block; the explicit add of each residual; each droppable
  activation right after its conv (a backend that fuses the two is charged only what the
  activation adds);
* :func:`reference_plans` — a few whole plans spanning what the DP can choose: the folded
  original, the DP's own picks at 80 % and 60 % of its summed terms, the fastest plan; for an
  analysis with pruning options also plans that prune (:func:`pruned_reference_plans`), so the
  correction is fitted where pruned plans lie, not extrapolated from depth-only ones;
* :func:`time_plans` — whole plans merged and timed interleaved with the folded original: the
  observations the table's correction is fitted to.

>>> units = unit_builders(analysis, torch.float32, "cpu")
>>> module, inputs = units[sorted(units)[0]]()
>>> isinstance(module, torch.nn.Module)
True
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge.backends import Builder, get_backend
from fxmerge.convs import conv_for_geometry
from fxmerge.cost import CostModel, add_key, conv_key
from fxmerge.passes.activations import registered_activations
from fxmerge.passes.rewrite import merge
from fxmerge.passes.tracing import TraceOptions
from fxmerge.plans import Plan
from fxmerge.problem import build_problem, frontier_plans, probe_plans
from fxmerge.records import Analysis
from fxmerge.timing import Ratio, merged, noise_note, ratio

log = logging.getLogger("fxmerge")

REFERENCE_FRACTIONS = (0.8, 0.6)  # the DP's picks between the two bounding plans


# --------------------------------------------------------------------------- table units


def unit_builders(analysis: Analysis, dtype: torch.dtype, device: torch.device | str,
                  prune_layers: bool = False) -> dict[str, Builder]:
    """For each cost-model term: a function building (module, inputs) to time it."""
    out: dict[str, Builder] = {}

    def rand(shape):
        return torch.randn(shape, dtype=dtype, device=device)

    for chain in analysis.chains:
        blocks = [(chain.specs[b], chain.input_shapes[b[0]]) for b in chain.valid_blocks
                  if chain.specs[b] is not None]  # a junction alone runs no conv
        if prune_layers:  # each option's merged conv (a fully pruned block runs no conv)
            blocks += [(o.spec, chain.input_shapes[i]) for (i, _), opts in chain.options.items() for o in opts
                       if o.spec is not None]
        for spec, shape in blocks:
            out[conv_key(spec, shape)] = lambda spec=spec, shape=shape: (
                conv_for_geometry(spec, dtype=dtype, device=device), (rand(shape),))
        for s in chain.skips:
            shape = chain.layers[s.target - 1].output_shape
            out[add_key(shape)] = lambda shape=shape: (_Add(), (rand(shape), rand(shape)))
        for p, key in CostModel.activation_keys(chain).items():
            kind, spec, shape = chain.activations[p][1], chain.specs[(p - 1, p)], chain.input_shapes[p - 1]
            out[key] = lambda kind=kind, spec=spec, shape=shape: (
                nn.Sequential(conv_for_geometry(spec, dtype=dtype, device=device), activation_module(kind)),
                (rand(shape),))
    return out


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _Call(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def activation_module(kind: str) -> nn.Module:
    """A module applying the registered activation ``kind`` in its first registered form."""
    entry = registered_activations()[kind]
    if entry.modules:
        return entry.modules[0]()
    if entry.functions:
        return _Call(entry.functions[0])
    return _Call(lambda x, name=entry.methods[0]: getattr(x, name)())


# --------------------------------------------------------------------------- whole plans


def reference_plans(analysis: Analysis, lookup: Callable[[str], float]) -> dict[str, Plan]:
    """The plans a table times end to end for ``analysis`` (see the module's docstring)."""
    cost = CostModel(analysis, lookup)
    plans = {**cost.bounding_plans(), **probe_plans(analysis, cost, REFERENCE_FRACTIONS)}
    if analysis.prune_layers:
        seen = {p.fingerprint() for p in plans.values()}
        plans.update({k: p for k, p in pruned_reference_plans(analysis, lookup).items() if p.fingerprint() not in seen})
    return plans


def pruned_reference_plans(analysis: Analysis, lookup: Callable[[str], float]) -> dict[str, Plan]:
    """Plans that prune, from the DP's frontier with uniform importance (where each pruned conv
    counts -1, so plans prune only where depth alone cannot go): the fastest of them and the
    one halfway along the pruned part of the frontier. With uniform importance the DP prunes
    only below the depth-only plans, so these are the plans ``prune_layers=True`` makes at
    small budgets; empty when no plan prunes."""
    cost = CostModel(analysis, lookup)
    problem = build_problem(analysis, cost, None, prune_layers=True)
    if not problem.options:
        return {}
    pruned = [plan for plan, _ in frontier_plans(analysis, problem, None, 0.0) if plan.num_pruned]
    if not pruned:
        return {}
    picks = {"pruned-fastest": pruned[0], "pruned-mid": pruned[len(pruned) // 2]}
    return picks if picks["pruned-mid"].fingerprint() != picks["pruned-fastest"].fingerprint() else \
        {"pruned-fastest": pruned[0]}


@dataclass(frozen=True)
class PlanTimings:
    """Plans timed interleaved with the folded original: its milliseconds, each plan's ratio to
    it, and the observations (``{"plan", "kind", "terms_ms", "ops", "ratio", "pruned"}``,
    ``pruned`` the number of convs the plan prunes) to record."""

    original_ms: float
    ratios: dict[str, float]
    observations: list[dict]
    intervals: dict[str, Ratio] = field(default_factory=dict)  # each plan's ratio with its confidence interval
    plans: dict[str, Plan] = field(default_factory=dict)
    original_spread: float = 0.0  # the folded original's IQR / median in this run: how busy the machine was

    def noisy(self) -> list[str]:
        """The plans whose ratio is too noisy to fit a correction to (:attr:`Ratio.trusted`)."""
        return [name for name, r in self.intervals.items() if not r.trusted]

    def trusted(self) -> "PlanTimings":
        """These timings without the noisy plans' observations (the folded original's own, ratio 1
        by definition, always stays)."""
        noisy = {self.plans[name].fingerprint() for name in self.noisy()}
        keep = [o for o in self.observations if o["plan"] not in noisy or o["kind"] == "fold-only"]
        return PlanTimings(self.original_ms, self.ratios, keep, self.intervals, self.plans, self.original_spread)


def time_plans(backend: str, model: nn.Module, inputs: Sequence[torch.Tensor], analysis: Analysis,
               plans: Mapping[str, Plan], lookup: Callable[[str], float], *, kind: str, include_original: bool,
               runners: dict | None = None, trace: TraceOptions | None = None) -> PlanTimings:
    """Merge ``plans`` and time them interleaved with the folded original on ``backend``.
    ``include_original`` adds the folded original itself as an observation (ratio 1), for the
    first observations of a model. ``runners`` caches compiled/exported modules between calls
    (a verification compiles the original once). When a plan's ratio comes out too noisy to
    trust, everything is timed once more (samples joined) before its interval is kept."""
    folded = Plan.fold_only(analysis)
    raw = CostModel(analysis, lookup)
    # modules are named by plan fingerprint: a cached runner is only ever the same plan's
    modules = {folded.fingerprint(): merge(model, folded, trace=trace)}
    modules.update({plan.fingerprint(): merge(model, plan, trace=trace) for plan in plans.values()
                    if plan.fingerprint() not in modules})
    runners = {} if runners is None else runners
    chosen = get_backend(backend)
    timings = chosen.compare(modules, inputs, rounds=3, repeats=9, runners=runners)
    if noise_note(timings, folded.fingerprint()) is not None:  # more rounds before anything is judged noisy
        again = chosen.compare(modules, inputs, rounds=3, repeats=9, runners=runners)
        timings = {name: merged(timings[name], again[name]) for name in timings}
    original = timings[folded.fingerprint()]
    original_ms = original.ms
    intervals = {name: ratio(timings[plan.fingerprint()], original) for name, plan in plans.items()}
    # the paired estimate its interval is about: the ratio of the two medians can lie outside
    # that interval when the machine's speed moves during the rounds (measured: 0.744 against an
    # interval of 0.760-0.855, a verify round that "met" 0.8 and then measured 0.84)
    ratios = {name: interval.value for name, interval in intervals.items()}
    observations = [{"plan": plan.fingerprint(), "kind": kind, "terms_ms": raw.terms_ms(plan), "ops": raw.op_count(plan),
                     "ratio": ratios[name], "pruned": plan.num_pruned} for name, plan in plans.items()]
    if include_original and all(p.fingerprint() != folded.fingerprint() for p in plans.values()):
        observations.insert(0, {"plan": folded.fingerprint(), "kind": "fold-only", "terms_ms": raw.terms_ms(folded),
                                "ops": raw.op_count(folded), "ratio": 1.0, "pruned": 0})
    return PlanTimings(original_ms, ratios, observations, intervals, dict(plans), original.relative_spread)
