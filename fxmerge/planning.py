"""From a measured latency table (and importance, where the user has it) to a :class:`Plan`:
one exact DP over all chains of the model, concatenated with forced breaks between them; the
whole Pareto frontier from one solve; and, with ``verify=True``, plans measured on the table's
backend and corrected until they meet the budget (:mod:`fxmerge.calibration`)."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge.api import analyze
from fxmerge.backends import BACKENDS
from fxmerge.cost import CostModel
from fxmerge.errors import EnvironmentMismatchError, FxMergeError, InvalidArgumentError
from fxmerge.latency import LatencyTable
from fxmerge.passes import dp
from fxmerge.passes.analysis import Analysis, Chain
from fxmerge.passes.pruning import add_prune_options, pruned_spec
from fxmerge.plans import Plan
from fxmerge.validation import (check_budget, check_choice, check_count, check_flag, check_importance, check_inputs,
                                check_resolution)

log = logging.getLogger("fxmerge")

# (chain index, i, j) -> score; with pruning also (chain index, i, j, pruned layers) -> score
Importance = Mapping[tuple, float]


class InfeasibleBudgetError(FxMergeError):
    """No plan fits the latency budget; ``smallest_ms`` (also in the message) is the least
    budget that has one."""

    def __init__(self, message: str, smallest_ms: float):
        super().__init__(message)
        self.smallest_ms = smallest_ms


@dataclass
class _Concatenated:
    """All chains laid end to end on one axis of positions, as stage 2 sees them."""

    offsets: list[int]
    length: int
    times: dict[tuple[int, int], float]
    importance: dict[tuple[int, int], float]
    candidates: list[int]
    position_costs: dict[int, float]
    options: dict[tuple[int, int], list[tuple[float, float]]]  # pruned blocks: (ms, importance)
    pruned: dict[tuple[int, int], list[tuple[int, ...]]]  # the layers each of those options prunes

    def local(self, chain: Chain, positions: Sequence[int]) -> list[int]:
        off = self.offsets[chain.index]
        return [p - off for p in positions if off < p < off + chain.length]


def uniform_option_score(pruned: Sequence[int]) -> float:
    """Without importance, a segment is worth 1 (so the DP keeps as many activations as fit)
    and each conv it prunes costs 1 (pruning a conv counts like dropping an activation)."""
    return 1.0 - len(pruned)


def _concatenate(analysis: Analysis, cost: CostModel, importance: Importance | None,
                 prune_layers: bool = False) -> _Concatenated:
    offsets, total = [], 0
    for chain in analysis.chains:
        offsets.append(total)
        total += chain.length
    times, imp, candidates, position_costs = {}, {}, [], {}
    options: dict[tuple[int, int], list[tuple[float, float]]] = {}
    pruned: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    for chain, off in zip(analysis.chains, offsets):
        for i, j in chain.valid_blocks:
            times[(off + i, off + j)] = cost.block_ms(chain, i, j)
        acts = cost.activation_ms(chain)
        forced, points = chain.forced, chain.kept_candidates
        for p in points[1:-1]:
            candidates.append(off + p)
            position_costs[off + p] = acts.get(p, 0.0)
        for a in range(len(points)):
            for b in range(a + 1, len(points)):
                i, j = points[a], points[b]
                if any(i < f < j for f in forced):
                    break  # a forced activation cannot be dropped
                score = 1.0 if importance is None else importance.get((chain.index, i, j))
                if score is not None:
                    imp[(off + i, off + j)] = float(score)
                for option in chain.options.get((i, j), []) if prune_layers else []:
                    score = uniform_option_score(option.pruned) if importance is None else \
                        importance.get((chain.index, i, j, option.pruned))
                    if score is not None:
                        options.setdefault((off + i, off + j), []).append(
                            (cost.pruned_ms(chain, i, j, option.pruned), float(score)))
                        pruned.setdefault((off + i, off + j), []).append(option.pruned)
        if chain.index < len(analysis.chains) - 1:
            candidates.append(off + chain.length)  # chain junctions always act as kept
            position_costs[off + chain.length] = 0.0
    return _Concatenated(offsets, total, times, imp, sorted(set(candidates)), position_costs, options, pruned)


class _Planner:
    """One model, one table, one importance: the DP's inputs, built once, and its answers."""

    def __init__(self, table: LatencyTable, analysis: Analysis, importance: Any, resolution: float | None,
                 prune_layers: bool = False):
        self.table, self.analysis, self.importance, self.resolution = table, analysis, importance, resolution
        self.prune_layers = prune_layers
        self.cost = CostModel(analysis, table.ms, table.correction(analysis))
        self.reference = table.reference(analysis)
        self.rest = self.cost.correction.rest_ms
        self.predicted_original = self.cost.predict_ms(Plan.fold_only(analysis))
        # budgets are fractions of the *measured* folded original where the table has it
        self.original_ms = self.reference["original_ms"] if self.reference else self.predicted_original
        self._problem: _Concatenated | None = None

    @property
    def problem(self) -> "_Concatenated":
        if self._problem is None:
            self._problem = _concatenate(self.analysis, self.cost, self.importance, self.prune_layers)
            _check_coverable(self.analysis, self._problem)
        return self._problem

    def select(self, target_ms: float) -> Plan:
        chosen = _select(self.analysis, self.problem, target_ms - self.rest, self.rest, self.resolution)
        return self.finish(chosen, target_ms)

    def keep_all(self) -> Plan:
        return self.finish(self.cost.merge_where_faster(keep="all"), None)

    def frontier(self, max_ms: float | None) -> list[Plan]:
        points = dp.frontier(self.problem.times, self.problem.importance, self.problem.length,
                             candidates=self.problem.candidates, position_costs=self.problem.position_costs,
                             resolution=self.resolution, max_budget=None if max_ms is None else max_ms - self.rest,
                             options=self.problem.options)
        return [self.finish(_to_plan(self.analysis, self.problem, sel), None) for sel in points]

    def finish(self, chosen: Plan, target_ms: float | None) -> Plan:
        chosen.info.update(_report(self.analysis, self.cost, chosen, self.rest, self.predicted_original,
                                   self.reference is not None, target_ms))
        chosen.info["original_ms"] = self.original_ms
        chosen.info["backend"] = self.table.backend
        return chosen


