"""fxmerge takes Torch-Pruning's outputs as they are: a channel-pruned net is plain modules with
fewer channels, and analyze / plan / linearize / merge are exact on it (a synthetic latency
table: nothing here is timed). Torch-Pruning is a benchmark extra (``.[bench]``); without it
this file is skipped."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxmerge
from conftest import assert_same, check_exact, kept_activations, randomize
from importance_models import Residual, block
from synthetic import feasible_budget, kernel_area_ms, table_for

tp = pytest.importorskip("torch_pruning")


class Net(nn.Module):
    """A MobileNetV2-like chain: stem, two inverted residuals (expansion, depthwise, projection),
    a channel-changing conv, and a classifier Torch-Pruning must leave alone."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(block(3, 16), Residual(16), block(16, 24, 1), Residual(24), block(24, 32, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, 5)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def pruned_net(criterion: str, ratio: float, round_to: int | None, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """(original, pruned copy): BatchNorm statistics randomised first, so folding is exercised
    and the pruned channels are not all alike."""
    torch.manual_seed(0)
    model = randomize(Net().eval(), seed=1, calibrate_on=torch.randn(8, *x.shape[1:]))
    pruned = copy.deepcopy(model)
    importance = {"magnitude": tp.importance.GroupMagnitudeImportance(p=2),
                  "taylor": tp.importance.GroupTaylorImportance()}[criterion]
    pruner = tp.pruner.BasePruner(pruned, x, importance=importance, pruning_ratio=ratio,
                                  ignored_layers=[pruned.classifier], round_to=round_to)
    if criterion == "taylor":
        pruned(x).logsumexp(1).sum().backward()
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return model, pruned.eval()


CASES = [("magnitude", 0.5, 4), ("taylor", 0.3, None)]  # round_to=None leaves odd channel counts (16 * 0.7 -> 11)


@pytest.mark.parametrize("criterion, ratio, round_to", CASES)
def test_a_channel_pruned_net_is_analysed_with_its_new_widths(criterion, ratio, round_to):
    x = torch.randn(2, 3, 12, 12)
    model, pruned = pruned_net(criterion, ratio, round_to, x)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert widths != [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)], "nothing was pruned"
    assert pruned.classifier.out_features == 5
    a, b = fxmerge.analyze(model, (x,)), fxmerge.analyze(pruned, (x,))
    # the same chain structure, every layer at the pruned net's widths
    assert [c.length for c in b.chains] == [c.length for c in a.chains]
    assert [c.droppable for c in b.chains] == [c.droppable for c in a.chains]
    assert [layer.geometry.out_channels for c in b.chains for layer in c.layers] == widths


@pytest.mark.parametrize("criterion, ratio, round_to", CASES)
def test_merge_is_exact_on_a_torch_pruning_output(criterion, ratio, round_to):
    """keep-all and fold-only equal the pruned model itself, drop-all and a random pruning plan
    merge to their linearized nets (float64 <= 1e-9), on outputs that depend on the input."""
    x = torch.randn(2, 3, 12, 12)
    _, pruned = pruned_net(criterion, ratio, round_to, x)
    check_exact(pruned, (x,), dtype=torch.float64)


@pytest.mark.parametrize("criterion, ratio, round_to", CASES)
def test_a_plan_on_a_synthetic_table_merges_exactly_on_a_torch_pruning_output(criterion, ratio, round_to):
    x = torch.randn(2, 3, 12, 12)
    _, pruned = pruned_net(criterion, ratio, round_to, x)
    pruned = pruned.double()
    x = x.double()
    analysis = fxmerge.analyze(pruned, (x,))
    table = table_for(analysis, (x,), kernel_area_ms)
    budget = feasible_budget(pruned, table, example_inputs=(x,))
    plan = fxmerge.plan(pruned, table, budget_ms=budget, example_inputs=(x,))
    assert plan.info["predicted_ms"]["planned"] <= budget
    assert any(cp.dropped for cp in plan.chains), "the plan drops nothing: it would test nothing lossy"
    linear = fxmerge.linearize(pruned, plan).eval()
    merged = fxmerge.merge(pruned, plan).eval()
    assert plan.num_convs < analysis.num_layers, "the plan merges nothing"
    assert_same(merged, linear, (x,), torch.float64, "plan on a pruned net: merge vs linearize", kept_activations(plan))
    keep_all = fxmerge.merge(pruned, fxmerge.Plan.keep_all(analysis)).eval()
    assert_same(keep_all, pruned, (x,), torch.float64, "keep_all vs the pruned model")
