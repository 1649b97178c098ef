"""Pruned plans rest on pruned observations (issue 17, point 2): a ``prune_layers=True`` table
times plans that prune among its end-to-end references, a depth-only table completed for
pruning gets them too, and verified pruned plans feed the correction.

The backends are fakes whose times are computed, never measured: units are linear in their
multiply-adds, whole models follow a law no per-unit table captures (big convs cost
disproportionately more: ``Fake`` of tests/test_backends.py). Pruned plans sit far below every
depth-only plan in summed terms, so a correction fitted to depth-only plans alone extrapolates
there; fitted to pruned references it does not.
"""
from __future__ import annotations

import pytest

import fxmerge
from fxmerge.cost import CostModel
from fxmerge.measure import pruned_reference_plans, reference_plans
from test_backends import Fake
from test_latency_and_plan import X, tiny_mbv2


@pytest.fixture
def fake():
    with fxmerge.backend_registry():
        yield fxmerge.register_backend(Fake())


def _measured(model, analysis, plan) -> float:
    return Fake.model_ms(fxmerge.merge(model, plan), (X,))


def _prediction_error(table, model, analysis, plan) -> float:
    predicted = CostModel(analysis, table.ms, table.correction(analysis)).predict_ms(plan)
    return predicted / _measured(model, analysis, plan) - 1


def test_a_pruning_table_times_plans_that_prune(fake):
    model = tiny_mbv2()
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake", prune_layers=True)
    analysis = fxmerge.analyze(model, (X,), prune_layers=True)
    plans = reference_plans(analysis, table.ms)
    picks = pruned_reference_plans(analysis, table.ms)
    assert set(picks) == {"pruned-fastest", "pruned-mid"} and all(p.num_pruned for p in picks.values())
    observations = table.reference(analysis)["observations"]
    assert len(observations) == len(plans)  # every reference timed, the folded original among them
    timed = {o["plan"] for o in observations}
    assert timed >= {p.fingerprint() for p in picks.values()}  # (a DP probe may coincide with one)
    assert sum(1 for o in observations if o["pruned"]) == sum(1 for p in plans.values() if p.num_pruned) >= 2
    fastest = picks["pruned-fastest"]
    # the fastest pruned reference is the DP's fastest plan with pruning: nothing the DP can pick is faster
    cost = CostModel(analysis, table.ms)
    with pytest.raises(fxmerge.InfeasibleBudgetError) as info:
        fxmerge.plan(model, table, budget_ms=1e-6, example_inputs=(X,), analysis=analysis, prune_layers=True)
    rest = table.correction(analysis)
    assert rest.rest_ms + rest.scale * cost.terms_ms(fastest) + rest.overhead_ms * cost.op_count(fastest) \
        == pytest.approx(info.value.smallest_ms, rel=0.01)


def test_depth_only_analyses_time_no_pruned_plans(fake):
    model = tiny_mbv2()
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake")
    analysis = fxmerge.analyze(model, (X,))
    assert not any(p.num_pruned for p in reference_plans(analysis, table.ms).values())
    assert not any(o["pruned"] for o in table.reference(analysis)["observations"])


def test_pruned_references_correct_a_backend_the_depth_only_law_mispredicts(fake):
    model = tiny_mbv2()
    analysis = fxmerge.analyze(model, (X,), prune_layers=True)
    depth = fxmerge.LatencyTable.measure(model, (X,), backend="fake")  # references fitted depth-only
    depth.measure_missing(model, (X,), prune_layers=True, reference=False)  # the pruned units, no new references
    assert not any(o["pruned"] for o in depth.reference(analysis)["observations"])
    pruned = fxmerge.LatencyTable.measure(model, (X,), backend="fake", prune_layers=True)
    assert depth.entries.keys() == pruned.entries.keys()  # the same units: only the references differ
    plans = pruned_reference_plans(analysis, pruned.ms)
    for name, plan in plans.items():
        without, with_ = (_prediction_error(t, model, analysis, plan) for t in (depth, pruned))
        assert abs(with_) < 0.5 * abs(without), (name, without, with_)
    # what that means for planning: depth-only references price pruned plans out of reach
    original = pruned.reference(analysis)["original_ms"]
    fastest = _measured(model, analysis, plans["pruned-fastest"]) / original
    budget = 2 * fastest  # a budget the backend meets with room to spare, by pruning
    with pytest.raises(fxmerge.InfeasibleBudgetError):
        fxmerge.plan(model, depth, budget=budget, example_inputs=(X,), analysis=analysis, prune_layers=True)
    chosen = fxmerge.plan(model, pruned, budget=budget, example_inputs=(X,), analysis=analysis, prune_layers=True)
    assert chosen.num_pruned and _measured(model, analysis, chosen) <= budget * original


def test_a_depth_only_table_completed_for_pruning_gains_pruned_references(fake):
    model = tiny_mbv2()
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake")
    analysis = fxmerge.analyze(model, (X,), prune_layers=True)
    before = [dict(o) for o in table.reference(analysis)["observations"]]
    original_ms = table.reference(analysis)["original_ms"]
    table.measure_missing(model, (X,), prune_layers=True)
    ref = table.reference(analysis)
    assert ref["observations"][:len(before)] == before and ref["original_ms"] == original_ms
    added = ref["observations"][len(before):]
    expected = pruned_reference_plans(analysis, table.ms)
    assert {o["plan"] for o in added} == {p.fingerprint() for p in expected.values()}
    assert all(o["pruned"] and o["kind"] == "reference" for o in added)
    table.measure_missing(model, (X,), prune_layers=True)  # once there, not timed again
    assert len(table.reference(analysis)["observations"]) == len(before) + len(added)


def test_verified_pruned_plans_feed_the_correction(fake):
    model = tiny_mbv2()
    analysis = fxmerge.analyze(model, (X,), prune_layers=True)
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake", references=False, prune_layers=True)
    from fxmerge.verification import observe

    observe(table, model, (X,), analysis, {"fold-only": fxmerge.Plan.fold_only(analysis)}, kind="reference")
    before = table.correction(analysis)
    chosen = fxmerge.plan(model, table, budget=0.6, example_inputs=(X,), analysis=analysis, prune_layers=True,
                          verify=True, verify_rounds=3)
    verified = [o for o in table.reference(analysis)["observations"] if o["kind"] == "verify"]
    assert verified and all(o["pruned"] for o in verified) and chosen.num_pruned
    assert table.correction(analysis) != before  # the fit moved to where the pruned plans are
    assert _measured(model, analysis, chosen) <= 1.03 * 0.6 * table.reference(analysis)["original_ms"]
