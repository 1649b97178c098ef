"""Speed of the stage-2 DP on the published MobileNetV2-1.0 table (L = 50, 171 valid blocks).

    python benchmarks/dp_speed.py [path/to/time_*.csv]

Importance is seeded random for every pair of positions; resolution 0.05 ms (the paper's
``prec = 20``). Baseline, in this file: a straightforward dict-based implementation of the same
DP (states ``(t, m)``, a Python loop over budgets), as the official code and METHOD.md §4.5 do
it. Both solve one budget (25 ms, the paper's loosest T0) and the whole Pareto frontier; the
answers are checked equal before the times are compared.
"""
from __future__ import annotations

import csv
import random
import statistics
import sys
import time
from pathlib import Path

from tabulate import tabulate

from fxmerge.passes import dp

DEFAULT = Path(__file__).resolve().parents[2] / "shared/reference/kim2023_tables/mbv2_1.0/time_fish_gpu1_1228.csv"
RESOLUTION, BUDGET = 0.05, 25.0


def load(path: Path) -> dict[tuple[int, int], float]:
    return {(int(r["st"]), int(r["end"])): float(r["time"]) for r in csv.DictReader(path.open())}


def dict_dp(times, importance, length, budget_units, resolution):
    """Baseline: best[(t, m)] = (importance, parent) with 'cost at most t' semantics."""
    topt, _ = dp.optimal_merge_times(times)
    cost = {k: -(-round(v / resolution * 1e9) // 10**9) for k, v in topt.items()}  # ceil, robust to fp
    best = {(t, 0): (0.0, None) for t in range(budget_units + 1)}
    for m in range(1, length + 1):
        for t in range(budget_units + 1):
            top = None
            for i in range(m):
                if (i, m) not in topt or (i, m) not in importance:
                    continue
                prev = best.get((t - cost[(i, m)], i))
                if prev is None:
                    continue
                value = prev[0] + importance[(i, m)]
                if top is None or value > top[0] + 1e-9:
                    top = (value, i)
            if top is not None:
                best[(t, m)] = top
    return best


def dict_backtrack(best, times, resolution, length, t):
    topt, _ = dp.optimal_merge_times(times)
    cost = {k: -(-round(v / resolution * 1e9) // 10**9) for k, v in topt.items()}
    kept, m = [], length
    while m:
        i = best[(t, m)][1]
        t -= cost[(i, m)]
        if i:
            kept.append(i)
        m = i
    return tuple(sorted(kept))


def timed(fn, repeats=5):
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - start)
    return out, statistics.median(samples) * 1e3


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    times = load(path)
    length = max(j for _, j in times)
    topt, _ = dp.optimal_merge_times(times)
    rng = random.Random(0)
    importance = {k: rng.uniform(0.0, 1.0) for k in sorted(topt)}

    # one budget
    ours, ours_ms = timed(lambda: dp.select(times, importance, length, BUDGET, resolution=RESOLUTION))
    units = round(BUDGET / RESOLUTION)
    best, base_ms = timed(lambda: dict_dp(times, importance, length, units, RESOLUTION), repeats=1)
    top = best[(units, length)][0]
    t_min = min(t for t in range(units + 1) if (t, length) in best and best[(t, length)][0] >= top - 1e-9)
    assert abs(top - ours.importance) < 1e-9, (top, ours.importance)
    assert dict_backtrack(best, times, RESOLUTION, length, t_min) == ours.kept

    # whole frontier
    points, front_ms = timed(lambda: dp.frontier(times, importance, length, resolution=RESOLUTION))
    max_units = round(points[-1].latency / RESOLUTION) + length

    def dict_frontier():
        table = dict_dp(times, importance, length, max_units, RESOLUTION)
        out, last = [], float("-inf")
        for t in range(max_units + 1):
            if (t, length) in table and table[(t, length)][0] > last + 1e-9:
                out.append(dict_backtrack(table, times, RESOLUTION, length, t))
                last = table[(t, length)][0]
        return out

    base_points, base_front_ms = timed(dict_frontier, repeats=1)
    assert base_points == [p.kept for p in points], "frontiers differ"

    rows = [["one budget (25 ms)", f"{base_ms:.1f}", f"{ours_ms:.2f}", f"{base_ms / ours_ms:.0f}x"],
            [f"whole frontier ({len(points)} points)", f"{base_front_ms:.1f}", f"{front_ms:.2f}",
             f"{base_front_ms / front_ms:.0f}x"]]
    print(f"{path.name}: L={length}, {len(times)} valid blocks, resolution {RESOLUTION} ms")
    print(tabulate(rows, headers=["stage 2", "dict baseline ms", "fxmerge ms", "speed-up"]))


if __name__ == "__main__":
    main()
