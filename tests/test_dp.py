"""The DP pass against the published tables and against exhaustive search."""
from __future__ import annotations

import ast
import csv
import itertools
import random
from pathlib import Path

import pytest

from fxmerge.passes import dp

TABLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "kim2023_tables"


def _published():
    if not TABLES.exists():
        pytest.skip("shared/ reference tables not beside the checkout")
    for folder in sorted(TABLES.iterdir()):
        if folder.is_dir():
            time_csv = next(folder.glob("time_*.csv"))
            opt_csv = next(folder.glob("opt_time_*.csv"))
            yield folder.name, list(csv.DictReader(time_csv.open())), list(csv.DictReader(opt_csv.open()))


def test_stage1_reproduces_every_published_opt_time_table():
    seen = 0
    for name, time_rows, opt_rows in _published():
        times = {(int(r["st"]), int(r["end"])): float(r["time"]) for r in time_rows}
        topt, breaks = dp.optimal_merge_times(times)
        assert len(opt_rows) == len(time_rows)
        for r in opt_rows:
            key = (int(r["st"]), int(r["end"]))
            assert abs(topt[key] - float(r["time"])) <= 1e-9, (name, key)
            assert breaks[key] == tuple(int(b) for b in r["breaks"].split(",")), (name, key)
        seen += 1
    assert seen == 3


def test_dp_module_imports_nothing_from_torch():
    source = Path(dp.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "math", "dataclasses", "typing", "numpy"}


# --------------------------------------------------------------------------- brute force


def _random_instance(rng: random.Random):
    length = rng.randint(2, 14)
    # skip-like constraints: blocks must nest with these spans or avoid them
    spans = []
    for _ in range(rng.randint(0, 3)):
        s = rng.randint(0, length - 2)
        spans.append((s, rng.randint(s + 2, min(length, s + 4))))
    breaks = set(rng.sample(range(1, length), rng.randint(0, min(2, length - 1))))
    max_len = rng.randint(2, 6)
    times = {}
    for i in range(length):
        for j in range(i + 1, length + 1):
            ok = j - i == 1 or (
                j - i <= max_len and not any(i < b < j for b in breaks)
                and all(not (i < s < j < t) and not (s < i < t < j) for s, t in spans))
            if ok:
                times[(i, j)] = rng.randint(1, 12) * 0.5  # on a 0.5 grid
    candidates = sorted(rng.sample(range(1, length), rng.randint(0, length - 1)))
    importance = {}
    points = [0] + candidates + [length]
    for a, b in itertools.combinations(points, 2):
        if rng.random() < 0.9:
            importance[(a, b)] = round(rng.uniform(-1, 3), 2)
    position_costs = {p: rng.randint(0, 2) * 0.5 for p in candidates}
    return length, times, importance, candidates, position_costs


def _brute_force(length, times, importance, candidates, position_costs, budget):
    """Every kept subset, every cover of every segment: the best (importance, -latency)."""
    topt, _ = dp.optimal_merge_times(times)
    best = None
    for r in range(len(candidates) + 1):
        for kept in itertools.combinations(candidates, r):
            points = (0,) + kept + (length,)
            pairs = list(zip(points[:-1], points[1:]))
            if any(p not in topt or p not in importance for p in pairs):
                continue
            lat = sum(topt[p] for p in pairs) + sum(position_costs[k] for k in kept)
            if lat > budget + 1e-9:
                continue
            imp = sum(importance[p] for p in pairs)
            key = (round(imp, 9), -round(lat, 9))
            if best is None or key > best[0]:
                best = (key, kept, lat, imp)
    return best


def test_select_matches_exhaustive_search_on_random_instances():
    rng = random.Random(2023)
    checked = infeasible = 0
    while checked < 220:
        length, times, importance, candidates, costs = _random_instance(rng)
        budget = rng.randint(2, 4 * length) * 0.5
        expected = _brute_force(length, times, importance, candidates, costs, budget)
        try:
            got = dp.select(times, importance, length, budget, candidates=candidates, position_costs=costs,
                            resolution=0.5)
        except dp.InfeasibleBudget as exc:
            assert expected is None
            assert exc.smallest > budget
            # the stated budget really is feasible
            assert _brute_force(length, times, importance, candidates, costs, exc.smallest) is not None
            infeasible += 1
            continue
        except ValueError:  # no chain of allowed pairs at all
            assert expected is None and _brute_force(length, times, importance, candidates, costs, 1e9) is None
            continue
        assert expected is not None
        assert got.importance == pytest.approx(expected[3], abs=1e-9)
        assert got.latency == pytest.approx(expected[2], abs=1e-9)
        assert got.latency <= budget + 1e-9
        assert set(got.kept) <= set(got.boundaries)
        checked += 1
    assert infeasible > 10


