"""``LatencyTable``: measured times of every term of the cost model, on the user's hardware.

>>> table = fxmerge.LatencyTable.measure(model, (x,), repeats=2, rounds=1, min_repeat_ms=1)  # quick and noisy
>>> table.save("table.json")
>>> fxmerge.LatencyTable.load("table.json").missing(fxmerge.analyze(model, (x,)))
[]

Every distinct merged-conv spec of every valid block is timed once, at the real input shape of
its block, as the module merge would emit and as the backend runs it inside a model (see
:mod:`fxmerge.backends`); so is the explicit add of each residual, and each droppable
activation right after its conv (a backend that fuses the two is charged only what the
activation adds). A few whole plans are timed end to end too, interleaved with the
BatchNorm-folded original (:mod:`fxmerge.measure`): these references fix the constant rest
of the network and the per-op overhead. Saved as versioned JSON (never pickle) with an
environment fingerprint; a measurement with ``path=`` saves as it goes and resumes where it
stopped.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tabulate import tabulate

from fxmerge.arguments import check_inputs, check_mapping, check_number
from fxmerge.backends import Eager, get_backend
from fxmerge.cost import CostModel, Correction
from fxmerge.errors import EnvironmentMismatchError, InvalidArgumentError, MalformedFileError, MissingLatencyError
from fxmerge.fingerprints import model_key
from fxmerge.measure import PlanTimings, pruned_reference_plans, reference_plans, time_plans, unit_builders
from fxmerge.passes.analysis import analyze
from fxmerge.passes.pruning import with_prune_options
from fxmerge.passes.tracing import TraceOptions
from fxmerge.plans import Plan
from fxmerge.records import Analysis, BlockLimits
from fxmerge.serialization import check_header, check_output_folder, read_json, write_json
from fxmerge.table_checks import check_reference, check_table_contents, limits_dict
from fxmerge.timing import (Progress, Timing, TimingNoiseWarning, TimingSettings, device_name, drift_note,
                            state_note)

FORMAT, VERSION = "fxmerge.latency", 2
log = logging.getLogger("fxmerge")
RETIRED = {1: "a version-1 latency table, whose references predate end-to-end observations; measure it again "
              "(fxmerge table --fresh, or LatencyTable.measure)"}
# What the numbers mean depends on these: a table measured with another value is refused.
# A different torch version or thread count only makes them less accurate: a warning.
MUST_MATCH, SHOULD_MATCH = ("backend", "dtype", "device"), ("torch", "threads")
RECHECK_UNITS = 8  # units re-timed after the references, to see whether the machine changed meanwhile


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
        self.entries = dict(check_mapping("entries", entries if entries is not None else {}))
        self.fingerprint = dict(check_mapping("fingerprint", fingerprint if fingerprint is not None else {}))
        # model key -> end-to-end reference
        self.references = dict(check_mapping("references", references if references is not None else {}))
        self.limits = dict(check_mapping("limits", limits if limits is not None else {}))
        self.pending = dict(check_mapping("pending", pending if pending is not None else {}))  # unfinished samples
        self.source: str | None = None  # the file it was loaded from (named in messages; never written implicitly)
        # re-timed units over their table times, after the references (1.0: the machine held still)
        self.drift: float | None = None
        check_table_contents(fingerprint=self.fingerprint, entries=self.entries, references=self.references,
                             limits=self.limits, pending=self.pending)

    # ---------------------------------------------------------------- measuring

    @classmethod
    def measure(cls, model: nn.Module, example_inputs: Sequence[torch.Tensor], *, backend: str = "eager",
                limits: BlockLimits | None = None, path: str | os.PathLike | None = None, warmup: int = 3,
                repeats: int = 9, min_repeat_ms: float = 10.0, rounds: int = 3, progress: bool | None = None,
                references: bool = True, prune_layers: bool = False,
                trace: TraceOptions | None = None, modules: Sequence[str] | None = None) -> "LatencyTable":
        """Measure every term ``model`` needs at ``example_inputs`` (device, dtype and batch
        follow them) as ``backend`` runs it, and (``references=True``) time a few whole plans
        end to end, to which the rest and the per-op overhead are fitted. ``prune_layers=True``
        also measures the merged specs of every block's pruning options (LayerMerge), for
        ``fxmerge.plan(..., prune_layers=True)``. With ``path``, finished entries are saved
        there as they come and an existing file there is resumed. ``trace`` and ``modules``
        (only those submodules' terms; references time the whole model) as for
        :func:`fxmerge.analyze`."""
        example_inputs = check_inputs("example_inputs", example_inputs)
        TimingSettings(warmup, repeats, min_repeat_ms, rounds).check()
        get_backend(backend)
        check_output_folder(path)
        table = cls(fingerprint=environment(example_inputs, backend))
        if path is not None and Path(path).exists():
            resumed = cls.load(path)
            resumed.check_environment(example_inputs, backend=backend, source=path)
            table = table | resumed
        analysis = analyze(model, example_inputs, limits=limits, prune_layers=prune_layers, trace=trace,
                           modules=modules)
        table.limits = limits_dict(analysis.limits)
        table.measure_missing(model, example_inputs, analysis=analysis, path=path, warmup=warmup, repeats=repeats,
                              min_repeat_ms=min_repeat_ms, rounds=rounds, progress=progress, reference=references,
                              trace=trace)
        return table

    def measure_missing(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], *,
                        analysis: Analysis | None = None, path: str | os.PathLike | None = None, warmup: int = 3,
                        repeats: int = 9, min_repeat_ms: float = 10.0, rounds: int = 3, progress: bool | None = None,
                        reference: bool = True, prune_layers: bool | None = None,
                        trace: TraceOptions | None = None) -> "LatencyTable":
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
                               trace=trace)
        elif prune_layers:
            analysis = with_prune_options(analysis)
        x = example_inputs[0]
        builders = unit_builders(analysis, x.dtype, x.device,
                                 analysis.prune_layers if prune_layers is None else prune_layers)
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
        plans = self._references_to_time(analysis) if reference else {}
        if plans:
            log.info("fxmerge: timing %d reference plans end to end (%s)", len(plans), self.backend)
            timings = time_plans(self.backend, model, example_inputs, analysis, plans, self.ms, kind="reference",
                                 include_original=model_key(analysis) not in self.references, trace=trace)
            self.record(analysis, example_inputs, timings)
            self._check_machine_state(backend, todo, settings, timings)
            changed = True
        if changed:  # nothing measured, nothing to write
            checkpoint()
        return self

    def _check_machine_state(self, backend: Any, units: dict[str, Any], settings: TimingSettings,
                             timings: PlanTimings) -> None:
        """Say (:class:`~fxmerge.timing.TimingNoiseWarning`) when the references were too noisy,
        or when the units just timed (``units``) and the references saw different machines:
        units re-timed at another speed, or the references' spread far above the units'."""
        _warn_noisy_references(timings)
        if not units:
            return
        self.drift = self._recheck_units(backend, units, settings)
        spreads = [self.entries[k].get("spread", 0.0) / self.ms(k) for k in units if self.ms(k) > 0]
        note = state_note(spreads, timings.original_spread)
        if note is not None:
            warnings.warn(note, TimingNoiseWarning, stacklevel=4)

    def _recheck_units(self, backend: Any, units: dict[str, Any], settings: TimingSettings) -> float:
        """Re-time the slowest of the units just measured, now that the references are timed,
        and warn (:class:`~fxmerge.timing.TimingNoiseWarning`) when they run at another speed
        than when the table timed them: units and references would then describe different
        machine states. Returns the median ratio, re-timed over table."""
        keys = sorted(units, key=lambda k: -self.ms(k))[:RECHECK_UNITS]
        again: dict[str, float] = {}
        backend.time_units({k: units[k] for k in keys}, dataclasses.replace(settings, rounds=1), state={},
                           done=lambda key, timing: again.__setitem__(key, timing.ms), checkpoint=lambda: None,
                           progress=Progress(len(keys), "fxmerge: re-timing units", False))
        note = drift_note({k: self.ms(k) for k in again}, again)
        if note is not None:
            warnings.warn(note, TimingNoiseWarning, stacklevel=5)
        ratios = sorted(again[k] / self.ms(k) for k in again if self.ms(k) > 0)
        return ratios[len(ratios) // 2] if ratios else 1.0

    def _references_to_time(self, analysis: Analysis) -> dict[str, Plan]:
        """The reference plans a model still needs: all of them for a model the table has no
        reference for; for an analysis with pruning options whose reference has no plan that
        prunes (measured depth-only before), the pruned ones (:func:`pruned_reference_plans`),
        so pruned predictions rest on pruned observations."""
        ref = self.references.get(model_key(analysis))
        if ref is None:
            return reference_plans(analysis, self.ms)
        if analysis.prune_layers and not any(o.get("pruned") for o in ref["observations"]):
            return pruned_reference_plans(analysis, self.ms)
        return {}

    def record(self, analysis: Analysis, inputs: Sequence[torch.Tensor], timings: PlanTimings) -> None:
        """Keep plans timed end to end (:func:`fxmerge.measure.time_plans`) as observations."""
        self.observe(analysis, inputs, timings.original_ms, timings.observations)

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
        check_reference("references[...]", ref)

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
            check_reference(f"references[{key!r}]", ref)
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
        if not isinstance(other, LatencyTable):
            return NotImplemented  # Python then says: unsupported operand type(s) for |
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
        check_header(d, FORMAT, VERSION, source=source, retired=RETIRED)
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
        table.source = str(path)
        return table

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        env = ", ".join(f"{k}={v}" for k, v in self.fingerprint.items())
        rows = [[k, f"{v['ms']:.4f}", f"{v.get('spread', 0.0):.4f}"] for k, v in sorted(self.entries.items(), key=lambda kv: -kv[1]["ms"])[:10]]
        return (f"fxmerge latency table: {len(self.entries)} entries, {len(self.references)} model references ({env})\n"
                + tabulate(rows, headers=["slowest entries", "ms", "spread"]))


def _warn_noisy_references(timings: PlanTimings) -> None:
    noisy = timings.noisy()
    if noisy:
        worst = max(noisy, key=lambda n: timings.intervals[n].width)
        r = timings.intervals[worst]
        warnings.warn(f"{len(noisy)} of the table's {len(timings.intervals)} end-to-end references were timed too "
                      f"noisily to trust: {worst!r} measured {r.value:.3f} of the folded original, {100 * r.confidence:.0f} % "
                      f"interval {r.low:.3f}-{r.high:.3f} (+-{50 * r.width:.0f} %). The correction fitted to them (the "
                      "rest of the network, the per-op overhead, the scale) is as uncertain: measure the table again on "
                      "a quieter machine, or let verify=True observations correct it", TimingNoiseWarning, stacklevel=5)


def _fit(reference: dict) -> Correction:
    return Correction.fit([(o["terms_ms"], o["ops"], o["ratio"] * reference["original_ms"])
                           for o in reference["observations"]])


def _describe(diff: dict[str, tuple[Any, Any]], side: int) -> str:
    return ", ".join(f"{k} {v[side]!r}" for k, v in diff.items())
