"""``LatencyTable``: measured times of every term of the cost model, on the user's hardware.

>>> import torch, torchvision, fxmerge
>>> model = torchvision.models.mobilenet_v2().eval()
>>> table = fxmerge.LatencyTable.measure(model, (torch.randn(1, 3, 224, 224),))  # doctest: +SKIP
>>> table.save("mbv2-cpu.json")                                                  # doctest: +SKIP

Every distinct merged-conv spec of every valid block is timed once, at the real input shape of
its block, as the module merge would emit; so is the explicit add of each residual, and each
droppable activation right after its conv (a backend that fuses the two is charged only what
the activation adds). The whole BatchNorm-folded model is timed too, which calibrates the
constant rest of the network and the per-op overhead. Saved as versioned JSON (never pickle)
with an environment fingerprint; a measurement with ``path=`` saves its samples as it goes and
resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tabulate import tabulate

from fxmerge.api import analyze
from fxmerge.convs import conv_for_geometry
from fxmerge.cost import CostModel, add_key, conv_key, model_key
from fxmerge.errors import EnvironmentMismatchError, FxMergeError, InvalidArgumentError, MalformedFileError
from fxmerge.serialization import check_header, read_json, write_json
from fxmerge.passes.analysis import Analysis, BlockLimits
from fxmerge.passes.patterns import registered_activations
from fxmerge.passes.rewrite import merge
from fxmerge.plans import Plan
from fxmerge.timing import (BACKENDS, Progress, Timing, calibrate, check_timing_settings, compare_latency, device_name,
                            evaluating, runner, sample)
from fxmerge.validation import (check_choice, check_count, check_inputs, check_mapping, check_number, check_shape,
                                check_torch_dtype)

FORMAT, VERSION = "fxmerge.latency", 1
_REFERENCE = "model (BatchNorm folded)"  # the end-to-end reference among the entries
# What the numbers mean depends on these: a table measured with another value is refused.
# A different torch version or thread count only makes them less accurate: a warning.
MUST_MATCH, SHOULD_MATCH = ("backend", "dtype", "device"), ("torch", "threads")


class MissingLatencyError(FxMergeError):
    """The table lacks terms a model needs."""


def environment(example_inputs: Sequence[torch.Tensor], backend: str) -> dict:
    """What a measurement depends on, beyond the shapes in each key."""
    x = example_inputs[0]
    return {"torch": torch.__version__, "device": device_name(x.device), "backend": backend,
            "threads": torch.get_num_threads(), "dtype": str(x.dtype).replace("torch.", "")}


class LatencyTable:
    """Milliseconds per call of each cost-model term, keyed by spec (see :mod:`fxmerge.cost`)."""

    def __init__(self, entries: dict[str, dict] | None = None, fingerprint: dict | None = None,
                 references: dict[str, dict] | None = None, limits: dict | None = None,
                 pending: dict[str, dict] | None = None):
        for name, value in (("entries", entries), ("fingerprint", fingerprint), ("references", references),
                            ("limits", limits), ("pending", pending)):
            if value is not None:
                check_mapping(name, value)
        self.entries = dict(entries or {})
        self.fingerprint = dict(fingerprint or {})
        self.references = dict(references or {})  # model key -> end-to-end reference
        self.limits = dict(limits or {})
        self.pending = dict(pending or {})  # samples of an unfinished measurement
        _check_contents(self)

    # ---------------------------------------------------------------- measuring

    @classmethod
    def measure(cls, model: nn.Module, example_inputs: Sequence[torch.Tensor], *, backend: str = "eager",
                limits: BlockLimits | None = None, path: str | os.PathLike | None = None, warmup: int = 3,
                repeats: int = 9, min_repeat_ms: float = 10.0, rounds: int = 3, progress: bool | None = None,
                **trace_kwargs: Any) -> "LatencyTable":
        """Measure every term ``model`` needs at ``example_inputs`` (device, dtype and batch
        follow them). With ``path``, finished entries are saved as they come and an existing
        file there is resumed."""
        example_inputs = check_inputs("example_inputs", example_inputs)
        check_timing_settings(backend=backend, warmup=warmup, repeats=repeats, min_repeat_ms=min_repeat_ms, rounds=rounds)
        _check_folder(path)
        table = cls(fingerprint=environment(example_inputs, backend))
        if path is not None and Path(path).exists():
            resumed = cls.load(path)
            resumed.check_environment(example_inputs, backend=backend, source=path)
            table = table | resumed
        analysis = analyze(model, example_inputs, limits=limits, **trace_kwargs)
        table.limits = _limits_dict(analysis.limits)
        table.measure_missing(model, example_inputs, analysis=analysis, path=path, warmup=warmup, repeats=repeats,
                              min_repeat_ms=min_repeat_ms, rounds=rounds, progress=progress, **trace_kwargs)
        return table

    def measure_missing(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], *,
                        analysis: Analysis | None = None, path: str | os.PathLike | None = None, warmup: int = 3,
                        repeats: int = 9, min_repeat_ms: float = 10.0, rounds: int = 3, progress: bool | None = None,
                        reference: bool = True, **trace_kwargs: Any) -> "LatencyTable":
        """Measure the terms ``model`` needs that the table lacks (and its end-to-end
        reference, unless ``reference=False``); returns ``self``. With ``path``, progress is
        saved there; a complete table writes nothing (so a cached table in a read-only folder
        serves)."""
        example_inputs = check_inputs("example_inputs", example_inputs)
        check_timing_settings(warmup=warmup, repeats=repeats, min_repeat_ms=min_repeat_ms, rounds=rounds)
        _check_folder(path)
        backend = self.fingerprint.setdefault("backend", "eager")
        self.check_environment(example_inputs)
        if analysis is None:
            analysis = analyze(model, example_inputs, limits=self.block_limits(), **trace_kwargs)
        x = example_inputs[0]
        builders = _builders(analysis, x.dtype, x.device)
        todo = [k for k in sorted(builders) if k not in self.entries]
        mkey = model_key(analysis)
        if reference and mkey not in self.references:
            # The whole BatchNorm-folded model is timed among the entries, so the constant rest
            # of the network is calibrated against the same machine state as they are.
            folded = merge(model, Plan.fold_only(analysis), **trace_kwargs)
            builders[_REFERENCE] = lambda: (folded, example_inputs)
            todo.append(_REFERENCE)
        # Eager entries are timed in `rounds` interleaved passes over all of them, so that the
        # machine drifting during a long measurement skews no group of entries; compiled
        # backends pay their compile once, in one pass. Unfinished samples are saved too, so an
        # interrupted measurement resumes where it stopped.
        rounds = rounds if backend == "eager" else 1
        per_round = max(1, -(-repeats // rounds))
        bar = Progress(len(todo) * rounds, "fxmerge: timing specs", progress)
        for r in range(rounds):
            for key in todo:
                state = self.pending.setdefault(key, {"samples": [], "calls": 0, "rounds": 0})
                if state["rounds"] <= r:
                    module, inputs = builders[key]()
                    with evaluating(module):
                        fn = runner(module, inputs, backend)
                        calls = calibrate(fn, x.device, warmup=1 if state["calls"] else warmup,
                                          min_repeat_ms=min_repeat_ms,
                                          warmup_ms=300.0 if key == _REFERENCE and r == 0 else 0.0)
                        state["calls"] = state["calls"] or calls
                        state["samples"] += sample(fn, x.device, state["calls"], per_round)
                    state["rounds"] += 1
                    if path is not None:
                        self.save(path)
                bar.step()
        for key in todo:
            state = self.pending.pop(key)
            timing = Timing.from_samples(state["samples"], state["calls"])
            if key == _REFERENCE:
                self.references[mkey] = self._calibrate(model, example_inputs, analysis, timing.ms, **trace_kwargs)
            else:
                self.entries[key] = timing.to_dict()
        if path is not None and todo:  # nothing measured, nothing to write
            self.save(path)
        return self

    def _calibrate(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], analysis: Analysis,
                   original_ms: float, **trace_kwargs: Any) -> dict:
        """The constant rest and the per-op overhead of the cost model, from two end-to-end
        references: the BatchNorm-folded model (timed among the entries) and a probe plan with
        far fewer ops, whose ratio to the first is timed interleaved (drift cancels)."""
        from fxmerge.planning import probe_plan  # planning builds on this module

        cost = CostModel(analysis, self.ms)
        folded = Plan.fold_only(analysis)
        resid_fold, ops_fold = original_ms - cost.terms_ms(folded), cost.op_count(folded)
        overhead = 0.0
        probe = probe_plan(analysis, cost)
        if probe is not None and cost.op_count(probe) < ops_fold:
            backend = self.fingerprint.get("backend", "eager")
            t = compare_latency({"folded": merge(model, folded, **trace_kwargs), "probe": merge(model, probe, **trace_kwargs)},
                                example_inputs, backend=backend, rounds=3, repeats=9)
            probe_ms = original_ms * t["probe"].ms / t["folded"].ms
            overhead = max(0.0, (resid_fold - (probe_ms - cost.terms_ms(probe))) / (ops_fold - cost.op_count(probe)))
            overhead = min(overhead, max(resid_fold, 0.0) / ops_fold)  # the rest cannot be negative
        # A negative rest (isolated terms summing to more than the whole model, seen with very
        # short timings) would let budgets below zero look feasible: clamp it.
        return {"original_ms": original_ms, "rest_ms": max(0.0, resid_fold - overhead * ops_fold), "overhead_ms": overhead,
                "inputs": [list(t.shape) for t in example_inputs]}

    def overhead_ms(self, analysis: Analysis) -> float:
        """Per-op overhead: this model's reference, else the mean of the table's references."""
        ref = self.reference(analysis)
        if ref is not None:
            return ref.get("overhead_ms", 0.0)
        values = [r.get("overhead_ms", 0.0) for r in self.references.values()]
        return sum(values) / len(values) if values else 0.0

    # ---------------------------------------------------------------- lookups

    def ms(self, key: str) -> float:
        try:
            entry = self.entries[key]
        except KeyError:
            raise MissingLatencyError(f"the latency table has no entry {key!r}") from None
        # checked at use too: a negative time would make plans with negative latency look feasible
        return check_number(f"latency table entry {key!r}: ms", entry.get("ms") if isinstance(entry, dict) else None,
                            minimum=0, hint="milliseconds per call; re-measure the entry")

    def missing(self, analysis: Analysis) -> list[str]:
        return sorted(CostModel(analysis, self.ms).required_keys() - self.entries.keys())

    def require(self, analysis: Analysis) -> None:
        """Raise :class:`MissingLatencyError` listing every term ``analysis`` needs and lacks."""
        missing = self.missing(analysis)
        if missing:
            shown = "\n  ".join(missing[:12]) + (f"\n  ... and {len(missing) - 12} more" if len(missing) > 12 else "")
            raise MissingLatencyError(
                f"the latency table lacks {len(missing)} entries this model needs:\n  {shown}\n"
                "Measure them with table.measure_missing(model, example_inputs) (same hardware and backend), "
                "or pass measure_missing=True.")

    def reference(self, analysis: Analysis) -> dict | None:
        key = model_key(analysis)
        ref = self.references.get(key)
        if ref is not None:
            _check_reference(f"references[{key!r}]", ref)
        return ref

    def block_limits(self) -> BlockLimits:
        return BlockLimits(**self.limits) if self.limits else BlockLimits()

    def check_environment(self, example_inputs: Sequence[torch.Tensor] | None = None, *, backend: str | None = None,
                          source: str | os.PathLike | None = None) -> None:
        """Refuse (:class:`EnvironmentMismatchError`) a table measured for another backend, or
        for another dtype or device than ``example_inputs``: its numbers mean something else
        there. Warn when only the torch version or the thread count differ. ``backend`` is the
        backend the caller will run (default: the table's own); ``source`` names the file."""
        here = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        if example_inputs is not None:
            here.update({k: v for k, v in environment(check_inputs("example_inputs", example_inputs), "").items()
                         if k in ("dtype", "device")})
        if backend is not None:
            here["backend"] = backend
        diff = {k: (self.fingerprint[k], v) for k, v in here.items() if k in self.fingerprint and self.fingerprint[k] != v}
        what = f"latency table {source}" if source is not None else "latency table"
        hard = {k: d for k, d in diff.items() if k in MUST_MATCH}
        if hard:
            raise EnvironmentMismatchError(
                f"the {what} was measured for {_describe(hard, 0)}, not {_describe(hard, 1)}: its times do not hold "
                "here. Measure a table for this setting (another path, or fxmerge table --fresh).")
        if diff:
            text = ", ".join(f"{k}: table {a!r} vs here {b!r}" for k, (a, b) in diff.items())
            warnings.warn(f"{what} measured elsewhere ({text}); its times may not hold here", stacklevel=3)

    # ---------------------------------------------------------------- combining, JSON

    def __or__(self, other: "LatencyTable") -> "LatencyTable":
        """A table with both tables' entries (``other`` wins on duplicates). Tables measured for
        different backends, dtypes or devices do not combine; other differences warn."""
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            diff = sorted(k for k in set(self.fingerprint) | set(other.fingerprint)
                          if self.fingerprint.get(k) != other.fingerprint.get(k))
            hard = {k: (self.fingerprint.get(k), other.fingerprint.get(k)) for k in diff if k in MUST_MATCH}
            if hard:
                raise EnvironmentMismatchError(f"cannot combine a latency table measured for {_describe(hard, 0)} "
                                               f"with one measured for {_describe(hard, 1)}")
            warnings.warn(f"combining latency tables from different environments (differ in {diff})", stacklevel=2)
        return LatencyTable({**self.entries, **other.entries}, self.fingerprint or other.fingerprint,
                            {**self.references, **other.references}, self.limits or other.limits,
                            {**self.pending, **other.pending})

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "limits": self.limits,
                "references": self.references, "entries": dict(sorted(self.entries.items())),
                **({"pending": self.pending} if self.pending else {})}

    @classmethod
    def from_dict(cls, d: dict, *, source: str | os.PathLike | None = None) -> "LatencyTable":
        """The table ``to_dict`` gave; :class:`MalformedFileError` (naming ``source``, the file,
        and the entry) for a wrong header or entries of the wrong type or sign."""
        check_header(d, FORMAT, VERSION, source=source)
        try:
            check_mapping("entries", d.get("entries"))
            return cls(d["entries"], d.get("fingerprint"), d.get("references"), d.get("limits"), d.get("pending"))
        except InvalidArgumentError as exc:
            where = f"{source}" if source is not None else "latency table data"
            raise MalformedFileError(f"{where}: {exc}. Fix or delete the file and measure the table again.") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        return cls.from_dict(read_json(path, "latency table"), source=path)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        env = ", ".join(f"{k}={v}" for k, v in self.fingerprint.items())
        rows = [[k, f"{v['ms']:.4f}", f"{v.get('spread', 0.0):.4f}"] for k, v in sorted(self.entries.items(), key=lambda kv: -kv[1]["ms"])[:10]]
        return (f"fxmerge latency table: {len(self.entries)} entries, {len(self.references)} model references ({env})\n"
                + tabulate(rows, headers=["slowest entries", "ms", "spread"]))


