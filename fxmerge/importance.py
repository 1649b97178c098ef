"""``ImportanceTable``: how much keeping the activations at two positions (and dropping every one
between them) is worth — the DP's ``importance`` input, keyed ``(chain, i, j)``.

Two estimators:

* :meth:`ImportanceTable.estimate` — the paper's protocol, generalised (METHOD.md §5): per
  candidate pair, copy the model, drop the activations strictly between the pair (linearized,
  padding moved), fine-tune briefly with the user's ``train_fn``, score with ``eval_fn`` and
  store the change against the unmodified model;
* :meth:`ImportanceTable.calibrate` — training-free: how little each candidate's output moves
  from the original's on calibration batches.

Long runs save every finished entry (``path=``) and resume where they stopped. When the caller
has initialised a ``torch.distributed`` process group, the pairs are sharded across ranks and
every rank ends with the full table; fxmerge never initialises a group itself, each rank saves
its own partial file, and rank 0 writes the full table.

>>> imp = fxmerge.ImportanceTable.calibrate(model, [x])                 # doctest: +SKIP
>>> plan = fxmerge.plan(model, table, budget=0.6, importance=imp)       # doctest: +SKIP
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Sized
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from fxmerge.api import analyze
from fxmerge.distill import KD_WEIGHT, TEMPERATURE, finetuning, split_batch
from fxmerge.errors import EnvironmentMismatchError, FxMergeError, InvalidArgumentError, MalformedFileError
from fxmerge.serialization import check_header, check_output_folder, read_json, write_json
from fxmerge.passes.analysis import Analysis
from fxmerge.passes.rewrite import linearize
from fxmerge.plans import Plan
from fxmerge.timing import Progress
from fxmerge.validation import (check_batches, check_count, check_inputs, check_mapping,
                                is_importance_key, is_real)

# Version 2 records what a table was made from (model, estimator, settings), so a run resumes
# only into a file made the same way; version-1 files still load, but never resume.
FORMAT, VERSION, READABLE = "fxmerge.importance", 2, (1, 2)
Pair = tuple  # (chain index, i, j), or (chain index, i, j, pruned layers) for a pruning option


# --------------------------------------------------------------------------- candidates


def candidate_pairs(analysis: Analysis) -> list[Pair]:
    """The entries estimated by default: one per valid block (i, j] — keep the activations at i
    and j (where there are any), drop those inside, merge the block. Every other pair of kept
    activations gets its score from these by :meth:`ImportanceTable.extend`, as the paper's
    extended importance does. mobilenet_v2 at 224x224 with the default limits: 246 entries
    (the paper measured 315); every pair of its 36 kept-activation candidates would be 630.

    An analysis made with ``prune_layers=True`` adds one entry per pruning option,
    ``(chain, i, j, pruned layers)``: the same block with those convs replaced by the identity
    (mobilenet_v2: 171 more, 417 in all; LayerMerge measured 391)."""
    pairs: list[Pair] = [(chain.index, i, j) for chain in analysis.chains for i, j in chain.valid_blocks]
    if analysis.prune_layers:
        pairs += [(chain.index, i, j, o.pruned) for chain in analysis.chains
                  for (i, j), options in sorted(chain.options.items()) for o in options]
    return pairs


def pair_plan(analysis: Analysis, pair: Pair) -> Plan:
    """The model with the activations strictly inside block (i, j] dropped (and, for a pruning
    option, its pruned convs replaced by the identity) and the block merged into one conv;
    every other layer is left on its own."""
    ci, i, j = pair[:3]
    chain = analysis.chains[ci]
    keep = [p for p in chain.droppable if not i < p < j]
    bounds = set(range(1, chain.length)) - set(range(i + 1, j))
    pruned = {ci: pair[3]} if len(pair) == 4 else None
    return Plan.from_positions(analysis, {ci: (keep, bounds)}, pruned=pruned)


# --------------------------------------------------------------------------- built-in pieces


def sgd_finetune(data: Iterable, *, steps: int = 100, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 1e-5, loss_fn: Callable = F.cross_entropy, teacher: nn.Module | None = None,
                 kd_weight: float = KD_WEIGHT, temperature: float = TEMPERATURE) -> Callable[[nn.Module], None]:
    """A ``train_fn``: ``steps`` SGD steps (Nesterov, cosine-decayed lr, as the paper) over
    ``(inputs, targets)`` batches from ``data``, cycled as needed. With ``teacher`` (the
    original model), knowledge distillation as :func:`fxmerge.distill.kd_loss` describes, and
    unlabeled batches (input tensors) train on the KD term alone."""
    return finetuning(data, steps=steps, lr=lr, momentum=momentum, weight_decay=weight_decay, task_loss=loss_fn,
                      teacher=teacher, kd_weight=kd_weight, temperature=temperature)


def accuracy(data: Iterable) -> Callable[[nn.Module], float]:
    """An ``eval_fn``: top-1 accuracy in percent over ``(inputs, targets)`` batches."""

    @torch.no_grad()
    def evaluate(module: nn.Module) -> float:
        module.eval()
        right = total = 0
        for inputs, targets in data:
            right += (module(inputs).argmax(1) == targets).sum().item()
            total += len(targets)
        return 100.0 * right / total

    return evaluate


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    return _first_tensor(out[0])


# --------------------------------------------------------------------------- the table


class ImportanceTable:
    """Scores keyed ``(chain, i, j)``; higher means more worth keeping."""

    def __init__(self, scores: dict[Pair, float] | None = None, meta: dict | None = None):
        self.scores = dict(scores or {})
        self.meta = dict(meta or {})

    # mapping protocol used by fxmerge.plan
    def get(self, pair: Pair, default: float | None = None) -> float | None:
        return self.scores.get(tuple(pair), default)

    def __getitem__(self, pair: Pair) -> float:
        return self.scores[tuple(pair)]

    def __contains__(self, pair: object) -> bool:
        return pair in self.scores

    def __len__(self) -> int:
        return len(self.scores)

    def normalized(self, alpha: float) -> "ImportanceTable":
        """METHOD.md §4.4 ('single'): subtract ``alpha`` times the mean score of the
        single-layer entries (which drop nothing, so their score is what fine-tuning alone
        gives) from every entry; every segment of a plan is charged that much."""
        single = [v for k, v in self.scores.items() if len(k) == 3 and k[2] - k[1] == 1]
        if not single:
            raise FxMergeError("normalisation needs the single-layer entries (blocks (p-1, p]) in the table")
        shift = alpha * sum(single) / len(single)
        return ImportanceTable({k: v - shift for k, v in self.scores.items()}, {**self.meta, "alpha": alpha, "shift": shift})

    def extend(self, analysis: Analysis) -> dict[Pair, float]:
        """Scores for every pair of kept-activation candidates: a pair's measured entry, or the
        best sum over splits at positions without an activation (the paper's extended
        importance, METHOD.md §4.4; ties keep the unsplit entry); pruning options' entries as
        they are (each is a whole segment). This is what the DP reads."""
        out: dict[Pair, float] = {k: v for k, v in self.scores.items() if len(k) == 4}
        for chain in analysis.chains:
            measured = {k[1:]: v for k, v in self.scores.items() if len(k) == 3 and k[0] == chain.index}
            # splits only where nothing can be kept: a border position is a choice of its own
            free = [p for p in range(1, chain.length) if p not in chain.activations and p not in chain.borders]
            ext: dict[tuple[int, int], float] = {}
            for j in range(1, chain.length + 1):
                for i in range(j):
                    best = measured.get((i, j))
                    for k in free:
                        if i < k < j and (i, k) in ext and (k, j) in measured:
                            value = ext[(i, k)] + measured[(k, j)]
                            if best is None or value > best:
                                best = value
                    if best is not None:
                        ext[(i, j)] = best
            points = chain.kept_candidates
            out.update({(chain.index, i, j): ext[(i, j)] for a, i in enumerate(points) for j in points[a + 1:]
                        if (i, j) in ext})
        return out

    # ---------------------------------------------------------------- estimators

    @classmethod
    def estimate(cls, model: nn.Module, example_inputs: Sequence[torch.Tensor], *, eval_fn: Callable[[nn.Module], float],
                 train_fn: Callable[[nn.Module], None] | None = None, data: Iterable | None = None,
                 steps: int = 100, lr: float = 0.01, pairs: Sequence[Pair] | None = None,
                 path: str | os.PathLike | None = None, progress: bool | None = None, seed: int = 0,
                 analysis: Analysis | None = None, distill: bool = False, kd_weight: float = KD_WEIGHT,
                 temperature: float = TEMPERATURE, **trace_kwargs: Any) -> "ImportanceTable":
        """Fine-tune-and-score each candidate pair (the paper's protocol).

        ``train_fn(module)`` fine-tunes a linearized candidate in place (or give ``data``, an
        iterable of ``(inputs, targets)``, for the built-in :func:`sgd_finetune`);
        ``eval_fn(module) -> float`` scores it, higher is better. Each entry is
        ``eval_fn(tuned candidate) - eval_fn(original)``. Pair k is trained from seed
        ``seed + k``, so results do not depend on sharding. ``analysis=fxmerge.analyze(...,
        prune_layers=True)`` also scores every pruning option.

        ``distill=True`` makes the built-in fine-tuning distil from ``model`` (a frozen copy):
        ``kd_weight`` and ``temperature`` as :func:`fxmerge.distill.kd_loss`; ``data`` may then
        be unlabeled (input tensors), trained on the KD term alone.
        """
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
        analysis = analysis or analyze(model, example_inputs, **trace_kwargs)
        pairs = _check_pairs(pairs, analysis)
        base = _finite_score(eval_fn(copy.deepcopy(model).eval()), "eval_fn(model)")

        def score(index: int, pair: Pair) -> float:
            candidate = linearize(model, pair_plan(analysis, pair), **trace_kwargs)
            torch.manual_seed(seed + index)
            train_fn(candidate)
            return eval_fn(candidate.eval()) - base

        meta = {"estimator": "fine-tune", "model": model_identity(model, analysis), "settings": settings,
                "base_score": base}
        return cls(_evaluate(pairs, score, path, progress, meta), meta)

    @classmethod
    def calibrate(cls, model: nn.Module, batches: Sequence[Any], *, pairs: Sequence[Pair] | None = None,
                  path: str | os.PathLike | None = None, progress: bool | None = None,
                  analysis: Analysis | None = None, **trace_kwargs: Any) -> "ImportanceTable":
        """Training-free: score = -(squared output change / output energy), averaged over
        ``batches`` (each a tensor or a tuple of model inputs). 0 means unchanged."""
        batches = [check_inputs(f"batches[{k}]", b) for k, b in enumerate(check_batches("batches", batches))]
        check_output_folder(path)
        analysis = analysis or analyze(model, batches[0], **trace_kwargs)
        pairs = _check_pairs(pairs, analysis)
        identity = model_identity(model, analysis)
        model = copy.deepcopy(model).eval()
        with torch.no_grad():
            reference = [_first_tensor(model(*b)) for b in batches]

        @torch.no_grad()
        def score(index: int, pair: Pair) -> float:
            candidate = linearize(model, pair_plan(analysis, pair), **trace_kwargs).eval()
            moved = [((_first_tensor(candidate(*b)) - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)).item()
                     for b, ref in zip(batches, reference)]
            return -sum(moved) / len(moved)

        meta = {"estimator": "calibration", "model": identity, "settings": {"batches": _batches_summary(batches)}}
        return cls(_evaluate(pairs, score, path, progress, meta), meta)

    # ---------------------------------------------------------------- JSON, printing

    def to_dict(self) -> dict:
        rows = [[*k[:3], list(k[3]), v] if len(k) == 4 else [*k, v] for k, v in sorted(self.scores.items(), key=_order)]
        return {"format": FORMAT, "version": VERSION, "meta": self.meta, "scores": rows}

    @classmethod
    def from_dict(cls, d: dict, *, source: str | os.PathLike | None = None) -> "ImportanceTable":
        """The table ``to_dict`` gave (format version 1 or 2); :class:`MalformedFileError`
        naming ``source`` (the file) and the entry for rows of the wrong shape or type."""
        check_header(d, FORMAT, READABLE, source=source)
        where = f"{source}" if source is not None else "importance table data"
        rows = d.get("scores")
        if not isinstance(rows, list):
            raise MalformedFileError(f"{where}: 'scores' must be a list of [chain, i, j, score] rows; got {rows!r}")
        scores = {}
        for k, row in enumerate(rows):
            key = _row_key(row)
            if key is None:
                raise MalformedFileError(f"{where}: scores[{k}] must be a row [chain, i, j, score] with integers "
                                         f"0 <= i < j (or [chain, i, j, [pruned layers], score]); got {row!r}. "
                                         "Fix or delete the file.")
            if not is_real(row[-1]) or not math.isfinite(row[-1]):
                raise MalformedFileError(f"{where}: scores[{k}] (pair {key}) has score {row[-1]!r}; scores "
                                         "must be finite numbers. Fix the entry or delete the file.")
            scores[key] = float(row[-1])
        try:
            meta = dict(check_mapping("meta", d.get("meta", {})))
        except InvalidArgumentError as exc:
            raise MalformedFileError(f"{where}: {exc}") from None
        return cls(scores, meta)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceTable":
        return cls.from_dict(read_json(path, "importance table"), source=path)

    def __str__(self) -> str:
        rows = [[k[0], f"({k[1]}, {k[2]}]", ", ".join(map(str, k[3])) if len(k) == 4 else "-", f"{v:+.4f}"]
                for k, v in sorted(self.scores.items(), key=_order)]
        head = f"fxmerge importance table: {len(self.scores)} pairs ({self.meta.get('estimator', '?')})"
        return head + "\n" + tabulate(rows, headers=["chain", "segment", "pruned layers", "score"])


def _order(item: tuple) -> tuple:
    key = item[0]
    return (*key[:3], key[3] if len(key) == 4 else ())


def _row_key(row: Any) -> Pair | None:
    """The key a saved row ``[chain, i, j, score]`` or ``[chain, i, j, [pruned], score]`` holds
    (None if it is malformed)."""
    if not isinstance(row, list) or len(row) not in (4, 5):
        return None
    key = tuple(row[:3]) if len(row) == 4 else (*row[:3], tuple(row[3]) if isinstance(row[3], list) else row[3])
    return key if is_importance_key(key) else None


def _evaluate(pairs: list[Pair], score: Callable[[int, Pair], float], path: str | os.PathLike | None,
              progress: bool | None, meta: dict) -> dict[Pair, float]:
    """Score every pair, sharded over the caller's process group if there is one; resumable."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = [(k, p) for k, p in enumerate(pairs) if k % world == rank]
    partial = None if path is None else (Path(path) if world == 1 else Path(f"{path}.rank{rank}-of-{world}"))
    done: dict[Pair, float] = {}
    if partial is not None and partial.exists():
        saved = ImportanceTable.load(partial)
        _check_resumable(saved.meta, meta, partial)
        wanted = set(pairs)
        done = {p: v for p, v in saved.scores.items() if p in wanted}
    bar = Progress(len(mine), f"fxmerge: importance (rank {rank}/{world})" if world > 1 else "fxmerge: importance", progress)
    bar.step(sum(1 for _, p in mine if p in done))
    for index, pair in mine:
        if pair in done:
            continue
        done[pair] = _finite_score(score(index, pair), f"the score of pair {pair}")
        if partial is not None:
            write_json(partial, ImportanceTable(done, meta).to_dict())
        bar.step()
    if world > 1:
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, done)
        done = {p: v for part in gathered for p, v in part.items()}
        if path is not None and rank == 0:
            write_json(path, ImportanceTable(done, meta).to_dict())
        dist.barrier()
    return {p: done[p] for p in pairs}


