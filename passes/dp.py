"""The DP pass: pure functions over plain mappings, importing nothing from torch (only numpy),
so they run on any published latency table; the file also loads on its own, without fxmerge.

Positions are integers 0..L; a block ``(i, j)`` is layers i+1..j merged into one convolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

Block = tuple[int, int]

# Stage 2 keeps two (positions x grid cells) arrays; this many cells per position (1000 times the
# default grid of budget / 1000) is ~1.3 GB for a 40-position model and a second or two of work.
MAX_GRID_UNITS = 2_000_000


class InvalidInput(ValueError):
    """An input of the DP is not usable (a non-finite number, a grid too fine, no cover)."""


class GridTooFine(InvalidInput):
    """``budget / resolution`` exceeds :data:`MAX_GRID_UNITS`."""


class NoCover(InvalidInput):
    """No sequence of allowed pairs leads from position 0 to the end."""


def _finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a finite number; got {value!r}") from None
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number; got {value!r}")
    return value


def check_grid(budget: float, resolution: float) -> None:
    """Raise :class:`GridTooFine` when ``budget`` on a ``resolution`` grid needs more than
    :data:`MAX_GRID_UNITS` cells; the message names a resolution that would do."""
    if resolution <= 0 or not math.isfinite(resolution):
        raise InvalidInput(f"resolution must be a finite number > 0; got {resolution!r}")
    units = budget / resolution
    if units > MAX_GRID_UNITS:
        raise GridTooFine(
            f"resolution={resolution:g} ms puts the budget of {budget:.6g} ms on {units:.3g} grid cells, more than "
            f"the DP's limit of {MAX_GRID_UNITS:,} (memory grows with it); use resolution >= "
            f"{_round_up(budget / MAX_GRID_UNITS):g} ms, or resolution=None for budget / 1000")


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits (a resolution to suggest)."""
    scale = 10 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / scale - 1e-9) * scale


def optimal_merge_times(times: Mapping[Block, float]) -> tuple[dict[Block, float], dict[Block, tuple[int, ...]]]:
    """Stage 1: the cheapest way to cover every pair ``(i, j)`` with valid blocks.

    ``times`` maps each valid block to its latency. Returns ``topt[(i, j)]``, the least total
    latency of a cover of (i, j] by valid blocks, and ``breaks[(i, j)] = (i, ..., j)``, the
    boundaries of that cover. Ties go to the unsplit block, then to the smallest start of the
    last block (the published tables' convention).
    """
    ends: dict[int, list[int]] = {}
    for i, j in times:
        ends.setdefault(j, []).append(i)
    starts = sorted({i for i, _ in times})
    topt: dict[Block, float] = {}
    breaks: dict[Block, tuple[int, ...]] = {}
    last = max((j for _, j in times), default=0)
    for i in starts:
        for j in range(i + 1, last + 1):
            best, best_breaks = times.get((i, j)), (i, j)
            for k in sorted(ends.get(j, ())):
                if k <= i or (i, k) not in topt:
                    continue
                cost = topt[(i, k)] + times[(k, j)]
                if best is None or cost < best:
                    best, best_breaks = cost, breaks[(i, k)] + (j,)
            if best is not None:
                topt[(i, j)], breaks[(i, j)] = best, best_breaks
    return topt, breaks


# --------------------------------------------------------------------------- stage 2


class InfeasibleBudget(ValueError):
    """No selection fits the budget; ``smallest`` is the least budget that has one."""

    def __init__(self, budget: float, smallest: float):
        self.budget, self.smallest = budget, smallest
        super().__init__(f"no selection fits the budget {budget:.6g}; the smallest feasible budget is "
                         f"{smallest:.6g} (every segment's cost rounded up to the resolution)")


@dataclass(frozen=True)
class Selection:
    """One solution: kept positions (interior), merge boundaries (interior, ⊇ kept), its
    latency (the unrounded sum of segment and kept-position costs) and its importance.
    ``options`` names each segment (i, j] that took an alternative from ``options`` instead
    of its cheapest cover: ``(i, j, index into options[(i, j)])``."""

    kept: tuple[int, ...]
    boundaries: tuple[int, ...]
    latency: float
    importance: float
    options: tuple[tuple[int, int, int], ...] = ()


