"""What the examples share to give results that reproduce and compare like for like.

* :func:`seed_everything` — one seed for Python, numpy and torch (and torch's deterministic
  algorithms, warning where an op has none);
* :func:`latency_table` — a latency table measured once into a file and read back from it on
  every later run, so plans depend on the file, not on the timings of the day;
* :class:`Strategy` — how plans are made: a name, an importance (None: uniform) and extra
  keyword arguments for ``fxmerge.plan`` / ``fxmerge.frontier`` (``prune_layers=True``);
* statistics over seeds: :func:`mean_std`, :func:`interpolate` (accuracy at a matched measured
  speed-up), :func:`paired`.

Not part of the library: examples import it from their own folder.
"""
from __future__ import annotations

import contextlib
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

import fxmerge
from fxmerge import serialization


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic algorithms (with a warning,
    not an error, for an op that has none). On the CPU, results then repeat bit for bit for
    the same seed, torch build and thread count; another thread count changes the order of
    float reductions, and so the last bits, which training amplifies."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads (None: as is), then restore the count: train
    on every core, time and plan on the table's thread count."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_table(path: Path, measure: Callable[[Path], fxmerge.LatencyTable], log: Callable[[str], None] = print,
                  ) -> fxmerge.LatencyTable:
    """The table in ``path`` if it exists; otherwise ``measure(path)`` (which saves there) —
    then read back from the file either way, so a first run and a repeat plan from the same
    numbers."""
    if path.exists():
        log(f"latency table: reusing {path} (delete it, or pass another --table, to re-measure)")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"latency table: measuring into {path}")
        measure(path)
    return fxmerge.LatencyTable.load(path)


# --------------------------------------------------------------------------- strategies


@dataclass
class Strategy:
    """One way of planning: ``importance`` for ``fxmerge.plan``/``frontier`` (None: uniform)
    and the keyword arguments they get besides (e.g. ``{"prune_layers": True}``)."""

    name: str
    importance: Any = None
    plan_kwargs: dict = field(default_factory=dict)


def spread(plans: Sequence[fxmerge.Plan], count: int) -> list[fxmerge.Plan]:
    """``count`` of ``plans`` (a frontier, fastest first) evenly spread in predicted latency, the
    fastest and the slowest included; all of them if there are no more than ``count``."""
    if len(plans) <= count:
        return list(plans)
    lat = [p.info["predicted_ms"]["planned"] for p in plans]
    picked = sorted({min(range(len(plans)), key=lambda i: abs(lat[i] - (lat[0] + (lat[-1] - lat[0]) * k / (count - 1))))
                     for k in range(count)})
    return [plans[i] for i in picked]


# --------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values: Sequence[float], digits: int = 1, sign: bool = False) -> str:
    """``mean ± std`` of ``values`` as text (``-`` when there are none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:+.{digits}f} ± {s:.{digits}f}" if sign else f"{m:.{digits}f} ± {s:.{digits}f}"


def interpolate(points: Iterable[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on the piecewise-linear curve through ``points`` (sorted by x; several
    points at one x averaged); None outside their range."""
    by_x: dict[float, list[float]] = {}
    for px, py in points:
        by_x.setdefault(px, []).append(py)
    xs = sorted(by_x)
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    ys = [statistics.fmean(by_x[v]) for v in xs]
    return float(np.interp(x, xs, ys))


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """Per-seed differences ``a - b``, for the seeds where both exist."""
    return [x - y for x, y in zip(a, b) if x is not None and y is not None]


def common_range(curves: Iterable[Sequence[tuple[float, float]]]) -> tuple[float, float] | None:
    """The x range every curve covers, or None if they do not overlap."""
    lows, highs = [], []
    for curve in curves:
        xs = [x for x, _ in curve]
        if not xs:
            return None
        lows.append(min(xs))
        highs.append(max(xs))
    if not lows or max(lows) > min(highs):
        return None
    return max(lows), min(highs)


def write_json(path: Path, data: dict) -> None:
    """fxmerge's atomic JSON write (a unique temporary file, then ``os.replace``), creating the
    folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    serialization.write_json(path, data, indent=1)
