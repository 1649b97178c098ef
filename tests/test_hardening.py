"""Issue 8: no bad input ends in a traceback or a lost file, and files carry their identity.

Each test is named after the case it covers. Planning uses synthetic latency tables and timing
uses the fewest repeats, so nothing here depends on how fast the machine is.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxmerge
from conftest import finetune_like
from fxmerge import cli
from fxmerge.cli import models as model_specs
from fxmerge.fingerprints import model_key
from fxmerge.importance import ImportanceTable, sgd_finetune
from importance_models import data, neg_loss, small_net
from synthetic import merging_pays_table
from test_latency_and_plan import X, tiny_mbv2

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(repeats=1, rounds=1, min_repeat_ms=0.0, warmup=0)
FACTORY = "test_latency_and_plan:tiny_mbv2"


@pytest.fixture(scope="module")
def tiny():
    model = tiny_mbv2()
    analysis = fxmerge.analyze(model, (X,))
    return model, analysis, merging_pays_table(analysis, (X,))


@pytest.fixture
def table(tiny):
    """A fresh copy of tiny's synthetic table (tests may change it)."""
    return fxmerge.LatencyTable.from_dict(json.loads(json.dumps(tiny[2].to_dict())))


@contextlib.contextmanager
def ends_within(seconds: float):
    """Fail instead of hanging (the code before the fix looped forever on some inputs)."""

    def alarm(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``fxmerge ARGV`` in this process: (exit status, stdout, stderr); argparse's exits too."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# =========================================================================== 1. one validation layer

BAD_BUDGETS = [float("nan"), float("inf"), -1.0, 0, "0.6", [0.6], torch.tensor(0.6)]


@pytest.mark.parametrize("name, unit", [("budget", "a fraction of the original's latency"),
                                        ("budget_ms", "the end-to-end latency in milliseconds")])
@pytest.mark.parametrize("value", BAD_BUDGETS, ids=repr)
def test_bad_budgets_are_refused_naming_the_argument_before_any_work(table, name, unit, value):
    # model=None: any tracing before the check would fail differently
    with pytest.raises(fxmerge.InvalidArgumentError, match=rf"^{name} must be a finite number > 0 \({unit}, e.g. "):
        fxmerge.plan(None, table, **{name: value}, example_inputs=(X,))


def test_budget_true_is_refused(tiny):
    model, _, table = tiny
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"^budget must be a finite number > 0 .*; got True \(bool\)"):
        fxmerge.plan(model, table, budget=True)


def test_budget_and_budget_ms_together_are_refused(tiny):
    model, _, table = tiny
    with pytest.raises(fxmerge.InvalidArgumentError, match="give budget .* or budget_ms .*, not both"):
        fxmerge.plan(model, table, budget=0.5, budget_ms=3.0)


def test_too_fine_resolution_is_refused_naming_one_that_works(tiny):
    model, _, table = tiny
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"resolution=1e-09 ms .* grid cells, more than the DP's "
                                                           r"limit of 2,000,000 .*use resolution >= [0-9.e-]+ ms") as info:
        fxmerge.plan(model, table, budget=0.6, resolution=1e-9)
    suggested = float(str(info.value).split("use resolution >= ")[1].split(" ms")[0])
    assert fxmerge.plan(model, table, budget=0.6, resolution=suggested).num_convs >= 1  # the suggestion works
    for bad in (float("nan"), -0.1, "0.1"):
        with pytest.raises(fxmerge.InvalidArgumentError, match="^resolution must be a finite number > 0"):
            fxmerge.plan(model, table, budget=0.6, resolution=bad)


def test_huge_budget_needs_no_huge_grid(tiny):
    model, _, table = tiny
    chosen = fxmerge.plan(model, table, budget_ms=1e12, resolution=0.25)  # 4e12 cells, were the grid not capped
    assert chosen.info["predicted_ms"]["planned"] <= chosen.info["predicted_ms"]["original"]


def _neighbour_scores(analysis) -> dict:
    return {(c.index, a, b): 1.0 for c in analysis.chains for a, b in zip(c.kept_candidates, c.kept_candidates[1:])}


def test_nan_importance_is_refused_naming_the_pair(tiny):
    model, analysis, table = tiny
    scores = _neighbour_scores(analysis)
    scores[(0, 0, 1)] = float("nan")
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"importance\[\(0, 0, 1\)\] is nan; every score must be a "
                                                           r"finite number"):
        fxmerge.plan(model, table, budget=0.8, importance=scores)


