"""Importance estimators: small, fast versions of both, resume after interrupt, and sharding
over a two-rank torchrun (gloo, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxmerge
from fxmerge import estimators as imp_mod
from fxmerge.importance import ImportanceTable, candidate_pairs, sgd_finetune
from importance_models import data, neg_loss, small_net
from synthetic import feasible_budget, merging_pays_table


pytestmark = pytest.mark.usefixtures("one_thread")  # the same arithmetic as the torchrun workers


def _estimate(path=None):
    model, batches = small_net(), data()
    return ImportanceTable.estimate(model, (batches[0][0],), eval_fn=neg_loss(batches),
                                    train_fn=sgd_finetune(batches, steps=3, lr=0.01), path=path)


def test_candidate_pairs_are_the_valid_blocks_and_extend_to_every_kept_pair():
    model, batches = small_net(), data()
    analysis = fxmerge.analyze(model, (batches[0][0],))
    chain = analysis.chains[0]
    assert candidate_pairs(analysis) == [(0, i, j) for i, j in chain.valid_blocks]
    table = ImportanceTable({p: -float(p[2] - p[1]) for p in candidate_pairs(analysis)})
    ext = table.extend(analysis)
    points = chain.kept_candidates  # activations and border positions: both can be kept
    assert {(0, a, b) for a, b in zip(points[:-1], points[1:])} <= set(ext)  # keeping everything stays possible
    # dropping the activation at a residual's source needs a segment holding the whole residual
    assert (0, 0, 2) not in ext and (0, 0, 5) in ext
    for (c, i, j), v in ext.items():
        if (i, j) in chain.valid_blocks:
            assert v == table[(c, i, j)]  # measured entries are used as they are


def test_extension_splits_only_where_nothing_can_be_kept():
    import torch.nn as nn
    from importance_models import Residual, block

    x = data()[0][0]
    # after the residual: a 1x1 conv (its position is free: no activation, no padding to move)
    # and a padded 3x3 (its position is a border: a choice of its own, never split over)
    model = nn.Sequential(block(1, 6), Residual(6), block(6, 6, 1, act=False), block(6, 8, 3)).eval()
    analysis = fxmerge.analyze(model, (x,))
    chain = analysis.chains[0]
    free = [p for p in range(1, chain.length) if p not in chain.activations and p not in chain.borders]
    assert free == [4] and chain.borders == [5]
    scores = {p: 0.0 for p in candidate_pairs(analysis)}
    scores[(0, 1, 5)] = -5.0
    scores[(0, 3, 6)] = scores[(0, 4, 6)] = -5.0
    ext = ImportanceTable(scores).extend(analysis)
    assert ext[(0, 1, 5)] == 0.0  # (1, 4] + (4, 5]: a split at the free position beats the merged entry
    assert ext[(0, 3, 6)] == -5.0  # (3, 5] + (5, 6] would give 0: no split at the border position 5,
    assert ext[(0, 3, 5)] + ext[(0, 5, 6)] == 0.0  # keeping it is a choice of its own (two pairs)


def test_mobilenet_v2_default_pair_count_is_practical():
    import torchvision

    analysis = fxmerge.analyze(torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 224, 224),))
    assert len(candidate_pairs(analysis)) == 246  # the count the docs quote; the paper measured 315
    assert len(ImportanceTable({p: 0.0 for p in candidate_pairs(analysis)}).extend(analysis)) == 630


def test_estimate_scores_every_pair_against_the_unmodified_model(tmp_path):
    table = _estimate()
    model, batches = small_net(), data()
    assert table.meta["base_score"] == pytest.approx(neg_loss(batches)(model))
    assert len(table) == len(candidate_pairs(fxmerge.analyze(model, (batches[0][0],))))
    assert len(set(round(v, 9) for v in table.scores.values())) > 1  # pairs really differ
    path = tmp_path / "imp.json"
    table.save(path)
    again = ImportanceTable.load(path)
    assert again.scores == table.scores
    assert "fine-tune" in str(again)
    shifted = table.normalized(alpha=1.0)
    assert shifted.meta["shift"] != 0 and all(
        shifted[k] == pytest.approx(v - shifted.meta["shift"]) for k, v in table.scores.items())


def test_calibration_estimator_is_zero_for_no_change_and_negative_otherwise():
    model, batches = small_net(), data()
    table = ImportanceTable.calibrate(model, [b[0] for b in batches])
    for (c, i, j), v in table.scores.items():
        assert v <= 0
        if j - i == 1:
            assert v == pytest.approx(0, abs=1e-10)  # a single layer: nothing dropped, nothing merged
    assert min(table.scores.values()) < -1e-3


def test_importance_drives_the_plan():
    model, batches = small_net(), data()
    x = batches[0][0]
    analysis = fxmerge.analyze(model, (x,))
    table = merging_pays_table(analysis, (x,))  # made-up times: the machine's speed cannot change the plans
    imp = ImportanceTable.calibrate(model, [b[0] for b in batches])
    ext = imp.extend(analysis)
    # an importance that forbids dropping anything: only neighbour pairs are offered
    points = analysis.chains[0].kept_candidates
    neighbours = {(0, a, b): ext[(0, a, b)] for a, b in zip(points[:-1], points[1:])}
    keep_all = fxmerge.plan(model, table, budget=10.0, importance=neighbours)
    assert keep_all.chains[0].keep == tuple(analysis.chains[0].droppable)
    chosen = fxmerge.plan(model, table, budget_ms=feasible_budget(model, table, importance=imp), importance=imp)
    kept = [0, *chosen.chains[0].keep, analysis.chains[0].length]
    assert all((0, a, b) in ext for a, b in zip(kept[:-1], kept[1:]))


def test_interrupted_estimate_resumes_without_redoing_entries(tmp_path, monkeypatch):
    path = tmp_path / "imp.json"
    calls = {"n": 0}
    real = imp_mod.linearize

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(imp_mod, "linearize", flaky)
    with pytest.raises(KeyboardInterrupt):
        _estimate(path)
    assert len(ImportanceTable.load(path)) == 3  # every finished entry is on disk
    calls["n"] = -1000
    resumed = _estimate(path)
    total = len(resumed)
    assert calls["n"] + 1000 == total - 3  # only the missing entries were estimated
    monkeypatch.setattr(imp_mod, "linearize", real)
    assert resumed.scores == pytest.approx(_estimate().scores)


def test_two_rank_torchrun_gathers_the_single_process_table(tmp_path):
    out = tmp_path / "dist.json"
    worker = Path(__file__).with_name("importance_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), str(out)], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    model, batches = small_net(), data()
    single = ImportanceTable.calibrate(model, [b[0] for b in batches])
    assert ImportanceTable.from_dict(result["calibrated"]).scores == pytest.approx(single.scores, rel=1e-9, abs=1e-12)
    assert ImportanceTable.from_dict(result["estimated"]).scores == pytest.approx(_estimate().scores, rel=1e-9, abs=1e-12)
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert "dist.estimate.json" in shards  # rank 0 wrote the full table where asked
    assert any(".rank1-of-2" in name for name in shards)  # each rank kept its own progress
