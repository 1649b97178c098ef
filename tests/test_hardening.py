"""Issue 8: no bad input ends in a traceback or a lost file, and files carry their identity.

Each test is named after the case it covers. Planning uses synthetic latency tables and timing
uses the fewest repeats, so nothing here depends on how fast the machine is.
"""
from __future__ import annotations

import contextlib
import json
import math
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
from conftest import perturb
from fxmerge import cli
from fxmerge.cost import model_key
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


def _neighbour_scores(analysis) -> dict:
    return {(c.index, a, b): 1.0 for c in analysis.chains for a, b in zip(c.kept_candidates, c.kept_candidates[1:])}


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


LATENCY_FILE_CASES = {
    "nan time": (_set_entry("ms", float("nan")), r"entries\['act .*'\]\['ms'\] must be a finite number >= 0 .*got nan"),
    "string time": (_set_entry("ms", "0.3"), r"entries\['act .*'\]\['ms'\] must be a finite number >= 0 .*got '0.3'"),
    "negative time": (_set_entry("ms", -1.0), r"entries\['act .*'\]\['ms'\] must be a finite number >= 0 .*got -1.0"),
    "entries not an object": (lambda d: d.__setitem__("entries", []), r"entries must be a JSON object / dict"),
    "not a dtype": (lambda d: d["fingerprint"].__setitem__("dtype", "float99"),
                    r"fingerprint\['dtype'\] must name a torch dtype such as 'float32'.*got 'float99'"),
    "negative rest": (_set_reference("rest_ms", -2.0), r"references\['[0-9a-f]+'\]\['rest_ms'\] must be a finite number >= 0"),
    "malformed reference": (_set_reference("inputs", "1x3x32x32"), r"references\['[0-9a-f]+'\]\['inputs'\] must be a list"),
    "wrong format": (lambda d: d.__setitem__("format", "fxmerge.plan"),
                     r"not a fxmerge.latency file \(its format is 'fxmerge.plan'\)"),
    "wrong version": (lambda d: d.__setitem__("version", 7), r"fxmerge.latency version 7 is not supported"),
}


@pytest.mark.parametrize("row, message", [
    ([0, 0, 1, float("nan")], r"scores\[0\] \(pair \(0, 0, 1\)\) has score nan"),
    ([0, 0, 1, "high"], r"scores\[0\] \(pair \(0, 0, 1\)\) has score 'high'"),
    ([0, 1], r"scores\[0\] must be a row \[chain, i, j, score\]"),
    ([0, 3, 1, 0.5], r"scores\[0\] must be a row .* 0 <= i < j"),
])
def test_importance_files_with_bad_entries_name_the_file_and_the_entry(tmp_path, row, message):
    path = tmp_path / "imp.json"
    path.write_text(json.dumps({"format": "fxmerge.importance", "version": 2, "meta": {}, "scores": [row]}))
    with pytest.raises(fxmerge.MalformedFileError, match=message) as info:
        ImportanceTable.load(path)
    assert str(info.value).startswith(f"{path}: ")


# =========================================================================== 3. importance identity

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


# =========================================================================== 4. environment

# =========================================================================== 5. no data loss

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fxmerge.serialization import write_json
    path, tag, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    for k in range(int(sys.argv[4])):
        write_json(path, {"writer": tag, "k": k, "payload": [tag * 50] * 2000})
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
            assert len(content["payload"]) == 2000
            reads += 1
    errors = [w.communicate(timeout=60)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert reads > 10
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("table.json", "go")] == []  # no temporary left


# =========================================================================== 6. the command line

@pytest.fixture
def no_measuring(monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError("measuring started before the arguments were checked")

    monkeypatch.setattr(fxmerge.LatencyTable, "measure", measured)
    monkeypatch.setattr(fxmerge.LatencyTable, "measure_missing", measured)


# =========================================================================== 7. timing leaves models alone

# =========================================================================== 8. safe artefacts

@pytest.fixture(scope="module")
def artifacts():
    from fxmerge import artifacts  # imported here, so the file's other tests run where it does not exist

    return artifacts


@pytest.fixture(scope="module")
def compressed(tiny):
    model, analysis, table = tiny
    return fxmerge.compress(model, table, budget=0.7)