def plan(model: nn.Module, latency_table: LatencyTable, *, budget: float | None = None,
         budget_ms: float | None = None, importance: Importance | None = None,
         example_inputs: Sequence[torch.Tensor] | None = None, resolution: float | None = None,
         measure_missing: bool = False, analysis: Analysis | None = None, backend: str | None = None,
         verify: bool = False, verify_rounds: int = 3, prune_layers: bool = False, **trace_kwargs: Any) -> Plan:
    """Choose which activations to keep and where to merge, exactly, under a latency budget.

    ``budget`` is a fraction of the BatchNorm-folded original's latency *as measured* on the
    table's backend (its end-to-end reference; the predicted one where the table has no
    reference for this model), ``budget_ms`` an absolute one. Without a budget every activation
    stays and blocks merge only where the table says merging is faster (exact merges only).
    ``importance`` (an :class:`~fxmerge.ImportanceTable`, or a mapping ``(chain, i, j) ->
    score``) scores keeping the activations at positions i and j of a chain with every one
    between them dropped (pairs it lacks may not be chosen); without it every kept position is
    worth 1. ``example_inputs`` defaults to random inputs of the shapes the table was measured
    with. ``resolution`` is the DP's cost grid in ms (default: the budget / 1000). ``backend``,
    when given, is the backend the plan is for: a table measured for another one is refused,
    as is one measured for another dtype or device than ``example_inputs``.

    ``verify=True`` builds the compressed model and times it interleaved with the folded
    original on the table's backend; when it misses the budget the observation corrects the
    cost model (kept in the table, and saved where the table was measured or loaded) and it
    plans again, for at most ``verify_rounds`` rounds (:func:`fxmerge.calibration.verify`).

    ``prune_layers=True`` also lets the DP replace convs inside merged segments by the
    identity (LayerMerge): one exact DP over kept activations, merge boundaries and kept convs,
    whose optimum is never below the depth-only one. The table needs the options' specs
    (``LatencyTable.measure(..., prune_layers=True)``); importance scores them as
    ``(chain, i, j, pruned layers)`` (without it, each pruned conv counts -1).

    The plan records the predicted latencies (``plan.info``; with ``verify``, every round's
    prediction and measurement in ``plan.info["verify"]``) and prints as a report.
    """
    budget, budget_ms = _check_budgets(budget, budget_ms)
    check_count("verify_rounds", verify_rounds, hint="plan-measure-correct rounds, e.g. 3")
    planner, analysis, example_inputs = _planner(model, latency_table, importance, example_inputs, resolution,
                                                 measure_missing, analysis, backend, trace_kwargs, prune_layers)
    if budget is None and budget_ms is None:
        chosen = planner.keep_all()
        if verify:
            from fxmerge.calibration import observe_plans  # measuring plans lives above the planner

            ratio = observe_plans(latency_table, model, example_inputs, analysis, {"plan": chosen}, kind="verify",
                                  **trace_kwargs)["plan"]
            chosen.info["verify"] = [{"round": 1, "predicted_ms": planner.cost.predict_ms(chosen),
                                      "measured_ms": ratio * planner.original_ms, "ratio": ratio}]
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
    from fxmerge.calibration import verify as verified  # measuring plans lives above the planner

    def fresh() -> _Planner:  # the correction re-fits on every observation a round adds
        return _Planner(latency_table, analysis, planner.importance, resolution, prune_layers)

    return verified(lambda aim: fresh().select(aim), lambda p: fresh().cost.predict_ms(p), latency_table, model,
                    example_inputs, analysis, target, rounds=verify_rounds, **trace_kwargs)


