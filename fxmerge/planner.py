"""From a measured latency table (and importance, where the user has it) to a :class:`Plan`:
one exact DP over all chains of the model, concatenated with forced breaks between them
(:mod:`fxmerge.problem`); the whole Pareto frontier from one solve; and, with ``verify=True``,
plans measured on the table's backend and corrected until they meet the budget
(:mod:`fxmerge.verification`).

>>> plan = fxmerge.plan(model, table, budget=0.9)
>>> plan.report.predicted_planned_ms <= 0.9 * plan.report.original_ms
True
>>> [len(fxmerge.frontier(model, table, points=2)) <= 2]
[True]
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge import verification
from fxmerge.arguments import (check_budget, check_choice, check_count, check_flag, check_importance_scores,
                               check_inputs, check_resolution)
from fxmerge.backends import BACKENDS
from fxmerge.cost import CostModel
from fxmerge.errors import EnvironmentMismatchError, InvalidArgumentError
from fxmerge.fingerprints import structure_digest
from fxmerge.importance import ImportanceTable
from fxmerge.latency import LatencyTable
from fxmerge.passes.analysis import analyze
from fxmerge.passes.pruning import pruned_spec, with_prune_options
from fxmerge.passes.tracing import TraceOptions
from fxmerge.plans import Plan
from fxmerge.problem import Importance, Problem, build_problem, check_coverable, frontier_plans, select_plan
from fxmerge.records import Analysis
from fxmerge.report import MergedConv, PlanReport, VerifyRound
from fxmerge.verification import observe, save_observations

log = logging.getLogger("fxmerge")


class Planner:
    """One model, one table, one importance: the DP's inputs, built once, and its answers."""

    def __init__(self, table: LatencyTable, analysis: Analysis, importance: Importance | None,
                 resolution: float | None, prune_layers: bool = False):
        self.table, self.analysis, self.importance, self.resolution = table, analysis, importance, resolution
        self.prune_layers = prune_layers
        self.cost = CostModel(analysis, table.ms, table.correction(analysis))
        self.reference = table.reference(analysis)
        self.rest = self.cost.correction.rest_ms
        self.predicted_original = self.cost.predict_ms(Plan.fold_only(analysis))
        # budgets are fractions of the *measured* folded original where the table has it
        self.original_ms = self.reference["original_ms"] if self.reference else self.predicted_original
        self._problem: Problem | None = None

    @property
    def problem(self) -> Problem:
        if self._problem is None:
            self._problem = build_problem(self.analysis, self.cost, self.importance, self.prune_layers)
            check_coverable(self.analysis, self._problem)
        return self._problem

    def select(self, target_ms: float) -> Plan:
        chosen, importance = select_plan(self.analysis, self.problem, target_ms, self.rest, self.resolution)
        return self.finish(chosen, target_ms, importance)

    def keep_all(self) -> Plan:
        return self.finish(self.cost.merge_where_faster(keep="all"), None, None)

    def frontier(self, max_ms: float | None) -> list[Plan]:
        return [self.finish(p, None, importance)
                for p, importance in frontier_plans(self.analysis, self.problem, max_ms, self.rest, self.resolution)]

    def finish(self, chosen: Plan, budget_ms: float | None, importance: float | None) -> Plan:
        """The plan with its report: predicted latencies and the merged convs."""
        chosen.report = PlanReport(predicted_original_ms=self.predicted_original,
                                   predicted_planned_ms=self.rest + self.cost.terms_ms(chosen),
                                   original_ms=self.original_ms, backend=self.table.backend,
                                   end_to_end=self.reference is not None, budget_ms=budget_ms,
                                   merged=self._merged(chosen), importance=importance)
        return chosen

    def _merged(self, chosen: Plan) -> list[MergedConv]:
        rows, lossy = [], set(chosen.border_changing())
        for ci, a, b, cp, ms in self.cost.segment_rows(chosen):
            pruned = [p for p in cp.pruned if a < p <= b]
            if b - a > 1 or pruned:
                spec = pruned_spec(self.analysis.chains[ci], a, b, pruned)
                rows.append(MergedConv(ci, (a, b), cp.block_name(a, b).split(" = ")[1], b - a,
                                       "x".join(map(str, spec.kernel)) if spec else "identity",
                                       spec.groups if spec else "-", ms, tuple(cp.layers[p - 1].conv for p in pruned),
                                       (ci, a, b) in lossy))
        return rows


