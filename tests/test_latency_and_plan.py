"""Latency tables, fxmerge.plan / compress and the CLI, on small models.

Nothing here asserts on timings (they belong in benchmarks/): measuring is tested with tiny,
quick tables whose numbers do not matter; planning tests whose outcome depends on the numbers
use synthetic tables (tests/synthetic.py), so a loaded machine cannot change what they see.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import fxmerge
import fxmerge.artifacts
from conftest import count_convs, randomize
from fxmerge import backends, timing
from synthetic import feasible_budget, merging_pays_table

QUICK = dict(repeats=2, rounds=2, min_repeat_ms=0.5, warmup=1)


def block(cin, cout, k=3, s=1, g=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c, t=4):
        super().__init__()
        self.conv = nn.Sequential(block(c, c * t, 1), block(c * t, c * t, 3, g=c * t), block(c * t, c, 1, act=False))

    def forward(self, x):
        return x + self.conv(x)


def tiny_mbv2():
    return randomize(nn.Sequential(block(3, 8, 3, s=2), InvertedResidual(8), InvertedResidual(8), block(8, 16, 1),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))).eval()


class FunctionalTwin(nn.Module):
    """Another model with the same conv specs, written differently (functional activations)."""

    def __init__(self):
        super().__init__()
        self.stem = block(3, 8, 3, s=2, act=False)
        self.ir = InvertedResidual(8)

    def forward(self, x):
        return self.ir(torch.nn.functional.relu6(self.stem(x))).mean((2, 3))


X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return fxmerge.LatencyTable.measure(tiny_mbv2(), (X,), path=tmp_path_factory.mktemp("t") / "t.json", **QUICK)


@pytest.fixture(scope="module")
def synthetic():
    """tiny_mbv2's table with made-up times: every conv 1 ms, merged or not, each kept
    activation and explicit add 0.25 ms, the rest 1 ms."""
    return merging_pays_table(fxmerge.analyze(tiny_mbv2(), (X,)), (X,))


def test_table_covers_every_cost_term_and_round_trips(table, tmp_path):
    analysis = fxmerge.analyze(tiny_mbv2(), (X,))
    assert table.missing(analysis) == []
    kinds = {k.split()[0] for k in table.entries}
    assert {"conv2d", "act", "add"} <= kinds
    ref = table.reference(analysis)
    assert ref is not None and ref["original_ms"] > 0 and len(ref["observations"]) >= 2  # the folded original and more
    assert {o["kind"] for o in ref["observations"]} == {"reference"}
    correction = table.correction(analysis)
    assert correction.scale > 0 and correction.rest_ms >= 0 and correction.overhead_ms >= 0
    assert set(table.fingerprint) == {"torch", "device", "backend", "threads", "dtype"}
    path = tmp_path / "table.json"
    table.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "fxmerge.latency" and data["version"] == 2 and "pending" not in data
    again = fxmerge.LatencyTable.load(path)
    assert again.entries == table.entries and again.references == table.references
    assert again.fingerprint == table.fingerprint


def test_each_distinct_spec_is_measured_once(table):
    analysis = fxmerge.analyze(tiny_mbv2(), (X,))
    from fxmerge.cost import CostModel

    keys = CostModel(analysis, table.ms).required_keys()
    assert len(table.entries) == len(keys)  # one entry per distinct term, no duplicates
    blocks = sum(len(c.valid_blocks) for c in analysis.chains)
    assert len([k for k in keys if k.startswith("conv")]) < blocks  # the two residual blocks share specs


def test_plan_and_compress_are_exact_and_deterministic(synthetic):
    model, table = tiny_mbv2(), synthetic
    budget = feasible_budget(model, table)
    first = fxmerge.plan(model, table, budget_ms=budget)
    second = fxmerge.plan(model, table, budget_ms=budget)
    assert first.fingerprint() == second.fingerprint()
    pred = first.info["predicted_ms"]
    assert pred["planned"] <= budget + 1e-9 and first.num_convs < fxmerge.analyze(model, (X,)).num_layers
    compressed = fxmerge.compress(model, table, budget_ms=budget)
    assert fxmerge.plan_of(compressed).chains == first.chains
    linear = fxmerge.linearize(model, first).eval()
    with torch.no_grad():
        torch.testing.assert_close(compressed(X), linear(X), rtol=1e-4, atol=1e-5)
    compressed.graph.lint()
    text = str(first)
    assert "predicted latency (end to end)" in text and "pred. ms" in text


def test_no_budget_keeps_every_activation(synthetic):
    model, table = tiny_mbv2(), synthetic
    chosen = fxmerge.plan(model, table)
    analysis = fxmerge.analyze(model, (X,))
    assert [c.keep for c in chosen.chains] == [tuple(c.droppable) for c in analysis.chains]
    assert chosen.info["predicted_ms"]["planned"] <= chosen.info["predicted_ms"]["original"] + 1e-9


def test_infeasible_budget_states_the_smallest_feasible_one(synthetic):
    # The cheapest plan drops every activation and merges as far as the block limits allow;
    # with every conv at 1 ms it costs the rest (1 ms) plus 1 ms per merged conv and its adds.
    analysis = fxmerge.analyze(tiny_mbv2(), (X,))
    cheapest = fxmerge.plan(tiny_mbv2(), synthetic, budget_ms=1e6, importance={
        (c.index, 0, c.length): 1.0 for c in analysis.chains}, resolution=0.25)
    smallest = cheapest.info["predicted_ms"]["planned"]
    assert smallest < 0.5 * cheapest.info["predicted_ms"]["original"]
    with pytest.raises(fxmerge.InfeasibleBudgetError, match=rf"smallest feasible budget is {smallest:g} ms") as info:
        fxmerge.plan(tiny_mbv2(), synthetic, budget_ms=smallest - 0.25, resolution=0.25)
    assert info.value.smallest_ms == pytest.approx(smallest)


def test_table_serves_a_second_model_whose_specs_it_covers(table):
    twin = randomize(FunctionalTwin()).eval()
    analysis = fxmerge.analyze(twin, (X,))
    assert table.missing(analysis) == []
    chosen = fxmerge.plan(twin, table, example_inputs=(X,), budget_ms=1e6)
    assert chosen.info["end_to_end"] is False  # no reference for this model: chains only
    assert "chains only" in str(chosen)
    compressed = fxmerge.compress(twin, table, example_inputs=(X,), budget_ms=1e6)
    with torch.no_grad():
        torch.testing.assert_close(compressed(X), fxmerge.linearize(twin, chosen).eval()(X), rtol=1e-4, atol=1e-5)


def test_missing_specs_are_listed_or_measured_on_request(table):
    wider = randomize(nn.Sequential(block(3, 12, 3), block(12, 12, 3))).eval()
    with pytest.raises(fxmerge.MissingLatencyError) as info:
        fxmerge.plan(wider, table, example_inputs=(X,))
    assert "conv2d in=12 out=12" in str(info.value) and "measure_missing" in str(info.value)
    extended = fxmerge.LatencyTable.from_dict(table.to_dict())
    chosen = fxmerge.plan(wider, extended, example_inputs=(X,), measure_missing=True)
    assert chosen.num_convs >= 1 and extended.missing(fxmerge.analyze(wider, (X,))) == []


def test_fingerprint_mismatch_warns_and_tables_combine(table):
    other = fxmerge.LatencyTable.from_dict(table.to_dict())
    other.fingerprint["threads"] = 64
    other.entries["conv2d fake"] = {"ms": 1.0, "spread": 0.0, "repeats": 1, "calls": 1}
    with pytest.warns(UserWarning, match="measured elsewhere"):
        fxmerge.plan(tiny_mbv2(), other)
    with pytest.warns(UserWarning, match="different environments"):
        both = table | other
    assert set(both.entries) == set(table.entries) | {"conv2d fake"}


def test_interrupted_measurement_resumes_without_losing_samples(tmp_path, monkeypatch):
    path = tmp_path / "resume.json"
    calls = {"n": 0}
    real_sample = backends.sample

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(backends, "sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        fxmerge.LatencyTable.measure(tiny_mbv2(), (X,), path=path, references=False, **QUICK)
    saved = json.loads(path.read_text())
    assert len(saved["pending"]) == 6  # every finished sample is on disk
    calls["n"] = -10_000  # no more interruptions
    table = fxmerge.LatencyTable.measure(tiny_mbv2(), (X,), path=path, references=False, **QUICK)
    analysis = fxmerge.analyze(tiny_mbv2(), (X,))
    assert table.missing(analysis) == [] and not table.pending
    # resumed: the 6 saved samples were not taken again
    assert calls["n"] + 10_000 == 2 * len(table.entries) - 6  # two rounds each, minus the six saved


def test_compressed_model_compiles_and_exports(synthetic):
    compressed = fxmerge.compress(tiny_mbv2(), synthetic, budget_ms=feasible_budget(tiny_mbv2(), synthetic))
    with torch.no_grad():
        ref = compressed(X)
        torch.testing.assert_close(torch.compile(compressed, backend="aot_eager")(X), ref)
        torch.testing.assert_close(torch.export.export(compressed, (X,)).module()(X), ref)


def test_onnx_export_runs_in_onnxruntime(synthetic, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    compressed = fxmerge.compress(tiny_mbv2(), synthetic, budget_ms=feasible_budget(tiny_mbv2(), synthetic))
    path = tmp_path / "m.onnx"
    torch.onnx.export(compressed, (X,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out[0]), compressed(X), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiles_compressed_model(synthetic):
    compressed = fxmerge.compress(tiny_mbv2(), synthetic, budget_ms=feasible_budget(tiny_mbv2(), synthetic))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(compressed)(X), compressed(X), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- CLI


def test_cli_table_plan_compress(tmp_path, capsys):
    from fxmerge.cli import main

    common = ["--input-shape", "1,3,32,32", "--cache-dir", str(tmp_path), "--quick"]
    factory = "test_latency_and_plan:tiny_mbv2"
    assert main(["table", factory, *common]) == 0
    assert "fxmerge latency table" in capsys.readouterr().out
    assert main(["plan", factory, "--budget-ms", "1000", "-o", str(tmp_path / "p.json"), *common]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and "predicted latency" in out
    assert fxmerge.Plan.load(tmp_path / "p.json").num_convs >= 1
    assert main(["compress", factory, "--budget-ms", "1000", "-o", str(tmp_path / "m.pt"), *common]) == 0
    model = fxmerge.artifacts.load(tmp_path / "m.pt", tiny_mbv2())
    assert count_convs(model) >= 1 and model(X).shape == (1, 10)
    # an infeasible budget, on a table whose numbers are known (a measured one could be anything)
    synthetic = tmp_path / "synthetic.json"
    merging_pays_table(fxmerge.analyze(tiny_mbv2(), (X,)), (X,)).save(synthetic)
    assert main(["plan", factory, "--budget", "0.01", "--table", str(synthetic), *common]) == 2
    assert "smallest feasible budget" in capsys.readouterr().err


def test_cli_entry_point_runs_as_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fxmerge", "analyze", "resnet18", "--input-shape", "1,3,32,32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "fxmerge analysis" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fxmerge", "analyze", "no_such_model"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "unknown model" in bad.stderr


def test_measure_latency_times_a_whole_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxmerge.timing.TimingNoiseWarning)  # a busy machine may say so
        result = fxmerge.measure_latency(tiny_mbv2(), (X,), rounds=1, repeats=2, min_repeat_ms=1, warmup_ms=0)
    # 2 samples, or 4 where the first two spread too wide and it timed once more (tests/test_timing_noise.py)
    assert result.ms > 0 and result.repeats in (2, 4) and len(result.samples) == result.repeats


def test_onnxruntime_backend_table():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize(nn.Sequential(block(3, 4, 3), block(4, 4, 1))).eval()
    x = torch.randn(1, 3, 16, 16)
    table = fxmerge.LatencyTable.measure(model, (x,), backend="onnxruntime", repeats=2, rounds=1, min_repeat_ms=0.5)
    assert table.fingerprint["backend"] == "onnxruntime" and table.missing(fxmerge.analyze(model, (x,))) == []
    assert fxmerge.plan(model, table).num_convs >= 1


def test_progress_reports_long_runs_off_terminal(capsys):
    bar = timing.Progress(3, "work", every_s=0.0)  # stderr is no terminal here
    bar.step()
    assert "work: 1/3" in capsys.readouterr().err
    quiet = timing.Progress(3, "work")  # short runs off a terminal print nothing
    quiet.step(3)
    assert capsys.readouterr().err == ""


def test_progress_false_prints_nothing_at_all(capsys):
    off = timing.Progress(3, "work", enabled=False, every_s=0.0)
    off.step(3)
    assert capsys.readouterr().err == ""
