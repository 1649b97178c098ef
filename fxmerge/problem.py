"""The planning problem: every chain of a model laid end to end on one axis of positions, priced
by the cost model and scored by importance, as the pure DP (:mod:`fxmerge.passes.dp`) takes it;
and the DP's selections turned back into :class:`~fxmerge.Plan` s.

Both the planner (``fxmerge.plan``) and the latency table (which times the DP's own picks as
its end-to-end references, :func:`probe_plans`) build their plans here.

>>> from fxmerge.cost import CostModel
>>> cost = CostModel(analysis, table.ms)
>>> problem = build_problem(analysis, cost, importance=None)
>>> plan, importance = select_plan(analysis, problem, budget_ms=cost.terms_ms(fxmerge.Plan.fold_only(analysis)), rest_ms=0)
>>> plan.num_convs <= analysis.num_layers
True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from fxmerge.cost import CostModel
from fxmerge.errors import InfeasibleBudgetError, InvalidArgumentError
from fxmerge.passes import dp
from fxmerge.plans import Plan
from fxmerge.records import Analysis, Chain, ImportanceKey

Importance = Mapping[tuple, float]  # ImportanceKey (a plain tuple) -> score


@dataclass
class Problem:
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


def build_problem(analysis: Analysis, cost: CostModel, importance: Importance | None,
                  prune_layers: bool = False) -> Problem:
    """The DP's inputs for ``analysis``: block times from ``cost``, pair scores from
    ``importance`` (None: every kept segment worth 1), pruning options when asked."""
    offsets, total = [], 0
    for chain in analysis.chains:
        offsets.append(total)
        total += chain.length
    problem = Problem(offsets, total, {}, {}, [], {}, {}, {})
    for chain, off in zip(analysis.chains, offsets):
        _add_chain(problem, chain, off, cost, importance, prune_layers)
        if chain.index < len(analysis.chains) - 1:
            problem.candidates.append(off + chain.length)  # chain junctions always act as kept
            problem.position_costs[off + chain.length] = 0.0
    problem.candidates = sorted(set(problem.candidates))
    return problem


def _add_chain(problem: Problem, chain: Chain, off: int, cost: CostModel, importance: Importance | None,
               prune_layers: bool) -> None:
    for i, j in chain.valid_blocks:
        problem.times[(off + i, off + j)] = cost.block_ms(chain, i, j)
    acts = cost.activation_ms(chain)
    forced, points = chain.forced, chain.kept_candidates
    for p in points[1:-1]:
        problem.candidates.append(off + p)
        problem.position_costs[off + p] = acts.get(p, 0.0)
    for a in range(len(points)):
        for b in range(a + 1, len(points)):
            i, j = points[a], points[b]
            if any(i < f < j for f in forced):
                break  # a forced activation cannot be dropped
            score = 1.0 if importance is None else importance.get(ImportanceKey(chain.index, i, j))
            if score is not None:
                problem.importance[(off + i, off + j)] = float(score)
            for option in chain.options.get((i, j), []) if prune_layers else []:
                score = uniform_option_score(option.pruned) if importance is None else \
                    importance.get(ImportanceKey(chain.index, i, j, option.pruned))
                if score is not None:
                    problem.options.setdefault((off + i, off + j), []).append(
                        (cost.pruned_ms(chain, i, j, option.pruned), float(score)))
                    problem.pruned.setdefault((off + i, off + j), []).append(option.pruned)


def check_coverable(analysis: Analysis, problem: Problem) -> None:
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


def select_plan(analysis: Analysis, problem: Problem, budget_ms: float, rest_ms: float,
                resolution: float | None = None) -> tuple[Plan, float]:
    """The most important plan whose predicted latency (chains' terms + ``rest_ms``) fits
    ``budget_ms``, and its summed importance; :class:`~fxmerge.InfeasibleBudgetError` names the
    smallest feasible budget."""
    try:
        sel = dp.select(problem.times, problem.importance, problem.length, budget_ms - rest_ms,
                        candidates=problem.candidates, position_costs=problem.position_costs, resolution=resolution,
                        options=problem.options)
    except dp.InfeasibleBudget as exc:
        raise _infeasible(analysis, problem, exc, rest_ms, resolution) from None
    except dp.InvalidInput as exc:  # what the argument checks before did not already refuse
        raise InvalidArgumentError(str(exc)) from None
    return plan_from_selection(analysis, problem, sel), sel.importance


def frontier_plans(analysis: Analysis, problem: Problem, max_ms: float | None, rest_ms: float,
                   resolution: float | None = None) -> list[tuple[Plan, float]]:
    """The Pareto set of ``(plan, summed importance)``, fastest first, from one DP solve."""
    points = dp.frontier(problem.times, problem.importance, problem.length, candidates=problem.candidates,
                         position_costs=problem.position_costs, resolution=resolution,
                         max_budget=None if max_ms is None else max_ms - rest_ms, options=problem.options)
    return [(plan_from_selection(analysis, problem, sel), sel.importance) for sel in points]


def plan_from_selection(analysis: Analysis, problem: Problem, sel: dp.Selection) -> Plan:
    choice, pruned = {}, {}
    for chain in analysis.chains:
        kept = [p for p in problem.local(chain, sel.kept) if p in chain.droppable]
        choice[chain.index] = (kept, problem.local(chain, sel.boundaries))
        off = problem.offsets[chain.index]
        pruned[chain.index] = [p for i, j, k in sel.options if off <= i and j <= off + chain.length
                               for p in problem.pruned[(i, j)][k]]
    return Plan.from_positions(analysis, choice, pruned=pruned)


def _infeasible(analysis: Analysis, problem: Problem, exc: dp.InfeasibleBudget, rest_ms: float,
                resolution: float | None) -> InfeasibleBudgetError:
    """The error for a budget no plan fits, naming its cause: a ``resolution`` so coarse that
    rounding each segment's cost up to it is what makes the budget infeasible, or a table in
    which merging barely pays (for this model at its input shape)."""
    budget, smallest = exc.budget + rest_ms, exc.smallest + rest_ms
    fine = None if resolution is None else _smallest_on_default_grid(problem, exc.budget)
    if fine is not None and (fine is True or fine + rest_ms < 0.99 * smallest):
        there = ("fits this budget" if fine is True else
                 f"makes the smallest feasible budget {fine + rest_ms:.4g} ms")
        return InfeasibleBudgetError(
            f"no plan fits {budget:.4g} ms at resolution={resolution:g} ms: the DP rounds each segment's cost up to "
            f"a multiple of the resolution, so there the smallest feasible budget is {smallest:.4g} ms, while the "
            f"default grid (resolution=None: budget / 1000) {there}. Pass a finer resolution (e.g. "
            f"{budget / 1000:.2g}) or resolution=None.", smallest if fine is True else fine + rest_ms)
    return InfeasibleBudgetError(
        f"no plan fits {budget:.4g} ms; the smallest feasible budget is {smallest:.4g} ms (predicted end-to-end). "
        f"Raise the budget.{_hint(analysis, problem, smallest, rest_ms)}", smallest)


def _smallest_on_default_grid(problem: Problem, budget: float) -> float | bool:
    """The smallest feasible budget (without the rest) on the DP's default grid, or True when
    ``budget`` fits there."""
    try:
        dp.select(problem.times, problem.importance, problem.length, budget, candidates=problem.candidates,
                  position_costs=problem.position_costs, options=problem.options)
    except dp.InfeasibleBudget as exc:
        return exc.smallest
    return True


def _hint(analysis: Analysis, problem: Problem, smallest: float, rest: float) -> str:
    original = rest + sum(problem.times[(problem.offsets[c.index] + p - 1, problem.offsets[c.index] + p)]
                          for c in analysis.chains for p in range(1, c.length + 1))
    if smallest >= 0.95 * original:
        shapes = " and ".join("x".join(map(str, x["shape"])) for x in analysis.inputs) or "its input shape"
        return (f" On this hardware and backend, for this model at input {shapes}, merging barely pays: the table "
                "says the merged convs cost about what the layers they replace do (at small inputs per-conv overheads "
                "can dominate: a table for the input size the model is deployed at may differ).")
    return ""


def probe_plans(analysis: Analysis, cost: CostModel, fractions: Sequence[float]) -> dict[str, Plan]:
    """Plans the DP picks with uniform importance at ``fractions`` of the original's summed
    terms (no rest, no correction): what references should look like, because they are what
    the DP picks. With ``prune_layers`` analyses, the DP may prune too. Infeasible fractions
    are left out."""
    if not any(j - i > 1 for c in analysis.chains for i, j in c.valid_blocks):
        return {}
    problem = build_problem(analysis, cost, None, analysis.prune_layers)
    full = cost.terms_ms(Plan.fold_only(analysis))
    out = {}
    for fraction in fractions:
        try:
            out[f"dp-{fraction:g}"] = select_plan(analysis, problem, fraction * full, 0.0)[0]
        except InfeasibleBudgetError:
            continue
    return out
