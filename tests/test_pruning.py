"""Pruning layers inside merged segments (LayerMerge): which convs may go, the options per
block, one exact DP over covers and options, plans that record pruned convs, and rewrites that
replace them by the identity exactly. (Every exactness check in the suite also runs a random
pruning plan: ``conftest.check_exact``.)"""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import torch.nn as nn
import torchvision

import fxmerge
from conftest import assert_same, kept_activations, probe_geometry, randomize, segment_spec
from fxmerge.cost import CostModel
from fxmerge.importance import ImportanceTable, candidate_pairs
from fxmerge.passes import dp
from fxmerge.passes.pruning import block_options, pruned_spec
from synthetic import kernel_area_ms, random_table, table_for
from test_backends import Fake  # noqa: F401  (the fake backend's fixture below)
from test_latency_and_plan import X, tiny_mbv2


# --------------------------------------------------------------------------- which convs


class Kinds(nn.Module):
    """One conv of each kind, in one chain."""

    def __init__(self):
        super().__init__()
        self.widen = nn.Conv2d(4, 8, 1)                    # channel-changing: no
        self.same = nn.Conv2d(8, 8, 3, padding=1)           # same size: yes
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)  # same size, depthwise: yes
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # strided: no
        self.valid = nn.Conv2d(8, 8, 3)                      # shrinks the map: no
        self.pointwise = nn.Conv2d(8, 8, 1, bias=False)      # yes
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        for conv in (self.widen, self.same, self.dilated, self.strided, self.valid):
            x = self.act(conv(x))
        return self.pointwise(x)


def test_prunable_convs_are_those_the_identity_can_replace():
    analysis = fxmerge.analyze(Kinds().eval(), (torch.randn(1, 4, 16, 16),))
    chain = analysis.chains[0]
    assert [chain.layers[p - 1].conv for p in chain.prunable] == ["same", "dilated", "pointwise"]
    reasons = {l.conv: l.prune_blocker() for l in chain.layers}
    assert reasons["widen"] == "changes channels (4 -> 8)"
    assert reasons["strided"] == "strided (2x2)"
    assert "changes the map size" in reasons["valid"]
    assert "prunable" not in str(analysis)
    options = fxmerge.analyze(Kinds().eval(), (torch.randn(1, 4, 16, 16),), prune_layers=True)
    count = sum(len(o) for o in options.chains[0].options.values())
    assert count and f", 3 prunable convs, {count} pruning options" in str(options)


def test_pruning_a_conv_the_identity_cannot_replace_is_refused_by_name():
    analysis = fxmerge.analyze(Kinds().eval(), (torch.randn(1, 4, 16, 16),))
    with pytest.raises(fxmerge.InvalidPlanError, match=r"conv 'strided' cannot be pruned: it strided \(2x2\)"):
        fxmerge.Plan.from_sets(analysis, keep=[], prune=["strided"], lossy=True)
    with pytest.raises(fxmerge.InvalidPlanError, match=r"cannot prune \['nope'\]: not conv layers"):
        fxmerge.Plan.from_sets(analysis, keep=[], prune=["nope"])
    with pytest.raises(fxmerge.InvalidPlanError, match="not one string"):
        fxmerge.Plan.from_sets(analysis, keep=[], prune="same")


# --------------------------------------------------------------------------- options


def _brute_force_options(chain, limits, norms):
    """Every subset of every kept-candidate block: the largest-norm subset per distinct spec,
    the unpruned block's spec left out."""
    points = set(chain.kept_candidates)
    out = {}
    for (i, j) in {(i, j) for i in points for j in points if i < j}:
        if fxmerge.records.residual_conflict(i, j, chain.skip_pairs()) or any(i < b < j for b in chain.breaks):
            continue
        inside = [p for p in chain.prunable if i < p <= j]
        best = {}
        for r in range(1, len(inside) + 1):
            for pruned in itertools.combinations(inside, r):
                spec = pruned_spec(chain, i, j, pruned)
                if spec is not None and j - i > 1:
                    first = chain.layers[i]
                    macs = sum(fxmerge.geometry.conv_macs(l.geometry, l.output_shape) for l in chain.layers[i:j])
                    if not limits.allows(spec, first.input_shape, chain.layers[j - 1].output_shape, macs):
                        continue
                norm = sum(norms[p] for p in inside if p not in pruned)
                if spec not in best or norm > best[spec][0] + 1e-12:
                    best[spec] = (norm, pruned)
        unpruned = pruned_spec(chain, i, j, ())
        best.pop(unpruned, None)
        if best:
            out[(i, j)] = {pruned for _, pruned in best.values()}
    return out


