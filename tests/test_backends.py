"""Backends, calibration, verification and the frontier, on a fake backend whose times are
computed, not measured: nothing here depends on the speed of the machine.

The fake backend charges a unit by its multiply-adds (as a table would measure it), but a
whole model by a *different*, nonlinear law (big merged convs cost disproportionately more,
every op has a call overhead, the network has a constant rest): exactly the situation
verification exists for.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fxmerge
from fxmerge.backends import Backend
from fxmerge.timing import TimingSettings
from fxmerge.cost import Correction
from fxmerge.timing import Timing
from test_latency_and_plan import X, tiny_mbv2

UNIT_MS_PER_MMAC, CALL_MS = 1.0, 0.01


def _conv_macs(module: nn.Module, inputs) -> list[int]:
    """Multiply-adds of every conv ``module`` runs on ``inputs``."""
    macs = []

    def hook(m, args, out):
        macs.append(out.numel() * m.weight.shape[1] * m.weight[0, 0].numel())

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    with torch.no_grad():
        module(*inputs)
    for h in handles:
        h.remove()
    return macs


def _pointwise_calls(module: nn.Module) -> int:
    if isinstance(module, torch.fx.GraphModule):
        return sum(1 for n in module.graph.nodes if n.op in ("call_function", "call_method")
                   or (n.op == "call_module" and not isinstance(module.get_submodule(n.target), nn.modules.conv._ConvNd)))
    return sum(1 for m in module.modules() if not list(m.children()) and not isinstance(m, nn.modules.conv._ConvNd))


class Fake(Backend):
    """Units: linear in MACs. Whole models: each conv costs (its linear cost)^1.5 / 0.05^0.5 (a
    merged conv five times the work of a 0.05 ms layer costs ~11x), plus a call overhead per op
    and a constant rest — a law no per-unit table captures."""

    name = "fake"

    def __init__(self):
        self.calls = 0

    def runner(self, module, inputs):  # pragma: no cover - the fake never runs modules for time
        raise AssertionError("the fake backend computes its times")

    def time_units(self, units, settings, *, state, done, checkpoint, progress):
        for key, build in units.items():
            module, inputs = build()
            ms = sum(UNIT_MS_PER_MMAC * m / 1e6 for m in _conv_macs(module, inputs)) + CALL_MS * _pointwise_calls(module)
            done(key, Timing(ms, 0.0, 1, 1))
            progress.step()
        checkpoint()

    @staticmethod
    def model_ms(module, inputs) -> float:
        convs = [UNIT_MS_PER_MMAC * m / 1e6 for m in _conv_macs(module, inputs)]
        return sum(c ** 1.5 / 0.05 ** 0.5 for c in convs) + 0.01 * (len(convs) + _pointwise_calls(module)) + 0.05

    def compare(self, modules, inputs, *, rounds=5, repeats=15, min_repeat_ms=30.0, warmup_ms=500.0, runners=None):
        self.calls += 1
        return {name: Timing(self.model_ms(m, inputs), 0.0, 1, 1) for name, m in modules.items()}


@pytest.fixture
def fake():
    backend = fxmerge.register_backend(Fake())
    yield backend
    del fxmerge.BACKENDS["fake"]


@pytest.fixture
def measured(fake, tmp_path):
    model = tiny_mbv2()
    path = tmp_path / "fake.json"
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake", path=path)
    return model, table, path


@pytest.fixture
def uncalibrated(fake, tmp_path):
    """A table whose only end-to-end observation is the folded original: its correction is a
    constant rest, blind to the backend's nonlinearity (as a table reused for another budget
    regime, or measured with references=False, would be)."""
    from fxmerge.verification import observe

    model = tiny_mbv2()
    path = tmp_path / "fake.json"
    table = fxmerge.LatencyTable.measure(model, (X,), backend="fake", path=path, references=False)
    analysis = fxmerge.analyze(model, (X,))
    observe(table, model, (X,), analysis, {"fold-only": fxmerge.Plan.fold_only(analysis)}, kind="reference")
    table.save(path)
    return model, table, path


def test_a_backend_is_one_registry_entry(fake, tmp_path, capsys):
    from fxmerge.cli import build_parser

    assert "fake" in fxmerge.BACKENDS
    parser = build_parser()
    args = parser.parse_args(["table", "m", "--backend", "fake"])  # the CLI offers it with no edit
    assert args.backend == "fake"
    with pytest.raises(fxmerge.InvalidArgumentError, match="backend must be one of"):
        fxmerge.LatencyTable.measure(tiny_mbv2(), (X,), backend="tensorrt")


def test_references_calibrate_the_cost_model(measured):
    model, table, _ = measured
    analysis = fxmerge.analyze(model, (X,))
    ref = table.reference(analysis)
    kinds = {o["kind"] for o in ref["observations"]}
    assert kinds == {"reference"} and len(ref["observations"]) >= 3
    folded = fxmerge.merge(model, fxmerge.Plan.fold_only(analysis))
    assert ref["original_ms"] == pytest.approx(Fake.model_ms(folded, (X,)))
    correction = table.correction(analysis)
    assert correction.rest_ms > 0 and correction.scale > 0  # the fit sees the rest the units lack
    original = fxmerge.plan(model, table, example_inputs=(X,))
    assert original.info["predicted_ms"]["original"] == pytest.approx(ref["original_ms"], rel=0.15)


def test_budgets_are_fractions_of_the_measured_original(measured):
    model, table, _ = measured
    analysis = fxmerge.analyze(model, (X,))
    chosen = fxmerge.plan(model, table, budget=0.95, example_inputs=(X,))
    assert chosen.info["original_ms"] == table.reference(analysis)["original_ms"]
    assert chosen.info["budget_ms"] == pytest.approx(0.95 * chosen.info["original_ms"])


def test_verify_converges_on_a_backend_the_table_mispredicts(uncalibrated):
    model, table, path = uncalibrated
    analysis = fxmerge.analyze(model, (X,))
    original = table.reference(analysis)["original_ms"]
    budget = 0.9
    unverified = fxmerge.plan(model, table, budget=budget, example_inputs=(X,))
    real = Fake.model_ms(fxmerge.merge(model, unverified), (X,))
    assert real > 1.03 * budget * original  # without verification the budget is missed
    verified = fxmerge.plan(model, table, budget=budget, example_inputs=(X,), verify=True)
    rounds = verified.info["verify"]
    assert 1 < len(rounds) <= 3
    real = Fake.model_ms(fxmerge.merge(model, verified), (X,))
    assert real <= 1.03 * budget * original  # met, as measured by the backend
    assert rounds[-1]["measured_ms"] == pytest.approx(real)
    assert [set(r) >= {"predicted_ms", "measured_ms", "ratio"} for r in rounds] == [True] * len(rounds)


def test_observations_persist_and_correct_the_next_plan(uncalibrated):
    model, table, path = uncalibrated
    analysis = fxmerge.analyze(model, (X,))
    untouched = path.read_bytes()
    fxmerge.plan(model, fxmerge.LatencyTable.load(path), budget=0.92, example_inputs=(X,), verify=True)
    assert path.read_bytes() == untouched  # verify writes only where it is told to
    fxmerge.plan(model, table, budget=0.92, example_inputs=(X,), verify=True, save_to=path)
    saved = json.loads(path.read_text())  # saved where asked
    observations = next(iter(saved["references"].values()))["observations"]
    assert any(o["kind"] == "verify" for o in observations)
    again = fxmerge.LatencyTable.load(path)
    before = fxmerge.plan(model, table, budget=0.92, example_inputs=(X,))  # the table corrected in memory ...
    first_try = fxmerge.plan(model, again, budget=0.92, example_inputs=(X,))  # ... and on disk: no verify needed
    assert first_try.chains == before.chains
    original = again.reference(analysis)["original_ms"]
    assert Fake.model_ms(fxmerge.merge(model, first_try), (X,)) <= 1.03 * 0.92 * original


def test_verify_states_what_it_reached_when_it_runs_out_of_rounds(uncalibrated):
    model, table, _ = uncalibrated
    analysis = fxmerge.analyze(model, (X,))
    with pytest.raises(fxmerge.VerificationError, match=r"no plan measured within the budget after 1 round\(s\): the "
                                                        r"closest measured [0-9.]+ ms \(0\.\d\d of the folded") as info:
        fxmerge.plan(model, table, budget=0.9, example_inputs=(X,), verify=True, verify_rounds=1)
    assert len(info.value.rounds) == 1 and info.value.best is not None
    assert table.reference(analysis)["observations"][-1]["kind"] == "verify"  # the miss is kept


def test_frontier_points_agree_with_plan_at_each_budget(measured):
    model, table, _ = measured
    grid = 1e-6  # one fine DP grid for both: each segment's cost rounds up by less than this
    points = fxmerge.frontier(model, table, example_inputs=(X,), resolution=grid)
    assert len(points) >= 3
    latencies = [p.info["predicted_ms"]["planned"] for p in points]
    assert latencies == sorted(latencies) and len(set(latencies)) == len(latencies)
    for p in points:
        slack = 64 * grid  # the rounding of every segment, far below the gaps between points
        at = fxmerge.plan(model, table, budget_ms=p.info["predicted_ms"]["planned"] + slack, example_inputs=(X,),
                          resolution=grid)
        assert at.info["importance"] == pytest.approx(p.info["importance"])
        assert at.info["predicted_ms"]["planned"] == pytest.approx(p.info["predicted_ms"]["planned"], abs=slack)


def test_frontier_with_verify_measures_the_chosen_points(measured, fake):
    model, table, _ = measured
    with pytest.raises(fxmerge.InvalidArgumentError, match="give points=N"):
        fxmerge.frontier(model, table, example_inputs=(X,), verify=True)
    points = fxmerge.frontier(model, table, example_inputs=(X,), verify=True, points=3)
    assert len(points) == 3
    for p in points:
        assert p.info["measured_ms"] == pytest.approx(Fake.model_ms(fxmerge.merge(model, p), (X,)))


def test_correction_fit_never_goes_negative():
    assert Correction.fit([(25.6, 96, 12.49), (21.6, 77, 12.2), (8.1, 12, 7.42)]).scale == pytest.approx(0.306, abs=1e-3)
    assert Correction.fit([(10, 100, 12), (6, 50, 7)]) == Correction(0.0, 0.02, 1.0)
    assert Correction.fit([(10, 100, 12)]) == Correction(2.0, 0.0, 1.0)
    fit = Correction.fit([(10, 100, 3), (6, 50, 2.5), (3, 20, 2)])  # measured below the terms: a scale < 1
    assert fit.rest_ms >= 0 and fit.overhead_ms >= 0 and 0 < fit.scale < 1


def test_cli_plan_frontier_and_verify(fake, tmp_path, capsys):
    from fxmerge.cli import main

    common = ["--input-shape", "1,3,32,32", "--cache-dir", str(tmp_path), "--backend", "fake"]
    factory = "test_latency_and_plan:tiny_mbv2"
    assert main(["plan", factory, "--frontier", *common]) == 0
    out = capsys.readouterr().out
    assert "Pareto frontier" in out and "pred. speed-up" in out
    assert main(["plan", factory, "--frontier", "--verify", "--points", "3", *common]) == 0
    assert "measured ms" in capsys.readouterr().out
    assert main(["plan", factory, "--budget", "0.9", "--verify", *common]) == 0
    assert "verification:" in capsys.readouterr().out


def test_onnxruntime_profiles_kernel_time_without_reorders(tmp_path):
    from fxmerge.backends import _per_run_kernel_ms

    trace = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
             {"cat": "Node", "name": "conv_kernel_time", "ts": 10, "dur": 30, "args": {"op_name": "Conv"}},
             {"cat": "Node", "name": "r_kernel_time", "ts": 50, "dur": 20, "args": {"op_name": "ReorderOutput"}},
             {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
             {"cat": "Node", "name": "conv_kernel_time", "ts": 210, "dur": 40, "args": {"op_name": "Conv"}}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    assert _per_run_kernel_ms(str(path)) == [0.03, 0.04]


def test_backends_time_units_in_their_layout():
    from fxmerge.backends import BACKENDS

    x = torch.randn(1, 4, 8, 8)
    assert BACKENDS["eager"].unit_inputs((x,))[0].is_contiguous()
    assert BACKENDS["inductor"].unit_inputs((x,))[0].is_contiguous(memory_format=torch.channels_last)
    assert isinstance(BACKENDS["eager"].unit_inputs((x,)), tuple) and TimingSettings().check().repeats == 9