def test_frontier_agrees_with_select_at_every_budget():
    rng = random.Random(7)
    solved = 0
    for _ in range(40):
        length, times, importance, candidates, costs = _random_instance(rng)
        try:
            points = dp.frontier(times, importance, length, candidates=candidates, position_costs=costs, resolution=0.5)
        except ValueError:
            continue
        solved += 1
        assert [p.latency for p in points] == sorted(p.latency for p in points)
        assert all(a.importance < b.importance for a, b in zip(points, points[1:]))
        for budget in sorted({p.latency for p in points} | {p.latency + 0.5 for p in points}):
            chosen = dp.select(times, importance, length, budget, candidates=candidates, position_costs=costs,
                               resolution=0.5)
            best = max((p for p in points if p.latency <= budget + 1e-9), key=lambda p: p.importance)
            assert chosen.importance == pytest.approx(best.importance, abs=1e-9)
            assert chosen.latency == pytest.approx(best.latency, abs=1e-9)
    assert solved >= 30


def test_rounding_up_never_exceeds_the_budget_off_grid():
    rng = random.Random(11)
    for _ in range(100):
        length, times, importance, candidates, costs = _random_instance(rng)
        times = {k: v * rng.uniform(0.9, 1.1) for k, v in times.items()}  # off the grid
        budget = rng.uniform(1, 3 * length)
        try:
            got = dp.select(times, importance, length, budget, candidates=candidates, position_costs=costs, resolution=0.3)
        except ValueError:
            continue
        assert got.latency <= budget + 1e-9


def test_infeasible_budget_states_the_smallest():
    times = {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.5}
    with pytest.raises(dp.InfeasibleBudget, match="smallest feasible budget is 1.5"):
        dp.select(times, {(0, 2): 1.0, (0, 1): 1.0, (1, 2): 1.0}, 2, 1.0, resolution=0.5)


def test_non_positive_budget_is_infeasible():
    times = {(0, 1): 1.0}
    with pytest.raises(dp.InfeasibleBudget):
        dp.select(times, {(0, 1): 1.0}, 1, -3.0)


def test_dp_file_runs_without_torch():
    import subprocess
    import sys

    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('dp', sys.argv[1]); "
            "dp = sys.modules['dp'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(dp); "
            "print(dp.select({(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.5}, {(0, 1): 1, (1, 2): 1, (0, 2): 1}, 2, 2.0).kept); "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, dp.__file__], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1,)"


def test_dp_refuses_unusable_inputs_with_clear_errors():
    times, scores = {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.5}, {(0, 1): 1.0, (1, 2): 1.0}
    with pytest.raises(dp.InvalidInput, match="^budget must be a finite number; got nan"):
        dp.select(times, scores, 2, float("nan"))
    with pytest.raises(dp.InvalidInput, match=r"importance\[\(0, 1\)\] must be a finite number; got nan"):
        dp.select(times, {**scores, (0, 1): float("nan")}, 2, 3.0)
    with pytest.raises(dp.GridTooFine, match="use resolution >= "):
        dp.select(times, scores, 2, 3.0, resolution=1e-9)
    with pytest.raises(dp.NoCover, match="reach position 1 at most; allow a pair"):
        dp.select(times, {(0, 1): 1.0}, 2, 3.0)
    assert all(issubclass(e, ValueError) for e in (dp.InvalidInput, dp.GridTooFine, dp.NoCover))


def test_a_budget_above_every_selection_needs_no_larger_grid():
    times, scores = {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.5}, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 0.5}
    chosen = dp.select(times, scores, 2, 1e12, resolution=0.5)  # 2e12 cells, were the grid not capped
    assert chosen.kept == (1,) and chosen.latency == 2.0
    assert [p.latency for p in dp.frontier(times, scores, 2, resolution=0.5, max_budget=1e12)] == [1.5, 2.0]
