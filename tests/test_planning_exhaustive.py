"""fxmerge.plan on a model of several chains against exhaustive search over every plan, with
synthetic latency tables on the DP's grid (nothing here depends on the machine's speed)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

import fxmerge
from conftest import randomize
from fxmerge.cost import CostModel
from synthetic import all_plans, best_within, chain_options, plan_importance, random_table

GRID = 0.25


def cbr(cin, cout, k=3, act=True, g=1):
    layers = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(cbr(c, c, 1), cbr(c, c, 3, act=False))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class ResidualWithFanOut(nn.Module):
    """The residual's inner map also feeds a reduction: a forced break that keeps its ReLU."""

    def __init__(self, c):
        super().__init__()
        self.c1, self.c2, self.c3 = cbr(c, c, 1), cbr(c, c, 3), cbr(c, c, 1, act=False)

    def forward(self, x):
        h = self.c1(x)
        return torch.relu(x + self.c3(self.c2(h))) + h.mean((2, 3), keepdim=True)


class ThreeChains(nn.Module):
    """Chains separated by max-pools: one with a forced activation inside a residual, two with
    plain residuals (one with a depthwise conv)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(cbr(3, 4, 3), cbr(4, 4, 1), ResidualWithFanOut(4))
        self.b = nn.Sequential(cbr(4, 6, 1), Residual(6), cbr(6, 6, 1))
        self.c = nn.Sequential(cbr(6, 6, 3, g=6), cbr(6, 6, 1), Residual(6))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.c(self.pool(self.b(self.pool(self.a(x))))).mean((2, 3))


X = torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def model_and_analysis():
    model = randomize(ThreeChains()).eval()
    analysis = fxmerge.analyze(model, (X,))
    assert len(analysis.chains) >= 3 and any(c.forced for c in analysis.chains)
    assert sum(1 for c in analysis.chains if c.skips) >= 2
    return model, analysis


def _random_importance(analysis, rng: random.Random) -> dict:
    """A score for most pairs of kept-activation candidates (never across a forced one);
    the pairs of neighbours are always scored, so keeping everything stays possible."""
    scores = {}
    for chain in analysis.chains:
        points = chain.kept_candidates
        for a, i in enumerate(points):
            for b, j in enumerate(points[a + 1:], start=a + 1):
                if any(i < f < j for f in chain.forced):
                    break
                if b == a + 1 or rng.random() < 0.85:
                    scores[(chain.index, i, j)] = round(rng.uniform(-1, 3), 2)
    return scores


@pytest.mark.parametrize("seed", range(4))
def test_plan_matches_exhaustive_search_across_chains_and_their_junctions(model_and_analysis, seed):
    model, analysis = model_and_analysis
    rng = random.Random(seed)
    table = random_table(analysis, (X,), rng, grid=GRID, rest_ms=1.0)
    importance = None if seed == 0 else _random_importance(analysis, rng)
    cost = CostModel(analysis, table.ms, table.correction(analysis))
    options = [chain_options(analysis, chain, cost, importance) for chain in analysis.chains]
    totals = all_plans(options)
    cheapest, dearest = float(totals[0].min()), float(totals[0].max())
    budgets = [rng.randint(int(cheapest / GRID), int(dearest / GRID) + 2) * GRID for _ in range(14)]
    budgets += [rng.uniform(cheapest, dearest + 1) for _ in range(8)]  # off the grid too
    budgets += [cheapest, dearest]
    for chain_budget in budgets:
        budget_ms = 1.0 + chain_budget  # the rest of the network is 1 ms
        expected = best_within(totals, chain_budget)
        chosen = fxmerge.plan(model, table, budget_ms=budget_ms, importance=importance, analysis=analysis,
                              example_inputs=(X,), resolution=GRID)
        planned = chosen.info["predicted_ms"]["planned"]
        assert planned <= budget_ms + 1e-9
        assert plan_importance(analysis, chosen, importance) == pytest.approx(expected[1], abs=1e-9), chain_budget
        assert planned == pytest.approx(1.0 + expected[0], abs=1e-9), chain_budget
    with pytest.raises(fxmerge.InfeasibleBudgetError) as info:
        fxmerge.plan(model, table, budget_ms=1.0 + cheapest - GRID, importance=importance, analysis=analysis,
                     example_inputs=(X,), resolution=GRID)
    assert info.value.smallest_ms == pytest.approx(1.0 + cheapest, abs=1e-9)
