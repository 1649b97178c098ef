"""Timing primitives shared by every backend (see :mod:`fxmerge.backends`).

Median over repeats of the mean time per call, the spread (inter-quartile range) kept; each
repeat runs enough calls to last ``min_repeat_ms``. CPU uses ``perf_counter``; inputs on a GPU
are timed with CUDA events.
"""
from __future__ import annotations

import contextlib
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge.arguments import check_count, check_number


@dataclass(frozen=True)
class Timing:
    ms: float  # median time per call
    spread: float  # inter-quartile range of the repeats
    repeats: int
    calls: int  # calls per repeat
    # the samples in the order they were taken (interleaved comparisons pair them); not saved
    samples: tuple[float, ...] = field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "samples"}

    @classmethod
    def from_samples(cls, samples: Sequence[float], calls: int) -> "Timing":
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        return cls(statistics.median(samples), quartiles[2] - quartiles[0], len(samples), calls, tuple(samples))

    @property
    def relative_spread(self) -> float:
        """The inter-quartile range over the median: how much the machine moved under it."""
        return self.spread / self.ms if self.ms > 0 else 0.0


# --------------------------------------------------------------------------- noise

CONFIDENCE = 0.95
NOISY_WIDTH = 0.10  # a ratio whose 95 % interval is wider than 10 % of it cannot be trusted


class TimingNoiseWarning(UserWarning):
    """A timing whose spread is too wide for the comparison it was made for."""


@dataclass(frozen=True)
class Ratio:
    """The ratio of two modules' latencies timed interleaved: the median of the paired sample
    ratios (sample k of one over sample k of the other, taken one after the other in the same
    round) and a distribution-free confidence interval for it (order statistics of the pairs:
    no assumption on how a busy machine's noise is distributed)."""

    value: float
    low: float
    high: float
    confidence: float  # the interval's coverage (at least CONFIDENCE where there are enough pairs)
    pairs: int

    @property
    def width(self) -> float:
        """The interval's width relative to the ratio."""
        return (self.high - self.low) / self.value if self.value > 0 else float("inf")

    @property
    def trusted(self) -> bool:
        return self.width <= NOISY_WIDTH

    def inverse(self) -> "Ratio":
        """The same comparison the other way round (a speed-up from a latency ratio)."""
        return Ratio(1 / self.value, 1 / self.high, 1 / self.low, self.confidence, self.pairs)

    def interval(self) -> tuple[float, float]:
        return (self.low, self.high)


