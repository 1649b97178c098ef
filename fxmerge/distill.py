"""Fine-tuning a linearized net, with knowledge distillation from the original model.

The paper's KD variant fine-tunes the compressed network against the logits of
the uncompressed one as well as the labels. Here:

``loss = kd_weight * T² * KL(softmax(teacher / T) || softmax(student / T))
       + (1 - kd_weight) * task_loss(student, targets)``

with ``kd_weight = 0.3`` and ``T = 1`` by default, the official code's ``--distill 0.3`` (its
``KLLossSoft`` is the cross-entropy to the teacher's soft labels, which is this KL plus the
teacher's entropy, a constant: same gradients). The T² factor keeps the KD gradients' scale
independent of the temperature (Hinton et al.). Batches without targets — an unlabeled input
tensor, or ``(inputs, None)`` — are trained on the KD term alone, with weight 1: what the users
of a pretrained model without its training labels can do.

>>> plan = fxmerge.Plan.drop_all(analysis)
>>> train = fxmerge.distill_finetune(model, loader, steps=3)
>>> student = fxmerge.linearize(model, plan); train(student)
>>> deployed = fxmerge.merge(student, plan)
>>> bool((deployed(x) - student(x)).abs().max() < 1e-4)
True

The teacher is a frozen copy of the model given (eval mode, no gradients); the model itself is
never changed.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.errors import InvalidArgumentError
from fxmerge.arguments import check_count, check_number

KD_WEIGHT = 0.3  # the official code's --distill 0.3
TEMPERATURE = 1.0  # the official code's; KLLossSoft has no temperature

TrainFn = Callable[[nn.Module], None]
UNLABELED_HINT = ("pass teacher=... (or use fxmerge.distill_finetune(model, data)) to train on the original "
                  "model's outputs, or give (inputs, targets) batches")


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with gradients off: a teacher that training cannot
    change, and whose BatchNorm statistics stay put. ``model`` is left as it was."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"teacher must be an nn.Module (the original model); got {type(model).__name__}")
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None, *,
            kd_weight: float = KD_WEIGHT, temperature: float = TEMPERATURE,
            task_loss: Callable[[torch.Tensor, Any], torch.Tensor] = F.cross_entropy) -> torch.Tensor:
    """``kd_weight * T² * KL(teacher/T || student/T) + (1 - kd_weight) * task_loss(student,
    targets)``; without ``targets``, the KD term alone (weight 1).

    Logits have their classes on dim 1 (``(N, C)``, or ``(N, C, ...)`` for dense outputs, where
    the KL is averaged over the other positions); the KL is summed over classes and averaged
    over the batch. 0 when the student's logits equal the teacher's (up to a constant shift)."""
    _check_weights(kd_weight, temperature)
    for name, value in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise InvalidArgumentError(f"{name} must be a tensor of logits with the classes on dim 1, e.g. (N, C); "
                                       f"got {_describe(value)}")
    if student_logits.shape != teacher_logits.shape:
        raise InvalidArgumentError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                                   f"{tuple(teacher_logits.shape)}")
    t = temperature
    log_student = F.log_softmax(student_logits / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kd = (log_teacher.exp() * (log_teacher - log_student)).sum(1).mean() * (t * t)
    if targets is None:
        return kd
    return kd_weight * kd + (1.0 - kd_weight) * task_loss(student_logits, targets)


def split_batch(batch: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
    """``(model inputs, targets or None)`` of one batch: a tensor is an unlabeled batch of
    inputs; a pair ``(inputs, targets)`` is labeled, unless its targets are None; ``inputs``
    may be a tensor or a tuple of tensors (a model with several inputs)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        inputs, targets = batch
        if isinstance(inputs, torch.Tensor):
            return (inputs,), targets
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
            return tuple(inputs), targets
    raise InvalidArgumentError("a batch must be an input tensor (unlabeled), or a pair (inputs, targets) with inputs a "
                               f"tensor or a tuple of tensors and targets None where there are none; got {_describe(batch)}")