def test_options_keep_the_largest_norm_subset_per_distinct_spec():
    """The layer-state DP finds what enumerating every subset finds (random norms, so ties are
    not what decides)."""
    rng = random.Random(3)
    analysis = fxmerge.analyze(tiny_mbv2(), (X,))
    checked = 0
    for chain in analysis.chains:
        for _ in range(5):
            norms = {p: rng.uniform(0.1, 5) for p in chain.prunable}
            got = {b: {o.pruned for o in opts} for b, opts in block_options(chain, analysis.limits, norms).items()}
            assert got == _brute_force_options(chain, analysis.limits, norms)
            checked += len(got)
    assert checked > 10


def test_option_specs_are_the_merged_geometry_of_the_kept_layers():
    from fxmerge.algebra import ConvGeometry

    analysis = fxmerge.analyze(torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 64, 64),),
                               prune_layers=True)
    chain = analysis.chains[0]
    count = 0
    for (i, j), options in chain.options.items():
        for o in options:
            geoms = [ConvGeometry.identity(l.geometry.in_channels, 2) if p in o.pruned else l.geometry
                     for p, l in enumerate(chain.layers[i:j], start=i + 1)]
            skips = [(s.source - i, s.target - i) for s in chain.skips if i <= s.source and s.target <= j]
            kept = [p for p in range(i + 1, j + 1) if p not in o.pruned]
            if not kept:  # the identity: no conv at all
                assert o.spec is None
                continue
            assert o.spec == probe_geometry(geoms, skips)
            assert o.spec.is_depthwise == all(chain.layers[p - 1].geometry.is_depthwise for p in kept)
            count += 1
    assert count > 100
    # only depthwise convs are prunable in mobilenet_v2 (the rest change channels or stride)
    assert all(chain.layers[p - 1].geometry.is_depthwise for p in chain.prunable)


# --------------------------------------------------------------------------- the DP


def _instance_with_options(rng: random.Random):
    from test_dp import _random_instance

    length, times, importance, candidates, costs = _random_instance(rng)
    points = [0] + candidates + [length]
    options = {}
    for a, b in itertools.combinations(points, 2):
        if rng.random() < 0.4:
            options[(a, b)] = [(rng.randint(0, 10) * 0.5, round(rng.uniform(-2, 3), 2))
                               for _ in range(rng.randint(1, 3))]
    return length, times, importance, candidates, costs, options


def _brute_force(length, times, importance, candidates, costs, options, budget):
    """Every kept subset, and per segment its cover or any of its options."""
    topt, _ = dp.optimal_merge_times(times)
    best = None
    for r in range(len(candidates) + 1):
        for kept in itertools.combinations(candidates, r):
            points = (0,) + kept + (length,)
            choices = []
            for pair in zip(points[:-1], points[1:]):
                fill = list(options.get(pair, []))
                if pair in topt and pair in importance:
                    fill.append((topt[pair], importance[pair]))
                choices.append(fill)
            for combo in itertools.product(*choices):
                lat = sum(c for c, _ in combo) + sum(costs[k] for k in kept)
                if lat > budget + 1e-9:
                    continue
                imp = sum(s for _, s in combo)
                key = (round(imp, 9), -round(lat, 9))
                if best is None or key > best[0]:
                    best = (key, lat, imp)
    return best


