"""``ImportanceTable``: how much keeping the activations at two positions (and dropping every one
between them) is worth — the DP's ``importance`` input, keyed ``(chain, i, j)``.

>>> imp = fxmerge.ImportanceTable.calibrate(model, [x])
>>> plan = fxmerge.plan(model, table, budget=0.9, importance=imp)
>>> plan.report.importance is not None
True

The table holds scores and what they were made from (``meta``) and reads and writes them as
versioned JSON. Its two estimators — the paper's fine-tune-and-score protocol
(:meth:`ImportanceTable.estimate`) and a training-free one (:meth:`ImportanceTable.calibrate`)
— live in :mod:`fxmerge.estimators`; long runs save as they go and resume, sharded across a
``torch.distributed`` process group when there is one (:mod:`fxmerge.sharding`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from tabulate import tabulate

from fxmerge import estimators
from fxmerge.arguments import check_mapping, is_finite, is_importance_key
from fxmerge.distill import KD_WEIGHT, TEMPERATURE
from fxmerge.distill import sgd_finetune  # noqa: F401 (its old home: an alias kept for a release)
from fxmerge.errors import FxMergeError, InvalidArgumentError, MalformedFileError
from fxmerge.estimators import candidate_pairs  # noqa: F401 (its old home: an alias kept for a release)
from fxmerge.fingerprints import parameter_digest  # noqa: F401 (its old home: an alias kept for a release)
from fxmerge.passes.tracing import TraceOptions
from fxmerge.records import Analysis, ImportanceKey
from fxmerge.serialization import check_header, read_json, write_json
from fxmerge.sharding import Store

# Version 2 records what a table was made from (model, estimator, settings), so a run resumes
# only into a file made the same way; version-1 files still load, but never resume.
FORMAT, VERSION, READABLE = "fxmerge.importance", 2, (1, 2)


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


# --------------------------------------------------------------------------- the table


class ImportanceTable:
    """Scores keyed by :class:`~fxmerge.records.ImportanceKey` — ``(chain, i, j)``, or
    ``(chain, i, j, pruned layers)`` for a pruning option; higher means more worth keeping.
    Plain tuples work as keys everywhere."""

    def __init__(self, scores: dict[tuple, float] | None = None, meta: dict | None = None):
        self.scores: dict[ImportanceKey, float] = {ImportanceKey.of(k): v for k, v in (scores or {}).items()}
        self.meta = dict(meta or {})

    # mapping protocol used by fxmerge.plan
    def get(self, pair: Sequence[Any], default: float | None = None) -> float | None:
        return self.scores.get(tuple(pair), default)

    def __getitem__(self, pair: Sequence[Any]) -> float:
        return self.scores[tuple(pair)]

    def __contains__(self, pair: object) -> bool:
        return pair in self.scores

    def __len__(self) -> int:
        return len(self.scores)

    def normalized(self, alpha: float) -> "ImportanceTable":
        """The paper's 'single' normalisation: subtract ``alpha`` times the mean score of the
        single-layer entries (which drop nothing, so their score is what fine-tuning alone
        gives) from every entry; every segment of a plan is charged that much."""
        single = [v for k, v in self.scores.items() if not k.is_option and k[2] - k[1] == 1]
        if not single:
            raise FxMergeError("normalisation needs the single-layer entries (blocks (p-1, p]) in the table")
        shift = alpha * sum(single) / len(single)
        return ImportanceTable({k: v - shift for k, v in self.scores.items()}, {**self.meta, "alpha": alpha, "shift": shift})

    def extend(self, analysis: Analysis) -> dict[ImportanceKey, float]:
        """Scores for every pair of kept-activation candidates: a pair's measured entry, or the
        best sum over splits at positions without an activation (the paper's extended
        importance; ties keep the unsplit entry); pruning options' entries as they are (each
        is a whole segment). This is what the DP reads."""
        out: dict[ImportanceKey, float] = {k: v for k, v in self.scores.items() if k.is_option}
        for chain in analysis.chains:
            measured = {k.segment: v for k, v in self.scores.items() if not k.is_option and k.chain == chain.index}
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
            out.update({ImportanceKey(chain.index, i, j): ext[(i, j)] for a, i in enumerate(points)
                        for j in points[a + 1:] if (i, j) in ext})
        return out

    # ---------------------------------------------------------------- estimators

    @classmethod
    def estimate(cls, model: nn.Module, example_inputs: Sequence[torch.Tensor], *, eval_fn: Callable[[nn.Module], float],
                 train_fn: Callable[[nn.Module], None] | None = None, data: Iterable | None = None,
                 steps: int = 100, lr: float = 0.01, pairs: Sequence[Any] | None = None,
                 path: str | os.PathLike | None = None, progress: bool | None = None, seed: int = 0,
                 analysis: Analysis | None = None, distill: bool = False, kd_weight: float = KD_WEIGHT,
                 temperature: float = TEMPERATURE, trace: TraceOptions | None = None) -> "ImportanceTable":
        """Fine-tune-and-score each candidate pair (the paper's protocol).

        ``train_fn(module)`` fine-tunes a linearized candidate in place (or give ``data``, an
        iterable of ``(inputs, targets)``, for the built-in :func:`fxmerge.distill.sgd_finetune`);
        ``eval_fn(module) -> float`` scores it, higher is better. Each entry is
        ``eval_fn(tuned candidate) - eval_fn(original)``. Pair k is trained from seed
        ``seed + k``, so results do not depend on sharding. ``analysis=fxmerge.analyze(...,
        prune_layers=True)`` also scores every pruning option. ``pairs`` limits the work to
        some candidates (:func:`fxmerge.estimators.candidate_pairs` lists them all).

        ``distill=True`` makes the built-in fine-tuning distil from ``model`` (a frozen copy):
        ``kd_weight`` and ``temperature`` as :func:`fxmerge.distill.kd_loss`; ``data`` may then
        be unlabeled (input tensors), trained on the KD term alone.

        With ``path``, every finished entry is saved there and a run resumes where it stopped
        (only from a file made from the same model and settings). Under a ``torch.distributed``
        process group the pairs are sharded across ranks; every rank ends with the full table.
        """
        scores, meta = estimators.fine_tune_scores(
            model, example_inputs, eval_fn=eval_fn, store=cls._store(), train_fn=train_fn, data=data, steps=steps,
            lr=lr, pairs=pairs, path=path, progress=progress, seed=seed, analysis=analysis, distill=distill,
            kd_weight=kd_weight, temperature=temperature, trace=trace)
        return cls(scores, meta)

    @classmethod
    def calibrate(cls, model: nn.Module, batches: Sequence[Any], *, pairs: Sequence[Any] | None = None,
                  path: str | os.PathLike | None = None, progress: bool | None = None,
                  analysis: Analysis | None = None, trace: TraceOptions | None = None) -> "ImportanceTable":
        """Training-free importance from calibration batches: score = -(squared output change /
        output energy), averaged over ``batches`` (each a tensor, a tuple of model inputs, or an
        ``(inputs, targets)`` pair as a DataLoader yields it). 0 means unchanged. ``path`` and
        sharding as for :meth:`estimate`."""
        scores, meta = estimators.output_change_scores(model, batches, store=cls._store(), pairs=pairs, path=path,
                                                       progress=progress, analysis=analysis, trace=trace)
        return cls(scores, meta)

    @classmethod
    def _store(cls) -> Store:
        """How a long estimation saves and resumes its partial results: as importance files."""
        def load(path: Path) -> tuple[dict, dict]:
            table = cls.load(path)
            return table.scores, table.meta

        return Store(load=load, save=lambda path, scores, meta: write_json(path, cls(scores, meta).to_dict()))

    # ---------------------------------------------------------------- JSON, printing

    def to_dict(self) -> dict:
        rows = [k.row(v) for k, v in sorted(self.scores.items(), key=_order)]
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
            if not is_finite(row[-1]):
                raise MalformedFileError(f"{where}: scores[{k}] (pair {tuple(key)}) has score {row[-1]!r}; scores "
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
        rows = [[k.chain, f"({k[1]}, {k[2]}]", ", ".join(map(str, k.pruned)) or "-", f"{v:+.4f}"]
                for k, v in sorted(self.scores.items(), key=_order)]
        head = f"fxmerge importance table: {len(self.scores)} pairs ({self.meta.get('estimator', '?')})"
        return head + "\n" + tabulate(rows, headers=["chain", "segment", "pruned layers", "score"])


def _order(item: tuple) -> tuple:
    key = item[0]
    return (key.chain, *key.segment, key.pruned)


def _row_key(row: Any) -> ImportanceKey | None:
    """The key a saved row ``[chain, i, j, score]`` or ``[chain, i, j, [pruned], score]`` holds
    (None if it is malformed)."""
    if not isinstance(row, list) or len(row) not in (4, 5):
        return None
    key = tuple(row[:3]) if len(row) == 4 else (*row[:3], tuple(row[3]) if isinstance(row[3], list) else row[3])
    return ImportanceKey.of(key) if is_importance_key(key) else None