def plan(model: nn.Module, latency_table: LatencyTable, *, budget: float | None = None,
         budget_ms: float | None = None, importance: ImportanceTable | Mapping[tuple, float] | None = None,
         example_inputs: Sequence[torch.Tensor] | None = None, resolution: float | None = None,
         measure_missing: bool = False, analysis: Analysis | None = None, backend: str | None = None,
         verify: bool = False, verify_rounds: int = 3, prune_layers: bool = False,
         save_to: str | os.PathLike | None = None, trace: TraceOptions | None = None,
         modules: Sequence[str] | None = None) -> Plan:
    """Choose which activations to keep and where to merge, exactly, under a latency budget.

    ``budget`` is a fraction of the BatchNorm-folded original's latency *as measured* on the
    table's backend (its end-to-end reference; the predicted one where the table has no
    reference for this model), ``budget_ms`` an absolute one. Without a budget every activation
    stays and blocks merge only where the table says merging is faster (exact merges only).
    ``importance`` (an :class:`~fxmerge.ImportanceTable`, or a mapping ``(chain, i, j) ->
    score``) scores keeping the activations at positions i and j of a chain with every one
    between them dropped (pairs it lacks may not be chosen); without it every kept position is
    worth 1. ``example_inputs`` defaults to random inputs of the shapes the table was measured
    with, in the model's dtype and on its device. ``resolution`` is the DP's cost grid in ms
    (default: the budget / 1000). ``backend``, when given, is the backend the plan is for: a
    table measured for another one is refused, as is one measured for another dtype or device
    than the inputs.

    ``measure_missing=True`` times the terms the table lacks first. ``verify=True`` builds the
    compressed model and times it interleaved with the folded original on the table's backend;
    when it misses the budget the observation corrects the cost model (kept in the table) and
    it plans again, for at most ``verify_rounds`` rounds (:func:`fxmerge.verification.verify`).
    What either adds to the table is written to ``save_to`` (a path; nothing is written
    without it).

    ``prune_layers=True`` also lets the DP replace convs inside merged segments by the
    identity (LayerMerge): one exact DP over kept activations, merge boundaries and kept convs,
    whose optimum is never below the depth-only one. The table needs the options' specs
    (``LatencyTable.measure(..., prune_layers=True)``); importance scores them as
    ``(chain, i, j, pruned layers)`` (without it, each pruned conv counts -1).

    ``modules=["backbone", ...]`` plans only those submodules (one DP over all of them, as
    :func:`fxmerge.analyze` with ``modules``); the table is measured the same way.

    The plan records the predicted latencies (``plan.report``, ``plan.info`` in JSON; with
    ``verify``, every round's prediction and measurement) and prints as a report.
    """
    budget, budget_ms = _check_budgets(budget, budget_ms)
    check_count("verify_rounds", verify_rounds, hint="plan-measure-correct rounds, e.g. 3")
    check_flag("verify", verify)
    planner, analysis, example_inputs = _planner(model, latency_table, importance, example_inputs, resolution,
                                                 measure_missing, analysis, backend, trace, prune_layers, save_to,
                                                 modules)
    if budget is None and budget_ms is None:
        chosen = planner.keep_all()
        if verify:
            ratio = observe(latency_table, model, example_inputs, analysis, {"plan": chosen}, kind="verify",
                            trace=trace)["plan"]
            save_observations(latency_table, save_to)
            chosen.report.verify = [VerifyRound(1, planner.cost.predict_ms(chosen), ratio * planner.original_ms, ratio)]
        return chosen
    if importance is None:
        log.info("fxmerge: no importance given, every kept activation counts 1; real importance needs data "
                 "(ImportanceTable)")
    target = budget * planner.original_ms if budget is not None else budget_ms
    if not verify:
        return planner.select(target)
    if planner.reference is None:
        raise InvalidArgumentError("verify=True needs the table's end-to-end reference for this model: measure it "
                                   "with table.measure_missing(model, example_inputs)")

    def fresh() -> Planner:  # the correction re-fits on every observation a round adds
        return Planner(latency_table, analysis, planner.importance, resolution, prune_layers)

    return verification.verify(lambda aim: fresh().select(aim), lambda p: fresh().cost.predict_ms(p), latency_table, model,
                               example_inputs, analysis, target, rounds=verify_rounds, save_to=save_to, trace=trace)


