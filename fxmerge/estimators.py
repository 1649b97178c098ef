"""How much keeping two activations (and dropping every one between them) is worth: the two ways
fxmerge estimates it, behind ``ImportanceTable.estimate`` and ``ImportanceTable.calibrate``.

* :func:`fine_tune_scores` — the paper's protocol, generalised: per candidate pair, copy the
  model, drop the activations strictly between the pair (linearized, padding moved), fine-tune
  briefly with the user's ``train_fn``, score with ``eval_fn`` and keep the change against the
  unmodified model;
* :func:`output_change_scores` — training-free: how little each candidate's output moves from
  the original's on calibration batches.

Both return ``(scores, meta)``; ``meta`` records the model, the estimator and its settings, so a
long run resumes only into a file made the same way (:mod:`fxmerge.sharding`).

>>> imp = fxmerge.ImportanceTable.calibrate(model, [x])      # output_change_scores behind it
>>> all(score <= 0 for score in imp.scores.values())         # 0: the output does not move
True
"""
from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sized
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from fxmerge.arguments import check_batches, check_count, check_inputs
from fxmerge.distill import KD_WEIGHT, TEMPERATURE, sgd_finetune, split_batch
from fxmerge.errors import InvalidArgumentError
from fxmerge.fingerprints import model_identity
from fxmerge.passes.analysis import analyze
from fxmerge.passes.rewrite import linearize
from fxmerge.passes.tracing import TraceOptions
from fxmerge.plans import Plan
from fxmerge.records import Analysis, ImportanceKey
from fxmerge.serialization import check_output_folder
from fxmerge.sharding import Store, finite_score, score_all


# --------------------------------------------------------------------------- candidates


def candidate_pairs(analysis: Analysis) -> list[ImportanceKey]:
    """The entries estimated by default: one per valid block (i, j] — keep the activations at i
    and j (where there are any), drop those inside, merge the block. Every other pair of kept
    activations gets its score from these by ``ImportanceTable.extend``, as the paper's
    extended importance does. mobilenet_v2 at 224x224 with the default limits: 246 entries
    (the paper measured 315); every pair of its 36 kept-activation candidates would be 630.

    An analysis made with ``prune_layers=True`` adds one entry per pruning option,
    ``(chain, i, j, pruned layers)``: the same block with those convs replaced by the identity
    (mobilenet_v2: 171 more, 417 in all; LayerMerge measured 391)."""
    pairs = [ImportanceKey(chain.index, i, j) for chain in analysis.chains for i, j in chain.valid_blocks]
    if analysis.prune_layers:
        pairs += [ImportanceKey(chain.index, i, j, o.pruned) for chain in analysis.chains
                  for (i, j), options in sorted(chain.options.items()) for o in options]
    return pairs


def pair_plan(analysis: Analysis, pair: ImportanceKey) -> Plan:
    """The model with the activations strictly inside block (i, j] dropped (and, for a pruning
    option, its pruned convs replaced by the identity) and the block merged into one conv;
    every other layer is left on its own."""
    pair = ImportanceKey.of(pair)
    chain = analysis.chains[pair.chain]
    i, j = pair.segment
    keep = [p for p in chain.droppable if not i < p < j]
    bounds = set(range(1, chain.length)) - set(range(i + 1, j))
    return Plan.from_positions(analysis, {pair.chain: (keep, bounds)}, pruned={pair.chain: pair.pruned})


def check_pairs(pairs: Sequence[Any] | None, analysis: Analysis) -> list[ImportanceKey]:
    """The pairs to estimate: each must be a candidate block of this model (default: all)."""
    allowed = candidate_pairs(analysis)
    if pairs is None:
        return allowed
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise InvalidArgumentError(f"pairs must be a list of (chain, i, j) candidate blocks; got {type(pairs).__name__}")
    known = set(allowed)
    out = []
    for k, pair in enumerate(pairs):
        key = ImportanceKey.of(pair) if isinstance(pair, (list, tuple)) and len(pair) in (3, 4) else pair
        if key not in known:
            raise InvalidArgumentError(f"pairs[{k}] = {pair!r} is not a candidate block (chain, i, j) or pruning "
                                       "option (chain, i, j, pruned) of this model; "
                                       "fxmerge.estimators.candidate_pairs(analysis) lists them")
        out.append(key)
    return out


