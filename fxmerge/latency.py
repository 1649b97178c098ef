"""``LatencyTable``: measured times of every term of the cost model, on the user's hardware.

>>> import torch, torchvision, fxmerge
>>> model = torchvision.models.mobilenet_v2().eval()
>>> table = fxmerge.LatencyTable.measure(model, (torch.randn(1, 3, 224, 224),))  # doctest: +SKIP
>>> table.save("mbv2-cpu.json")                                                  # doctest: +SKIP

Every distinct merged-conv spec of every valid block is timed once, at the real input shape of
its block, as the module merge would emit and as the backend runs it inside a model (see
:mod:`fxmerge.backends`); so is the explicit add of each residual, and each droppable
activation right after its conv (a backend that fuses the two is charged only what the
activation adds). A few whole plans are timed end to end too, interleaved with the
BatchNorm-folded original (:mod:`fxmerge.calibration`): these references fix the constant rest
of the network and the per-op overhead. Saved as versioned JSON (never pickle) with an
environment fingerprint; a measurement with ``path=`` saves as it goes and resumes where it
stopped.
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
from fxmerge.backends import BACKENDS, Eager, TimingSettings, get_backend
from fxmerge.convs import conv_for_geometry
from fxmerge.cost import CostModel, Correction, add_key, conv_key, model_key
from fxmerge.errors import EnvironmentMismatchError, FxMergeError, InvalidArgumentError, MalformedFileError
from fxmerge.serialization import check_header, check_output_folder, read_json, write_json
from fxmerge.passes.analysis import Analysis, BlockLimits
from fxmerge.passes.pruning import add_prune_options
from fxmerge.passes.patterns import registered_activations
from fxmerge.timing import Progress, Timing, device_name
from fxmerge.validation import (check_choice, check_count, check_inputs, check_mapping, check_number, check_shape,
                                check_torch_dtype)

FORMAT, VERSION = "fxmerge.latency", 2
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
        self.path: str | os.PathLike | None = None  # where measure/load found it: verify saves there
        _check_contents(self)

    # ---------------------------------------------------------------- measuring

    @classmethod
    def measure(cls, model: nn.Module, example_inputs: Sequence[torch.Tensor], *, backend: str = "eager",
                limits: BlockLimits | None = None, path: str | os.PathLike | None = None, warmup: int = 3,
                repeats: int = 9, min_repeat_ms: float = 10.0, rounds: int = 3, progress: bool | None = None,
                references: bool = True, prune_layers: bool = False, **trace_kwargs: Any) -> "LatencyTable":
        """Measure every term ``model`` needs at ``example_inputs`` (device, dtype and batch
        follow them) as ``backend`` runs it, and (``references=True``) time a few whole plans
        end to end to calibrate the rest and the per-op overhead. ``prune_layers=True`` also
        measures the merged specs of every block's pruning options (LayerMerge), for
        ``fxmerge.plan(..., prune_layers=True)``. With ``path``, finished entries are saved as
        they come and an existing file there is resumed; later verifications save their
        observations there too."""
        example_inputs = check_inputs("example_inputs", example_inputs)
        TimingSettings(warmup, repeats, min_repeat_ms, rounds).check()
        get_backend(backend)
        check_output_folder(path)
        table = cls(fingerprint=environment(example_inputs, backend))
        if path is not None and Path(path).exists():
            resumed = cls.load(path)
            resumed.check_environment(example_inputs, backend=backend, source=path)
            table = table | resumed
        table.path = path
        analysis = analyze(model, example_inputs, limits=limits, prune_layers=prune_layers, **trace_kwargs)
        table.limits = _limits_dict(analysis.limits)
        table.measure_missing(model, example_inputs, analysis=analysis, path=path, warmup=warmup, repeats=repeats,
                              min_repeat_ms=min_repeat_ms, rounds=rounds, progress=progress, reference=references,
                              **trace_kwargs)
        return table

    def measure_missing(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], *,
                        analysis: Analysis | None = None, path: str | os.PathLike | None = None, warmup: int = 3,
                        repeats: int = 9, min_repeat_ms: float = 10.0, rounds: int = 3, progress: bool | None = None,
                        reference: bool = True, prune_layers: bool | None = None,
                        **trace_kwargs: Any) -> "LatencyTable":
        """Measure the terms ``model`` needs that the table lacks (and its end-to-end
        references, unless ``reference=False``); returns ``self``. ``prune_layers`` (default:
        as ``analysis`` was made, else False) includes the pruning options' specs. With
        ``path``, progress is saved there; a complete table writes nothing (so a cached table
        in a read-only folder serves)."""
        example_inputs = check_inputs("example_inputs", example_inputs)
        settings = TimingSettings(warmup, repeats, min_repeat_ms, rounds).check()
        check_output_folder(path)
        backend = get_backend(self.fingerprint.setdefault("backend", "eager"))
        self.check_environment(example_inputs)
        if analysis is None:
            analysis = analyze(model, example_inputs, limits=self.block_limits(), prune_layers=bool(prune_layers),
                               **trace_kwargs)
        elif prune_layers:
            add_prune_options(analysis)
        x = example_inputs[0]
        builders = _builders(analysis, x.dtype, x.device, analysis.prune_layers if prune_layers is None else prune_layers)
        todo = {k: builders[k] for k in sorted(builders) if k not in self.entries}
        changed = bool(todo)

        def done(key: str, timing: Timing) -> None:
            self.entries[key] = timing.to_dict()

        def checkpoint() -> None:
            if path is not None:
                self.save(path)

        if todo:
            units = len(todo) * (settings.rounds if isinstance(backend, Eager) else 1)
            bar = Progress(units, f"fxmerge: timing {len(todo)} table entries ({backend.name})", progress)
            backend.time_units(todo, settings, state=self.pending, done=done, checkpoint=checkpoint, progress=bar)
        if reference and model_key(analysis) not in self.references:
            from fxmerge.calibration import measure_references  # plans are built above the table

            measure_references(self, model, example_inputs, analysis, **trace_kwargs)
            changed = True
        if changed:  # nothing measured, nothing to write
            checkpoint()
        return self

    def correction(self, analysis: Analysis) -> Correction:
        """The scale, rest and per-op overhead fitted to this model's end-to-end observations;
        for a model the table has none of, no rest and the mean overhead and scale of the
        others."""
        ref = self.reference(analysis)
        if ref is not None:
            return _fit(ref)
        fits = [_fit(r) for r in self.references.values()]
        if not fits:
            return Correction()
        return Correction(0.0, sum(f.overhead_ms for f in fits) / len(fits), sum(f.scale for f in fits) / len(fits))

    def observe(self, analysis: Analysis, inputs: Sequence[torch.Tensor], original_ms: float,
                observations: Sequence[dict]) -> None:
        """Record end-to-end observations of plans of the model ``analysis`` describes: each
        ``{"plan", "kind", "terms_ms", "ops", "ratio"}``, ``ratio`` its measured latency over
        the folded original's in the same interleaved run (``original_ms`` is that
        original's, kept from the first observation: ratios stay comparable across runs)."""
        ref = self.references.setdefault(model_key(analysis), {
            "inputs": [list(t.shape) for t in inputs], "original_ms": float(original_ms), "observations": []})
        ref["observations"] += [dict(o) for o in observations]
        _check_reference("references[...]", ref)

    @property
    def backend(self) -> str:
        return self.fingerprint.get("backend", "eager")

    # ---------------------------------------------------------------- lookups

    def ms(self, key: str) -> float:
        try:
            entry = self.entries[key]
        except KeyError:
            raise MissingLatencyError(f"the latency table has no entry {key!r}") from None
        # checked at use too: a negative time would make plans with negative latency look feasible
        return check_number(f"latency table entry {key!r}: ms", entry.get("ms") if isinstance(entry, dict) else None,
                            minimum=0, hint="milliseconds per call; re-measure the entry")

    def missing(self, analysis: Analysis, prune_layers: bool | None = None) -> list[str]:
        """The terms ``analysis`` needs (with ``prune_layers``, default as the analysis was
        made, its pruning options' too) that the table lacks."""
        return sorted(CostModel(analysis, self.ms).required_keys(prune_layers) - self.entries.keys())

    def require(self, analysis: Analysis, prune_layers: bool | None = None) -> None:
        """Raise :class:`MissingLatencyError` listing every term ``analysis`` needs and lacks."""
        missing = self.missing(analysis, prune_layers)
        if missing:
            shown = "\n  ".join(missing[:12]) + (f"\n  ... and {len(missing) - 12} more" if len(missing) > 12 else "")
            raise MissingLatencyError(
                f"the latency table lacks {len(missing)} entries this model needs:\n  {shown}\n"
                "Measure them with table.measure_missing(model, example_inputs"
                f"{', prune_layers=True' if analysis.prune_layers and prune_layers is not False else ''}) (same "
                "hardware and backend), or pass measure_missing=True.")

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
        if isinstance(d, dict) and d.get("format") == FORMAT and d.get("version") == 1:
            where = f"{source}: " if source is not None else ""
            raise MalformedFileError(f"{where}a version-1 latency table, whose references predate end-to-end observations; "
                                     "measure it again (fxmerge table --fresh, or LatencyTable.measure)")
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
        table = cls.from_dict(read_json(path, "latency table"), source=path)
        table.path = path
        return table

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        env = ", ".join(f"{k}={v}" for k, v in self.fingerprint.items())
        rows = [[k, f"{v['ms']:.4f}", f"{v.get('spread', 0.0):.4f}"] for k, v in sorted(self.entries.items(), key=lambda kv: -kv[1]["ms"])[:10]]
        return (f"fxmerge latency table: {len(self.entries)} entries, {len(self.references)} model references ({env})\n"
                + tabulate(rows, headers=["slowest entries", "ms", "spread"]))


