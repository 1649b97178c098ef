"""Seeded runs of the MNIST pipeline (examples/mnist_pipeline.py) repeat: the same seed and the
same latency-table file give the same plans and the same accuracies — run on a tiny net, a few
steps and a synthetic table, so nothing here depends on how fast the machine is."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxmerge
from importance_models import Residual, block
from synthetic import kernel_area_ms, table_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import mnist_pipeline as pipeline  # noqa: E402
import repro  # noqa: E402

CFG = pipeline.Config(epochs=10, finetune_epochs=2, importance_steps=2, points=3, min_budget=0.0, max_budget=1.0,
                      distill_budgets=(0.9,), batch=16, prune_layers=True)


@pytest.fixture(autouse=True)
def deterministic_on_one_thread(one_thread):
    yield
    torch.use_deterministic_algorithms(False)  # seed_everything turns it on


def tiny_net() -> nn.Module:
    """Initialised from torch's global generator, which the run seeds."""
    return nn.Sequential(block(1, 6), Residual(6), block(6, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3)).eval()


def tiny_digits(seed: int):
    """Three classes of 8x8 images (a bright row, column or diagonal, with noise), split by ``seed``."""
    g = torch.Generator().manual_seed(1234)
    y = torch.arange(192) % 3
    x = 0.5 * torch.randn(192, 1, 8, 8, generator=g)
    for k, label in enumerate(y.tolist()):
        pos = k % 8
        if label == 0:
            x[k, 0, pos, :] += 2
        elif label == 1:
            x[k, 0, :, pos] += 2
        else:
            x[k, 0].diagonal().add_(2)
    order = torch.randperm(192, generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:96], y[:96]), (x[96:128], y[96:128]), (x[128:], y[128:])


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    x = torch.randn(CFG.batch, 1, 8, 8)
    model = tiny_net()
    path = tmp_path_factory.mktemp("table") / "table.json"
    table_for(fxmerge.analyze(model, (x,), prune_layers=True), (x,), kernel_area_ms).save(path)
    return path


def run(seed: int, table_file: Path, out: Path) -> pipeline.SeedRun:
    return pipeline.run_seed(CFG, seed, fxmerge.LatencyTable.load(table_file), out, make_model=tiny_net,
                             load=tiny_digits, log=lambda line: None)


def test_same_seed_and_table_file_give_the_same_plans_and_accuracies(table_file, tmp_path):
    first = run(3, table_file, tmp_path / "a")
    again = run(3, table_file, tmp_path / "b")  # nothing reused: computed again from scratch
    assert again.results == first.results
    assert first.results["base_acc"] > 50  # learned (3 classes): equal accuracies are not chance-level ties
    strategies = first.results["strategies"]
    assert set(strategies) == {"fine-tune", "calibration", "uniform", "fine-tune+prune", "calibration+prune",
                               "uniform+prune"} and all(strategies.values())
    pruned = [first.results["plans"][r["plan"]] for r in strategies["uniform+prune"]]
    assert any(chain.get("prune") for p in pruned for chain in p["chains"]), "no plan pruned a conv"
    assert len(first.results["plans"]) >= 3  # distinct plans were tuned
    for name in ("fine-tune", "calibration"):
        a = json.loads((tmp_path / "a" / "seed-3" / f"importance-{name}.json").read_text())
        b = json.loads((tmp_path / "b" / "seed-3" / f"importance-{name}.json").read_text())
        assert a["scores"] == b["scores"]
    saved = json.loads((tmp_path / "a" / "seed-3" / "results.json").read_text())
    assert saved == json.loads(json.dumps(first.results))

    resumed = run(3, table_file, tmp_path / "a")  # importance read back from the files
    assert resumed.results == first.results

    other = run(4, table_file, tmp_path / "c")  # another seed: another split, other weights
    assert other.results["base_acc"] != first.results["base_acc"] or \
        [r["acc"] for r in other.results["strategies"]["uniform"]] != [r["acc"] for r in strategies["uniform"]]
    c = json.loads((tmp_path / "c" / "seed-4" / "importance-fine-tune.json").read_text())
    assert c["scores"] != json.loads((tmp_path / "a" / "seed-3" / "importance-fine-tune.json").read_text())["scores"]


def test_report_compares_at_matched_speed_up_and_ends_with_a_summary(table_file, tmp_path, capsys):
    runs = [run(seed, table_file, None) for seed in (0, 1)]
    # speed-ups as predicted (a test must not time): the report only needs one number per plan
    speedup = {fp: (p["info"]["predicted_ms"]["original"] / p["info"]["predicted_ms"]["planned"])
               for r in runs for fp, p in r.results["plans"].items()}
    summary = pipeline.report(runs, speedup, log=print)
    out = capsys.readouterr().out
    assert "Accuracy at matched measured speed-up, importance, depth-only" in out and "fine-tune - uniform" in out
    assert "Knowledge distillation vs plain" in out
    assert re.fullmatch(r"summary: (\d+\.\d\dx measured at -?\d+\.\d\d pt mean accuracy drop over 2 seeds|"
                        r"none within 0\.5 pt)", summary["summary"])
    groups = {g["group"]: g["rows"] for g in summary["matched"]}
    assert set(groups) == {"importance, depth-only", "importance, with layer pruning",
                           *[f"layer pruning vs depth-only, {n} importance" for n in ("fine-tune", "calibration", "uniform")]}
    assert groups["importance, depth-only"], "depth-only frontiers share a speed-up range"
    for row in (row for rows in groups.values() for row in rows):
        for name, diffs in row["paired"].items():
            a, b = name.split(" - ")
            assert diffs == pytest.approx([x - y for x, y in zip(row["acc"][a], row["acc"][b])])
    fastest = summary["plans"][0]  # every strategy's f0 is its fastest plan: the same for all
    assert fastest["point"] == "f0"


def test_interpolation_and_paired_differences():
    curve = [(1.0, 90.0), (2.0, 80.0), (3.0, 50.0)]
    assert repro.interpolate(curve, 1.5) == pytest.approx(85.0)
    assert repro.interpolate(curve, 3.5) is None and repro.interpolate(curve, 0.5) is None
    assert repro.interpolate([(2.0, 80.0), (2.0, 82.0)], 2.0) == pytest.approx(81.0)
    assert repro.paired([1.0, None, 3.0], [0.5, 2.0, 1.0]) == [0.5, 2.0]
    assert repro.common_range([[(1.0, 0), (3.0, 0)], [(1.5, 0), (4.0, 0)]]) == (1.5, 3.0)
    assert repro.mean_std([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5))
