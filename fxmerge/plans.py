"""``Plan``: which activations each chain keeps and where its merged convolutions end.

A plan carries the structure it was made for (node names of every layer, activation and skip
add), so it applies to any freshly traced copy of the same model and round-trips through JSON.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from fxmerge.errors import InvalidPlanError, PlanMismatchError
from fxmerge.serialization import check_header, read_json, write_json
from fxmerge.passes.dp import optimal_merge_times

FORMAT, VERSION = "fxmerge.plan", 1


@dataclass(frozen=True)
class ChainPlan:
    """One chain's structure (by node names) and its choice: kept activations and boundaries.

    ``layers[p - 1]`` is ``(conv, pad, bn)`` of layer p; ``activations`` maps positions to
    activation nodes; ``skips`` are ``(source, target, add node)``; ``breaks`` are interior
    forced breaks. ``keep`` holds the droppable positions whose activation stays and
    ``boundaries`` the interior positions where a merged convolution ends (⊇ keep ∪ breaks).
    """

    layers: tuple[tuple[str, str | None, str | None], ...]
    activations: Mapping[int, str]
    skips: tuple[tuple[int, int, str], ...]
    breaks: tuple[int, ...]
    keep: tuple[int, ...]
    boundaries: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.layers)

    @property
    def droppable(self) -> tuple[int, ...]:
        return tuple(sorted(p for p in self.activations if 0 < p < self.length and p not in self.breaks))

    @property
    def dropped(self) -> tuple[int, ...]:
        return tuple(p for p in self.droppable if p not in self.keep)

    def segments(self) -> list[tuple[int, int]]:
        cuts = (0,) + self.boundaries + (self.length,)
        return list(zip(cuts[:-1], cuts[1:]))

    def name(self) -> str:
        return self.layers[0][0] if self.length == 1 else f"{self.layers[0][0]}..{self.layers[-1][0]}"

    def block_name(self, i: int, j: int) -> str:
        first, last = self.layers[i][0], self.layers[j - 1][0]
        return f"({i}, {j}] = {first}" + ("" if first == last else f"..{last}")

    def to_dict(self) -> dict:
        return {
            "layers": [{"conv": c, "pad": p, "bn": b} for c, p, b in self.layers],
            "activations": {str(p): n for p, n in sorted(self.activations.items())},
            "skips": [list(s) for s in self.skips],
            "breaks": list(self.breaks),
            "keep": [self.activations[p] for p in self.keep],
            "merge_after": [self.layers[p - 1][0] for p in self.boundaries],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ChainPlan":
        layers = tuple((x["conv"], x["pad"], x["bn"]) for x in d["layers"])
        acts = {int(p): n for p, n in d["activations"].items()}
        by_act = {n: p for p, n in acts.items()}
        by_conv = {c: p for p, (c, _, _) in enumerate(layers, start=1)}
        return cls(layers, acts, tuple(tuple(s) for s in d["skips"]), tuple(d["breaks"]),
                   tuple(sorted(by_act[n] for n in d["keep"])), tuple(sorted(by_conv[c] for c in d["merge_after"])))


def _structure(chain: Any) -> dict:
    return dict(
        layers=tuple((l.conv, l.pad, l.bn) for l in chain.layers),
        activations={p: name for p, (name, _) in chain.activations.items()},
        skips=tuple((s.source, s.target, s.add) for s in chain.skips),
        breaks=tuple(sorted(chain.breaks)),
    )


def cheapest_cover(chain: Any, fixed: Iterable[int], times: dict[tuple[int, int], float] | None = None) -> tuple[int, ...]:
    """Boundaries ⊇ ``fixed`` that cover each run between them with valid blocks at the least
    summed ``times`` (default: every block counts 1, so the fewest blocks)."""
    cuts = sorted({0, chain.length, *fixed})
    _, breaks = optimal_merge_times(times if times is not None else {b: 1.0 for b in chain.valid_blocks})
    out: set[int] = set()
    for a, b in zip(cuts[:-1], cuts[1:]):
        out.update(breaks[(a, b)])
    return tuple(sorted(out - {0, chain.length}))


@dataclass
class Plan:
    """Per chain, the kept activations and the merge boundaries.

    Build one with :meth:`keep_all`, :meth:`drop_all`, :meth:`from_sets` or the DP
    (``fxmerge.plan``); apply it with ``fxmerge.linearize`` / ``fxmerge.merge``.
    """

    chains: list[ChainPlan]
    info: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def keep_all(cls, analysis: Any) -> "Plan":
        """Keep every activation; merge every activation-free run as far as valid."""
        return cls.from_positions(analysis, {c.index: (c.droppable, None) for c in analysis.chains})

    @classmethod
    def drop_all(cls, analysis: Any) -> "Plan":
        """Drop every droppable activation; merge as far as valid."""
        return cls.from_positions(analysis, {c.index: ((), None) for c in analysis.chains})

    @classmethod
    def fold_only(cls, analysis: Any) -> "Plan":
        """Keep every activation and merge nothing: each conv only absorbs its BatchNorm
        (the baseline speed-ups are measured against, as in the paper)."""
        return cls.from_positions(analysis, {c.index: (c.droppable, range(1, c.length)) for c in analysis.chains})

    @classmethod
    def from_positions(cls, analysis: Any, choice: Mapping[int, tuple[Iterable[int], Iterable[int] | None]]) -> "Plan":
        """``choice[chain index] = (kept positions, boundaries or None)``; None merges each run
        between kept activations and forced breaks with the fewest valid blocks. Chains not in
        ``choice`` keep all activations."""
        chains = []
        for chain in analysis.chains:
            keep, bounds = choice.get(chain.index, (chain.droppable, None))
            keep = tuple(sorted(set(keep)))
            fixed = set(keep) | set(chain.breaks)
            bounds = cheapest_cover(chain, fixed) if bounds is None else tuple(sorted(set(bounds) | fixed))
            cp = ChainPlan(**_structure(chain), keep=keep, boundaries=bounds)
            validate_chain(cp, chain.index)
            chains.append(cp)
        return cls(chains)

    @classmethod
    def from_sets(cls, analysis: Any, keep: Iterable[str], merge_after: Iterable[str] | None = None) -> "Plan":
        """A plan from explicit node names: ``keep`` the activation nodes to keep (every other
        droppable one is dropped); ``merge_after`` the conv nodes after which a merged conv
        must end (None: merge as far as valid). Raises :class:`InvalidPlanError` on names that
        are not droppable activations / layers, or on boundaries that break a merge rule."""
        keep, cut = set(keep), None if merge_after is None else set(merge_after)
        choice = {}
        for chain in analysis.chains:
            acts = {name: p for p, (name, _) in chain.activations.items() if p in chain.droppable}
            convs = {layer.conv: p for p, layer in enumerate(chain.layers, start=1)}
            choice[chain.index] = ([acts[n] for n in keep & acts.keys()],
                                   None if cut is None else [convs[n] for n in cut & convs.keys() if convs[n] < chain.length])
            keep -= acts.keys()
            if cut is not None:
                cut -= convs.keys()
        if keep:
            raise InvalidPlanError(f"not droppable activations of this model: {sorted(keep)}; "
                                   "see print(fxmerge.analyze(...)) for the droppable ones")
        if cut:
            raise InvalidPlanError(f"not conv layers of this model: {sorted(cut)}")
        return cls.from_positions(analysis, choice)

    # ------------------------------------------------------------------ queries

    def fingerprint(self) -> str:
        body = json.dumps([c.to_dict() for c in self.chains], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    @property
    def num_convs(self) -> int:
        """Convolutions in the planned chains after merging."""
        return sum(len(c.segments()) for c in self.chains)

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = []
        for i, c in enumerate(self.chains):
            merged = [c.block_name(a, b) for a, b in c.segments() if b - a > 1]
            rows.append([i, c.name(), c.length, len(c.segments()), f"{len(c.keep)}/{len(c.droppable)}",
                         "; ".join(merged) or "-"])
        table = tabulate(rows, headers=["chain", "layers", "L", "convs after", "kept acts", "merged blocks"])
        head = f"fxmerge plan {self.fingerprint()}: {sum(c.length for c in self.chains)} -> {self.num_convs} convs"
        return "\n".join([head, self.prediction_report() if "predicted_ms" in self.info else table])

    def prediction_report(self) -> str:
        """One row per merged conv (layers it replaces, kernel, groups, predicted ms) and the
        predicted totals, for plans made by ``fxmerge.plan``."""
        from tabulate import tabulate

        info = self.info
        rows = [[r["chain"], r["layers"], r["replaces"], r["kernel"], r["groups"], f"{r['ms']:.3f}"]
                for r in info.get("merged", [])]
        pred = info["predicted_ms"]
        scope = "end to end" if info.get("end_to_end") else "chains only: the table has no reference for this model"
        budget = f"; budget {info['budget_ms']:.3f} ms" if info.get("budget_ms") is not None else ""
        table = tabulate(rows, headers=["chain", "merged conv replaces", "layers", "kernel", "groups", "pred. ms"]) \
            if rows else "(no merged convs)"
        return (f"{table}\npredicted latency ({scope}): original {pred['original']:.3f} ms -> planned "
                f"{pred['planned']:.3f} ms ({pred['original'] / pred['planned']:.2f}x faster){budget}")

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "chains": [c.to_dict() for c in self.chains], "info": self.info}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        check_header(d, FORMAT, VERSION, PlanMismatchError)
        plan = cls([ChainPlan.from_dict(c) for c in d["chains"]], dict(d.get("info", {})))
        for i, c in enumerate(plan.chains):
            validate_chain(c, i)
        return plan

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_json(path))


def validate_chain(c: ChainPlan, index: int) -> None:
    """Raise :class:`InvalidPlanError` if a chain's sets break a merge rule."""
    where = f"chain {index} ({c.name()})"
    if not set(c.keep) <= set(c.droppable):
        raise InvalidPlanError(f"{where}: kept positions {sorted(set(c.keep) - set(c.droppable))} hold no droppable activation")
    if not set(c.keep) | set(c.breaks) <= set(c.boundaries):
        raise InvalidPlanError(f"{where}: every kept activation and forced break must be a merge boundary")
    if any(not 0 < b < c.length for b in c.boundaries):
        raise InvalidPlanError(f"{where}: boundaries must lie strictly inside 0..{c.length}")
    for a, b in c.segments():
        for s, t, add in c.skips:
            if a < s < b < t or s < a < t < b:
                raise InvalidPlanError(
                    f"{where}: merged block {c.block_name(a, b)} cuts the residual '{add}' "
                    f"({s}, {t}); end the block at {s} or {t}, or let it contain the whole span")