def test_importance_given_as_a_list_is_refused(tiny):
    model, _, table = tiny
    with pytest.raises(fxmerge.InvalidArgumentError, match="importance must be an ImportanceTable or a mapping "
                                                           r"\(chain, i, j\) -> score; got \[1.0, 2.0\] \(list\)"):
        fxmerge.plan(model, table, budget=0.8, importance=[1.0, 2.0])
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"importance key \(0, 1\) is not a pair \(chain, i, j\)"):
        fxmerge.plan(model, table, budget=0.8, importance={(0, 1): 1.0})


def test_missing_importance_entries_name_the_chain_and_the_missing_pairs(tiny):
    model, analysis, table = tiny
    scores = _neighbour_scores(analysis)
    chain = analysis.chains[0]
    first, second = chain.kept_candidates[1], chain.kept_candidates[2]
    del scores[(0, first, second)]
    with pytest.raises(fxmerge.InvalidArgumentError) as info:
        fxmerge.plan(model, table, budget=0.8, importance=scores)
    message = str(info.value)
    assert f"chain 0 ({chain.name()})" in message and f"(0, {first}, {second})" in message
    assert "KeyError" not in message and "no chain of allowed pairs" not in message
    # an ImportanceTable with too few entries: named the same way
    partial = ImportanceTable({(0, 0, 1): 1.0})
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"importance has no scores that lead through chain 0"):
        fxmerge.plan(model, table, budget=0.8, importance=partial)


def test_example_inputs_must_be_tensors(table):
    for bad in ([[1.0, 2.0]], "x", ()):
        with pytest.raises(fxmerge.InvalidArgumentError, match="^example_inputs must be a tensor or a tuple of tensors"):
            fxmerge.plan(None, table, budget=0.5, example_inputs=bad)
    with pytest.raises(fxmerge.InvalidArgumentError, match="^latency_table must be a fxmerge.LatencyTable"):
        fxmerge.plan(None, "table.json", budget=0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"repeats": 0}, "^repeats must be an integer >= 1"),
    ({"rounds": -1}, "^rounds must be an integer >= 1"),
    ({"warmup": 1.5}, "^warmup must be an integer >= 0"),
    ({"min_repeat_ms": float("nan")}, "^min_repeat_ms must be a finite number >= 0"),
    ({"backend": "tensorrt"}, "^backend must be one of 'eager', 'inductor', 'onnxruntime'; got 'tensorrt'"),
])
def test_latency_table_measure_checks_its_settings_before_any_work(kwargs, message, table):
    with pytest.raises(fxmerge.InvalidArgumentError, match=message):
        fxmerge.LatencyTable.measure(None, (X,), **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(fxmerge.InvalidArgumentError, match=message):
            table.measure_missing(None, (X,), **kwargs)


def test_measure_latency_and_compare_latency_check_their_settings():
    with pytest.raises(fxmerge.InvalidArgumentError, match="^rounds must be an integer >= 1"):
        fxmerge.measure_latency(nn.Identity(), (X,), rounds=0)
    with pytest.raises(fxmerge.InvalidArgumentError, match="^warmup_ms must be a finite number >= 0"):
        fxmerge.measure_latency(nn.Identity(), (X,), warmup_ms=-5)
    with pytest.raises(fxmerge.InvalidArgumentError, match="^modules must be a non-empty mapping"):
        fxmerge.backends.compare_latency({}, (X,))
    with pytest.raises(fxmerge.InvalidArgumentError, match="^example_inputs must be a tensor"):
        fxmerge.measure_latency(nn.Identity(), [3])


def test_importance_estimators_check_their_settings():
    model, batches = small_net(), data()
    x = batches[0][0]
    with pytest.raises(fxmerge.InvalidArgumentError, match="^steps must be an integer >= 1"):
        ImportanceTable.estimate(model, (x,), eval_fn=neg_loss(batches), data=batches, steps=0)
    with pytest.raises(fxmerge.InvalidArgumentError, match="^lr must be a finite number > 0"):
        ImportanceTable.estimate(model, (x,), eval_fn=neg_loss(batches), data=batches, lr=float("nan"))
    with pytest.raises(fxmerge.InvalidArgumentError, match="^eval_fn must be a function"):
        ImportanceTable.estimate(model, (x,), eval_fn=None, data=batches)
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"^pairs\[0\] = \(0, 0, 99\) is not a candidate block"):
        ImportanceTable.calibrate(model, [x], pairs=[(0, 0, 99)])
    with ends_within(60):  # the code before the fix looped forever over empty data
        with pytest.raises(fxmerge.InvalidArgumentError, match="^data is empty"):
            ImportanceTable.estimate(model, (x,), eval_fn=neg_loss(batches), data=[], steps=2)
        with pytest.raises(fxmerge.InvalidArgumentError, match="^batches is empty: give at least one batch"):
            ImportanceTable.calibrate(model, [])
        with pytest.raises(fxmerge.InvalidArgumentError, match=r"data yielded no .*\(a generator is used up"):
            sgd_finetune((b for b in batches[:1]), steps=3)(small_net())


