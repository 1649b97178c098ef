"""Activations before residual adds (``x + act(bn(conv(...)))``: YOLO's C2f/C3 bottlenecks, CSP
and darknet stages): the add is a junction in the chain, so the activation is a position the
DP may keep (the add then stays explicit after it) or drop (the residual is an identity skip,
fused into a merged kernel that contains it)."""
from __future__ import annotations

import operator
import random

import pytest
import torch
import torch.nn as nn

import fxmerge
from conftest import check_exact, randomize
from fxmerge.cost import CostModel
from synthetic import all_plans, best_within, chain_options, plan_importance, random_table

GRID = 0.25
X = torch.randn(1, 3, 16, 16)


class ConvBnAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """YOLO's: ``x + cv2(cv1(x))``, both convs ending in SiLU."""

    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBnAct(c, c, 1), ConvBnAct(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


def bottlenecks() -> nn.Module:
    return randomize(nn.Sequential(ConvBnAct(3, 8), Bottleneck(8), Bottleneck(8), ConvBnAct(8, 8))).eval()


def _adds(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add))


def test_an_activation_before_a_residual_add_is_a_droppable_position():
    analysis = fxmerge.analyze(bottlenecks(), (X,))
    (chain,) = analysis.chains
    junctions = [p for p, layer in enumerate(chain.layers, start=1) if layer.junction]
    assert len(junctions) == 2 and all(p - 1 in chain.droppable for p in junctions)
    assert [(s.source, s.target) for s in chain.skips] == [(1, 4), (4, 7)]
    assert "junction 8" in str(analysis)


def test_merges_are_exact_and_drop_all_fuses_the_residuals():
    model = bottlenecks()
    checked = check_exact(model, (X,), dtype=torch.float64)
    merged = checked.merged["drop_all"]
    assert _adds(merged) == 0  # both residuals are inside the merged kernel
    keep_all = fxmerge.merge(model, fxmerge.Plan.keep_all(checked.analysis))
    assert _adds(keep_all) == 2  # kept activations: the adds stay explicit after them


def test_the_cost_model_prices_what_the_rewrite_emits():
    """For every plan of the chain: the ops the cost model counts (merged convs, explicit adds,
    kept activations) are the ops the merged graph runs."""
    model = bottlenecks()
    analysis = fxmerge.analyze(model, (X,))
    cost = CostModel(analysis, lambda key: 1.0)
    (chain,) = analysis.chains
    rng = random.Random(0)
    options = chain_options(analysis, chain, cost, None)
    for _, _, kept, bounds in rng.sample(options, 25):
        plan = fxmerge.Plan.from_positions(analysis, {0: (kept, bounds)}, lossy=True)
        merged = fxmerge.merge(model, plan)
        ops = sum(1 for n in merged.graph.nodes if n.op == "call_module" and isinstance(
            merged.get_submodule(n.target), (nn.Conv2d, nn.SiLU))) + _adds(merged)
        assert ops - 1 == cost.op_count(plan), (kept, bounds)  # the last conv's SiLU ends the chain


@pytest.mark.parametrize("seed", range(3))
def test_plan_matches_exhaustive_search_with_junctions(seed):
    model = bottlenecks()
    analysis = fxmerge.analyze(model, (X,))
    rng = random.Random(seed)
    table = random_table(analysis, (X,), rng, grid=GRID, rest_ms=1.0)
    cost = CostModel(analysis, table.ms, table.correction(analysis))
    totals = all_plans([chain_options(analysis, chain, cost, None) for chain in analysis.chains])
    cheapest, dearest = float(totals[0].min()), float(totals[0].max())
    for chain_budget in [rng.randint(int(cheapest / GRID), int(dearest / GRID) + 1) * GRID for _ in range(10)]:
        expected = best_within(totals, chain_budget)
        chosen = fxmerge.plan(model, table, budget_ms=1.0 + chain_budget, analysis=analysis, example_inputs=(X,),
                              resolution=GRID)
        assert plan_importance(analysis, chosen, None) == pytest.approx(expected[1])
        assert chosen.report.predicted_planned_ms == pytest.approx(1.0 + expected[0])