def _order_interval(n: int, confidence: float) -> tuple[int, float]:
    """The largest k with P(k-th smallest <= median <= k-th largest) >= ``confidence`` for n
    samples, and that coverage (k = 1, the full range, when n is too small for it)."""
    best = (1, 1 - 2 * 0.5 ** n) if n else (1, 0.0)
    for k in range(1, n // 2 + 1):
        tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n  # P(fewer than k below the median)
        coverage = 1 - 2 * tail
        if coverage < confidence:
            break
        best = (k, coverage)
    return best


def ratio(numerator: Timing, denominator: Timing, confidence: float = CONFIDENCE) -> Ratio:
    """``numerator`` over ``denominator`` (two timings of the same interleaved run) with its
    confidence interval; a timing without samples gives the ratio of medians, interval of zero
    width.

    >>> a = Timing.from_samples([2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.0, 2.0, 2.0], 1)
    >>> b = Timing.from_samples([1.0] * 9, 1)
    >>> r = ratio(a, b)
    >>> (r.value, r.low, r.high, round(r.confidence, 3), r.trusted)
    (2.0, 1.95, 2.05, 0.961, True)
    """
    pairs = sorted(x / y for x, y in zip(numerator.samples, denominator.samples) if y > 0)
    if not pairs:
        value = numerator.ms / denominator.ms
        return Ratio(value, value, value, 0.0, 0)
    k, coverage = _order_interval(len(pairs), confidence)
    return Ratio(statistics.median(pairs), pairs[k - 1], pairs[-k], coverage, len(pairs))


def merged(first: Timing, second: Timing) -> Timing:
    """One timing from two passes of the same interleaved comparison (their samples joined)."""
    return Timing.from_samples(first.samples + second.samples, first.calls)


def noise_note(timings: Mapping[str, Timing], baseline: str) -> str | None:
    """A sentence naming the noise when a comparison of ``timings`` against ``baseline`` cannot
    be trusted (a ratio's interval wider than :data:`NOISY_WIDTH`), else None."""
    ratios = {name: ratio(t, timings[baseline]) for name, t in timings.items() if name != baseline}
    noisy = {name: r for name, r in ratios.items() if not r.trusted}
    if not noisy:
        return None
    worst = max(noisy, key=lambda n: noisy[n].width)
    r = noisy[worst]
    spreads = ", ".join(f"{name} {100 * t.relative_spread:.0f} %" for name, t in
                        sorted(timings.items(), key=lambda kv: -kv[1].relative_spread)[:3])
    return (f"timing too noisy to trust {len(noisy)} of {len(ratios)} comparison(s) with {baseline!r}: {worst!r} over "
            f"{baseline!r} is {r.value:.3f} with a {100 * r.confidence:.0f} % interval {r.low:.3f}-{r.high:.3f} "
            f"(+-{50 * r.width:.0f} %, over {r.pairs} paired samples); samples spread (IQR / median) {spreads}. The "
            "machine's speed moved while timing (other work running?): time again on a quieter machine or with more "
            "rounds")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name}"


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Run the block with every submodule of ``modules`` in eval mode, and give each back the
    mode it had (timing must not switch a caller's model to eval, nor run BatchNorm in
    training mode and move its statistics)."""
    before = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in before:
            m.training = training


def calls_per_sample(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, min_repeat_ms: float = 10.0,
                     warmup_ms: float = 0.0) -> int:
    """Warm ``fn`` up (``warmup`` calls and at least ``warmup_ms``) and return how many calls
    make one repeat last ``min_repeat_ms``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        begin = time.perf_counter()
        done = 0
        while done < warmup or (time.perf_counter() - begin) * 1e3 < warmup_ms:
            fn()
            done += 1
        sync()
        start = time.perf_counter()
        fn()
        sync()
    one = (time.perf_counter() - start) * 1e3
    return max(1, int(min_repeat_ms / max(one, 1e-3)))


def sample(fn: Callable[[], object], device: torch.device, calls: int, repeats: int) -> list[float]:
    """``repeats`` samples of the mean milliseconds per call over ``calls`` calls."""
    out = []
    with torch.inference_mode():
        for _ in range(repeats):
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(calls):
                    fn()
                end.record()
                end.synchronize()
                out.append(begin.elapsed_time(end) / calls)
            else:
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                out.append((time.perf_counter() - start) * 1e3 / calls)
    return out


_SETTING_CHECKS = {
    "rounds": lambda v: check_count("rounds", v, hint="interleaved passes over everything timed"),
    "repeats": lambda v: check_count("repeats", v, hint="samples per entry, e.g. 9"),
    "warmup": lambda v: check_count("warmup", v, minimum=0, hint="untimed calls before timing"),
    "min_repeat_ms": lambda v: check_number("min_repeat_ms", v, minimum=0, hint="milliseconds per sample"),
    "warmup_ms": lambda v: check_number("warmup_ms", v, minimum=0, hint="milliseconds of warm-up"),
}


def check_timing_settings(**settings: Any) -> None:
    """The timing arguments shared by measure_latency, compare_latency and LatencyTable."""
    for name, value in settings.items():
        _SETTING_CHECKS[name](value)


@dataclass(frozen=True)
class TimingSettings:
    """How hard a latency table looks: samples per entry, calls per sample, warm-up."""

    warmup: int = 3
    repeats: int = 9
    min_repeat_ms: float = 10.0
    rounds: int = 3

    def check(self) -> "TimingSettings":
        check_timing_settings(**asdict(self))
        return self