class _Problem:
    """Stage-2 inputs on an integer cost grid, shared by :func:`select` and :func:`frontier`.

    ``pairs`` are the ways to fill one segment between consecutive kept positions, ordered by
    end, then start: ``(i, j, cost, importance, option)``, option -1 for the cheapest cover
    of valid blocks, k >= 0 for ``options[(i, j)][k]``."""

    def __init__(self, times, importance, length, candidates, position_costs, options=None):
        self.topt, self.breaks = optimal_merge_times(times)
        self.length = length
        inner = range(1, length) if candidates is None else sorted(set(candidates))
        self.points = [0] + [p for p in inner if 0 < p < length] + [length]
        costs = position_costs or {}
        options = options or {}
        # A segment (i, j] between consecutive kept positions costs its cheapest cover (or an
        # option's own cost) plus the cost of keeping j (0 and `length` act as kept, cost nothing).
        self.pairs: list[tuple[int, int, float, float, int]] = []
        for jx, j in enumerate(self.points):
            keep_j = costs.get(j, 0.0) if j != length else 0.0
            for i in self.points[:jx]:
                if (i, j) in self.topt and (i, j) in importance:
                    score = _finite(f"importance[{(i, j)}]", importance[(i, j)])
                    self.pairs.append((i, j, _finite(f"the cost of segment {(i, j)}", self.topt[(i, j)] + keep_j),
                                       score, -1))
                for k, (cost, score) in enumerate(options.get((i, j), ())):
                    self.pairs.append((i, j, _finite(f"the cost of option {k} of segment {(i, j)}", cost + keep_j),
                                       _finite(f"the importance of option {k} of segment {(i, j)}", score), k))

    def discretise(self, resolution: float | None, scale: float) -> None:
        """Put every segment cost on the grid, rounded up (default grid: scale / 1000)."""
        if resolution is None:
            scale = scale if scale > 0 else max((c for _, _, c, _, _ in self.pairs), default=1.0)
            resolution = scale / 1000 or 1.0
        check_grid(scale, resolution)
        self.resolution = resolution
        self.unit = [math.ceil(c / self.resolution - 1e-9) for _, _, c, _, _ in self.pairs]
        position = {p: k for k, p in enumerate(self.points)}
        grouped: dict[int, list[int]] = {}
        for e, (_, j, _, _, _) in enumerate(self.pairs):
            grouped.setdefault(j, []).append(e)
        self.by_end = [(j, (np.array([position[self.pairs[e][0]] for e in g]), np.array([self.unit[e] for e in g]),
                            np.array([self.pairs[e][3] for e in g], dtype=float), np.array(g)))
                       for j, g in sorted(grouped.items())]

    def solve(self, budget_units: int):
        """D[p][t]: best importance of a kept chain 0..p with rounded cost <= t, and parents.

        Vectorised over the budget axis and over all starts of a segment ending at p: one
        (starts x budgets) array per end. Near-ties (1e-9) go to the smallest start.
        """
        idx = {p: k for k, p in enumerate(self.points)}
        width = budget_units + 1
        best = np.full((len(self.points), width), -np.inf)
        parent = np.full((len(self.points), width), -1, dtype=np.int64)
        best[0, :] = 0.0
        budgets = np.arange(width)
        for j, group in self.by_end:  # ends in increasing order, so every D[i] is final
            starts, units, scores, entries = group
            source = budgets[None, :] - units[:, None]
            values = np.where(source >= 0, best[starts[:, None], np.maximum(source, 0)], -np.inf) + scores[:, None]
            pick = np.argmax(np.round(values, 9), axis=0)
            row = values[pick, budgets]
            best[idx[j]] = row
            parent[idx[j]] = np.where(np.isfinite(row), entries[pick], -1)
        return best[idx[self.length]], parent, idx

    def backtrack(self, parent, idx, t: int) -> Selection:
        kept, p, boundaries, chosen = [], self.length, set(), []
        latency = importance = 0.0
        while p != 0:
            e = int(parent[idx[p], t])
            i, _, c, imp, option = self.pairs[e]
            latency, importance = latency + c, importance + imp
            if option < 0:
                boundaries.update(self.breaks[(i, p)])
            else:  # an option fills its segment as one unit
                boundaries.update((i, p))
                chosen.append((i, p, option))
            t -= self.unit[e]
            if i != 0:
                kept.append(i)
            p = i
        return Selection(tuple(sorted(kept)), tuple(sorted(boundaries - {0, self.length})), latency, importance,
                         tuple(sorted(chosen)))

    def best_unconstrained_latency(self) -> float:
        """Latency of the most important selection (ties: the cheaper one), ignoring budgets."""
        best: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}
        for i, j, c, imp, _ in self.pairs:
            if i not in best:
                continue
            cand = (best[i][0] + imp, best[i][1] + c)
            old = best.get(j)
            if old is None or cand[0] > old[0] + _TOL * (1 + abs(old[0])) or (
                    abs(cand[0] - old[0]) <= _TOL * (1 + abs(old[0])) and cand[1] < old[1]):
                best[j] = cand
        if self.length not in best:
            raise self.no_cover(best)
        return best[self.length][1]

    def no_cover(self, reached: Iterable[int]) -> NoCover:
        last = max(p for p in reached if p != self.length)
        return NoCover(f"no chain of allowed pairs covers positions 0..{self.length}: from position 0 the allowed "
                       f"pairs reach position {last} at most; allow a pair (i, j) with i <= {last} < j "
                       "(give it an importance and valid blocks covering it)")

    def cheapest_units(self) -> int | None:
        """The least rounded cost of any complete selection (None if there is none)."""
        least = {0: 0}
        for e, (i, j, _, _, _) in enumerate(self.pairs):
            if i in least:
                cand = least[i] + self.unit[e]
                if cand < least.get(j, cand + 1):
                    least[j] = cand
        return least.get(self.length)

    def dearest_cost(self) -> float | None:
        """The greatest unrounded cost of any complete selection (None if there is none): a
        budget above it buys nothing more, so the grid never needs to reach past it."""
        most = {0: 0.0}
        for i, j, c, _, _ in self.pairs:  # ordered by end: every start is final when used
            if i in most:
                most[j] = max(most.get(j, -math.inf), most[i] + c)
        return most.get(self.length)

    def dearest_units(self) -> int:
        """The greatest rounded cost of any complete selection (one exists)."""
        most = {0: 0}
        for e, (i, j, _, _, _) in enumerate(self.pairs):
            if i in most:
                most[j] = max(most.get(j, -1), most[i] + self.unit[e])
        return most[self.length]

    def reachable(self) -> set[int]:
        """Positions some sequence of allowed pairs leads to from 0."""
        seen = {0}
        for i, j, _, _, _ in self.pairs:  # pairs are ordered by their end, so one pass suffices
            if i in seen:
                seen.add(j)
        return seen