def frontier(model: nn.Module, latency_table: LatencyTable,
             importance: ImportanceTable | Mapping[tuple, float] | None = None, *,
             example_inputs: Sequence[torch.Tensor] | None = None, resolution: float | None = None,
             max_budget: float | None = None, points: int | None = None, verify: bool = False,
             analysis: Analysis | None = None, backend: str | None = None, prune_layers: bool = False,
             save_to: str | os.PathLike | None = None, trace: TraceOptions | None = None,
             modules: Sequence[str] | None = None) -> list[Plan]:
    """The Pareto set of plans — for every latency, the most important plan that fits —
    fastest first, from one DP solve. Each plan's report holds its predicted latency (and
    ``budget_ratio``: predicted over the original). ``max_budget`` (a fraction of the
    original) bounds the slowest point (default: the most important plan); ``points`` keeps
    that many, evenly spread in predicted latency. ``verify=True`` times the returned points
    interleaved with the folded original on the table's backend (``measured_ms``,
    ``measured_ratio``) and keeps them as observations (written to ``save_to`` when given); it
    needs ``points`` (each point is a model to build and, on compiled backends, to compile).
    ``prune_layers`` and ``modules`` as in :func:`plan`.
    """
    if max_budget is not None:
        max_budget = check_budget("max_budget", max_budget, "a fraction of the original's latency, e.g. 1.0")
    if points is not None:
        check_count("points", points, minimum=2, hint="how many frontier plans to return")
    if verify and points is None:
        raise InvalidArgumentError("frontier(verify=True) measures every returned plan: give points=N (e.g. 6)")
    planner, analysis, example_inputs = _planner(model, latency_table, importance, example_inputs, resolution,
                                                 False, analysis, backend, trace, prune_layers, save_to, modules)
    plans = planner.frontier(None if max_budget is None else max_budget * planner.original_ms)
    if points is not None and len(plans) > points:
        plans = _spread(plans, points)
    for p in plans:
        p.report.budget_ratio = p.report.predicted_planned_ms / planner.original_ms
    if verify:
        ratios = observe(latency_table, model, example_inputs, analysis, {p.fingerprint(): p for p in plans},
                         kind="frontier", trace=trace)
        for p in plans:
            p.report.measured_ratio = ratios[p.fingerprint()]
            p.report.measured_ms = ratios[p.fingerprint()] * planner.original_ms
        save_observations(latency_table, save_to)
    return plans


def _spread(plans: list[Plan], count: int) -> list[Plan]:
    """``count`` plans evenly spread in predicted latency, the fastest and slowest included."""
    lat = [p.report.predicted_planned_ms for p in plans]
    picked = []
    for k in range(count):
        goal = lat[0] + (lat[-1] - lat[0]) * k / (count - 1)
        best = min(range(len(plans)), key=lambda i: abs(lat[i] - goal))
        if best not in picked:
            picked.append(best)
    return [plans[i] for i in sorted(picked)]


def _warn_if_options_unscored(analysis: Analysis, importance: Mapping) -> None:
    """Pruning options without an importance entry are not offered to the DP: say so when that
    is all of them (importance estimated on an analysis without pruning options)."""
    has_options = any(chain.options for chain in analysis.chains)
    if has_options and not any(len(key) == 4 for key in importance):
        warnings.warn("prune_layers=True, but the importance has no entries for pruning options, so no conv will be "
                      "pruned: estimate it with analysis=fxmerge.analyze(model, inputs, prune_layers=True), or plan "
                      "without importance", stacklevel=3)


