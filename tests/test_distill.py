"""Knowledge distillation when fine-tuning a linearized net: the loss, the helper (labeled and
unlabeled data), and the built-in fine-tuning of ImportanceTable.estimate(distill=True)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fxmerge
from fxmerge.distill import frozen_teacher, split_batch
from fxmerge.importance import ImportanceTable, parameter_digest, sgd_finetune
from importance_models import data, neg_loss, small_net


pytestmark = pytest.mark.usefixtures("one_thread")


def _confident_net():
    """small_net with a head scaled up, so its predictions are far from uniform (there is
    something to distil)."""
    model = small_net()
    with torch.no_grad():
        model[-1].weight.mul_(30.0)
    return model


def _student(model):
    analysis = fxmerge.analyze(model, (data()[0][0],))
    return fxmerge.linearize(model, fxmerge.Plan.drop_all(analysis))


def _kl(student, teacher, batches) -> float:
    with torch.no_grad():
        return sum(fxmerge.kd_loss(student(x), teacher(x)).item() for x, _ in batches) / len(batches)


def test_kd_loss_is_the_tempered_kl_plus_the_weighted_task_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    T = 3.0
    p = F.softmax(t / T, 1)
    kl = (p * (p.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(fxmerge.kd_loss(s, t, temperature=T), kl)  # unlabeled: the KD term alone
    want = 0.3 * kl + 0.7 * F.cross_entropy(s, y)
    assert torch.allclose(fxmerge.kd_loss(s, t, y, kd_weight=0.3, temperature=T), want)
    assert fxmerge.kd_loss(t + 2.0, t).abs().item() < 1e-6  # same distribution: nothing to learn
    # the official KLLossSoft (cross-entropy to soft labels) differs by the teacher's entropy only
    soft_ce = -(F.softmax(t, 1) * F.log_softmax(s, 1)).sum(1).mean()
    entropy = -(F.softmax(t, 1) * F.log_softmax(t, 1)).sum(1).mean()
    assert torch.allclose(fxmerge.kd_loss(s, t), soft_ce - entropy, atol=1e-6)


def test_kd_loss_refuses_bad_weights_and_shapes():
    s = torch.zeros(2, 3)
    with pytest.raises(fxmerge.InvalidArgumentError, match="kd_weight must be within"):
        fxmerge.kd_loss(s, s, kd_weight=1.5)
    with pytest.raises(fxmerge.InvalidArgumentError, match="temperature must be a finite number > 0"):
        fxmerge.kd_loss(s, s, temperature=0)
    with pytest.raises(fxmerge.InvalidArgumentError, match="differ in shape"):
        fxmerge.kd_loss(s, torch.zeros(2, 4))
    with pytest.raises(fxmerge.InvalidArgumentError, match="classes on dim 1"):
        fxmerge.kd_loss(torch.zeros(3), torch.zeros(3))


def test_split_batch_tells_labeled_from_unlabeled():
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    assert split_batch(x) == ((x,), None)
    assert split_batch((x, y))[1] is y
    assert split_batch(((x, x), None)) == ((x, x), None)
    with pytest.raises(fxmerge.InvalidArgumentError, match="a batch must be an input tensor"):
        split_batch({"x": x})


def test_distillation_on_unlabeled_data_moves_the_student_to_the_teacher_and_leaves_the_teacher_alone():
    model = _confident_net()
    digest = parameter_digest(model)
    unlabeled = [x for x, _ in data(n=48)]
    student = _student(model)
    model.train()  # the user's mode, which must survive
    teacher = frozen_teacher(model)
    before = _kl(student, teacher, data(seed=5))
    assert before > 0.05  # far from the teacher before
    fxmerge.distill_finetune(model, unlabeled, steps=30, lr=0.05)(student)
    after = _kl(student, teacher, data(seed=5))  # held-out inputs
    assert after < 0.5 * before, (before, after)
    assert not student.training
    assert model.training and parameter_digest(model) == digest
    assert all(p.requires_grad for p in model.parameters())


def test_labeled_distillation_differs_from_plain_fine_tuning_and_is_seeded():
    model = small_net()

    def tuned(**kwargs):
        torch.manual_seed(3)
        student = _student(model)
        sgd_finetune(data(), steps=5, lr=0.05, **kwargs)(student)
        return parameter_digest(student)

    plain, kd = tuned(), tuned(teacher=model)
    assert plain == tuned() and kd == tuned(teacher=model)  # same seed, same weights
    assert kd != plain
    assert tuned(teacher=model, kd_weight=0.0) == plain  # weight 0: the task loss alone


def test_unlabeled_data_without_a_teacher_says_what_to_pass():
    model = small_net()
    unlabeled = [x for x, _ in data()]
    with pytest.raises(fxmerge.InvalidArgumentError, match="without targets; pass teacher="):
        sgd_finetune(unlabeled, steps=2)(_student(model))
    with pytest.raises(fxmerge.InvalidArgumentError, match="pass distill=True"):
        ImportanceTable.estimate(model, (unlabeled[0],), eval_fn=neg_loss(data()), data=unlabeled, steps=2)
    with pytest.raises(fxmerge.InvalidArgumentError, match="needs the teacher"):
        fxmerge.distill_finetune(None, unlabeled)
    with pytest.raises(fxmerge.InvalidArgumentError, match="with your own train_fn"):
        ImportanceTable.estimate(model, (unlabeled[0],), eval_fn=neg_loss(data()), distill=True,
                                 train_fn=sgd_finetune(data(), steps=1))


def test_estimate_distills_from_the_original_and_records_it(tmp_path):
    model = small_net()
    digest = parameter_digest(model)
    batches = data()
    unlabeled = [x for x, _ in batches]
    pairs = [p for p in fxmerge.importance.candidate_pairs(fxmerge.analyze(model, (unlabeled[0],)))][:3]
    path = tmp_path / "kd.json"

    def estimate(train_data, **kwargs):
        return ImportanceTable.estimate(model, (unlabeled[0],), eval_fn=neg_loss(batches), data=train_data, steps=3,
                                        lr=0.05, pairs=pairs, **kwargs)

    kd = estimate(unlabeled, distill=True, path=path)
    assert kd.meta["settings"]["distill"] is True and kd.meta["settings"]["kd_weight"] == 0.3
    assert parameter_digest(model) == digest
    plain = estimate(batches)
    assert "distill" not in plain.meta["settings"]
    assert kd.scores != plain.scores  # the teacher's outputs, not the labels, were trained on
    assert estimate(unlabeled, distill=True, path=path).scores == kd.scores  # resumed: nothing to redo
    with pytest.raises(fxmerge.EnvironmentMismatchError, match="distill"):
        estimate(batches, path=path)  # a KD file never resumes a plain run
    assert copy.deepcopy(kd.scores) == estimate(unlabeled, distill=True).scores  # recomputed: the same