# =========================================================================== 2. files

def _latency_file(tmp_path, tiny, change) -> Path:
    d = json.loads(json.dumps(tiny[2].to_dict()))
    change(d)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(d) if isinstance(d, dict) else d)
    return path


def _first(mapping: dict) -> str:
    return next(iter(mapping))


def _set_entry(field, value):
    return lambda d: d["entries"][_first(d["entries"])].__setitem__(field, value)


def _set_reference(field, value):
    return lambda d: d["references"][_first(d["references"])].__setitem__(field, value)


def _set_observation(field, value):
    return lambda d: d["references"][_first(d["references"])]["observations"][0].__setitem__(field, value)


LATENCY_FILE_CASES = {
    "nan time": (_set_entry("ms", float("nan")), r"entries\['act .*'\]\['ms'\] must be a finite number >= 0 .*got nan"),
    "string time": (_set_entry("ms", "0.3"), r"entries\['act .*'\]\['ms'\] must be a finite number >= 0 .*got '0.3'"),
    "negative time": (_set_entry("ms", -1.0), r"entries\['act .*'\]\['ms'\] must be a finite number >= 0 .*got -1.0"),
    "entries not an object": (lambda d: d.__setitem__("entries", []), r"entries must be a JSON object / dict"),
    "not a dtype": (lambda d: d["fingerprint"].__setitem__("dtype", "float99"),
                    r"fingerprint\['dtype'\] must name a torch dtype such as 'float32'.*got 'float99'"),
    "negative original": (_set_reference("original_ms", -2.0),
                          r"references\['[0-9a-f]+'\]\['original_ms'\] must be a finite number > 0"),
    "negative observation": (_set_observation("ratio", -0.5),
                             r"references\['[0-9a-f]+'\]\['observations'\]\[0\]\['ratio'\] must be a finite number > 0"),
    "version 1": (lambda d: d.__setitem__("version", 1), r"a version-1 latency table.*measure it again"),
    "malformed reference": (_set_reference("inputs", "1x3x32x32"), r"references\['[0-9a-f]+'\]\['inputs'\] must be a list"),
    "wrong format": (lambda d: d.__setitem__("format", "fxmerge.plan"),
                     r"not a fxmerge.latency file \(its format is 'fxmerge.plan'\)"),
    "wrong version": (lambda d: d.__setitem__("version", 7), r"fxmerge.latency version 7 is not supported"),
}