# --------------------------------------------------------------------------- identity


def parameter_digest(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes), in
    state_dict order: two models with the same digest compute the same function."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype} {tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # extra state: whatever the module chose to store
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def model_identity(model: nn.Module, analysis: Analysis) -> dict:
    """What an importance table was estimated on: the model's structure (the fold-only plan's
    fingerprint, as plans use) and its weights."""
    return {"structure": Plan.fold_only(analysis).fingerprint(), "parameters": parameter_digest(model)}


def _callable_name(fn: Callable) -> str:
    target = getattr(fn, "func", fn)  # functools.partial
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{getattr(target, '__module__', '?')}.{name}"


def _batches_summary(batches: Any) -> dict:
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


def _check_resumable(saved: dict, meta: dict, path: Path) -> None:
    """A file resumes a run only if it was made from the same model, by the same estimator,
    with the same settings; otherwise its scores would be returned as this run's."""
    remedy = "delete the file or choose another path"
    if "model" not in saved:
        raise EnvironmentMismatchError(f"{path} does not record the model and settings it was made with (an older "
                                       f"fxmerge, or a table saved by hand), so it cannot be resumed safely; {remedy}")
    differences = []
    if saved.get("estimator") != meta["estimator"]:  # then their settings are not comparable
        differences.append(f"estimator {saved.get('estimator')!r}, not {meta['estimator']!r}")
    for key in ("structure", "parameters"):
        if saved["model"].get(key) != meta["model"][key]:
            what = "structure" if key == "structure" else "parameters digest"
            differences.append(f"another model ({what} {saved['model'].get(key)} vs {meta['model'][key]} here)")
    if saved.get("estimator") == meta["estimator"]:
        old, new = saved.get("settings", {}), meta["settings"]
        differences += [f"{key}={old.get(key)!r}, not {new.get(key)!r}" for key in sorted(set(old) | set(new))
                        if old.get(key) != new.get(key)]
        if "base_score" in meta and not math.isclose(saved.get("base_score", math.nan), meta["base_score"],
                                                     rel_tol=1e-6, abs_tol=1e-9):
            differences.append(f"base score {saved.get('base_score')!r}, not {meta['base_score']!r} "
                               "(eval_fn scores the unmodified model differently)")
    if differences:
        raise EnvironmentMismatchError(f"{path} holds importance made with {'; '.join(differences)}: resuming it "
                                       f"would return those scores as this run's; {remedy}")