def sgd_finetune(data: Iterable, *, steps: int = 100, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 1e-5, loss_fn: Callable = F.cross_entropy, teacher: nn.Module | None = None,
                 kd_weight: float = KD_WEIGHT, temperature: float = TEMPERATURE, freeze_bn: bool = False) -> TrainFn:
    """A ``train_fn(module)``: ``steps`` SGD steps (Nesterov, cosine-decayed lr, as the paper)
    over the batches of ``data``, cycled as needed; the module ends in eval mode.

    Without ``teacher``: ``loss_fn(module(inputs), targets)`` on ``(inputs, targets)``
    batches. With ``teacher`` (the original model; a frozen copy is taken now): :func:`kd_loss`
    against its logits, so unlabeled batches work too. ``freeze_bn`` keeps every BatchNorm in
    eval mode (running statistics unchanged, affine weights still trained): for small or
    unrepresentative data, whose batch statistics would replace good ones."""
    check_count("steps", steps, hint="SGD steps, e.g. 100")
    check_number("lr", lr, minimum=0, strict=True, hint="the SGD learning rate, e.g. 0.01")
    check_number("momentum", momentum, minimum=0, hint="SGD momentum, e.g. 0.9")
    check_number("weight_decay", weight_decay, minimum=0, hint="e.g. 1e-5")
    _check_weights(kd_weight, temperature)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise InvalidArgumentError(f"data must be an iterable of batches (a list or a DataLoader); got {_describe(data)}")
    frozen = None if teacher is None else frozen_teacher(teacher)

    def loss_of(module: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = split_batch(batch)
        out = module(*inputs)
        if frozen is None:
            if targets is None:
                raise InvalidArgumentError(f"data yielded a batch without targets; {UNLABELED_HINT}")
            return loss_fn(out, targets)
        with torch.no_grad():
            reference = frozen(*inputs)
        return kd_loss(out, reference, targets, kd_weight=kd_weight, temperature=temperature, task_loss=loss_fn)

    def train(module: nn.Module) -> None:
        _sgd(module, data, loss_of, steps=steps, lr=lr, momentum=momentum, weight_decay=weight_decay,
             freeze_bn=freeze_bn)

    return train


def distill_finetune(teacher: nn.Module, data: Iterable, *, steps: int = 100, lr: float = 0.01,
                     kd_weight: float = KD_WEIGHT, temperature: float = TEMPERATURE, freeze_bn: bool = False,
                     **sgd: Any) -> TrainFn:
    """A ``train_fn(student)`` that fine-tunes ``student`` (e.g. ``fxmerge.linearize(teacher,
    plan)``) by knowledge distillation from ``teacher``, the original model: :func:`kd_loss` on
    ``(inputs, targets)`` batches, the KD term alone on unlabeled ones (input tensors).
    ``sgd`` passes ``momentum``, ``weight_decay``, ``loss_fn`` on to :func:`sgd_finetune`.
    ``teacher`` is copied and frozen; it is never changed."""
    if teacher is None:
        raise InvalidArgumentError("distill_finetune needs the teacher: the original (uncompressed) model")
    return sgd_finetune(data, steps=steps, lr=lr, teacher=teacher, kd_weight=kd_weight, temperature=temperature,
                      freeze_bn=freeze_bn, **sgd)


def _sgd(module: nn.Module, data: Iterable, loss_of: Callable[[nn.Module, Any], torch.Tensor], *, steps: int,
         lr: float, momentum: float, weight_decay: float, freeze_bn: bool) -> None:
    _train_mode(module, freeze_bn)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                          nesterov=momentum > 0, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    done = 0
    while done < steps:
        before = done
        for batch in data:
            opt.zero_grad()
            loss_of(module, batch).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
        if done == before:  # an empty dataset, or a generator already used up: it would never end
            raise InvalidArgumentError("data yielded no batches; give a list or a DataLoader "
                                       "(a generator is used up after one pass)")
    module.eval()


def _train_mode(module: nn.Module, freeze_bn: bool) -> None:
    module.train()
    if freeze_bn:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _check_weights(kd_weight: float, temperature: float) -> None:
    check_number("kd_weight", kd_weight, minimum=0, hint="the KD term's share of the loss, 0..1, e.g. 0.3")
    if kd_weight > 1:
        raise InvalidArgumentError(f"kd_weight must be within [0, 1] (the KD term's share of the loss, e.g. 0.3); "
                                   f"got {kd_weight!r}")
    check_number("temperature", temperature, minimum=0, strict=True, hint="the softmax temperature, e.g. 1 or 4")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__