class Progress:
    """Progress of a long run on stderr. ``enabled=None`` (the default): a one-line bar on a
    terminal, elsewhere (logs, notebooks) a plain line every ``every_s`` seconds, so short runs
    stay silent; ``True``: the bar; ``False``: nothing at all."""

    def __init__(self, total: int, what: str, enabled: bool | None = None, every_s: float = 10.0):
        self.total, self.what, self.done = total, what, 0
        self.silent = enabled is False
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.every_s = every_s
        self.start = self.last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.silent:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        if self.tty:
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r{self.what} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"{elapsed:5.1f}s, ~{left:4.0f}s left ")
            if self.done >= self.total:
                sys.stderr.write("\n")
        elif now - self.last >= self.every_s:
            sys.stderr.write(f"{self.what}: {self.done}/{self.total} after {elapsed:.0f}s, ~{left:.0f}s left\n")
            self.last = now
        else:
            return
        sys.stderr.flush()


# --------------------------------------------------------------------------- machine state

DRIFT_LIMIT = 1.15  # units re-timed at more than 15 % off their table times: the machine changed


def drift_note(table_ms: Mapping[str, float], again_ms: Mapping[str, float], what: str = "units") -> str | None:
    """Compare ``what`` timed twice (``table_ms`` when the table measured them, ``again_ms``
    re-timed later): a sentence naming the drift when their median ratio is off by more than
    :data:`DRIFT_LIMIT` either way, else None.

    >>> drift_note({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.3, "b": 2.7, "c": 3.6})
    'the machine changed speed while the table was measured: 3 units re-timed after the end-to-end references ran at 1.30x their table times (1.20x-1.35x), so the references and the units describe different machine states and predictions will be off by about that much. Measure the table again on a quieter machine (LatencyTable.measure, fxmerge table --fresh)'
    """
    ratios = sorted(again_ms[k] / table_ms[k] for k in again_ms if table_ms.get(k, 0) > 0)
    if not ratios:
        return None
    m = statistics.median(ratios)
    if 1 / DRIFT_LIMIT <= m <= DRIFT_LIMIT:
        return None
    return (f"the machine changed speed while the table was measured: {len(ratios)} {what} re-timed after the "
            f"end-to-end references ran at {m:.2f}x their table times ({ratios[0]:.2f}x-{ratios[-1]:.2f}x), so the "
            "references and the units describe different machine states and predictions will be off by about that "
            "much. Measure the table again on a quieter machine (LatencyTable.measure, fxmerge table --fresh)")


def state_note(unit_spreads: Sequence[float], reference_spread: float) -> str | None:
    """Compare how much the units' samples spread (each entry's IQR / median) with how much the
    folded original's did while the end-to-end references ran: a sentence when the references
    saw a much busier machine (spread over :data:`NOISY_WIDTH` and over twice the units'
    median), else None. Their ratios may still be sharp (interleaving cancels the load), but
    the units, medians of short runs, describe a quieter machine than the references: the
    fitted scale then stands for the load.

    >>> state_note([0.02, 0.03, 0.01], 0.04) is None
    True
    >>> state_note([0.02, 0.03, 0.01], 0.35)[:80]
    'the end-to-end references ran on a busier machine than the units: the folded ori'
    """
    if not unit_spreads or reference_spread <= NOISY_WIDTH:
        return None
    units = statistics.median(unit_spreads)
    if reference_spread <= 2 * units:
        return None
    return (f"the end-to-end references ran on a busier machine than the units: the folded original's samples "
            f"spread {100 * reference_spread:.0f} % (IQR / median) while they were timed, the units' "
            f"{100 * units:.0f} % (median over {len(unit_spreads)}). The correction's scale then stands for that load, "
            "and predictions hold only while the machine is as busy. Measure the table again on a quieter machine "
            "(LatencyTable.measure, fxmerge table --fresh)")