def test_the_dp_with_options_matches_exhaustive_search():
    rng = random.Random(2024)
    checked = 0
    while checked < 150:
        length, times, importance, candidates, costs, options = _instance_with_options(rng)
        if len(candidates) > 9:
            continue
        budget = rng.randint(2, 4 * length) * 0.5
        expected = _brute_force(length, times, importance, candidates, costs, options, budget)
        try:
            got = dp.select(times, importance, length, budget, candidates=candidates, position_costs=costs,
                            resolution=0.5, options=options)
        except (dp.InfeasibleBudget, dp.NoCover):
            assert expected is None
            continue
        assert expected is not None
        assert (got.importance, got.latency) == pytest.approx((expected[2], expected[1]), abs=1e-9)
        # what the selection says it chose adds up to what it reports
        points = (0,) + got.kept + (length,)
        chosen = {(i, j): k for i, j, k in got.options}
        topt, _ = dp.optimal_merge_times(times)
        total = sum(options[p][chosen[p]][1] if p in chosen else importance[p] for p in zip(points[:-1], points[1:]))
        assert total == pytest.approx(got.importance)
        assert all(i in (0, *got.boundaries) and j in (*got.boundaries, length) for i, j, _ in got.options)
        checked += 1


def test_options_never_lower_the_optimum_at_any_budget():
    rng = random.Random(11)
    compared = 0
    for _ in range(60):
        length, times, importance, candidates, costs, options = _instance_with_options(rng)
        for budget in (length * 0.5, length * 1.0, length * 2.0):
            try:
                without = dp.select(times, importance, length, budget, candidates=candidates, position_costs=costs,
                                    resolution=0.5)
            except ValueError:
                continue
            with_options = dp.select(times, importance, length, budget, candidates=candidates, position_costs=costs,
                                     resolution=0.5, options=options)
            assert with_options.importance >= without.importance - 1e-9
            compared += 1
    assert compared > 50


# --------------------------------------------------------------------------- planning