# --------------------------------------------------------------------------- checks


def _describe(diff: dict[str, tuple[Any, Any]], side: int) -> str:
    return ", ".join(f"{k} {v[side]!r}" for k, v in diff.items())


def _check_contents(table: LatencyTable) -> None:
    """Every part of a table has the type and sign the cost model relies on; raises
    :class:`InvalidArgumentError` naming the part (``from_dict`` adds the file's name)."""
    check_mapping("fingerprint", table.fingerprint)
    fp = table.fingerprint
    if "backend" in fp:
        check_choice("fingerprint['backend']", fp["backend"], tuple(BACKENDS))
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
    """An end-to-end reference: the measured original (finite, > 0), the input shapes, and
    observations with finite, non-negative terms and ratios (a negative one would let plans
    predict below zero)."""
    check_mapping(name, ref)
    check_number(f"{name}['original_ms']", ref.get("original_ms"), minimum=0, strict=True,
                 hint="milliseconds; re-measure the table")
    inputs = ref.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgumentError(f"{name}['inputs'] must be a list of input shapes; got {inputs!r}")
    for k, shape in enumerate(inputs):
        check_shape(f"{name}['inputs'][{k}]", shape)
    observations = ref.get("observations")
    if not isinstance(observations, list) or not observations:
        raise InvalidArgumentError(f"{name}['observations'] must be a non-empty list; got {observations!r}")
    for k, obs in enumerate(observations):
        where = f"{name}['observations'][{k}]"
        check_mapping(where, obs)
        check_number(f"{where}['terms_ms']", obs.get("terms_ms"), minimum=0, hint="milliseconds")
        check_count(f"{where}['ops']", obs.get("ops"), minimum=0)
        check_number(f"{where}['ratio']", obs.get("ratio"), minimum=0, strict=True, hint="measured / original")


def _fit(reference: dict) -> Correction:
    return Correction.fit([(o["terms_ms"], o["ops"], o["ratio"] * reference["original_ms"])
                           for o in reference["observations"]])


def _limits_dict(limits: BlockLimits) -> dict:
    return dataclasses.asdict(limits)


def _builders(analysis: Analysis, dtype: torch.dtype, device: torch.device,
              prune_layers: bool = False) -> dict[str, Callable]:
    """For each cost-model term: a function building (module, inputs) to time it."""
    out: dict[str, Callable] = {}

    def rand(shape):
        return torch.randn(shape, dtype=dtype, device=device)

    for chain in analysis.chains:
        blocks = [(chain.specs[b], chain.input_shapes[b[0]]) for b in chain.valid_blocks]
        if prune_layers:  # each option's merged conv (a fully pruned block runs no conv)
            blocks += [(o.spec, chain.input_shapes[i]) for (i, _), opts in chain.options.items() for o in opts
                       if o.spec is not None]
        for spec, shape in blocks:
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