@pytest.mark.parametrize("case", LATENCY_FILE_CASES)
def test_latency_table_files_with_bad_entries_name_the_file_and_the_entry(tmp_path, tiny, case):
    change, message = LATENCY_FILE_CASES[case]
    path = _latency_file(tmp_path, tiny, change)
    with pytest.raises(fxmerge.MalformedFileError, match=message) as info:
        fxmerge.LatencyTable.load(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("content, message", [
    ('{"format": "fxmerge.latency", "version": 1, "entries": {"conv', r"the JSON ends too early \(a truncated file\?\)"),
    ("hello", r"the JSON is malformed: Expecting value at line 1 column 1"),
    ("", "file is empty"),
    ("[1, 2]", "it holds a JSON array, not an object"),
    (b"\xff\xfe\x00garbage", "not a valid latency table file"),
])
def test_unreadable_files_name_the_file_and_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(fxmerge.MalformedFileError, match=message) as info:
        fxmerge.LatencyTable.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(fxmerge.MalformedFileError, match=str(path)) as info:
        ImportanceTable.load(path)
    assert "a importance" not in str(info.value)  # "an importance table file"
    with pytest.raises(fxmerge.MalformedFileError, match=str(path)):
        fxmerge.Plan.load(path)


@pytest.mark.parametrize("row, message", [
    ([0, 0, 1, float("nan")], r"scores\[0\] \(pair \(0, 0, 1\)\) has score nan"),
    ([0, 0, 1, "high"], r"scores\[0\] \(pair \(0, 0, 1\)\) has score 'high'"),
    ([0, 1], r"scores\[0\] must be a row \[chain, i, j, score\]"),
    ([0, 3, 1, 0.5], r"scores\[0\] must be a row .* 0 <= i < j"),
])
@pytest.mark.parametrize("version", [1, 2])
def test_importance_files_with_bad_entries_name_the_file_and_the_entry(tmp_path, row, message, version):
    path = tmp_path / "imp.json"
    path.write_text(json.dumps({"format": "fxmerge.importance", "version": version, "meta": {}, "scores": [row]}))
    with pytest.raises(fxmerge.MalformedFileError, match=message) as info:
        ImportanceTable.load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_negative_latencies_never_yield_plans_with_negative_predicted_latency(tiny, table):
    model, analysis, _ = tiny
    ref = table.references[model_key(analysis)]
    bad = {**ref, "observations": [{**ref["observations"][0], "terms_ms": -50.0}]}
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"\['terms_ms'\] must be a finite number >= 0"):
        fxmerge.LatencyTable(table.entries, table.fingerprint, {model_key(analysis): bad})
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"\['ms'\] must be a finite number >= 0"):
        fxmerge.LatencyTable({**table.entries, "conv2d x": {"ms": -1.0}}, table.fingerprint)
    # changed after construction: refused where it is used
    ref["original_ms"] = -50.0
    with pytest.raises(fxmerge.InvalidArgumentError, match=r"\['original_ms'\] must be a finite number > 0"):
        fxmerge.plan(model, table, budget_ms=1.0)
    ref["original_ms"] = 10.0
    key = _first(table.entries)
    table.entries[key]["ms"] = -30.0
    with pytest.raises(fxmerge.InvalidArgumentError, match=re.escape(f"latency table entry '{key}': ms must be a finite "
                                                                     "number >= 0")):
        fxmerge.plan(model, table, budget_ms=1.0)
    # and the fitted correction never goes negative, whatever the observations say
    ref["observations"] = [{**ref["observations"][0], "ratio": 0.01}]
    assert table.correction(analysis).rest_ms >= 0 and table.correction(analysis).overhead_ms >= 0


# =========================================================================== 3. importance identity

def test_long_runs_into_a_missing_folder_are_refused_before_any_work(tmp_path, tiny):
    model, _, _ = tiny
    target = tmp_path / "missing" / "out.json"
    message = f"path: the folder '{target.parent}' of '{target}' does not exist; create it or choose another path"
    calls = []

    def eval_fn(module):
        calls.append(module)
        return 0.0

    with pytest.raises(fxmerge.InvalidArgumentError) as info:
        ImportanceTable.estimate(model, (X,), eval_fn=eval_fn, train_fn=lambda m: None, path=target)
    assert str(info.value) == message and not calls  # not even the baseline was scored
    with pytest.raises(fxmerge.InvalidArgumentError, match="does not exist; create it"):
        ImportanceTable.calibrate(model, [X], path=target)
    with pytest.raises(fxmerge.InvalidArgumentError, match="does not exist; create it"):
        fxmerge.LatencyTable.measure(model, (X,), path=target, **FAST)
    assert not target.parent.exists()


def _calibrate(model, path):
    return ImportanceTable.calibrate(model, [b[0] for b in data()], path=path)


def _estimate(model, path, steps=2):
    batches = data()
    return ImportanceTable.estimate(model, (batches[0][0],), eval_fn=neg_loss(batches), data=batches, steps=steps,
                                    path=path)


def test_estimate_never_resumes_another_models_calibration_file(tmp_path):
    path = tmp_path / "imp.json"
    _calibrate(small_net(seed=0), path)
    with pytest.raises(fxmerge.EnvironmentMismatchError) as info:
        _estimate(small_net(seed=1), path)
    message = str(info.value)
    assert str(path) in message and "estimator 'calibration', not 'fine-tune'" in message
    assert "another model (parameters digest" in message and "delete the file or choose another path" in message


