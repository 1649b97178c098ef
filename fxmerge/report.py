"""What ``fxmerge.plan`` records about a plan it made: predicted latencies, the merged convs,
and — when plans are verified — what each round measured. ``plan.info`` is its JSON form.

>>> r = PlanReport(predicted_original_ms=10.0, predicted_planned_ms=5.0, original_ms=10.0, backend="eager")
>>> r.to_dict()["predicted_ms"]
{'original': 10.0, 'planned': 5.0}
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tabulate import tabulate


@dataclass(frozen=True)
class MergedConv:
    """One merged conv of a plan: the block it replaces, its kernel and predicted time."""

    chain: int
    block: tuple[int, int]
    layers: str  # first..last conv node
    replaces: int
    kernel: str  # e.g. "5x5", or "identity" for a fully pruned block
    groups: int | str
    ms: float
    pruned: tuple[str, ...] = ()
    moves_borders: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "block": list(self.block), "pruned": list(self.pruned)}

    @classmethod
    def from_dict(cls, d: dict) -> "MergedConv":
        return cls(**{**d, "block": tuple(d["block"]), "pruned": tuple(d.get("pruned", ()))})


@dataclass(frozen=True)
class VerifyRound:
    """One round of verified planning: the aim the DP planned under, what it predicted, what
    the compressed model measured (and its ratio to the folded original, timed interleaved)."""

    round: int
    predicted_ms: float
    measured_ms: float
    ratio: float
    aim_ms: float | None = None
    budget_ratio: float | None = None
    ratio_interval: tuple[float, float] | None = None  # confidence interval of the measured ratio

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.ratio_interval is not None:
            d["ratio_interval"] = list(self.ratio_interval)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VerifyRound":
        interval = d.get("ratio_interval")
        return cls(**{**d, "ratio_interval": tuple(interval) if interval is not None else None})


@dataclass
class PlanReport:
    """Predicted (and, where measured, measured) latencies of a plan on one backend."""

    predicted_original_ms: float
    predicted_planned_ms: float
    original_ms: float  # the folded original as measured (the table's reference), else predicted
    backend: str
    end_to_end: bool = False  # whether the prediction includes the rest of the network
    budget_ms: float | None = None
    merged: list[MergedConv] = field(default_factory=list)
    importance: float | None = None  # the DP's objective: summed importance of kept pairs
    budget_ratio: float | None = None  # predicted over the original (frontier points)
    measured_ms: float | None = None
    measured_ratio: float | None = None
    verify: list[VerifyRound] = field(default_factory=list)

    @property
    def predicted_speedup(self) -> float:
        return self.predicted_original_ms / self.predicted_planned_ms

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"predicted_ms": {"original": self.predicted_original_ms,
                                              "planned": self.predicted_planned_ms},
                             "original_ms": self.original_ms, "backend": self.backend, "end_to_end": self.end_to_end,
                             "budget_ms": self.budget_ms, "merged": [m.to_dict() for m in self.merged]}
        for name in ("importance", "budget_ratio", "measured_ms", "measured_ratio"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.verify:
            d["verify"] = [r.to_dict() for r in self.verify]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlanReport":
        """The report ``to_dict`` gave (raises KeyError / TypeError on a malformed one)."""
        known = {f.name for f in fields(cls)}
        rest = {k: v for k, v in d.items() if k in known and k not in ("merged", "verify")}
        return cls(predicted_original_ms=float(d["predicted_ms"]["original"]),
                   predicted_planned_ms=float(d["predicted_ms"]["planned"]),
                   **{k: v for k, v in rest.items() if k not in ("predicted_original_ms", "predicted_planned_ms")},
                   merged=[MergedConv.from_dict(m) for m in d.get("merged", [])],
                   verify=[VerifyRound.from_dict(r) for r in d.get("verify", [])])

    def table(self) -> str:
        """One row per merged conv (layers it replaces, kernel, groups, whether it moves padding
        across a border, pruned convs, predicted ms) and the predicted totals."""
        any_pruned = any(m.pruned for m in self.merged)
        rows = [[m.chain, m.layers, m.replaces, m.kernel, m.groups, "borders change" if m.moves_borders else "",
                 *([", ".join(m.pruned)] if any_pruned else []), f"{m.ms:.3f}"] for m in self.merged]
        headers = ["chain", "merged conv replaces", "layers", "kernel", "groups", "",
                   *(["pruned"] if any_pruned else []), "pred. ms"]
        table = tabulate(rows, headers=headers) if rows else "(no merged convs)"
        scope = "end to end" if self.end_to_end else "chains only: the table has no reference for this model"
        budget = f"; budget {self.budget_ms:.3f} ms" if self.budget_ms is not None else ""
        return (f"{table}\npredicted latency ({scope}): original {self.predicted_original_ms:.3f} ms -> planned "
                f"{self.predicted_planned_ms:.3f} ms ({self.predicted_speedup:.2f}x faster){budget}")

    def verify_table(self) -> str:
        rows = [[r.round, f"{r.predicted_ms:.3f}", f"{r.measured_ms:.3f}", f"{r.ratio:.3f}",
                 "" if r.ratio_interval is None else f"{r.ratio_interval[0]:.3f}-{r.ratio_interval[1]:.3f}"]
                for r in self.verify]
        return "verification:\n" + tabulate(rows, headers=["round", "predicted ms", "measured ms",
                                                           "measured / original", "95% interval"])
