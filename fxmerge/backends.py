"""Where a compressed model will run, and how to time things there: one registry, one entry per
backend.

A backend answers two questions the same way it runs a whole model:

* ``time_units``: how long each latency-table term (a conv, a conv + its activation, a residual
  add) costs *inside a model* — eager times each in isolation (its per-call overhead is
  fitted from end-to-end references later); inductor runs convolutions as calls to ATen's oneDNN kernels on
  channels-last maps, so its units are timed as those calls, on channels-last inputs; ONNX
  Runtime optimises each unit as it optimises a model (fusing the activation into the conv) and
  sums the unit's node kernels from its profiler, leaving out the layout reorders a model only
  pays at its boundaries;
* ``compare``: end-to-end latency of whole modules, interleaved (a machine whose speed drifts
  shifts them all alike, so their ratios stay honest).

>>> sorted(BACKENDS)
['eager', 'inductor', 'onnxruntime']

A new backend is one subclass of :class:`Backend` passed to :func:`register_backend`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from typing import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.arguments import check_choice, check_inputs
from fxmerge.errors import FxMergeError, InvalidArgumentError
from fxmerge.timing import (NOISY_WIDTH, Progress, Timing, TimingNoiseWarning, TimingSettings, calls_per_sample,
                            check_timing_settings, evaluating, merged, noise_note, sample)

Builder = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]  # a unit and its inputs


class Backend:
    """How one runtime runs a module, and how to time latency-table units as it would."""

    name = ""
    needs: str | None = None  # pip extra that provides it

    def check_available(self) -> None:
        """Raise :class:`FxMergeError` saying what to install when the runtime is missing."""

    def runner(self, module: nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
        """A no-argument callable running ``module(*inputs)`` here (compiled/exported once, so
        that cost never reaches a timing)."""
        raise NotImplementedError

    def time_units(self, units: Mapping[str, Builder], settings: TimingSettings, *, state: dict,
                   done: Callable[[str, Timing], None], checkpoint: Callable[[], None], progress: Progress) -> None:
        """Time every unit as the backend runs it inside a model; call ``done(key, timing)``
        as each finishes. ``state`` holds unfinished work (samples so far) and persists
        between interrupted runs; ``checkpoint()`` saves it."""
        raise NotImplementedError

    def compare(self, modules: Mapping[str, nn.Module], inputs: Sequence[torch.Tensor], *, rounds: int = 5,
                repeats: int = 15, min_repeat_ms: float = 30.0, warmup_ms: float = 500.0,
                runners: dict | None = None) -> dict[str, Timing]:
        """End-to-end latency of each module, timed interleaved round by round. ``runners``
        (name -> callable) keeps compiled/exported modules between calls: a module whose name
        is already there is not built again."""
        device = inputs[0].device
        runners = {} if runners is None else runners
        with evaluating(*modules.values()):
            for name, m in modules.items():
                if name not in runners:
                    runners[name] = self.runner(m, inputs)
            fns = {name: runners[name] for name in modules}
            calls = {name: calls_per_sample(fn, device, min_repeat_ms=min_repeat_ms, warmup_ms=warmup_ms)
                     for name, fn in fns.items()}
            per_round = max(1, -(-repeats // rounds))
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    samples[name] += sample(fn, device, calls[name], per_round)
        return {name: Timing.from_samples(samples[name], calls[name]) for name in fns}


class BackendRegistry(Mapping):
    """Backends by name (a read-only mapping); :meth:`snapshot` / :meth:`restore` bring back
    exactly what was registered, and :func:`backend_registry` scopes changes to a block."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self._backends: dict[str, Backend] = {}
        for backend in backends:
            self.register(backend)

    def register(self, backend: Backend) -> Backend:
        if not isinstance(backend, Backend) or not backend.name:
            raise InvalidArgumentError("register_backend needs a Backend instance with a name")
        self._backends[backend.name] = backend
        return backend

    def unregister(self, name: str) -> None:
        self._backends.pop(name, None)

    __delitem__ = unregister

    def __getitem__(self, name: str) -> Backend:
        return self._backends[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._backends)

    def __len__(self) -> int:
        return len(self._backends)

    def snapshot(self) -> dict[str, Backend]:
        return dict(self._backends)

    def restore(self, snapshot: dict[str, Backend]) -> None:
        self._backends = dict(snapshot)


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` available by its name (latency tables, plans, the CLI)."""
    return BACKENDS.register(backend)


def unregister_backend(name: str) -> None:
    """Forget a registered backend."""
    BACKENDS.unregister(name)


@contextlib.contextmanager
def backend_registry() -> Iterator[BackendRegistry]:
    """Restore the backend registry on exit: backends registered inside the block are gone."""
    saved = BACKENDS.snapshot()
    try:
        yield BACKENDS
    finally:
        BACKENDS.restore(saved)


def get_backend(name: str) -> Backend:
    check_choice("backend", name, tuple(BACKENDS))
    backend = BACKENDS[name]
    backend.check_available()
    return backend


# --------------------------------------------------------------------------- eager


class Eager(Backend):
    """PyTorch eager mode. Units are timed alone, each sample a loop of calls, in ``rounds``
    interleaved passes over all of them (drift skews no group of entries); what an op costs
    inside a model beyond its isolated time is fitted to end-to-end references (the table's correction)."""

    name = "eager"

    def runner(self, module, inputs):
        return lambda: module(*inputs)

    def unit_inputs(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Inputs in the layout the backend keeps maps in, inside a model."""
        return tuple(inputs)

    def time_units(self, units, settings, *, state, done, checkpoint, progress):
        per_round = max(1, -(-settings.repeats // settings.rounds))
        for r in range(settings.rounds):
            for key, build in units.items():
                entry = state.setdefault(key, {"samples": [], "calls": 0, "rounds": 0})
                if entry["rounds"] <= r:
                    module, inputs = build()
                    inputs = self.unit_inputs(inputs)
                    fn, device = Eager.runner(self, module, inputs), inputs[0].device
                    with evaluating(module):
                        calls = calls_per_sample(fn, device, warmup=1 if entry["calls"] else settings.warmup,
                                                 min_repeat_ms=settings.min_repeat_ms)
                        entry["calls"] = entry["calls"] or calls
                        entry["samples"] += sample(fn, device, entry["calls"], per_round)
                    entry["rounds"] += 1
                    checkpoint()
                progress.step()
        for key in units:
            entry = state.pop(key)
            done(key, Timing.from_samples(entry["samples"], entry["calls"]))


# --------------------------------------------------------------------------- inductor


def _graph_module(module: nn.Module) -> fx.GraphModule:
    # A GraphModule of its own gives each module its own code object; otherwise every nn.Conv2d
    # shares Conv2d.forward and dynamo stops compiling after a few shapes.
    return module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)


def _model_layout(x: torch.Tensor) -> torch.Tensor:
    """An input in the layout inductor keeps convolution maps in (channels last)."""
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


class Inductor(Eager):
    """``torch.compile`` (inductor). On the CPU inductor keeps conv maps channels-last and runs
    each convolution as a call to ATen's oneDNN kernel (its generated code handles the
    pointwise ops around them), so a unit is timed as that call: eagerly, on channels-last
    inputs, warm as inside a model, in interleaved rounds — no compile per unit (about 200 for
    mobilenet_v2, a minute or more each on two cores). The compiled end-to-end references
    correct for what the generated code adds and saves (fused activations, no per-module Python
    overhead); compile time is never timed."""

    name = "inductor"

    def runner(self, module, inputs):
        compiled = torch.compile(_graph_module(module), backend="inductor", dynamic=False)
        with torch.inference_mode():
            compiled(*inputs)
        return lambda: compiled(*inputs)

    def unit_inputs(self, inputs):
        return tuple(_model_layout(x) for x in inputs)


# --------------------------------------------------------------------------- ONNX Runtime


def _export_onnx(module: nn.Module, inputs: Sequence[torch.Tensor], path: str, *, fast: bool) -> None:
    """torch.onnx.export; ``fast`` uses the TorchScript exporter (a unit exports in ~30 ms, the
    dynamo one takes seconds), falling back to dynamo where it is gone."""
    if fast:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, tuple(inputs), path, dynamo=False, opset_version=17)
            return
        except Exception:  # noqa: BLE001 - the legacy exporter is deprecated: use the supported one
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs), path, dynamo=True, verbose=False)


class OnnxRuntime(Backend):
    """ONNX Runtime, CPU provider, all graph optimisations on (it fuses a conv with the
    activation and the residual add after it, and runs convs in its blocked NCHWc layout).
    Each unit is exported and optimised as a model is, and timed from ONNX Runtime's own
    profiler: the sum of the unit's node kernels per run, leaving out the layout reorders at
    the unit's edges (a model pays those once, at its own edges) and the per-call overhead
    of ``session.run``."""

    name = "onnxruntime"
    needs = "onnx"

    def check_available(self):
        if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
            raise FxMergeError("the onnxruntime backend needs the extra: pip install 'fxmerge[onnx]'")

    @staticmethod
    def _options(profile_prefix: str | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return options

    def _session(self, module: nn.Module, inputs: Sequence[torch.Tensor], *, fast: bool, profile_prefix: str | None = None):
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:  # the session reads weights stored beside the graph
            path = f"{tmp}/module.onnx"
            _export_onnx(module, inputs, path, fast=fast)
            session = ort.InferenceSession(path, self._options(profile_prefix), providers=["CPUExecutionProvider"])
        feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
        return session, feeds

    def runner(self, module, inputs):
        session, feeds = self._session(module, inputs, fast=False)
        return lambda: session.run(None, feeds)

    def time_units(self, units, settings, *, state, done, checkpoint, progress):
        with tempfile.TemporaryDirectory() as tmp:
            for key, build in units.items():
                module, inputs = build()
                session, feeds = self._session(module.eval(), inputs, fast=True, profile_prefix=f"{tmp}/profile")
                runs = max(1, settings.warmup) + settings.repeats
                for _ in range(runs):
                    session.run(None, feeds)
                per_run = _per_run_kernel_ms(session.end_profiling())[-settings.repeats:]
                done(key, Timing.from_samples(per_run, 1))
                checkpoint()
                progress.step()


def _per_run_kernel_ms(trace_path: str) -> list[float]:
    """Milliseconds per ``session.run`` spent in node kernels, layout reorders left out."""
    with open(trace_path) as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    totals = [0.0] * len(runs)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if e.get("args", {}).get("op_name", "").startswith("Reorder"):
            continue
        for k, (begin, end) in enumerate(runs):
            if begin <= e["ts"] <= end:
                totals[k] += e["dur"] / 1e3
                break
    return totals


BACKENDS = BackendRegistry([Eager(), Inductor(), OnnxRuntime()])


# --------------------------------------------------------------------------- whole modules


def compare_latency(modules: Mapping[str, nn.Module], example_inputs: Sequence[torch.Tensor], *,
                    backend: str = "eager", rounds: int = 5, repeats: int = 15, min_repeat_ms: float = 30.0,
                    warmup_ms: float = 500.0, baseline: str | None = None) -> dict[str, Timing]:
    """Time several modules interleaved on ``backend``: each round samples every module in
    turn, so a machine whose speed drifts (shared hosts do, by tens of percent over tens of
    seconds) shifts them all alike and their ratios stay honest. The modules are timed in eval
    mode and left in the mode they were in.

    The timing measures its own noise: each module's ratio to ``baseline`` (default: the
    first module) has a confidence interval from the paired samples of the rounds
    (:func:`fxmerge.timing.ratio`). When one is too wide to trust (over
    :data:`fxmerge.timing.NOISY_WIDTH`), the comparison is run once more (as many rounds again,
    samples joined); if it still is, a :class:`~fxmerge.timing.TimingNoiseWarning` names the
    noise. A single module warns when its own samples spread that much."""
    check_timing_settings(rounds=rounds, repeats=repeats, min_repeat_ms=min_repeat_ms, warmup_ms=warmup_ms)
    chosen = get_backend(backend)
    if not isinstance(modules, Mapping) or not modules or not all(isinstance(m, nn.Module) for m in modules.values()):
        raise InvalidArgumentError("modules must be a non-empty mapping name -> nn.Module, e.g. {'model': model}; "
                                   f"got {type(modules).__name__}")
    baseline = next(iter(modules)) if baseline is None else baseline
    if baseline not in modules:
        raise InvalidArgumentError(f"baseline must name one of the modules {sorted(modules)}; got {baseline!r}")
    example_inputs = check_inputs("example_inputs", example_inputs)
    runners: dict = {}

    def once() -> dict[str, Timing]:
        return chosen.compare(modules, example_inputs, rounds=rounds, repeats=repeats, min_repeat_ms=min_repeat_ms,
                              warmup_ms=warmup_ms, runners=runners)

    timings = once()
    if _noise(timings, baseline) is not None:
        again = once()
        timings = {name: merged(timings[name], again[name]) for name in timings}
    note = _noise(timings, baseline)
    if note is not None:
        warnings.warn(note, TimingNoiseWarning, stacklevel=2)
    return timings


def _noise(timings: Mapping[str, Timing], baseline: str) -> str | None:
    if len(timings) > 1:
        return noise_note(timings, baseline)
    t = timings[baseline]
    if t.relative_spread <= NOISY_WIDTH:
        return None
    return (f"timing too noisy to trust: {baseline!r} measured {t.ms:.3f} ms with its samples spread "
            f"{100 * t.relative_spread:.0f} % (IQR / median, {t.repeats} samples): the machine's speed moved while "
            "timing (other work running?); time again on a quieter machine, or compare against a baseline in the "
            "same run (compare_latency)")


def measure_latency(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, backend: str = "eager",
                    rounds: int = 5, repeats: int = 15, min_repeat_ms: float = 30.0, warmup_ms: float = 500.0) -> Timing:
    """End-to-end latency of ``module`` on ``backend``, timed as latency-table references are
    (device, dtype and batch follow ``example_inputs``): median over ``repeats`` samples taken
    in ``rounds``. ``module`` is timed in eval mode and left in the mode it was in."""
    return compare_latency({"model": module}, example_inputs, backend=backend, rounds=rounds, repeats=repeats,
                           min_repeat_ms=min_repeat_ms, warmup_ms=warmup_ms)["model"]