# --------------------------------------------------------------------------- checks


def _check_folder(path: str | os.PathLike | None) -> None:
    """A measurement saves as it goes: its folder must exist before anything is timed."""
    if path is not None and not Path(path).parent.is_dir():
        raise InvalidArgumentError(f"path: the folder {str(Path(path).parent)!r} of {str(path)!r} does not exist; "
                                   "create it or choose another path")


def _describe(diff: dict[str, tuple[Any, Any]], side: int) -> str:
    return ", ".join(f"{k} {v[side]!r}" for k, v in diff.items())


def _check_contents(table: LatencyTable) -> None:
    """Every part of a table has the type and sign the cost model relies on; raises
    :class:`InvalidArgumentError` naming the part (``from_dict`` adds the file's name)."""
    check_mapping("fingerprint", table.fingerprint)
    fp = table.fingerprint
    if "backend" in fp:
        check_choice("fingerprint['backend']", fp["backend"], BACKENDS)
    if "dtype" in fp:
        check_torch_dtype("fingerprint['dtype']", fp["dtype"])
    if "threads" in fp:
        check_count("fingerprint['threads']", fp["threads"])
    for key, entry in table.entries.items():
        name = f"entries[{key!r}]"
        check_mapping(name, entry)
        check_number(f"{name}['ms']", entry.get("ms"), minimum=0, hint="milliseconds per call")
        if "spread" in entry:
            check_number(f"{name}['spread']", entry["spread"], minimum=0)
        for count in ("repeats", "calls"):
            if count in entry:
                check_count(f"{name}[{count!r}]", entry[count])
    for key, ref in check_mapping("references", table.references).items():
        _check_reference(f"references[{key!r}]", ref)
    known = set(_limits_dict(BlockLimits()))
    if not set(table.limits) <= known:
        raise InvalidArgumentError(f"limits may hold only {sorted(known)}; got {sorted(table.limits)}")
    for key, value in table.limits.items():
        if value is not None:  # None: that limit is off
            check_number(f"limits[{key!r}]", value, minimum=0, strict=True)
    for key, state in check_mapping("pending", table.pending).items():
        name = f"pending[{key!r}]"
        check_mapping(name, state)
        samples = state.get("samples")
        if not isinstance(samples, list):
            raise InvalidArgumentError(f"{name}['samples'] must be a list of milliseconds; got {samples!r}")
        for k, v in enumerate(samples):
            check_number(f"{name}['samples'][{k}]", v, minimum=0)
        check_count(f"{name}['calls']", state.get("calls"), minimum=0)
        check_count(f"{name}['rounds']", state.get("rounds"), minimum=0)