_TOL = 1e-9


Options = Mapping[Block, Sequence[tuple[float, float]]]


def select(times: Mapping[Block, float], importance: Mapping[Block, float], length: int, budget: float, *,
           candidates: Iterable[int] | None = None, position_costs: Mapping[int, float] | None = None,
           resolution: float | None = None, options: Options | None = None) -> Selection:
    """Stage 2: which positions keep their activation, under a latency budget.

    Maximises the summed ``importance[(i, j)]`` of consecutive kept positions (0 and
    ``length`` always act as kept; only ``candidates`` may be kept, default all; a pair absent
    from ``importance`` may not be consecutive) subject to the summed cheapest-cover latency of
    the segments plus ``position_costs`` of kept positions, each segment's cost rounded *up* to
    ``resolution`` (default budget / 1000), being at most ``budget``. ``options[(i, j)]`` are
    alternatives to the cover for a segment between consecutive kept positions, each a
    ``(latency, importance)`` pair that fills the whole segment as one unit (LayerMerge's pruned
    blocks); with them the DP is exact over covers and options alike. Exactly optimal, ties to
    the lower latency, when the costs lie on the resolution grid; never over budget. Raises
    :class:`InfeasibleBudget` with the smallest feasible budget, :class:`NoCover` when no
    sequence of allowed pairs covers 0..length, :class:`GridTooFine` when the budget (or the
    dearest selection, if that is less) spans more than :data:`MAX_GRID_UNITS` grid cells.
    """
    budget = _finite("budget", budget)
    problem = _Problem(times, importance, length, candidates, position_costs, options)
    dearest = problem.dearest_cost()
    if dearest is None:
        raise problem.no_cover(problem.reachable())
    problem.discretise(resolution, min(budget, dearest))  # the grid spans only budgets that matter
    units = min(math.floor(budget / problem.resolution + 1e-9), problem.dearest_units())
    least = problem.cheapest_units()
    if least > units:
        raise InfeasibleBudget(budget, least * problem.resolution)
    best, parent, idx = problem.solve(units)
    top = best[units]
    t = int(np.argmax(best >= top - _TOL * (1.0 + abs(top))))  # least budget reaching the optimum
    return problem.backtrack(parent, idx, t)


def frontier(times: Mapping[Block, float], importance: Mapping[Block, float], length: int, *,
             candidates: Iterable[int] | None = None, position_costs: Mapping[int, float] | None = None,
             resolution: float | None = None, max_budget: float | None = None,
             options: Options | None = None) -> list[Selection]:
    """The Pareto frontier of (latency, importance) from one vectorised solve: for every
    budget up to ``max_budget`` (default: the latency of the best unconstrained selection),
    the selection :func:`select` would return, without repeats, cheapest first."""
    problem = _Problem(times, importance, length, candidates, position_costs, options)
    if max_budget is None:
        max_budget = problem.best_unconstrained_latency()
    max_budget = min(_finite("max_budget", max_budget), problem.dearest_cost())  # not None: a cover exists
    problem.discretise(resolution, max_budget)
    # slack of one unit per segment, so the unconstrained optimum survives the rounding up
    units = math.ceil(max_budget / problem.resolution - 1e-9) + len(problem.points)
    best, parent, idx = problem.solve(units)
    points, last = [], -np.inf
    for t in np.flatnonzero(np.isfinite(best)):
        if best[t] > last + _TOL * (1.0 + abs(last if np.isfinite(last) else 0.0)):
            points.append(problem.backtrack(parent, idx, int(t)))
            last = best[t]
    return points