def frontier(model: nn.Module, latency_table: LatencyTable, importance: Importance | None = None, *,
             example_inputs: Sequence[torch.Tensor] | None = None, resolution: float | None = None,
             max_budget: float | None = None, points: int | None = None, verify: bool = False,
             analysis: Analysis | None = None, backend: str | None = None, prune_layers: bool = False,
             **trace_kwargs: Any) -> list[Plan]:
    """The Pareto set of plans — for every latency, the most important plan that fits —
    fastest first, from one DP solve. Each plan's ``info`` holds its predicted latency (and
    ``budget_ratio``: predicted over the original). ``max_budget`` (a fraction of the
    original) bounds the slowest point (default: the most important plan); ``points`` keeps
    that many, evenly spread in predicted latency. ``verify=True`` times the returned points
    interleaved with the folded original on the table's backend (``info["measured_ms"]``,
    ``info["measured_ratio"]``) and keeps them as observations; it needs ``points`` (each
    point is a model to build and, on compiled backends, to compile). ``prune_layers`` as in
    :func:`plan`.
    """
    if max_budget is not None:
        max_budget = check_budget("max_budget", max_budget, "a fraction of the original's latency, e.g. 1.0")
    if points is not None:
        check_count("points", points, minimum=2, hint="how many frontier plans to return")
    if verify and points is None:
        raise InvalidArgumentError("frontier(verify=True) measures every returned plan: give points=N (e.g. 6)")
    planner, analysis, example_inputs = _planner(model, latency_table, importance, example_inputs, resolution,
                                                 False, analysis, backend, trace_kwargs, prune_layers)
    plans = planner.frontier(None if max_budget is None else max_budget * planner.original_ms)
    if points is not None and len(plans) > points:
        plans = _spread(plans, points)
    for p in plans:
        p.info["budget_ratio"] = p.info["predicted_ms"]["planned"] / planner.original_ms
    if verify:
        from fxmerge.calibration import observe_plans, save_observations

        ratios = observe_plans(latency_table, model, example_inputs, analysis, {p.fingerprint(): p for p in plans},
                               kind="frontier", **trace_kwargs)
        for p in plans:
            p.info["measured_ratio"] = ratios[p.fingerprint()]
            p.info["measured_ms"] = ratios[p.fingerprint()] * planner.original_ms
        save_observations(latency_table)
    return plans


def _spread(plans: list[Plan], count: int) -> list[Plan]:
    """``count`` plans evenly spread in predicted latency, the fastest and slowest included."""
    lat = [p.info["predicted_ms"]["planned"] for p in plans]
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


