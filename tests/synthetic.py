"""Latency tables made up by hand, and exhaustive search over plans, for planning tests that
must not depend on how fast (or how loaded) the machine running them is."""
from __future__ import annotations

import itertools
import math
import random
from typing import Callable

import numpy as np
import pytest
import torch

import fxmerge
from fxmerge.measure import pruned_reference_plans
from fxmerge.cost import CostModel
from fxmerge.latency import environment


def _producer(key: str) -> str:
    return key.split(" after ", 1)[1]


def table_for(analysis: fxmerge.Analysis, inputs: tuple[torch.Tensor, ...], conv_ms: Callable[[str], float],
              *, act_ms: Callable[[str], float] = lambda key: 0.25, add_ms: Callable[[str], float] = lambda key: 0.25,
              rest_ms: float = 1.0, backend: str = "eager") -> fxmerge.LatencyTable:
    """A table with every term ``analysis`` needs: ``conv_ms(key)`` per merged conv,
    ``act_ms(key)`` what each activation adds after its conv, ``add_ms(key)`` per explicit
    residual add; overhead 0 and a rest of ``rest_ms``, so predictions are plain sums."""
    keys = CostModel(analysis, lambda key: 0.0).required_keys()
    ms = {k: conv_ms(k) for k in keys if k.startswith("conv")}
    ms.update({k: add_ms(k) for k in keys if k.startswith("add")})
    ms.update({k: ms[_producer(k)] + act_ms(k) for k in keys if k.startswith("act")})
    entries = {k: {"ms": v, "spread": 0.0, "repeats": 1, "calls": 1} for k, v in ms.items()}
    table = fxmerge.LatencyTable(entries, fingerprint=environment(inputs, backend))
    fold = fxmerge.Plan.fold_only(analysis)
    cost = CostModel(analysis, table.ms)
    original_ms = rest_ms + cost.terms_ms(fold)
    # end-to-end observations that are exact sums (the folded original; with pruning options,
    # the pruned references a table measures too, so nothing is left to time for real), so
    # the fitted correction is the rest alone
    plans = {"folded": fold, **(pruned_reference_plans(analysis, table.ms) if analysis.prune_layers else {})}
    table.observe(analysis, inputs, original_ms, [
        {"plan": p.fingerprint(), "kind": "reference", "terms_ms": cost.terms_ms(p), "ops": cost.op_count(p),
         "ratio": (rest_ms + cost.terms_ms(p)) / original_ms, "pruned": p.num_pruned} for p in plans.values()])
    return table


def merging_pays_table(analysis: fxmerge.Analysis, inputs: tuple[torch.Tensor, ...], **kwargs) -> fxmerge.LatencyTable:
    """Every conv, merged or not, costs 1 ms: merging n layers saves n - 1 ms."""
    return table_for(analysis, inputs, lambda key: 1.0, **kwargs)


def kernel_area_ms(key: str) -> float:
    """A made-up conv time that grows with the kernel, as merged kernels' do (so pruning a conv
    out of a merged segment pays)."""
    kernel = key.split(" k=")[1].split()[0]
    return 0.1 * math.prod(int(k) for k in kernel.split("x"))


def random_table(analysis: fxmerge.Analysis, inputs: tuple[torch.Tensor, ...], rng: random.Random,
                 grid: float = 0.25, **kwargs) -> fxmerge.LatencyTable:
    """Random times on a ``grid`` (so the DP at that resolution is exact)."""
    return table_for(analysis, inputs, lambda key: rng.randint(1, 16) * grid,
                     act_ms=lambda key: rng.randint(0, 3) * grid, add_ms=lambda key: rng.randint(0, 2) * grid, **kwargs)


def feasible_budget(model, table: fxmerge.LatencyTable, **kwargs) -> float:
    """Halfway between the smallest feasible budget and the original's predicted latency, in ms."""
    with pytest.raises(fxmerge.InfeasibleBudgetError) as info:
        fxmerge.plan(model, table, budget_ms=1e-6, **kwargs)
    original = fxmerge.plan(model, table, **kwargs).info["predicted_ms"]["original"]
    assert info.value.smallest_ms < original
    return (info.value.smallest_ms + original) / 2


# --------------------------------------------------------------------------- exhaustive search


def _score(chain: fxmerge.Chain, kept, bounds, importance: dict | None) -> float | None:
    """Summed importance of consecutive kept positions: the chain's ends, its kept and forced
    activations and the border positions that are merge boundaries (kept exact); None where a
    pair is unscored."""
    points = [0, *sorted(set(kept) | set(chain.forced) | (set(chain.borders) & set(bounds))), chain.length]
    pairs = [(chain.index, a, b) for a, b in zip(points[:-1], points[1:])]
    if importance is None:
        return float(len(pairs))
    if all(p in importance for p in pairs):
        return sum(importance[p] for p in pairs)
    return None


def chain_options(analysis: fxmerge.Analysis, chain: fxmerge.Chain, cost: CostModel,
                  importance: dict | None) -> list[tuple[float, float, tuple, tuple]]:
    """Every valid (kept activations, merge boundaries) of one chain, as
    ``(ms, importance, kept, boundaries)``: kept any subset of the droppable activations,
    boundaries any superset of kept + forced breaks whose segments are valid blocks and that
    Plan.from_positions accepts; importance as :func:`_score` (unscored options left out)."""
    acts = cost.activation_ms(chain)
    interior = range(1, chain.length)
    out = []
    for r in range(len(chain.droppable) + 1):
        for kept in itertools.combinations(chain.droppable, r):
            fixed = set(kept) | set(chain.breaks)
            free = [p for p in interior if p not in fixed]
            for s in range(len(free) + 1):
                for extra in itertools.combinations(free, s):
                    bounds = sorted(fixed | set(extra))
                    cuts = [0, *bounds, chain.length]
                    segments = list(zip(cuts[:-1], cuts[1:]))
                    score = _score(chain, kept, bounds, importance)
                    if score is None or not all(seg in chain.valid_blocks for seg in segments):
                        continue
                    try:
                        fxmerge.Plan.from_positions(analysis, {chain.index: (kept, bounds)})
                    except fxmerge.InvalidPlanError:
                        continue
                    ms = sum(cost.block_ms(chain, a, b) for a, b in segments) + sum(acts[p] for p in kept)
                    out.append((ms, score, kept, tuple(bounds)))
    return out


def all_plans(options: list[list[tuple]]) -> tuple[np.ndarray, np.ndarray]:
    """(ms, importance) of every combination of one option per chain, as two flat arrays."""
    ms, imp = np.zeros(1), np.zeros(1)
    for chain_options_ in options:
        ms = (ms[:, None] + np.array([o[0] for o in chain_options_])[None, :]).ravel()
        imp = (imp[:, None] + np.array([o[1] for o in chain_options_])[None, :]).ravel()
    return ms, imp


def best_within(totals: tuple[np.ndarray, np.ndarray], budget_ms: float) -> tuple[float, float] | None:
    """The most important combination within ``budget_ms`` (ties: the fastest), as
    (ms, importance); None if none fits."""
    ms, imp = totals
    fits = ms <= budget_ms + 1e-9
    if not fits.any():
        return None
    top = np.round(imp[fits], 9).max()
    best = fits & (np.round(imp, 9) == top)
    return float(ms[best].min()), float(imp[best][0])


def plan_importance(analysis: fxmerge.Analysis, plan: fxmerge.Plan, importance: dict | None) -> float:
    return sum(_score(chain, cp.keep, cp.boundaries, importance) for chain, cp in zip(analysis.chains, plan.chains))
