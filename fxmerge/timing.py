"""Timing modules the same way everywhere: latency-table entries and whole models alike.

Median over repeats of the mean time per call, the spread (inter-quartile range) kept; each
repeat runs enough calls to last ``min_repeat_ms``. CPU uses ``perf_counter``; inputs on a GPU
are timed with CUDA events. Backends: ``"eager"``, ``"inductor"`` (``torch.compile``, compile
time excluded) and ``"onnxruntime"`` (with the ``onnx`` extra installed).
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge.errors import FxMergeError, InvalidArgumentError
from fxmerge.validation import check_choice, check_count, check_inputs, check_number

BACKENDS = ("eager", "inductor", "onnxruntime")


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


def runner(module: nn.Module, inputs: Sequence[torch.Tensor], backend: str) -> Callable[[], object]:
    """A no-argument callable running ``module(*inputs)`` on ``backend`` (compiled/exported
    once here, so that cost never reaches the timings). It leaves ``module`` as it is: build and
    call it inside :func:`evaluating` to time the module in eval mode."""
    if backend == "eager":
        return lambda: module(*inputs)
    if backend == "inductor":
        # A GraphModule of its own gives each module its own code object; otherwise every
        # nn.Conv2d shares Conv2d.forward and dynamo stops compiling after a few shapes.
        if not isinstance(module, torch.fx.GraphModule):
            module = torch.fx.symbolic_trace(module)
        compiled = torch.compile(module, backend="inductor", dynamic=False)
        with torch.inference_mode():
            compiled(*inputs)
        return lambda: compiled(*inputs)
    if backend == "onnxruntime":
        return _onnx_runner(module, inputs)
    check_choice("backend", backend, BACKENDS)
    raise AssertionError(f"backend {backend!r} is listed in BACKENDS but has no runner")


def _onnx_runner(module: nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise FxMergeError("the onnxruntime backend needs the extra: pip install 'fxmerge[onnx]'") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:  # the session reads weights stored beside the graph
        path = f"{tmp}/module.onnx"
        torch.onnx.export(module, tuple(inputs), path, dynamo=True, verbose=False)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)


def calibrate(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, min_repeat_ms: float = 10.0,
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


def measure_latency(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, backend: str = "eager",
                    rounds: int = 5, repeats: int = 15, min_repeat_ms: float = 30.0, warmup_ms: float = 500.0) -> Timing:
    """End-to-end latency of ``module`` timed as latency-table entries are (device, dtype and
    batch follow ``example_inputs``): median over ``repeats`` samples taken in ``rounds``.
    ``module`` is timed in eval mode and left in the mode it was in."""
    return compare_latency({"model": module}, example_inputs, backend=backend, rounds=rounds, repeats=repeats,
                           min_repeat_ms=min_repeat_ms, warmup_ms=warmup_ms)["model"]


def compare_latency(modules: Mapping[str, nn.Module], example_inputs: Sequence[torch.Tensor], *,
                    backend: str = "eager", rounds: int = 5, repeats: int = 15, min_repeat_ms: float = 30.0,
                    warmup_ms: float = 500.0) -> dict[str, Timing]:
    """Time several modules interleaved: each round samples every module in turn, so a machine
    whose speed drifts (shared hosts do, by tens of percent over tens of seconds) shifts them
    all alike and their ratios stay honest. The modules are timed in eval mode and left in the
    mode they were in."""
    check_timing_settings(backend=backend, rounds=rounds, repeats=repeats, min_repeat_ms=min_repeat_ms,
                          warmup_ms=warmup_ms)
    if not isinstance(modules, Mapping) or not modules or not all(isinstance(m, nn.Module) for m in modules.values()):
        raise InvalidArgumentError("modules must be a non-empty mapping name -> nn.Module, e.g. {'model': model}; "
                                   f"got {type(modules).__name__}")
    example_inputs = check_inputs("example_inputs", example_inputs)
    device = example_inputs[0].device
    with evaluating(*modules.values()):
        fns = {name: runner(m, example_inputs, backend) for name, m in modules.items()}
        calls = {name: calibrate(fn, device, min_repeat_ms=min_repeat_ms, warmup_ms=warmup_ms) for name, fn in fns.items()}
        per_round = max(1, -(-repeats // rounds))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name] += sample(fn, device, calls[name], per_round)
    return {name: Timing.from_samples(samples[name], calls[name]) for name in fns}


def check_timing_settings(**settings: Any) -> None:
    """The timing arguments shared by measure_latency, compare_latency and LatencyTable."""
    checks = {
        "backend": lambda v: check_choice("backend", v, BACKENDS),
        "rounds": lambda v: check_count("rounds", v, hint="interleaved passes over everything timed"),
        "repeats": lambda v: check_count("repeats", v, hint="samples per entry, e.g. 9"),
        "warmup": lambda v: check_count("warmup", v, minimum=0, hint="untimed calls before timing"),
        "min_repeat_ms": lambda v: check_number("min_repeat_ms", v, minimum=0, hint="milliseconds per sample"),
        "warmup_ms": lambda v: check_number("warmup_ms", v, minimum=0, hint="milliseconds of warm-up"),
    }
    for name, value in settings.items():
        checks[name](value)


class Progress:
    """Progress of a long run on stderr: a one-line bar on a terminal; elsewhere (logs,
    notebooks) a plain line every ``every_s`` seconds, so short runs stay silent."""

    def __init__(self, total: int, what: str, enabled: bool | None = None, every_s: float = 10.0):
        self.total, self.what, self.done = total, what, 0
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.every_s = every_s
        self.start = self.last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
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
