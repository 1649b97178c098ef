"""``Plan``: which activations each chain keeps and where its merged convolutions end.

A plan carries the structure it was made for — per chain the layers (node names and
geometry), activation kinds, identity skips, forced breaks and consumers — and the example input
shapes. Applying it re-traces the model and compares that structure first, so a plan cannot be
applied to a model it does not fit (:class:`~fxmerge.PlanMismatchError` names the first
difference). Plans round-trip through JSON.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from fxmerge.errors import InvalidPlanError, MalformedFileError, PlanMismatchError
from fxmerge.serialization import check_header, read_json, write_json
from fxmerge.passes.dp import optimal_merge_times

FORMAT, VERSION = "fxmerge.plan", 2


@dataclass(frozen=True)
class ChainPlan:
    """One chain's structure (by node names) and its choice: kept activations and boundaries.

    ``layers[p - 1]`` is ``(conv, pad, bn)`` of layer p; ``activations`` maps positions to
    activation nodes; ``skips`` are ``(source, target, add node)``; ``breaks`` are interior
    forced breaks; ``borders`` are activation-free positions whose next layer pads its input
    (a merge across one moves that padding). ``keep`` holds the droppable positions whose
    activation stays and ``boundaries`` the interior positions where a merged convolution
    ends (⊇ keep ∪ breaks); ``pruned`` the layers replaced by the identity (LayerMerge).
    ``signature`` is the chain's recorded structure.
    """

    layers: tuple[tuple[str, str | None, str | None], ...]
    activations: Mapping[int, str]
    skips: tuple[tuple[int, int, str], ...]
    breaks: tuple[int, ...]
    keep: tuple[int, ...]
    boundaries: tuple[int, ...]
    borders: tuple[int, ...] = ()
    signature: Mapping[str, Any] = field(default_factory=dict)
    pruned: tuple[int, ...] = ()

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

    def moved_borders(self, a: int, b: int) -> list[int]:
        """Border positions segment (a, b] merges across: the original's zero padding there
        moves to the segment's front, which changes the output near the image borders."""
        return [p for p in self.borders if a < p < b]

    @property
    def is_exact(self) -> bool:
        """Whether this chain computes what the original did: nothing dropped or pruned, no
        padding moved."""
        return not self.dropped and not self.pruned and not any(self.moved_borders(a, b) for a, b in self.segments())

    def kept_layers(self, a: int, b: int) -> list[int]:
        """The layers of segment (a, b] that are not pruned (numbered like positions)."""
        return [p for p in range(a + 1, b + 1) if p not in self.pruned]

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
            "borders": list(self.borders),
            "keep": [self.activations[p] for p in self.keep],
            "merge_after": [self.layers[p - 1][0] for p in self.boundaries],
            "signature": dict(self.signature),
            **({"prune": [self.layers[p - 1][0] for p in self.pruned]} if self.pruned else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ChainPlan":
        layers = tuple((x["conv"], x["pad"], x["bn"]) for x in d["layers"])
        acts = {int(p): n for p, n in d["activations"].items()}
        by_act = {n: p for p, n in acts.items()}
        by_conv = {c: p for p, (c, _, _) in enumerate(layers, start=1)}
        prune = d.get("prune", [])
        unknown = ([n for n in d["keep"] if n not in by_act] + [c for c in d["merge_after"] if c not in by_conv]
                   + [c for c in prune if c not in by_conv])
        if unknown:
            raise InvalidPlanError(f"kept activations / merge boundaries / pruned convs {unknown} are not nodes of "
                                   "this chain")
        return cls(layers, acts, tuple(tuple(s) for s in d["skips"]), tuple(d["breaks"]),
                   tuple(sorted(by_act[n] for n in d["keep"])), tuple(sorted(by_conv[c] for c in d["merge_after"])),
                   tuple(d["borders"]), dict(d["signature"]), tuple(sorted(by_conv[c] for c in prune)))


def _structure(chain: Any) -> dict:
    return dict(
        layers=tuple((l.conv, l.pad, l.bn) for l in chain.layers),
        activations={p: name for p, (name, _) in chain.activations.items()},
        skips=tuple((s.source, s.target, s.add) for s in chain.skips),
        breaks=tuple(sorted(chain.breaks)),
        borders=tuple(chain.borders),
        signature=chain.signature(),
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

    Build one with :meth:`keep_all`, :meth:`fold_only`, :meth:`drop_all`, :meth:`from_sets` or
    the DP (``fxmerge.plan``); apply it with ``fxmerge.linearize`` / ``fxmerge.merge``.
    ``inputs`` records the example input shapes the plan was made at (re-tracing a model
    whose padding depends on the input size needs them).
    """

    chains: list[ChainPlan]
    info: dict = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def keep_all(cls, analysis: Any) -> "Plan":
        """Keep every activation; merge every activation-free run as far as merging stays exact
        (never across a border position): the result equals the original model."""
        return cls.from_positions(analysis, {c.index: (c.droppable, None) for c in analysis.chains})

    @classmethod
    def drop_all(cls, analysis: Any) -> "Plan":
        """Drop every droppable activation and merge as far as valid, border positions included
        (the most merging the analysis allows; not equal to the original)."""
        return cls.from_positions(analysis, {c.index: ((), None) for c in analysis.chains}, lossy=True)

    @classmethod
    def fold_only(cls, analysis: Any) -> "Plan":
        """Keep every activation and merge nothing: each conv only absorbs its BatchNorm
        (the baseline speed-ups are measured against, as in the paper)."""
        return cls.from_positions(analysis, {c.index: (c.droppable, range(1, c.length)) for c in analysis.chains})

    @classmethod
    def from_positions(cls, analysis: Any, choice: Mapping[int, tuple[Iterable[int], Iterable[int] | None]], *,
                       lossy: bool = False, pruned: Mapping[int, Iterable[int]] | None = None) -> "Plan":
        """``choice[chain index] = (kept positions, boundaries or None)``; None merges each run
        between kept activations and forced breaks with the fewest valid blocks — and, unless
        ``lossy``, never across a border position. Chains not in ``choice`` keep all activations.
        ``pruned[chain index]`` lists layers (numbered 1..L) to replace by the identity."""
        chains = []
        pruned = pruned or {}
        for chain in analysis.chains:
            keep, bounds = choice.get(chain.index, (chain.droppable, None))
            keep = tuple(sorted(set(keep)))
            fixed = set(keep) | set(chain.breaks) | (set() if lossy else set(chain.borders))
            bounds = cheapest_cover(chain, fixed) if bounds is None else tuple(sorted(set(bounds) | set(keep) | set(chain.breaks)))
            cp = ChainPlan(**_structure(chain), keep=keep, boundaries=bounds,
                           pruned=tuple(sorted(set(pruned.get(chain.index, ())))))
            validate_chain(cp, chain.index)
            check_prunable(cp, chain, chain.index)
            chains.append(cp)
        return cls(chains, inputs=list(getattr(analysis, "inputs", [])))

    @classmethod
    def from_sets(cls, analysis: Any, keep: Iterable[str], merge_after: Iterable[str] | None = None, *,
                  lossy: bool = False, prune: Iterable[str] = ()) -> "Plan":
        """A plan from explicit node names: ``keep`` the activation nodes to keep (every other
        droppable one is dropped); ``merge_after`` the conv nodes after which a merged conv
        must end (None: merge as far as valid, across border positions only if ``lossy``);
        ``prune`` the conv nodes to replace, with their BatchNorm, by the identity (LayerMerge;
        only convs that keep every shape). Raises :class:`InvalidPlanError` on names that are
        not droppable activations / layers / prunable convs, or on boundaries that break a
        merge rule."""
        if any(isinstance(v, str) for v in (keep, merge_after, prune)):
            raise InvalidPlanError("keep, merge_after and prune are collections of node names, not one string")
        keep, cut, prune = set(keep), None if merge_after is None else set(merge_after), set(prune)
        choice, pruned = {}, {}
        for chain in analysis.chains:
            acts = {name: p for p, (name, _) in chain.activations.items() if p in chain.droppable}
            convs = {layer.conv: p for p, layer in enumerate(chain.layers, start=1)}
            choice[chain.index] = ([acts[n] for n in keep & acts.keys()],
                                   None if cut is None else [convs[n] for n in cut & convs.keys() if convs[n] < chain.length])
            pruned[chain.index] = [convs[n] for n in prune & convs.keys()]
            keep -= acts.keys()
            prune -= convs.keys()
            if cut is not None:
                cut -= convs.keys()
        if keep:
            raise InvalidPlanError(f"not droppable activations of this model: {sorted(keep)}; "
                                   "see print(fxmerge.analyze(...)) for the droppable ones")
        if cut:
            raise InvalidPlanError(f"not conv layers of this model: {sorted(cut)}")
        if prune:
            raise InvalidPlanError(f"cannot prune {sorted(prune)}: not conv layers of this model; "
                                   "see print(fxmerge.analyze(...)) for the layers")
        return cls.from_positions(analysis, choice, lossy=lossy, pruned=pruned)

    # ------------------------------------------------------------------ structure

    def check_structure(self, analysis: Any) -> None:
        """Raise :class:`PlanMismatchError` naming the first difference between the structure
        this plan was made for and ``analysis`` (a fresh trace of the model it is applied to)."""
        chains = analysis.chains
        for index, (cp, chain) in enumerate(zip(self.chains, chains)):
            difference = _first_difference(cp.signature, chain.signature())
            if difference:
                raise PlanMismatchError(
                    f"plan built for a different model: chain {index} ({cp.name()}): {difference}. "
                    "Build the plan from this model (fxmerge.analyze / fxmerge.plan) or trace it the same way.")
            check_prunable(cp, chain, index)
        if len(chains) != len(self.chains):
            extra = [c.name() for c in chains[len(self.chains):]] or [c.name() for c in self.chains[len(chains):]]
            raise PlanMismatchError(
                f"plan built for a different model: the plan has {len(self.chains)} chain(s), this model "
                f"{len(chains)} ({extra} only in {'this model' if len(chains) > len(self.chains) else 'the plan'}). "
                "Build the plan from this model (fxmerge.analyze / fxmerge.plan).")

    # ------------------------------------------------------------------ queries

    def fingerprint(self) -> str:
        body = json.dumps([c.to_dict() for c in self.chains], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    @property
    def num_convs(self) -> int:
        """Convolutions in the planned chains after merging (a fully pruned segment has none)."""
        return sum(1 for c in self.chains for a, b in c.segments() if c.kept_layers(a, b))

    @property
    def num_pruned(self) -> int:
        return sum(len(c.pruned) for c in self.chains)

    @property
    def is_exact(self) -> bool:
        """Whether merging with this plan gives the original model's function (up to float
        rounding): no activation dropped and no padding moved across a border position."""
        return all(c.is_exact for c in self.chains)

    def border_changing(self) -> list[tuple[int, int, int]]:
        """``(chain, a, b)`` of every merged segment that moves padding across a border position."""
        return [(i, a, b) for i, c in enumerate(self.chains) for a, b in c.segments() if c.moved_borders(a, b)]

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = []
        for i, c in enumerate(self.chains):
            merged = [c.block_name(a, b) + (" (borders change)" if c.moved_borders(a, b) else "")
                      for a, b in c.segments() if b - a > 1]
            rows.append([i, c.name(), c.length, sum(1 for a, b in c.segments() if c.kept_layers(a, b)),
                         f"{len(c.keep)}/{len(c.droppable)}", "; ".join(merged) or "-",
                         ", ".join(c.layers[p - 1][0] for p in c.pruned) or "-"])
        table = tabulate(rows, headers=["chain", "layers", "L", "convs after", "kept acts", "merged blocks", "pruned"])
        pruned = f", prunes {self.num_pruned} convs" if self.num_pruned else ""
        exact = "exact: equals the original model" if self.is_exact else (
            f"lossy: drops {sum(len(c.dropped) for c in self.chains)} activations{pruned}, "
            f"{len(self.border_changing())} merges move padding across borders")
        head = (f"fxmerge plan {self.fingerprint()}: {sum(c.length for c in self.chains)} -> {self.num_convs} convs; "
                f"{exact}")
        return "\n".join([head, self.prediction_report() if "predicted_ms" in self.info else table])

    def prediction_report(self) -> str:
        """One row per merged conv (layers it replaces, kernel, groups, whether it moves padding
        across a border, predicted ms) and the predicted totals, for plans made by ``fxmerge.plan``."""
        from tabulate import tabulate

        info = self.info
        lossy = {(ci, a, b) for ci, a, b in self.border_changing()}
        rows = [[r["chain"], r["layers"], r["replaces"], r["kernel"], r["groups"],
                 "borders change" if (r["chain"], *r["block"]) in lossy else "", ", ".join(r.get("pruned", [])),
                 f"{r['ms']:.3f}"]
                for r in info.get("merged", [])]
        pred = info["predicted_ms"]
        scope = "end to end" if info.get("end_to_end") else "chains only: the table has no reference for this model"
        budget = f"; budget {info['budget_ms']:.3f} ms" if info.get("budget_ms") is not None else ""
        if not any(r[6] for r in rows):
            rows = [r[:6] + r[7:] for r in rows]
        headers = ["chain", "merged conv replaces", "layers", "kernel", "groups", "", "pruned", "pred. ms"]
        table = tabulate(rows, headers=headers if any(len(r) == 8 for r in rows) else headers[:6] + headers[7:]) \
            if rows else "(no merged convs)"
        return (f"{table}\npredicted latency ({scope}): original {pred['original']:.3f} ms -> planned "
                f"{pred['planned']:.3f} ms ({pred['original'] / pred['planned']:.2f}x faster){budget}")

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "inputs": self.inputs, "chains": [c.to_dict() for c in self.chains],
                "info": self.info}

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "Plan":
        """A plan from its JSON form; a malformed one raises :class:`MalformedFileError` naming
        ``source`` and what is wrong."""
        if not isinstance(d, dict):
            raise MalformedFileError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") == FORMAT and d.get("version") == 1:
            raise MalformedFileError(f"{source}: a version-1 plan, which predates structure records (plans are now "
                                     "checked against the model's structure). Re-create it with fxmerge.plan.")
        check_header(d, FORMAT, VERSION, MalformedFileError, source=source)
        try:
            chains = [ChainPlan.from_dict(c) for c in d["chains"]]
            plan = cls(chains, dict(d.get("info", {})), [dict(x) for x in d["inputs"]])
        except InvalidPlanError as exc:
            raise MalformedFileError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedFileError(f"{source}: missing or malformed field ({type(exc).__name__}: {exc}); "
                                     "was it written by fxmerge's Plan.save?") from None
        for i, c in enumerate(plan.chains):
            validate_chain(c, i)
        return plan

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_json(path, "plan"), source=str(path))


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
        inside = [(s, t, add) for s, t, add in c.skips if a <= s and t <= b]
        for s1, t1, add1 in inside:
            for s2, t2, add2 in inside:
                if s1 < s2 < t1 < t2:
                    raise InvalidPlanError(
                        f"{where}: merged block {c.block_name(a, b)} holds the residuals '{add1}' ({s1}, {t1}) and "
                        f"'{add2}' ({s2}, {t2}), which cross; end a block at a position between {s2} and {t1}")



def check_prunable(c: ChainPlan, chain: Any, index: int) -> None:
    """Raise :class:`InvalidPlanError` if the plan prunes a layer the identity cannot replace
    (``chain`` is the analysis' chain: it knows the layers' shapes)."""
    for p in c.pruned:
        if not 0 < p <= c.length:
            raise InvalidPlanError(f"chain {index} ({c.name()}): pruned layer {p} is not in 1..{c.length}")
        why = chain.layers[p - 1].prune_blocker()
        if why is not None:
            raise InvalidPlanError(f"chain {index} ({c.name()}): conv '{c.layers[p - 1][0]}' cannot be pruned: it "
                                   f"{why}, which the identity cannot do. Prune only convs that keep every shape.")


def _first_difference(recorded: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """A sentence naming the first structural difference between two chain signatures."""
    if not recorded:
        return "the plan carries no structure record"
    rec_layers, layers = recorded["layers"], found["layers"]
    for p, (a, b) in enumerate(zip(rec_layers, layers), start=1):
        if a != b:
            return f"layer {p}: the plan has {a[0]} ({a[3]}), this model {b[0]} ({b[3]})"
    if len(rec_layers) != len(layers):
        return (f"{len(rec_layers)} layers in the plan, {len(layers)} in this model, where it ends at "
                f"{found['end']}")
    for key, what in (("activations", "activation"), ("breaks", "forced break")):
        rec, now = recorded[key], found[key]
        for p in sorted(set(rec) | set(now), key=int):
            if rec.get(p) != now.get(p):
                return (f"position {p}: {what} {rec.get(p, 'none')!r} in the plan, {now.get(p, 'none')!r} in this model")
    if recorded["skips"] != found["skips"]:
        return f"residuals differ: {recorded['skips']} in the plan, {found['skips']} in this model"
    if recorded["end"] != found["end"]:
        return f"it ends at {recorded['end']!r} in the plan, at {found['end']!r} in this model"
    return None
