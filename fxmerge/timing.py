"""Timing primitives shared by every backend (see :mod:`fxmerge.backends`).

Median over repeats of the mean time per call, the spread (inter-quartile range) kept; each
repeat runs enough calls to last ``min_repeat_ms``. CPU uses ``perf_counter``; inputs on a GPU
are timed with CUDA events.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from fxmerge.arguments import check_count, check_number


@dataclass(frozen=True)
class Timing:
    ms: float  # median time per call
    spread: float  # inter-quartile range of the repeats
    repeats: int
    calls: int  # calls per repeat

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples: Sequence[float], calls: int) -> "Timing":
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        return cls(statistics.median(samples), quartiles[2] - quartiles[0], len(samples), calls)


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
