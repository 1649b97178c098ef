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
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from fxmerge.api import analyze
from fxmerge.errors import FxMergeError
from fxmerge.serialization import check_header, read_json, write_json
from fxmerge.passes.analysis import Analysis
from fxmerge.passes.rewrite import linearize
from fxmerge.passes.tracing import as_inputs
from fxmerge.plans import Plan
from fxmerge.timing import Progress

FORMAT, VERSION = "fxmerge.importance", 1
Pair = tuple[int, int, int]  # (chain index, i, j)


# --------------------------------------------------------------------------- candidates


def candidate_pairs(analysis: Analysis) -> list[Pair]:
    """The entries estimated by default: one per valid block (i, j] — keep the activations at i
    and j (where there are any), drop those inside, merge the block. Every other pair of kept
    activations gets its score from these by :meth:`ImportanceTable.extend`, as the paper's
    extended importance does. mobilenet_v2 at 224x224 with the default limits: 248 entries
    (the paper measured 315); every pair of its 36 kept-activation candidates would be 630."""
    return [(chain.index, i, j) for chain in analysis.chains for i, j in chain.valid_blocks]


def pair_plan(analysis: Analysis, pair: Pair) -> Plan:
    """The model with the activations strictly inside block (i, j] dropped and the block merged
    into one conv; every other layer is left on its own."""
    ci, i, j = pair
    chain = analysis.chains[ci]
    keep = [p for p in chain.droppable if not i < p < j]
    bounds = set(range(1, chain.length)) - set(range(i + 1, j))
    return Plan.from_positions(analysis, {ci: (keep, bounds)})


# --------------------------------------------------------------------------- built-in pieces


def sgd_finetune(data: Iterable, *, steps: int = 100, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 1e-5, loss_fn: Callable = F.cross_entropy) -> Callable[[nn.Module], None]:
    """A ``train_fn``: ``steps`` SGD steps (Nesterov, cosine-decayed lr, as the paper) over
    ``(inputs, targets)`` batches from ``data``, cycled as needed."""

    def train(module: nn.Module) -> None:
        module.train()
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        done = 0
        while done < steps:
            for inputs, targets in data:
                opt.zero_grad()
                loss_fn(module(inputs), targets).backward()
                opt.step()
                sched.step()
                done += 1
                if done == steps:
                    break
        module.eval()

    return train


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
        single = [v for (_, i, j), v in self.scores.items() if j - i == 1]
        if not single:
            raise FxMergeError("normalisation needs the single-layer entries (blocks (p-1, p]) in the table")
        shift = alpha * sum(single) / len(single)
        return ImportanceTable({k: v - shift for k, v in self.scores.items()}, {**self.meta, "alpha": alpha, "shift": shift})

    def extend(self, analysis: Analysis) -> dict[Pair, float]:
        """Scores for every pair of kept-activation candidates: a pair's measured entry, or the
        best sum over splits at positions without an activation (the paper's extended
        importance, METHOD.md §4.4; ties keep the unsplit entry). This is what the DP reads."""
        out: dict[Pair, float] = {}
        for chain in analysis.chains:
            measured = {(i, j): v for (c, i, j), v in self.scores.items() if c == chain.index}
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
                 analysis: Analysis | None = None, **trace_kwargs: Any) -> "ImportanceTable":
        """Fine-tune-and-score each candidate pair (the paper's protocol).

        ``train_fn(module)`` fine-tunes a linearized candidate in place (or give ``data``, an
        iterable of ``(inputs, targets)``, for the built-in :func:`sgd_finetune`);
        ``eval_fn(module) -> float`` scores it, higher is better. Each entry is
        ``eval_fn(tuned candidate) - eval_fn(original)``. Every pair is trained from the same
        seed, so results do not depend on sharding.
        """
        if train_fn is None:
            if data is None:
                raise FxMergeError("estimate needs train_fn=..., or data=... for the built-in SGD fine-tuning")
            train_fn = sgd_finetune(data, steps=steps, lr=lr)
        analysis = analysis or analyze(model, example_inputs, **trace_kwargs)
        base = eval_fn(copy.deepcopy(model).eval())
        pairs = list(pairs) if pairs is not None else candidate_pairs(analysis)

        def score(index: int, pair: Pair) -> float:
            candidate = linearize(model, pair_plan(analysis, pair), **trace_kwargs)
            torch.manual_seed(seed + index)
            train_fn(candidate)
            return eval_fn(candidate.eval()) - base

        meta = {"estimator": "fine-tune", "base_score": base}
        return cls(_evaluate(pairs, score, path, progress, meta), meta)

    @classmethod
    def calibrate(cls, model: nn.Module, batches: Sequence[Any], *, pairs: Sequence[Pair] | None = None,
                  path: str | os.PathLike | None = None, progress: bool | None = None,
                  analysis: Analysis | None = None, **trace_kwargs: Any) -> "ImportanceTable":
        """Training-free: score = -(squared output change / output energy), averaged over
        ``batches`` (each a tensor or a tuple of model inputs). 0 means unchanged."""
        batches = [as_inputs(b) for b in batches]
        analysis = analysis or analyze(model, batches[0], **trace_kwargs)
        model = copy.deepcopy(model).eval()
        with torch.no_grad():
            reference = [_first_tensor(model(*b)) for b in batches]
        pairs = list(pairs) if pairs is not None else candidate_pairs(analysis)

        @torch.no_grad()
        def score(index: int, pair: Pair) -> float:
            candidate = linearize(model, pair_plan(analysis, pair), **trace_kwargs).eval()
            moved = [((_first_tensor(candidate(*b)) - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)).item()
                     for b, ref in zip(batches, reference)]
            return -sum(moved) / len(moved)

        meta = {"estimator": "calibration"}
        return cls(_evaluate(pairs, score, path, progress, meta), meta)

    # ---------------------------------------------------------------- JSON, printing

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "meta": self.meta,
                "scores": [[c, i, j, v] for (c, i, j), v in sorted(self.scores.items())]}

    @classmethod
    def from_dict(cls, d: dict) -> "ImportanceTable":
        check_header(d, FORMAT, VERSION)
        return cls({(c, i, j): v for c, i, j, v in d["scores"]}, d.get("meta"))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceTable":
        return cls.from_dict(read_json(path))

    def __str__(self) -> str:
        rows = [[c, f"({i}, {j}]", f"{v:+.4f}"] for (c, i, j), v in sorted(self.scores.items())]
        head = f"fxmerge importance table: {len(self.scores)} pairs ({self.meta.get('estimator', '?')})"
        return head + "\n" + tabulate(rows, headers=["chain", "segment", "score"])


def _evaluate(pairs: list[Pair], score: Callable[[int, Pair], float], path: str | os.PathLike | None,
              progress: bool | None, meta: dict) -> dict[Pair, float]:
    """Score every pair, sharded over the caller's process group if there is one; resumable."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = [(k, p) for k, p in enumerate(pairs) if k % world == rank]
    partial = None if path is None else (Path(path) if world == 1 else Path(f"{path}.rank{rank}-of-{world}"))
    done: dict[Pair, float] = {}
    if partial is not None and partial.exists():
        wanted = set(pairs)
        done = {p: v for p, v in ImportanceTable.load(partial).scores.items() if p in wanted}
    bar = Progress(len(mine), f"fxmerge: importance (rank {rank}/{world})" if world > 1 else "fxmerge: importance", progress)
    bar.step(sum(1 for _, p in mine if p in done))
    for index, pair in mine:
        if pair in done:
            continue
        done[pair] = float(score(index, pair))
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
