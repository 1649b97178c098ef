"""Timing that says when it cannot be trusted (issue 18, item 15) and a verify loop that stays in
its loop (item 18). Every test here runs the noise logic on made-up timings (fake backends and
stubs): nothing depends on how fast or busy the machine is.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch.nn as nn

import fxmerge
from fxmerge import timing, verification
from fxmerge.backends import Backend
from fxmerge.measure import PlanTimings
from fxmerge.timing import Ratio, Timing, TimingNoiseWarning, ratio
from test_backends import Fake
from test_latency_and_plan import X, tiny_mbv2

QUIET = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.0, 1.01]
BUSY = [1.0, 1.6, 0.9, 1.4, 1.0, 2.1, 0.8, 1.3, 1.2]  # another process took the core now and then
BURSTS = [1.0, 1.3, 0.99, 1.0, 1.02, 0.98, 1.0, 1.25, 1.01]  # twice


def _timing(samples, scale=1.0):
    return Timing.from_samples([scale * s for s in samples], 1)


# --------------------------------------------------------------------------- the interval


def test_interval_comes_from_paired_samples_order_statistics():
    r = ratio(_timing(QUIET, 0.5), _timing([1.0] * 9))
    assert r.value == pytest.approx(0.5) and r.pairs == 9
    assert r.confidence == pytest.approx(1 - 2 * 10 / 512)  # 2nd smallest .. 2nd largest of 9: 96 %
    assert (r.low, r.high) == pytest.approx((0.495, 0.505)) and r.trusted
    assert r.inverse().value == pytest.approx(2.0) and r.inverse().interval() == pytest.approx((1 / 0.505, 1 / 0.495))
    # a drift that shifts both modules alike cancels in the pairs: the ratio stays sharp
    drifting = [1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 2.0, 2.0, 2.0]
    assert ratio(_timing(drifting, 0.5), _timing(drifting)).width == pytest.approx(0.0)
    # noise that hits one module and not the other does not
    noisy = ratio(_timing(BUSY, 0.5), _timing(QUIET))
    assert not noisy.trusted and noisy.low < 0.5 * 0.95 and noisy.high > 0.5 * 1.2


def test_interval_coverage_follows_the_number_of_pairs():
    assert timing._order_interval(15, 0.95) == (4, pytest.approx(1 - 2 * 576 / 32768))
    k, coverage = timing._order_interval(3, 0.95)  # too few pairs for 95 %: the full range, and its coverage
    assert k == 1 and coverage == pytest.approx(0.75)
    assert ratio(Timing(2.0, 0.0, 1, 1), Timing(1.0, 0.0, 1, 1)) == Ratio(2.0, 2.0, 2.0, 0.0, 0)  # no samples


def test_noise_note_names_the_noisy_comparison():
    assert timing.noise_note({"original": _timing(QUIET), "small": _timing(QUIET, 0.5)}, "original") is None
    note = timing.noise_note({"original": _timing(QUIET), "small": _timing(BUSY, 0.5)}, "original")
    assert note.startswith("timing too noisy to trust 1 of 1 comparison(s) with 'original': 'small' over 'original'")
    assert re.search(r"'small' over 'original' is 0\.\d+ with a 96 % interval 0\.\d+-0\.\d+ \(\+-\d+ %, over 9 paired", note)
    assert "samples spread (IQR / median) small" in note


# --------------------------------------------------------------------------- compare_latency


class Scripted(Backend):
    """Whole modules timed from scripted samples (by module name), one pass after another."""

    name = "scripted"

    def __init__(self, passes):
        self.passes, self.calls = passes, 0

    def compare(self, modules, inputs, *, rounds=5, repeats=15, min_repeat_ms=30.0, warmup_ms=500.0, runners=None):
        samples = self.passes[min(self.calls, len(self.passes) - 1)]
        self.calls += 1
        return {name: Timing.from_samples(samples[name], 1) for name in modules}


@pytest.fixture
def registry():
    with fxmerge.backend_registry() as backends:
        yield backends


def _modules():
    return {"original": nn.Identity(), "compressed": nn.Identity()}


def test_compare_latency_is_silent_on_a_quiet_machine(registry):
    backend = fxmerge.register_backend(Scripted([{"original": QUIET, "compressed": [0.5 * s for s in QUIET]}]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timings = fxmerge.compare_latency(_modules(), (X,), backend="scripted")
    assert backend.calls == 1 and ratio(timings["compressed"], timings["original"]).trusted


def test_compare_latency_times_again_then_warns_naming_the_noise(registry):
    noisy = {"original": QUIET, "compressed": [0.5 * s for s in BUSY]}
    backend = fxmerge.register_backend(Scripted([noisy, noisy]))
    with pytest.warns(TimingNoiseWarning, match=r"'compressed' over 'original' is 0\.\d+ with a 9\d % interval"):
        timings = fxmerge.compare_latency(_modules(), (X,), backend="scripted")
    assert backend.calls == 2 and timings["compressed"].repeats == 18  # more rounds first: samples joined


def test_compare_latency_keeps_a_second_pass_that_settles(registry):
    settled = {"original": QUIET, "compressed": [0.5 * s for s in QUIET]}
    first = {"original": QUIET, "compressed": [0.5 * s for s in BURSTS]}
    assert timing.noise_note({k: _timing(v) for k, v in first.items()}, "original") is not None
    backend = fxmerge.register_backend(Scripted([first, settled]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxmerge.compare_latency(_modules(), (X,), backend="scripted")
    assert backend.calls == 2
    with pytest.raises(fxmerge.InvalidArgumentError, match="baseline must name one of the modules"):
        fxmerge.compare_latency(_modules(), (X,), backend="scripted", baseline="nope")


def test_measure_latency_warns_on_its_own_spread(registry):
    fxmerge.register_backend(Scripted([{"model": BUSY}]))
    with pytest.warns(TimingNoiseWarning, match=r"'model' measured [0-9.]+ ms with its samples spread \d+ %"):
        fxmerge.measure_latency(nn.Identity(), (X,), backend="scripted")


# --------------------------------------------------------------------------- verify


class NoisyFake(Fake):
    """Fake's law, with samples: every candidate ratio is timed with a busy machine's spread
    while ``noisy`` is set."""

    def __init__(self):
        super().__init__()
        self.noisy = True

    def compare(self, modules, inputs, *, rounds=5, repeats=15, min_repeat_ms=30.0, warmup_ms=500.0, runners=None):
        self.calls += 1
        out = {}
        for k, (name, m) in enumerate(modules.items()):
            base = self.model_ms(m, inputs)
            shape = BUSY if self.noisy and k else QUIET
            out[name] = Timing.from_samples([base * s for s in shape], 1)
        return out


def _uncalibrated(model):
    """A table whose only observation is the folded original (as in tests/test_backends.py)."""
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake", references=False)
    analysis = fxmerge.analyze(model, (X,))
    verification.observe(table, model, (X,), analysis, {"fold-only": fxmerge.Plan.fold_only(analysis)},
                         kind="reference")
    return table


def test_verify_does_not_correct_on_a_noisy_observation(registry, tmp_path):
    backend = fxmerge.register_backend(NoisyFake())
    backend.noisy = False
    model = tiny_mbv2()
    table = _uncalibrated(model)
    analysis = fxmerge.analyze(model, (X,))
    before = [dict(o) for o in table.reference(analysis)["observations"]]
    correction = table.correction(analysis)
    backend.noisy, calls = True, backend.calls
    with pytest.warns(TimingNoiseWarning, match="too noisy to correct the cost model with, so it was not recorded"):
        with pytest.raises(fxmerge.VerificationError, match=r"3 of the rounds were too noisy") as info:
            fxmerge.plan(model, table, budget=0.9, example_inputs=(X,), verify=True, save_to=tmp_path / "t.json")
    assert table.reference(analysis)["observations"] == before and table.correction(analysis) == correction
    rounds = info.value.rounds
    assert len(rounds) == 3 and len({r["aim_ms"] for r in rounds}) == 1  # the same aim, timed again
    assert backend.calls - calls == 2 * 3  # each round timed twice (more rounds) before it was judged noisy
    assert all(r["ratio_interval"][1] - r["ratio_interval"][0] > timing.NOISY_WIDTH * r["ratio"] for r in rounds)


def test_verify_records_quiet_rounds_with_their_interval(registry):
    backend = fxmerge.register_backend(NoisyFake())
    backend.noisy = False
    model = tiny_mbv2()
    table = _uncalibrated(model)
    chosen = fxmerge.plan(model, table, budget=0.9, example_inputs=(X,), verify=True)
    assert len(chosen.info["verify"]) > 1  # a miss first: recorded, corrected, re-planned
    for r in chosen.info["verify"]:
        low, high = r["ratio_interval"]
        assert low <= r["ratio"] <= high and high - low <= timing.NOISY_WIDTH * r["ratio"]


# --------------------------------------------------------------------------- verify stays in its loop (item 18)


class _Plan:
    def __init__(self, name):
        self.name, self.report = name, fxmerge.PlanReport(1.0, 1.0, 20.0, "stub")

    def fingerprint(self):
        return self.name


class _Table:
    def __init__(self):
        self.saved = 0

    def reference(self, analysis):
        return {"original_ms": 20.0}

    def save(self, path):
        self.saved += 1


SMALLEST = 9.5


def _select(plans):
    def select(aim):
        if aim < SMALLEST:
            raise fxmerge.InfeasibleBudgetError(f"no plan fits {aim:.4g} ms; the smallest feasible budget is "
                                                f"{SMALLEST} ms", SMALLEST)
        return plans["slow"] if aim >= 10 else plans["fast"]
    return select


def _scripted_measurements(monkeypatch, measured: dict, interrupt_after: int | None = None):
    calls = []

    def measure_plans(table, model, inputs, analysis, plans, **kw):
        (name, plan), = plans.items()
        calls.append(plan.name)
        if interrupt_after is not None and len(calls) > interrupt_after:
            raise KeyboardInterrupt
        r = measured[plan.name] / 20.0
        return PlanTimings(20.0, {name: r}, [], {name: Ratio(r, r, r, 0.96, 9)}, {name: plan})

    monkeypatch.setattr(verification, "measure_plans", measure_plans)
    return calls


def _verify(plans, table, **kw):
    predicted = {"slow": 10.0, "fast": SMALLEST}
    return verification.verify(_select(plans), lambda p: predicted[p.name], table, None, (X,), None, 10.0,
                               save_to="unused.json", **kw)


def test_verify_reaims_at_the_smallest_feasible_plan_instead_of_raising(monkeypatch):
    plans, table = {"slow": _Plan("slow"), "fast": _Plan("fast")}, _Table()
    # round 1 misses by 10 %: the secant aim (9.09 ms) lies below the smallest feasible plan (9.5 ms)
    calls = _scripted_measurements(monkeypatch, {"slow": 11.0, "fast": 10.2})
    chosen = _verify(plans, table)
    assert chosen is plans["fast"] and calls == ["slow", "fast"] and table.saved == 1
    assert [r.aim_ms for r in chosen.report.verify] == [10.0, pytest.approx(10.0 * 10 / 11)]


def test_verify_stops_when_the_aim_leads_back_to_a_measured_plan(monkeypatch):
    plans, table = {"slow": _Plan("slow"), "fast": _Plan("fast")}, _Table()
    calls = _scripted_measurements(monkeypatch, {"slow": 11.0, "fast": 10.8})
    with pytest.raises(fxmerge.VerificationError, match="after 2 round") as info:
        _verify(plans, table, rounds=5)
    assert calls == ["slow", "fast"] and info.value.best is plans["fast"] and table.saved == 1


def test_verify_saves_its_observations_when_interrupted(monkeypatch):
    plans, table = {"slow": _Plan("slow"), "fast": _Plan("fast")}, _Table()
    _scripted_measurements(monkeypatch, {"slow": 11.0, "fast": 10.2}, interrupt_after=1)
    with pytest.raises(KeyboardInterrupt):
        _verify(plans, table)
    assert table.saved == 1


def test_verify_leaves_the_users_own_infeasible_budget_to_them(monkeypatch):
    plans, table = {"slow": _Plan("slow"), "fast": _Plan("fast")}, _Table()
    _scripted_measurements(monkeypatch, {})
    with pytest.raises(fxmerge.InfeasibleBudgetError, match="smallest feasible budget is 9.5"):
        verification.verify(_select(plans), lambda p: 0.0, table, None, (X,), None, 9.0)


# --------------------------------------------------------------------------- a table measured while the machine changed


class Slowing(Fake):
    """Fake's units, getting slower the longer the table runs (another job starting up)."""

    def __init__(self, rate):
        super().__init__()
        self.rate, self.timed = rate, 0

    def time_units(self, units, settings, *, state, done, checkpoint, progress):
        def later(key, t):
            self.timed += 1
            done(key, Timing(t.ms * (1 + self.rate * self.timed), 0.0, 1, 1))
        super().time_units(units, settings, state=state, done=later, checkpoint=checkpoint, progress=progress)