def _check_reference(name: str, ref: Any) -> None:
    """An end-to-end reference: its times are finite and >= 0 (a negative rest would make
    plans with negative predicted latency)."""
    check_mapping(name, ref)
    for field in ("original_ms", "rest_ms", "overhead_ms"):
        check_number(f"{name}[{field!r}]", ref.get(field), minimum=0, hint="milliseconds; re-measure the table")
    inputs = ref.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgumentError(f"{name}['inputs'] must be a list of input shapes; got {inputs!r}")
    for k, shape in enumerate(inputs):
        check_shape(f"{name}['inputs'][{k}]", shape)


def _limits_dict(limits: BlockLimits) -> dict:
    return dataclasses.asdict(limits)


def _builders(analysis: Analysis, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """For each cost-model term: a function building (module, inputs) to time it."""
    out: dict[str, Callable] = {}

    def rand(shape):
        return torch.randn(shape, dtype=dtype, device=device)

    for chain in analysis.chains:
        for i, j in chain.valid_blocks:
            spec, shape = chain.specs[(i, j)], chain.input_shapes[i]
            out[conv_key(spec, shape)] = lambda spec=spec, shape=shape: (
                conv_for_geometry(spec, dtype=dtype, device=device), (rand(shape),))
        for s in chain.skips:
            shape = chain.layers[s.target - 1].output_shape
            out[add_key(shape)] = lambda shape=shape: (_Add(), (rand(shape), rand(shape)))
        for p, key in CostModel.activation_keys(chain).items():
            kind, spec, shape = chain.activations[p][1], chain.specs[(p - 1, p)], chain.input_shapes[p - 1]
            out[key] = lambda kind=kind, spec=spec, shape=shape: (
                nn.Sequential(conv_for_geometry(spec, dtype=dtype, device=device), _activation_module(kind)), (rand(shape),))
    return out


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _activation_module(kind: str) -> nn.Module:
    entry = registered_activations()[kind]
    if entry.modules:
        return entry.modules[0]()
    if entry.functions:
        return _Call(entry.functions[0])
    return _Call(lambda x, name=entry.methods[0]: getattr(x, name)())