def _check_callable(name: str, value: Any, what: str) -> None:
    if not callable(value):
        raise InvalidArgumentError(f"{name} must be {what}; got {type(value).__name__}")


def _check_pairs(pairs: Sequence[Pair] | None, analysis: Analysis) -> list[Pair]:
    """The pairs to estimate: each must be a candidate block of this model (default: all)."""
    allowed = candidate_pairs(analysis)
    if pairs is None:
        return allowed
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise InvalidArgumentError(f"pairs must be a list of (chain, i, j) candidate blocks; got {type(pairs).__name__}")
    known = set(allowed)
    out = []
    for k, pair in enumerate(pairs):
        if isinstance(pair, (list, tuple)):
            pair = tuple(pair[:3]) + ((tuple(pair[3]),) if len(pair) == 4 and isinstance(pair[3], (list, tuple)) else
                                      tuple(pair[3:]))
        if pair not in known:
            raise InvalidArgumentError(f"pairs[{k}] = {pair!r} is not a candidate block (chain, i, j) or pruning "
                                       "option (chain, i, j, pruned) of this model; "
                                       "fxmerge.importance.candidate_pairs(analysis) lists them")
        out.append(pair)
    return out


def _builtin_finetune(model: nn.Module, data: Iterable | None, steps: int, lr: float, distill: bool,
                      kd_weight: float, temperature: float, settings: dict) -> Callable[[nn.Module], None]:
    """estimate's built-in fine-tuning (:func:`sgd_finetune`, distilling from ``model`` with
    ``distill``), its settings recorded in ``settings``; unlabeled data without ``distill`` is
    refused before anything is trained."""
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
    settings.update(train_fn="fxmerge sgd_finetune", steps=steps, lr=lr, data=_batches_summary(data))
    if distill:  # recorded only when on, so files made before distillation existed still resume
        settings.update(distill=True, kd_weight=kd_weight, temperature=temperature)
    return train_fn


def _finite_score(value: Any, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} is {value!r}: eval_fn must return a number") from None
    if not math.isfinite(value):
        raise FxMergeError(f"{what} is {value}: eval_fn must return a finite number (and the model's outputs must "
                           "be finite)")
    return value