def test_a_table_says_when_its_units_and_references_saw_different_machines(registry):
    fxmerge.register_backend(Slowing(rate=0.02))
    with pytest.warns(TimingNoiseWarning, match=r"the machine changed speed while the table was measured: 8 units "
                                                r"re-timed after the end-to-end references ran at [0-9.]+x"):
        table = fxmerge.LatencyTable.measure(tiny_mbv2(), (X,), backend="fake")
    assert table.drift > timing.DRIFT_LIMIT


def test_a_table_measured_on_a_steady_machine_says_nothing(registry):
    fxmerge.register_backend(Slowing(rate=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TimingNoiseWarning)
        table = fxmerge.LatencyTable.measure(tiny_mbv2(), (X,), backend="fake")
    assert table.drift == pytest.approx(1.0)


# --------------------------------------------------------------------------- what the demo prints


def test_demo_reports_speedups_within_their_confidence_or_says_it_was_too_noisy():
    from fxmerge.cli.demo import speedup_summary

    quiet = {"original": _timing(QUIET), "budget 0.6": _timing(QUIET, 0.5)}
    speedups, line = speedup_summary(quiet, "original")
    assert speedups["budget 0.6"].value == pytest.approx(2.0) and speedups["budget 0.6"].trusted
    assert line.startswith("timing: every speed-up is within +-") and "9 paired samples" in line
    busy = {"original": _timing(QUIET), "budget 0.8": _timing(BUSY, 0.9), "budget 0.6": _timing(QUIET, 0.5)}
    speedups, line = speedup_summary(busy, "original")
    low, high = speedups["budget 0.8"].interval()
    assert low < 1 < high  # "faster" cannot even be told from "slower" here
    assert line.startswith("the machine was too noisy to measure 1 of these 2 speed-ups: budget 0.8 measured")
    assert f"{low:.2f}x-{high:.2f}x" in line and "measure again when the machine is quieter" in line


def test_cli_verify_says_the_machine_was_too_noisy(registry, tmp_path, capsys):
    from fxmerge.cli import main

    backend = fxmerge.register_backend(NoisyFake())
    common = ["--input-shape", "1,3,32,32", "--cache-dir", str(tmp_path), "--backend", "fake"]
    factory = "test_latency_and_plan:tiny_mbv2"
    backend.noisy = False
    assert main(["plan", factory, "--budget", "0.95", "--verify", *common]) == 0
    out = capsys.readouterr().out
    assert "verification:" in out and "95% interval" in out
    backend.noisy = True
    with pytest.warns(TimingNoiseWarning):
        code = main(["plan", factory, "--budget", "0.9", "--verify", *common])
    err = capsys.readouterr().err
    assert code != 0 and "too noisy to correct the cost model with" in err


def test_verify_accepts_a_noisy_round_that_meets_the_budget_and_says_how_sure_it_is(monkeypatch):
    plans, table = {"slow": _Plan("slow"), "fast": _Plan("fast")}, _Table()
    calls = []

    def measure_plans(table, model, inputs, analysis, plans, **kw):
        (name, plan), = plans.items()
        calls.append(plan.name)
        return PlanTimings(20.0, {name: 0.49}, [], {name: Ratio(0.49, 0.40, 0.62, 0.96, 9)}, {name: plan})

    monkeypatch.setattr(verification, "measure_plans", measure_plans)
    with pytest.warns(TimingNoiseWarning, match=r"met its budget on a noisy measurement: 0\.490 .* interval 0\.400-0\.620"):
        chosen = _verify(plans, table)
    assert chosen is plans["slow"] and calls == ["slow"]
    assert chosen.report.verify[0].ratio_interval == (0.40, 0.62)


class BusyReferences(Fake):
    """Fake's law; whole models timed on a machine that another process keeps taking: every
    module's samples swing alike (their ratios stay sharp), the units' do not."""

    def compare(self, modules, inputs, *, rounds=5, repeats=15, min_repeat_ms=30.0, warmup_ms=500.0, runners=None):
        return {name: Timing.from_samples([self.model_ms(m, inputs) * s for s in BUSY], 1) for name, m in modules.items()}


def test_a_table_says_when_its_references_saw_a_busier_machine_than_its_units(registry):
    fxmerge.register_backend(BusyReferences())
    with pytest.warns(TimingNoiseWarning, match=r"the end-to-end references ran on a busier machine than the units: "
                                                r"the folded original's samples spread \d+ %"):
        table = fxmerge.LatencyTable.measure(tiny_mbv2(), (X,), backend="fake")
    analysis = fxmerge.analyze(tiny_mbv2(), (X,))
    assert len(table.reference(analysis)["observations"]) >= 3  # sharp ratios: the references are all kept
    assert timing.state_note([0.02] * 5, 0.05) is None and timing.state_note([0.08] * 5, 0.12) is None


# --------------------------------------------------------------------------- one estimate per ratio


class DriftingFake(Fake):
    """Fake's units; whole modules timed while the machine changes speed part-way through each
    module's samples, at a slightly different sample for the folded original (timed first in
    each round) than for the plans: pair by pair the plan takes half the original's time, but
    the medians of the two sample lists are equal."""

    def compare(self, modules, inputs, *, rounds=5, repeats=15, min_repeat_ms=30.0, warmup_ms=500.0, runners=None):
        self.calls += 1
        original, plan = [10.0] * 5 + [20.0] * 4, [5.0] * 4 + [10.0] * 5
        return {name: Timing.from_samples(original if k == 0 else plan, 1) for k, name in enumerate(modules)}


def test_a_plans_ratio_is_the_paired_estimate_its_interval_belongs_to(registry):
    """The ratio a verify round judges and a table records is the median of the paired sample
    ratios, the estimate its confidence interval is about; the ratio of the two medians (1.0
    here) could lie outside that interval (measured: 0.744 reported with an interval of
    0.760-0.855, a round that "met" 0.8 and then measured 0.84)."""
    fxmerge.register_backend(DriftingFake())
    model = tiny_mbv2()
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake", references=False)
    analysis = fxmerge.analyze(model, (X,))
    plan = fxmerge.Plan.drop_all(analysis)
    timings = verification.measure_plans(table, model, (X,), analysis, {"drop-all": plan}, kind="verify")
    r = timings.intervals["drop-all"]
    assert (r.low, r.value, r.high) == (0.5, 0.5, 0.5)
    assert timings.ratios["drop-all"] == r.value
    recorded = [o["ratio"] for o in table.reference(analysis)["observations"] if o["plan"] == plan.fingerprint()]
    assert recorded == [0.5]