def _planner(model, table, importance, example_inputs, resolution, measure_missing, analysis, backend,
             trace_kwargs, prune_layers: bool = False) -> tuple[_Planner, Analysis, tuple]:
    """Arguments checked, the model analysed, the table completed if asked, importance
    extended: the planner for this call."""
    importance = check_importance(importance)
    resolution = check_resolution(resolution)
    if not isinstance(table, LatencyTable):
        raise InvalidArgumentError(f"latency_table must be a fxmerge.LatencyTable (LatencyTable.load(path) reads a "
                                   f"saved one); got {type(table).__name__}")
    if backend is not None:
        check_choice("backend", backend, tuple(BACKENDS))
    given = example_inputs is not None
    example_inputs = check_inputs("example_inputs", example_inputs) if given else _example_inputs(table)
    # Inputs made up from the table match its dtype by construction; their device is not its.
    table.check_environment(example_inputs if given else None, backend=backend)
    check_flag("prune_layers", prune_layers)
    if analysis is None:
        analysis = analyze(model, example_inputs, limits=table.block_limits(), prune_layers=prune_layers, **trace_kwargs)
    elif prune_layers:
        add_prune_options(analysis)
    if measure_missing:
        table.measure_missing(model, example_inputs, analysis=analysis, prune_layers=prune_layers, **trace_kwargs)
    table.require(analysis, prune_layers)
    if importance is not None and hasattr(importance, "extend"):  # an ImportanceTable: extend to every pair
        _check_importance_model(importance, analysis)
        importance = importance.extend(analysis)
    if prune_layers and importance is not None:
        _warn_if_options_unscored(analysis, importance)
    return _Planner(table, analysis, importance, resolution, prune_layers), analysis, example_inputs


def _check_budgets(budget: Any, budget_ms: Any) -> tuple[float | None, float | None]:
    if budget is not None and budget_ms is not None:
        raise InvalidArgumentError("give budget (a fraction of the original's latency) or budget_ms "
                                   "(milliseconds), not both")
    if budget is not None:
        budget = check_budget("budget", budget, "a fraction of the original's latency, e.g. 0.6")
    if budget_ms is not None:
        budget_ms = check_budget("budget_ms", budget_ms, "the end-to-end latency in milliseconds, e.g. 12.5")
    return budget, budget_ms


def _check_importance_model(importance: Any, analysis: Analysis) -> None:
    """An importance table estimated for another model scores other positions: refuse it."""
    made_for = importance.meta.get("model", {}).get("structure")
    here = Plan.fold_only(analysis).fingerprint()
    if made_for is not None and made_for != here:
        raise EnvironmentMismatchError(
            f"the importance table was estimated for another model (structure {made_for}, this model's is {here}); "
            "estimate importance for this model")


def _check_coverable(analysis: Analysis, problem: _Concatenated) -> None:
    """Every chain needs a sequence of scored pairs from its start to its end; name the chain
    and the pairs whose scores are missing when one has none (instead of a bare DP failure)."""
    for chain in analysis.chains:
        off = problem.offsets[chain.index]
        scored = {(i - off, j - off) for i, j in problem.importance if off <= i and j <= off + chain.length}
        reached = {0}
        for j in chain.kept_candidates[1:]:
            if any((i, j) in scored for i in reached):
                reached.add(j)
        if chain.length in reached:
            continue
        points = chain.kept_candidates
        missing = [(chain.index, a, b) for a, b in zip(points[:-1], points[1:]) if (a, b) not in scored]
        shown = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise InvalidArgumentError(
            f"importance has no scores that lead through chain {chain.index} ({chain.name()}): no scored pairs of "
            f"kept activations go from position 0 to {chain.length} (kept activations are possible at "
            f"{', '.join(map(str, points))}). Missing, among others: importance[(chain, i, j)] for {shown}. "
            "Score those pairs (an ImportanceTable from estimate/calibrate has them), or pass importance=None.")


