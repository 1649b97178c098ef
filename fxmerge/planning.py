"""From a measured latency table (and importance, where the user has it) to a :class:`Plan`:
one exact DP over all chains of the model, concatenated with forced breaks between them."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge.api import analyze
from fxmerge.cost import CostModel
from fxmerge.errors import EnvironmentMismatchError, FxMergeError, InvalidArgumentError
from fxmerge.latency import LatencyTable
from fxmerge.passes import dp
from fxmerge.passes.analysis import Analysis, Chain
from fxmerge.plans import Plan, cheapest_cover
from fxmerge.timing import BACKENDS
from fxmerge.validation import check_budget, check_choice, check_importance, check_inputs, check_resolution

log = logging.getLogger("fxmerge")

Importance = Mapping[tuple[int, int, int], float]  # (chain index, i, j) -> score


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

    def local(self, chain: Chain, positions: Sequence[int]) -> list[int]:
        off = self.offsets[chain.index]
        return [p - off for p in positions if off < p < off + chain.length]


def _concatenate(analysis: Analysis, cost: CostModel, importance: Importance | None) -> _Concatenated:
    offsets, total = [], 0
    for chain in analysis.chains:
        offsets.append(total)
        total += chain.length
    times, imp, candidates, position_costs = {}, {}, [], {}
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
        if chain.index < len(analysis.chains) - 1:
            candidates.append(off + chain.length)  # chain junctions always act as kept
            position_costs[off + chain.length] = 0.0
    return _Concatenated(offsets, total, times, imp, sorted(set(candidates)), position_costs)


def plan(model: nn.Module, latency_table: LatencyTable, *, budget: float | None = None,
         budget_ms: float | None = None, importance: Importance | None = None,
         example_inputs: Sequence[torch.Tensor] | None = None, resolution: float | None = None,
         measure_missing: bool = False, analysis: Analysis | None = None, backend: str | None = None,
         **trace_kwargs: Any) -> Plan:
    """Choose which activations to keep and where to merge, exactly, under a latency budget.

    ``budget`` is a fraction of the BatchNorm-folded original's predicted latency, ``budget_ms``
    an absolute one. Without a budget every activation stays and blocks merge only where the
    table says merging is faster. ``importance`` (an :class:`~fxmerge.ImportanceTable`, or a
    mapping ``(chain, i, j) -> score``) scores keeping the activations at positions i and j of a
    chain with every one between them dropped (pairs it lacks may not be chosen); without it
    every kept activation is worth 1. ``example_inputs`` defaults to random inputs of the shapes
    the table was measured with. ``resolution`` is the DP's cost grid in ms (default: the
    budget / 1000). ``backend``, when given, is the backend the plan is for: a table measured
    for another one is refused, as is one measured for another dtype or device than
    ``example_inputs``.

    The plan records the predicted latencies (``plan.info``) and prints as a report.
    """
    budget, budget_ms = _check_budgets(budget, budget_ms)
    importance = check_importance(importance)
    resolution = check_resolution(resolution)
    if not isinstance(latency_table, LatencyTable):
        raise InvalidArgumentError(f"latency_table must be a fxmerge.LatencyTable (LatencyTable.load(path) reads a "
                                   f"saved one); got {type(latency_table).__name__}")
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    given = example_inputs is not None
    example_inputs = check_inputs("example_inputs", example_inputs) if given else _example_inputs(latency_table)
    # Inputs made up from the table match its dtype by construction; their device is not its.
    latency_table.check_environment(example_inputs if given else None, backend=backend)
    if analysis is None:
        analysis = analyze(model, example_inputs, limits=latency_table.block_limits(), **trace_kwargs)
    if measure_missing:
        latency_table.measure_missing(model, example_inputs, analysis=analysis, **trace_kwargs)
    latency_table.require(analysis)
    cost = CostModel(analysis, latency_table.ms, latency_table.overhead_ms(analysis))
    reference = latency_table.reference(analysis)
    rest = reference["rest_ms"] if reference else 0.0
    original = rest + cost.terms_ms(Plan.fold_only(analysis))
    if budget is None and budget_ms is None:
        chosen, target = _keep_all_merge_where_faster(analysis, cost), None
    else:
        if importance is None:
            log.info("fxmerge: no importance given, every kept activation counts 1; "
                     "real importance needs data (ImportanceTable)")
        elif hasattr(importance, "extend"):  # an ImportanceTable: extend its entries to every pair
            _check_importance_model(importance, analysis)
            importance = importance.extend(analysis)
        target = budget * original if budget is not None else budget_ms
        problem = _concatenate(analysis, cost, importance)
        _check_coverable(analysis, problem)
        chosen = _select(analysis, problem, target - rest, rest, resolution)
    chosen.info.update(_report(analysis, cost, chosen, rest, original, reference is not None, target))
    return chosen


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
    shapes = [r["inputs"] for r in table.references.values()]
    if len(shapes) != 1:
        raise InvalidArgumentError(f"pass example_inputs=...: the latency table holds {len(shapes)} reference input "
                                   "shapes, not one, so the model's input shape is not known")
    dtype = getattr(torch, table.fingerprint.get("dtype", "float32"))
    return tuple(torch.randn(s, dtype=dtype) for s in shapes[0])


def _keep_all_merge_where_faster(analysis: Analysis, cost: CostModel) -> Plan:
    choice = {}
    for chain in analysis.chains:
        times = {(i, j): cost.block_ms(chain, i, j) for i, j in chain.valid_blocks}
        fixed = [*chain.droppable, *chain.breaks, *chain.borders]  # exact merges only
        choice[chain.index] = (chain.droppable, cheapest_cover(chain, fixed, times))
    return Plan.from_positions(analysis, choice)


def _select(analysis: Analysis, problem: _Concatenated, budget: float, rest: float, resolution: float | None) -> Plan:
    try:
        sel = dp.select(problem.times, problem.importance, problem.length, budget, candidates=problem.candidates,
                        position_costs=problem.position_costs, resolution=resolution)
    except dp.InfeasibleBudget as exc:
        smallest = exc.smallest + rest
        raise InfeasibleBudgetError(
            f"no plan fits {exc.budget + rest:.4g} ms; the smallest feasible budget is {smallest:.4g} ms "
            f"(predicted end-to-end). Raise the budget.{_hint(analysis, problem, smallest, rest)}", smallest) from None
    except dp.InvalidInput as exc:  # what the argument checks above did not already refuse
        raise InvalidArgumentError(str(exc)) from None
    choice = {}
    for chain in analysis.chains:
        kept = [p for p in problem.local(chain, sel.kept) if p in chain.droppable]
        choice[chain.index] = (kept, problem.local(chain, sel.boundaries))
    return Plan.from_positions(analysis, choice)


def _hint(analysis: Analysis, problem: _Concatenated, smallest: float, rest: float) -> str:
    original = rest + sum(problem.times[(problem.offsets[c.index] + p - 1, problem.offsets[c.index] + p)]
                          for c in analysis.chains for p in range(1, c.length + 1))
    if smallest >= 0.95 * original:
        return (" On this hardware and backend merging barely pays for this model: the table says the merged "
                "convs cost about what the layers they replace do.")
    return ""


def probe_plan(analysis: Analysis, cost: CostModel) -> Plan | None:
    """A plan with far fewer ops than the original (uniform importance, 60 % of its predicted
    chain latency), used to calibrate the cost model; None when nothing can merge."""
    if not any(j - i > 1 for c in analysis.chains for i, j in c.valid_blocks):
        return None
    problem = _concatenate(analysis, cost, None)
    full = cost.terms_ms(Plan.fold_only(analysis))
    for fraction in (0.6, 0.8, 1.0):
        try:
            return _select(analysis, problem, fraction * full, 0.0, None)
        except InfeasibleBudgetError:
            continue
    return None


def _report(analysis: Analysis, cost: CostModel, plan: Plan, rest: float, original: float, end_to_end: bool,
            budget_ms: float | None) -> dict:
    rows = []
    for ci, a, b, cp, ms in cost.segment_rows(plan):
        if b - a > 1:
            spec = analysis.chains[ci].specs[(a, b)]
            rows.append({"chain": ci, "block": [a, b], "layers": cp.block_name(a, b).split(" = ")[1],
                         "replaces": b - a, "kernel": "x".join(map(str, spec.kernel)), "groups": spec.groups,
                         "ms": ms})
    planned = rest + cost.terms_ms(plan)
    return {"predicted_ms": {"original": original, "planned": planned}, "budget_ms": budget_ms,
            "end_to_end": end_to_end, "merged": rows}