def test_resume_refuses_a_file_made_with_other_settings_or_weights(tmp_path):
    path = tmp_path / "imp.json"
    _estimate(small_net(), path, steps=2)
    with pytest.raises(fxmerge.EnvironmentMismatchError, match="steps=2, not 3"):
        _estimate(small_net(), path, steps=3)
    calibrated = tmp_path / "cal.json"
    _calibrate(small_net(seed=0), calibrated)
    with pytest.raises(fxmerge.EnvironmentMismatchError, match=r"another model \(parameters digest [0-9a-f]+ vs"):
        _calibrate(small_net(seed=1), calibrated)
    assert _calibrate(small_net(seed=0), calibrated).scores  # the same model and settings resume


def test_importance_files_record_the_model_estimator_and_settings(tmp_path):
    path = tmp_path / "imp.json"
    model = small_net()
    table = _estimate(model, path)
    saved = json.loads(path.read_text())
    assert saved["version"] == 2
    meta = saved["meta"]
    analysis = fxmerge.analyze(model, (data()[0][0],))
    assert meta["model"]["structure"] == fxmerge.Plan.fold_only(analysis).fingerprint()
    assert meta["model"]["parameters"] == fxmerge.importance.parameter_digest(model)
    assert meta["estimator"] == "fine-tune" and meta["base_score"] == table.meta["base_score"]
    settings = meta["settings"]
    assert settings["steps"] == 2 and settings["lr"] == 0.01 and settings["seed"] == 0
    assert settings["data"] == {"count": 3, "shapes": [[[8, 1, 8, 8], [8]]] * 3}
    assert settings["eval_fn"].endswith("neg_loss.<locals>.evaluate")


def test_version_1_importance_files_load_but_never_resume(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": "fxmerge.importance", "version": 1, "meta": {"estimator": "calibration"},
                                "scores": [[0, 0, 1, -0.0], [0, 1, 2, -0.25]]}))
    assert ImportanceTable.load(path).scores == {(0, 0, 1): 0.0, (0, 1, 2): -0.25}
    with pytest.raises(fxmerge.EnvironmentMismatchError, match="does not record the model and settings"):
        _calibrate(small_net(), path)


def test_plan_refuses_importance_estimated_for_another_model(tiny):
    model, _, table = tiny
    other = small_net()
    imp = ImportanceTable.calibrate(other, [data()[0][0]])
    with pytest.raises(fxmerge.EnvironmentMismatchError, match="importance table was estimated for another model"):
        fxmerge.plan(model, table, budget=0.8, importance=imp)


# =========================================================================== 4. environment

def test_latency_table_for_another_backend_dtype_or_device_is_refused(tiny, table):
    model = tiny[0]
    with pytest.raises(fxmerge.EnvironmentMismatchError, match="measured for backend 'eager', not backend 'inductor'"):
        fxmerge.plan(model, table, budget=0.8, backend="inductor")
    for key, value in (("dtype", "float64"), ("device", "NVIDIA H200")):
        other = fxmerge.LatencyTable.from_dict({**table.to_dict(), "fingerprint": {**table.fingerprint, key: value}})
        with pytest.raises(fxmerge.EnvironmentMismatchError, match=rf"measured for {key} '{value}', not {key} "):
            fxmerge.plan(model, other, budget=0.8, example_inputs=(X,))
        with pytest.raises(fxmerge.EnvironmentMismatchError, match="cannot combine"):
            table | other
    other = fxmerge.LatencyTable.from_dict({**table.to_dict(), "fingerprint": {**table.fingerprint, "threads": 99}})
    with pytest.warns(UserWarning, match="measured elsewhere"):  # threads and torch version only warn
        fxmerge.plan(model, other, budget=0.8)


def test_measure_refuses_to_resume_a_file_of_another_backend(tmp_path, tiny):
    path = tmp_path / "t.json"
    inductor = fxmerge.LatencyTable.from_dict(tiny[2].to_dict())
    inductor.fingerprint["backend"] = "inductor"
    inductor.save(path)
    with pytest.raises(fxmerge.EnvironmentMismatchError, match=rf"latency table {path} was measured for backend "
                                                               "'inductor', not backend 'eager'"):
        fxmerge.LatencyTable.measure(tiny[0], (X,), backend="eager", path=path, **FAST)


