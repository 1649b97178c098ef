"""Scoring many candidates in a long run: every finished score saved as it comes, a run resumed
only from a file made the same way, and — when the caller has initialised a
``torch.distributed`` process group — the candidates sharded across ranks, every rank ending
with all the scores (fxmerge never initialises a group itself; each rank saves its own partial
file, rank 0 the full one).

The file format is the caller's: a :class:`Store` reads and writes ``(scores, meta)``.

>>> store = Store(load=lambda path: ({}, {}), save=lambda path, scores, meta: None)
>>> score_all([1, 2, 3], lambda index, item: float(item * 10), None, False, {"estimator": "x"}, store)
{1: 10.0, 2: 20.0, 3: 30.0}
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch.distributed as dist

from fxmerge.arguments import is_finite
from fxmerge.errors import EnvironmentMismatchError, FxMergeError, InvalidArgumentError
from fxmerge.timing import Progress


@dataclass(frozen=True)
class Store:
    """How partial results are read from and written to a file."""

    load: Callable[[Path], tuple[dict, dict]]
    save: Callable[[Path, dict, dict], None]


def score_all(items: Sequence[Hashable], score: Callable[[int, Any], float], path: str | os.PathLike | None,
              progress: bool | None, meta: dict, store: Store, what: str = "importance") -> dict:
    """``{item: score(index, item)}`` for every item, resumable from ``path`` (see the module's
    docstring); ``meta`` says how the scores are made, and a file made otherwise is refused."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = [(k, item) for k, item in enumerate(items) if k % world == rank]
    partial = None if path is None else (Path(path) if world == 1 else Path(f"{path}.rank{rank}-of-{world}"))
    done: dict = {}
    if partial is not None and partial.exists():
        saved_scores, saved_meta = store.load(partial)
        check_resumable(saved_meta, meta, partial)
        wanted = set(items)
        done = {item: v for item, v in saved_scores.items() if item in wanted}
    bar = Progress(len(mine), f"fxmerge: {what} (rank {rank}/{world})" if world > 1 else f"fxmerge: {what}", progress)
    bar.step(sum(1 for _, item in mine if item in done))
    for index, item in mine:
        if item in done:
            continue
        done[item] = finite_score(score(index, item), f"the score of pair {item}")
        if partial is not None:
            store.save(partial, done, meta)
        bar.step()
    if world > 1:
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, done)
        done = {item: v for part in gathered for item, v in part.items()}
        if path is not None and rank == 0:
            store.save(Path(path), done, meta)
        dist.barrier()
    return {item: done[item] for item in items}


def check_resumable(saved: dict, meta: dict, path: Path) -> None:
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


def finite_score(value: Any, what: str) -> float:
    """``value`` as a finite float, or an error naming ``what`` returned it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} is {value!r}: eval_fn must return a number") from None
    if not is_finite(value):
        raise FxMergeError(f"{what} is {value}: eval_fn must return a finite number (and the model's outputs must "
                           "be finite)")
    return value
