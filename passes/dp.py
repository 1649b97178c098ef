"""The DP pass: pure functions over plain mappings, importing nothing from torch, so they run on
any published latency table (``python passes/dp.py`` works without fxmerge installed).

Positions are integers 0..L; a block ``(i, j)`` is layers i+1..j merged into one convolution.
"""
from __future__ import annotations

from typing import Mapping

Block = tuple[int, int]


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