# --------------------------------------------------------------------------- the paper's protocol


def fine_tune_scores(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, eval_fn: Callable[[nn.Module], float],
                     store: Store, train_fn: Callable[[nn.Module], None] | None = None, data: Iterable | None = None,
                     steps: int = 100, lr: float = 0.01, pairs: Sequence[Any] | None = None,
                     path: str | os.PathLike | None = None, progress: bool | None = None, seed: int = 0,
                     analysis: Analysis | None = None, distill: bool = False, kd_weight: float = KD_WEIGHT,
                     temperature: float = TEMPERATURE, trace: TraceOptions | None = None) -> tuple[dict, dict]:
    """``(scores, meta)`` of ``ImportanceTable.estimate`` (its docstring says what each does)."""
    example_inputs = check_inputs("example_inputs", example_inputs)
    check_output_folder(path)
    _check_callable("eval_fn", eval_fn, "a function module -> score (higher is better)")
    check_count("seed", seed, minimum=0)
    settings: dict[str, Any] = {"eval_fn": _callable_name(eval_fn), "seed": seed}
    if train_fn is None:
        train_fn = _builtin_finetune(model, data, steps, lr, distill, kd_weight, temperature, settings)
    elif distill:
        raise InvalidArgumentError("distill=True applies to the built-in fine-tuning (data=...); with your own "
                                   "train_fn, distil inside it, e.g. train_fn=fxmerge.distill_finetune(model, data)")
    else:
        _check_callable("train_fn", train_fn, "a function that fine-tunes a module in place")
        settings["train_fn"] = _callable_name(train_fn)
    analysis = analysis or analyze(model, example_inputs, trace=trace)
    pairs = check_pairs(pairs, analysis)
    base = finite_score(eval_fn(copy.deepcopy(model).eval()), "eval_fn(model)")

    def score(index: int, pair: ImportanceKey) -> float:
        candidate = linearize(model, pair_plan(analysis, pair), trace=trace)
        torch.manual_seed(seed + index)
        train_fn(candidate)
        return eval_fn(candidate.eval()) - base

    meta = {"estimator": "fine-tune", "model": model_identity(model, analysis), "settings": settings,
            "base_score": base}
    return score_all(pairs, score, path, progress, meta, store), meta


def _builtin_finetune(model: nn.Module, data: Iterable | None, steps: int, lr: float, distill: bool,
                      kd_weight: float, temperature: float, settings: dict) -> Callable[[nn.Module], None]:
    """The built-in fine-tuning (:func:`fxmerge.distill.sgd_finetune`, distilling from ``model``
    with ``distill``), its settings recorded in ``settings``; unlabeled data without
    ``distill`` is refused before anything is trained."""
    if data is None:
        raise InvalidArgumentError("estimate needs train_fn=..., or data=... for the built-in SGD fine-tuning")
    if isinstance(data, Sized) and len(data) == 0:
        raise InvalidArgumentError("data is empty: give at least one (inputs, targets) batch")
    if not isinstance(distill, bool):
        raise InvalidArgumentError(f"distill must be True or False; got {distill!r}")
    if not distill and isinstance(data, (list, tuple)) and split_batch(data[0])[1] is None:
        raise InvalidArgumentError("data holds batches without targets: pass distill=True to fine-tune on the "
                                   "original model's outputs (knowledge distillation), or give (inputs, targets) batches")
    train_fn = sgd_finetune(data, steps=steps, lr=lr, teacher=model if distill else None, kd_weight=kd_weight,
                            temperature=temperature)
    settings.update(train_fn="fxmerge sgd_finetune", steps=steps, lr=lr, data=batches_summary(data))
    if distill:  # recorded only when on, so files made before distillation existed still resume
        settings.update(distill=True, kd_weight=kd_weight, temperature=temperature)
    return train_fn