def _planner(model: nn.Module, table: Any, importance: Any, example_inputs: Any, resolution: Any,
             measure_missing: bool, analysis: Analysis | None, backend: str | None, trace: TraceOptions | None,
             prune_layers: bool, save_to: Any, modules: Sequence[str] | None = None
             ) -> tuple[Planner, Analysis, tuple]:
    """Arguments checked, the model analysed, the table completed if asked, importance
    extended: the planner for this call."""
    scores = check_importance_scores(importance.scores if isinstance(importance, ImportanceTable) else importance) \
        if importance is not None else None
    resolution = check_resolution(resolution)
    if not isinstance(table, LatencyTable):
        raise InvalidArgumentError(f"latency_table must be a fxmerge.LatencyTable (LatencyTable.load(path) reads a "
                                   f"saved one); got {type(table).__name__}")
    if backend is not None:
        check_choice("backend", backend, tuple(BACKENDS))
    check_flag("prune_layers", prune_layers)
    check_flag("measure_missing", measure_missing)
    if save_to is not None and not isinstance(save_to, (str, os.PathLike)):
        raise InvalidArgumentError(f"save_to must be a path (str or os.PathLike); got {type(save_to).__name__}")
    example_inputs = check_inputs("example_inputs", example_inputs) if example_inputs is not None else \
        _example_inputs(table, model)
    table.check_environment(example_inputs, backend=backend)
    if analysis is not None and not isinstance(analysis, Analysis):
        raise InvalidArgumentError(f"analysis must be the fxmerge.Analysis that fxmerge.analyze returns; got "
                                   f"{type(analysis).__name__}")
    if analysis is None:
        analysis = analyze(model, example_inputs, limits=table.block_limits(), prune_layers=prune_layers, trace=trace,
                           modules=modules)
    elif modules is not None and list(modules) != analysis.modules:
        covered = analysis.modules or "the whole model"
        raise InvalidArgumentError(f"modules={list(modules)} but the analysis passed covers {covered}: pass one of them")
    elif prune_layers:
        analysis = with_prune_options(analysis)
    if measure_missing:
        before = len(table)
        table.measure_missing(model, example_inputs, analysis=analysis, prune_layers=prune_layers, trace=trace)
        _keep_measured(table, len(table) - before, save_to)
    table.require(analysis, prune_layers)
    if isinstance(importance, ImportanceTable):  # extend to every pair of kept candidates
        _check_importance_model(importance, analysis)
        scores = importance.extend(analysis)
    if prune_layers and scores is not None:
        _warn_if_options_unscored(analysis, scores)
    return Planner(table, analysis, scores, resolution, prune_layers), analysis, example_inputs


def _keep_measured(table: LatencyTable, added: int, save_to: Any) -> None:
    """Entries measured for a plan are saved where the caller said; a user who loaded the
    table from a file is told they would be lost otherwise."""
    if save_to is not None:
        table.save(save_to)
    elif added and table.source is not None:
        warnings.warn(f"measured {added} entries missing from the latency table {table.source}, but did not save them "
                      f"(a later run measures them again): pass save_to={table.source!r} to keep them", stacklevel=4)


def _check_budgets(budget: Any, budget_ms: Any) -> tuple[float | None, float | None]:
    if budget is not None and budget_ms is not None:
        raise InvalidArgumentError("give budget (a fraction of the original's latency) or budget_ms "
                                   "(milliseconds), not both")
    if budget is not None:
        budget = check_budget("budget", budget, "a fraction of the original's latency, e.g. 0.6")
    if budget_ms is not None:
        budget_ms = check_budget("budget_ms", budget_ms, "the end-to-end latency in milliseconds, e.g. 12.5")
    return budget, budget_ms


def _check_importance_model(importance: ImportanceTable, analysis: Analysis) -> None:
    """An importance table estimated for another model scores other positions: refuse it."""
    made_for = importance.meta.get("model", {}).get("structure")
    here = structure_digest(analysis)
    if made_for is not None and made_for != here:
        raise EnvironmentMismatchError(
            f"the importance table was estimated for another model (structure {made_for}, this model's is {here}); "
            "estimate importance for this model")


def _example_inputs(table: LatencyTable, model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Random inputs of the shapes the table was measured with, in the model's float dtype and
    on its device — so a table measured for another dtype or device is refused, not used."""
    shapes = list({str(r["inputs"]): r["inputs"] for r in table.references.values()}.values())
    if len(shapes) != 1:
        raise InvalidArgumentError(f"pass example_inputs=...: the latency table holds {len(shapes)} reference input "
                                   "shapes, not one, so the model's input shape is not known")
    param = next((p for p in model.parameters() if p.is_floating_point()), None) if isinstance(model, nn.Module) \
        else None
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))
    return tuple(torch.randn(s, dtype=dtype, device=device) for s in shapes[0])