def _example_inputs(table: LatencyTable) -> tuple[torch.Tensor, ...]:
    shapes = {str(r["inputs"]): r["inputs"] for r in table.references.values()}
    shapes = list(shapes.values())
    if len(shapes) != 1:
        raise InvalidArgumentError(f"pass example_inputs=...: the latency table holds {len(shapes)} reference input "
                                   "shapes, not one, so the model's input shape is not known")
    dtype = getattr(torch, table.fingerprint.get("dtype", "float32"))
    return tuple(torch.randn(s, dtype=dtype) for s in shapes[0])


def _select(analysis: Analysis, problem: _Concatenated, budget: float, rest: float, resolution: float | None) -> Plan:
    try:
        sel = dp.select(problem.times, problem.importance, problem.length, budget, candidates=problem.candidates,
                        position_costs=problem.position_costs, resolution=resolution, options=problem.options)
    except dp.InfeasibleBudget as exc:
        smallest = exc.smallest + rest
        raise InfeasibleBudgetError(
            f"no plan fits {exc.budget + rest:.4g} ms; the smallest feasible budget is {smallest:.4g} ms "
            f"(predicted end-to-end). Raise the budget.{_hint(analysis, problem, smallest, rest)}", smallest) from None
    except dp.InvalidInput as exc:  # what the argument checks above did not already refuse
        raise InvalidArgumentError(str(exc)) from None
    return _to_plan(analysis, problem, sel)


def _to_plan(analysis: Analysis, problem: _Concatenated, sel: dp.Selection) -> Plan:
    choice, pruned = {}, {}
    for chain in analysis.chains:
        kept = [p for p in problem.local(chain, sel.kept) if p in chain.droppable]
        choice[chain.index] = (kept, problem.local(chain, sel.boundaries))
        off = problem.offsets[chain.index]
        pruned[chain.index] = [p for i, j, k in sel.options if off <= i and j <= off + chain.length
                               for p in problem.pruned[(i, j)][k]]
    chosen = Plan.from_positions(analysis, choice, pruned=pruned)
    chosen.info["importance"] = sel.importance  # the DP's objective: summed importance of kept pairs
    return chosen


def _hint(analysis: Analysis, problem: _Concatenated, smallest: float, rest: float) -> str:
    original = rest + sum(problem.times[(problem.offsets[c.index] + p - 1, problem.offsets[c.index] + p)]
                          for c in analysis.chains for p in range(1, c.length + 1))
    if smallest >= 0.95 * original:
        return (" On this hardware and backend merging barely pays for this model: the table says the merged "
                "convs cost about what the layers they replace do.")
    return ""


def probe_plans(analysis: Analysis, cost: CostModel, fractions: Sequence[float]) -> dict[str, Plan]:
    """Plans the DP picks with uniform importance at ``fractions`` of the original's summed
    terms (no rest, no correction): what references should look like, because they are what
    the DP picks. Infeasible fractions are left out."""
    if not any(j - i > 1 for c in analysis.chains for i, j in c.valid_blocks):
        return {}
    problem = _concatenate(analysis, cost, None)
    full = cost.terms_ms(Plan.fold_only(analysis))
    out = {}
    for fraction in fractions:
        try:
            out[f"dp-{fraction:g}"] = _select(analysis, problem, fraction * full, 0.0, None)
        except InfeasibleBudgetError:
            continue
    return out


def _report(analysis: Analysis, cost: CostModel, plan: Plan, rest: float, original: float, end_to_end: bool,
            budget_ms: float | None) -> dict:
    rows = []
    for ci, a, b, cp, ms in cost.segment_rows(plan):
        pruned = [p for p in cp.pruned if a < p <= b]
        if b - a > 1 or pruned:
            spec = pruned_spec(analysis.chains[ci], a, b, pruned)
            rows.append({"chain": ci, "block": [a, b], "layers": cp.block_name(a, b).split(" = ")[1],
                         "replaces": b - a, "kernel": "x".join(map(str, spec.kernel)) if spec else "identity",
                         "groups": spec.groups if spec else "-", "ms": ms,
                         "pruned": [cp.layers[p - 1][0] for p in pruned]})
    planned = rest + cost.terms_ms(plan)
    return {"predicted_ms": {"original": original, "planned": planned}, "budget_ms": budget_ms,
            "end_to_end": end_to_end, "merged": rows}