@pytest.fixture(scope="module")
def mbv2():
    model = randomize(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    analysis = fxmerge.analyze(model, (x,), prune_layers=True)
    return model, x, analysis, random_table(analysis, (x,), random.Random(5))


@pytest.mark.parametrize("importance", ["uniform", "random"])
def test_pruning_plans_are_at_least_as_important_at_every_budget(mbv2, importance):
    """The superset property, on a real model's option set and table: every budget gets an
    objective no lower with prune_layers=True, and some budget only pruning can meet."""
    model, x, analysis, table = mbv2
    scores = None
    if importance == "random":
        rng = random.Random(1)
        scores = {k: rng.uniform(-1, 1) for k in candidate_pairs(analysis)}
        scores = ImportanceTable(scores).extend(analysis)
    kwargs = dict(example_inputs=(x,), analysis=analysis, importance=scores, resolution=0.05)
    with pytest.raises(fxmerge.InfeasibleBudgetError) as depth_only:
        fxmerge.plan(model, table, budget_ms=1e-3, **kwargs)
    with pytest.raises(fxmerge.InfeasibleBudgetError) as pruning:
        fxmerge.plan(model, table, budget_ms=1e-3, prune_layers=True, **kwargs)
    assert pruning.value.smallest_ms < depth_only.value.smallest_ms  # pruning reaches further
    below = fxmerge.plan(model, table, budget_ms=depth_only.value.smallest_ms - 0.5, prune_layers=True, **kwargs)
    assert below.num_pruned > 0
    original = fxmerge.plan(model, table, **kwargs).info["predicted_ms"]["original"]
    pruned_any = False
    for fraction in (0.95, 0.8, 0.65, 0.5):
        budget_ms = depth_only.value.smallest_ms + fraction * (original - depth_only.value.smallest_ms)
        plain = fxmerge.plan(model, table, budget_ms=budget_ms, **kwargs)
        pruned = fxmerge.plan(model, table, budget_ms=budget_ms, prune_layers=True, **kwargs)
        assert pruned.info["importance"] >= plain.info["importance"] - 1e-9
        assert pruned.info["predicted_ms"]["planned"] <= budget_ms + 1e-9
        assert plain.num_pruned == 0
        pruned_any |= pruned.num_pruned > 0
    assert pruned_any or importance == "uniform"  # uniform: each pruned conv costs 1, rarely worth it above


def test_a_pruning_plan_merges_exactly_and_round_trips(mbv2, tmp_path):
    model, x, analysis, table = mbv2
    with pytest.raises(fxmerge.InfeasibleBudgetError) as depth_only:
        fxmerge.plan(model, table, budget_ms=1e-3, example_inputs=(x,), analysis=analysis)
    plan = fxmerge.plan(model, table, budget_ms=depth_only.value.smallest_ms - 0.5, example_inputs=(x,),
                        analysis=analysis, prune_layers=True)
    assert plan.num_pruned > 0 and not plan.is_exact
    text = str(plan)
    assert "prunes" in text and "pruned" in text
    pruned_names = {cp.layers[p - 1][0] for cp in plan.chains for p in cp.pruned}
    assert all(name in text for name in pruned_names)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert set(json.loads(path.read_text())["chains"][0]["prune"]) == pruned_names
    loaded = fxmerge.Plan.load(path)
    assert loaded.fingerprint() == plan.fingerprint()
    linear = fxmerge.linearize(model.double(), loaded)
    merged = fxmerge.merge(linear, loaded)
    merged.graph.lint()
    assert_same(merged, linear, (x.double(),), torch.float64, "pruning plan: merge vs linearize", kept_activations(plan))
    # the pruned convs are gone from both graphs
    for gm in (linear, merged):
        assert not pruned_names & {n.name for n in gm.graph.nodes}
    # the cost model prices what the DP chose
    cost = CostModel(analysis, table.ms, table.correction(analysis))
    assert cost.predict_ms(plan) == pytest.approx(plan.info["predicted_ms"]["planned"])
    model.float()


def test_a_plan_file_naming_an_unknown_pruned_conv_is_refused(mbv2, tmp_path):
    model, x, analysis, _ = mbv2
    plan = fxmerge.Plan.from_positions(analysis, {}, pruned={0: [analysis.chains[0].prunable[0]]})
    d = plan.to_dict()
    d["chains"][0]["prune"] = ["no_such_conv"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(fxmerge.MalformedFileError, match="no_such_conv"):
        fxmerge.Plan.load(path)


# --------------------------------------------------------------------------- identity segments


class Basic(nn.Module):
    """A ResNet basic block (same channels), then a plain conv pair without a residual."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.c4 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        y = self.act(self.b1(self.c1(x)))
        y = self.act(self.b2(self.c2(y)) + x)
        return self.c4(self.act(self.c3(y)))


def test_a_residual_branch_whose_convs_are_all_pruned_becomes_x_plus_x():
    model = randomize(Basic()).eval().double()
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    analysis = fxmerge.analyze(model, (x,))
    plan = fxmerge.Plan.from_sets(analysis, keep=["act_1", "act_2"], prune=["c1", "c2"], lossy=True)
    merged = fxmerge.merge(model, plan)
    with torch.no_grad():
        want = model.c4(model.act(model.c3(model.act(2 * x))))
        assert torch.allclose(merged(x), want, atol=1e-12)
    assert not any(n.name in ("c1", "c2", "b1", "b2") for n in merged.graph.nodes)
    assert plan.num_convs == 2  # c3, c4: the pruned block runs no conv, only its add stays
    # a segment pruned to nothing, without a residual, is the identity
    plan = fxmerge.Plan.from_sets(analysis, keep=["act", "act_1"], prune=["c3"], lossy=True)
    merged = fxmerge.merge(model, plan)
    with torch.no_grad():
        y = model.act(model.b2(model.c2(model.act(model.b1(model.c1(x))))) + x)
        assert torch.allclose(merged(x), model.c4(y), atol=1e-12)


def test_crossing_residuals_never_share_a_merged_block():
    """x2 = f(x1) + x0 and x3 = g(x2) + x1 cross: no block may hold both (found by the
    property tests once pruning plans joined them)."""

    class Crossing(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(3))

        def forward(self, x0):
            x1 = self.convs[0](x0)
            x2 = self.convs[1](x1) + x0
            return self.convs[2](x2) + x1

    model = Crossing().eval().double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    analysis = fxmerge.analyze(model, (x,))
    assert analysis.chains[0].valid_blocks == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(fxmerge.InvalidPlanError, match="which cross"):
        fxmerge.Plan.from_positions(analysis, {0: ([], [])}, lossy=True)
    merged = fxmerge.merge(model, fxmerge.Plan.drop_all(analysis))
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=1e-12)


# --------------------------------------------------------------------------- table, importance, CLI


@pytest.fixture
def fake():
    backend = fxmerge.register_backend(Fake())
    yield backend
    del fxmerge.BACKENDS["fake"]


def test_the_table_measures_only_the_new_specs(fake, tmp_path):
    model = tiny_mbv2()
    path = tmp_path / "t.json"
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake", path=path, references=False)
    before = len(table)
    analysis = fxmerge.analyze(model, (X,), prune_layers=True)
    with pytest.raises(fxmerge.MissingLatencyError, match="prune_layers=True"):
        fxmerge.plan(model, table, budget=0.7, example_inputs=(X,), prune_layers=True)
    needed = CostModel(analysis, table.ms).required_keys() - CostModel(analysis, table.ms).required_keys(False)
    table.measure_missing(model, (X,), analysis=analysis, reference=False)
    assert len(table) - before == len(needed) > 0
    fxmerge.plan(model, table, budget=0.7, example_inputs=(X,), prune_layers=True)


def test_importance_scores_every_option_and_round_trips(tmp_path):
    model = tiny_mbv2()
    analysis = fxmerge.analyze(model, (X,), prune_layers=True)
    options = [p for p in candidate_pairs(analysis) if len(p) == 4]
    assert options and all(p[3] == tuple(sorted(p[3])) for p in options)
    imp = ImportanceTable.calibrate(model, [X], analysis=analysis, path=tmp_path / "imp.json", progress=False)
    assert set(imp.scores) == set(candidate_pairs(analysis))
    assert all(v <= 0 for v in imp.scores.values())
    # pruning a conv moves the output: its option scores below the same block unpruned
    c, i, j, pruned = options[0]
    if (c, i, j) in imp.scores:
        assert imp[(c, i, j, pruned)] < imp[(c, i, j)]
    loaded = ImportanceTable.load(tmp_path / "imp.json")
    assert loaded.scores == imp.scores
    assert "pruned layers" in str(loaded)
    table = table_for(analysis, (X,), lambda key: 1.0)
    plan = fxmerge.plan(model, table, budget=0.5, importance=loaded, example_inputs=(X,), prune_layers=True)
    assert plan.info["predicted_ms"]["planned"] <= 0.5 * plan.info["original_ms"] + 1e-9
    depth_only = ImportanceTable.calibrate(model, [X], progress=False)  # no option entries: nothing can be pruned
    with pytest.warns(UserWarning, match="no entries for pruning options, so no conv will be pruned"):
        fxmerge.plan(model, table, budget=0.5, importance=depth_only, example_inputs=(X,), prune_layers=True)


def test_cli_plans_with_pruning(tmp_path, capsys):
    from fxmerge.cli import main

    analysis = fxmerge.analyze(tiny_mbv2(), (X,), prune_layers=True)
    path = tmp_path / "t.json"
    table = table_for(analysis, (X,), kernel_area_ms)
    table.save(path)
    with pytest.raises(fxmerge.InfeasibleBudgetError) as depth_only:
        fxmerge.plan(tiny_mbv2(), table, budget_ms=1e-3, example_inputs=(X,))
    out = tmp_path / "plan.json"
    main(["plan", "test_latency_and_plan:tiny_mbv2", "--table", str(path), "--input-shape", "1,3,32,32",
          "--budget-ms", str(depth_only.value.smallest_ms - 0.1), "--prune-layers", "-o", str(out)])
    plan = fxmerge.Plan.load(out)
    assert plan.num_pruned > 0
    assert "prunes" in capsys.readouterr().out


def test_segment_spec_helper_agrees_with_the_pass(mbv2):
    """conftest's independent spec (probe_geometry: the kept layers run as convolutions) is the
    pass' own (geometry.MergedRun)."""
    _, _, analysis, _ = mbv2
    chain = analysis.chains[0]
    plan = fxmerge.Plan.from_positions(analysis, {0: ([], None)}, lossy=True, pruned={0: chain.prunable[::2]})
    cp = plan.chains[0]
    for a, b in cp.segments():
        if cp.kept_layers(a, b):
            assert segment_spec(chain, cp, a, b) == pruned_spec(chain, a, b, cp.pruned)