def test_cli_refuses_a_table_of_another_backend_before_any_work(tmp_path, tiny, capsys, monkeypatch):
    path = tmp_path / "t.json"
    tiny[2].save(path)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the table was checked")

    monkeypatch.setattr(model_specs, "load_model", no_work)
    code, _, err = run_cli(capsys, "plan", FACTORY, "--table", str(path), "--backend", "inductor",
                           "--input-shape", "1,3,32,32", "--budget", "0.8")
    assert code == 2 and err.startswith(f"fxmerge: error: the latency table {path} was measured for backend 'eager', "
                                        "not backend 'inductor'")


# =========================================================================== 5. no data loss

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fxmerge.serialization import write_json
    path, tag, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    for k in range(int(sys.argv[4])):
        write_json(path, {"writer": tag, "k": k, "payload": tag * 2_000_000})  # writing, not encoding, takes the time
""")


def test_concurrent_writers_never_crash_and_readers_never_see_a_partial_file(tmp_path):
    path, go = tmp_path / "table.json", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(go), "150"], env=env,
                                stderr=subprocess.PIPE, text=True) for tag in "ab"]
    time.sleep(0.5)
    go.touch()
    reads = 0
    deadline = time.monotonic() + 240
    while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
        if path.exists():
            content = json.loads(path.read_text())  # never a partial file
            assert len(content["payload"]) == 2_000_000
            reads += 1
    errors = [w.communicate(timeout=60)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert reads > 10
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("table.json", "go")] == []  # no temporary left


def test_fresh_never_deletes_the_table_before_a_successful_measurement(tmp_path, tiny, capsys, monkeypatch):
    path = tmp_path / "t.json"
    tiny[2].save(path)
    before = path.read_bytes()
    import fxmerge.backends as backends

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(backends, "sample", interrupted)
    common = ["--table", str(path), "--input-shape", "1,3,32,32", "--quick"]
    with contextlib.suppress(KeyboardInterrupt):
        run_cli(capsys, "table", FACTORY, "--fresh", *common)
    assert path.read_bytes() == before  # the old table is intact
    monkeypatch.undo()
    code, out, _ = run_cli(capsys, "table", FACTORY, "--fresh", *common)
    assert code == 0 and "fxmerge latency table" in out
    fresh = fxmerge.LatencyTable.load(path)
    assert fresh.entries != tiny[2].entries and not fresh.pending  # replaced by the new, complete measurement
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_a_complete_table_measures_and_writes_nothing(tmp_path, tiny, table, monkeypatch):
    path = tmp_path / "t.json"
    table.save(path)
    import fxmerge.latency as latency

    def no_write(*args, **kwargs):
        raise AssertionError("a complete table was written again")

    monkeypatch.setattr(latency, "write_json", no_write)
    table.measure_missing(tiny[0], (X,), path=path)


def test_a_complete_cached_table_works_from_a_read_only_folder(tmp_path, tiny, table, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "t.json"
    table.save(path)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("this user can write to read-only folders (root): chmod proves nothing here")
        table.measure_missing(tiny[0], (X,), path=path)
        code, out, err = run_cli(capsys, "plan", FACTORY, "--table", str(path), "--input-shape", "1,3,32,32",
                                 "--budget", "0.9")
        assert code == 0, err
        assert "reused" in out
    finally:
        folder.chmod(stat.S_IRWXU)


# =========================================================================== 6. the command line

@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz' (MODEL 'no_such_module_xyz:make'): there is "
                                "no module 'no_such_module_xyz'; check the spelling"),
    ("cli_models:smal", "'cli_models' has no attribute 'smal' (MODEL 'cli_models:smal'); did you mean small?"),
    ("cli_models:raises", "calling cli_models:raises() raised RuntimeError: the factory is broken; MODEL must name"),
    ("cli_models:not_a_module", "cli_models:not_a_module() returned a value of type int, not an nn.Module"),
    ("cli_models:NUMBER", "MODEL 'cli_models:NUMBER' is of type int, not an nn.Module"),
    ("timm:resnet1", "unknown timm model 'resnet1' (did you mean resnet18"),
    ("mobilenet_v9", "unknown model 'mobilenet_v9' (did you mean mobilenet_v2"),
])
def test_cli_model_spec_typos_are_clear_errors(capsys, spec, message):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")  # without timm the message is the install hint, tested below
    code, _, err = run_cli(capsys, "analyze", spec, "--input-shape", "1,3,16,16")
    assert code == 2 and err.startswith(f"fxmerge: error: {message}"), err


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_cli_threads_must_be_a_positive_integer(capsys, tmp_path, value):
    code, _, err = run_cli(capsys, "table", "cli_models:small", "--threads", value, "--input-shape", "1,3,8,8",
                           "--cache-dir", str(tmp_path), "--quick")
    assert code == 2 and f"fxmerge: error: argument --threads: must be an integer >= 1 (intra-op threads, e.g. 1 or 4); " \
                          f"got '{value}'" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def no_measuring(monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError("measuring started before the arguments were checked")

    monkeypatch.setattr(fxmerge.LatencyTable, "measure", measured)
    monkeypatch.setattr(fxmerge.LatencyTable, "measure_missing", measured)


@pytest.mark.parametrize("flag, value, message", [
    ("--budget", "nan", "budget must be a finite number > 0 (a fraction of the original's latency, e.g. 0.6); got nan"),
    ("--budget", "inf", "budget must be a finite number > 0 (a fraction of the original's latency, e.g. 0.6); got inf"),
    ("--budget", "-1", "budget must be a finite number > 0 (a fraction of the original's latency, e.g. 0.6); got -1.0"),
    ("--budget-ms", "nan", "budget_ms must be a finite number > 0 (the end-to-end latency in milliseconds, e.g. 12.5)"),
    ("--budget", "lots", "expected a number; got 'lots'"),
])
def test_cli_bad_budgets_are_refused_before_measuring(capsys, tmp_path, no_measuring, flag, value, message):
    code, _, err = run_cli(capsys, "plan", "cli_models:small", flag, value, "--input-shape", "1,3,8,8",
                           "--cache-dir", str(tmp_path))
    assert code == 2 and f"fxmerge: error: argument {flag}: {message}" in err


def test_cli_output_into_a_missing_folder_is_refused_before_measuring(capsys, tmp_path, no_measuring):
    target = tmp_path / "missing" / "m.pt"
    code, _, err = run_cli(capsys, "compress", "cli_models:small", "--budget", "0.8", "-o", str(target),
                           "--input-shape", "1,3,8,8", "--cache-dir", str(tmp_path))
    assert code == 2 and err == f"fxmerge: error: -o {target}: the folder '{target.parent}' does not exist; " \
                                "create it first\n"


def test_cli_timm_model_without_timm_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail as if it were not installed
    code, _, err = run_cli(capsys, "analyze", "timm:resnet18", "--input-shape", "1,3,16,16")
    assert code == 2 and err == "fxmerge: error: MODEL 'timm:resnet18' needs timm, which is not installed: " \
                                "pip install timm\n"


def test_cli_accepts_timm_models_and_checkpoints(capsys, tmp_path):
    timm = pytest.importorskip("timm")
    code, out, err = run_cli(capsys, "analyze", "timm:resnet18", "--input-shape", "1,3,32,32")
    assert code == 0 and "fxmerge analysis" in out, err
    torch.manual_seed(3)
    trained = timm.create_model("resnet18", pretrained=False)
    checkpoint = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), checkpoint)
    loaded = model_specs.load_model("timm:resnet18", checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    torch.save({"state_dict": trained.state_dict()}, checkpoint)  # a common wrapper
    assert torch.equal(model_specs.load_model("timm:resnet18", checkpoint).conv1.weight, trained.conv1.weight)
    import cli_models

    torch.save(cli_models.small().state_dict(), checkpoint)
    code, _, err = run_cli(capsys, "analyze", "resnet18", "--checkpoint", str(checkpoint), "--input-shape", "1,3,32,32")
    assert code == 2 and f"fxmerge: error: --checkpoint {checkpoint} does not fit MODEL 'resnet18': " in err
    torch.save(nn.Linear(2, 2), checkpoint)  # a pickled module: code, which is never loaded
    code, _, err = run_cli(capsys, "analyze", "timm:resnet18", "--checkpoint", str(checkpoint))
    assert code == 2 and f"fxmerge: error: --checkpoint {checkpoint}: not a checkpoint that torch.load(weights_only=True) " \
                         "can read (UnpicklingError)" in err


def test_cli_timm_not_installed_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    code, _, err = run_cli(capsys, "analyze", "timm:resnet18")
    assert code == 2 and err == "fxmerge: error: MODEL 'timm:resnet18' needs timm, which is not installed: " \
                                "pip install timm\n"


def test_cli_user_errors_end_in_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    for argv in (["analyze", "cli_models:raises"], ["plan", "cli_models:small", "--budget", "nan"],
                 ["plan", "cli_models:small", "--table", str(tmp_path / "missing" / "t.json"), "--quick",
                  "--input-shape", "1,3,8,8", "-o", str(tmp_path / "nowhere" / "p.json")]):
        run = subprocess.run([sys.executable, "-m", "fxmerge", *argv], capture_output=True, text=True, env=env,
                             timeout=300, cwd=tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("fxmerge: error: ")


# =========================================================================== 7. timing leaves models alone

def test_measure_latency_does_not_switch_the_callers_model_to_eval():
    model = tiny_mbv2().train()
    model[1].eval()  # mixed modes come back exactly
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxmerge.measure_latency(model, (X,), rounds=1, repeats=1, min_repeat_ms=0, warmup_ms=0)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics unmoved
    fxmerge.backends.compare_latency({"a": model, "b": tiny_mbv2().train()}, (X,), rounds=1, repeats=1, min_repeat_ms=0,
                                   warmup_ms=0)
    assert [m.training for m in model.modules()] == modes


# =========================================================================== 8. safe artefacts

@pytest.fixture(scope="module")
def artifacts():
    from fxmerge import artifacts  # imported here, so the file's other tests run where it does not exist

    return artifacts


@pytest.fixture(scope="module")
def compressed(tiny):
    model, analysis, table = tiny
    return fxmerge.compress(model, table, budget=0.7)


def test_saved_artifact_loads_with_weights_only_and_rebuilds_the_compressed_model(tmp_path, tiny, compressed, artifacts):
    path = tmp_path / "m.pt"
    artifacts.save(compressed, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "fxmerge.artifact" and raw["version"] == 1
    assert json.loads(raw["plan"]) == fxmerge.plan_of(compressed).to_dict()
    loaded = artifacts.load(path, tiny_mbv2())  # the architecture, weights from the file
    assert fxmerge.plan_of(loaded).chains == fxmerge.plan_of(compressed).chains
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), compressed.eval()(X), rtol=0, atol=0)
    # the paper's workflow: fine-tuned linearized net, merged, saved, loaded from the original architecture
    plan = fxmerge.plan_of(compressed)
    tuned = fxmerge.linearize(tiny[0], plan)
    finetune_like(tuned, (X,))
    deployed = fxmerge.merge(tuned.eval(), plan).eval()
    artifacts.save(deployed, path)
    with torch.no_grad():
        torch.testing.assert_close(artifacts.load(path, tiny_mbv2())(X), deployed(X), rtol=0, atol=0)


def test_artifacts_refuse_other_models_and_pickled_code(tmp_path, compressed, artifacts):
    path = tmp_path / "m.pt"
    artifacts.save(compressed, path)
    with pytest.raises(fxmerge.PlanMismatchError):
        artifacts.load(path, small_net())
    pickled = tmp_path / "pickled.pt"
    torch.save(compressed, pickled)
    with pytest.raises(fxmerge.MalformedFileError, match=rf"{pickled}: not a fxmerge artifact that torch.load\(weights_only="
                                                         r"True\) can read .*pickled Python objects .*never loads"):
        artifacts.load(pickled, tiny_mbv2())
    with pytest.raises(fxmerge.InvalidArgumentError, match="save needs a module returned by fxmerge.merge"):
        artifacts.save(tiny_mbv2(), path)


def test_cli_compress_writes_a_weights_only_artifact_or_an_exported_program(tmp_path, tiny, capsys, artifacts):
    table = tmp_path / "t.json"
    tiny[2].save(table)
    common = ["--table", str(table), "--input-shape", "1,3,32,32", "--budget", "0.7"]
    torch.manual_seed(0)  # the factory's random weights: the same model in both runs
    code, out, err = run_cli(capsys, "compress", FACTORY, "-o", str(tmp_path / "m.pt"), *common)
    assert code == 0, err
    assert "fxmerge.load_compressed(path, model)" in out
    loaded = artifacts.load(tmp_path / "m.pt", tiny_mbv2())
    torch.manual_seed(0)
    code, _, err = run_cli(capsys, "compress", FACTORY, "-o", str(tmp_path / "m.pt2"), *common)
    assert code == 0, err
    program = torch.export.load(tmp_path / "m.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(X), loaded(X), rtol=1e-5, atol=1e-6)