# --------------------------------------------------------------------------- training-free


def output_change_scores(model: nn.Module, batches: Sequence[Any], *, store: Store, pairs: Sequence[Any] | None = None,
                         path: str | os.PathLike | None = None, progress: bool | None = None,
                         analysis: Analysis | None = None, trace: TraceOptions | None = None) -> tuple[dict, dict]:
    """``(scores, meta)`` of ``ImportanceTable.calibrate``: score = -(squared output change /
    output energy), averaged over the batches. Every batch is checked before any work: model
    inputs (a tensor or a tuple), or ``(inputs, targets)`` as a DataLoader yields them
    (targets ignored); none empty; all shaped like the first but for the batch size."""
    batches = model_input_batches(model, batches)
    check_output_folder(path)
    analysis = analysis or analyze(model, batches[0], trace=trace)
    pairs = check_pairs(pairs, analysis)
    identity = model_identity(model, analysis)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference = [_first_tensor(model(*b)) for b in batches]

    @torch.no_grad()
    def score(index: int, pair: ImportanceKey) -> float:
        candidate = linearize(model, pair_plan(analysis, pair), trace=trace).eval()
        moved = [((_first_tensor(candidate(*b)) - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)).item()
                 for b, ref in zip(batches, reference)]
        return -sum(moved) / len(moved)

    meta = {"estimator": "calibration", "model": identity, "settings": {"batches": batches_summary(batches)}}
    return score_all(pairs, score, path, progress, meta, store), meta


def model_input_batches(model: nn.Module, batches: Any) -> list[tuple[torch.Tensor, ...]]:
    """Every batch as the tuple of model inputs it holds, checked: ``(inputs, targets)`` pairs
    (a DataLoader's) lose their targets when the model takes one input; an empty batch, or one
    shaped or typed unlike the first (but for its size), is refused naming its index."""
    batches = check_batches("batches", batches)
    arity = _positional_inputs(model)
    out = []
    for k, batch in enumerate(batches):
        if arity == 1 and isinstance(batch, (list, tuple)) and len(batch) == 2:
            batch = split_batch(batch)[0]  # (inputs, targets): the model takes the inputs
        inputs = check_inputs(f"batches[{k}]", batch)
        if any(x.dim() > 0 and x.shape[0] == 0 for x in inputs):
            raise InvalidArgumentError(f"batches[{k}] is empty (batch size 0): every batch needs at least one "
                                       "sample, or its scores would all be 0")
        if out and [(x.shape[1:], x.dtype) for x in inputs] != [(x.shape[1:], x.dtype) for x in out[0]]:
            shapes = lambda b: [f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" for x in b]  # noqa: E731
            raise InvalidArgumentError(f"batches[{k}] holds inputs {shapes(inputs)}, unlike batches[0] "
                                       f"{shapes(out[0])}: every batch must have the same shapes and dtypes but for "
                                       "the batch size")
        out.append(inputs)
    return out


def _positional_inputs(model: nn.Module) -> int | None:
    """How many positional inputs ``model.forward`` requires (None if it cannot say)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)


# --------------------------------------------------------------------------- helpers


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    return _first_tensor(out[0])


def _callable_name(fn: Callable) -> str:
    target = getattr(fn, "func", fn)  # functools.partial
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{getattr(target, '__module__', '?')}.{name}"


def batches_summary(batches: Any) -> dict:
    """How many batches of which shapes (without iterating a loader that is not a list)."""
    if not isinstance(batches, (list, tuple)):
        return {"type": type(batches).__name__, "count": len(batches) if isinstance(batches, Sized) else None}

    def shapes(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return list(item.shape)
        if isinstance(item, (list, tuple)):
            return [shapes(x) for x in item]
        return type(item).__name__

    return {"count": len(batches), "shapes": [shapes(b) for b in batches]}


def _check_callable(name: str, value: Any, what: str) -> None:
    if not callable(value):
        raise InvalidArgumentError(f"{name} must be {what}; got {type(value).__name__}")
