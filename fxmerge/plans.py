"""``Plan``: which activations each chain keeps and where its merged convolutions end.

>>> import torch, torchvision, fxmerge
>>> analysis = fxmerge.analyze(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),))
>>> fxmerge.Plan.keep_all(analysis).is_exact, fxmerge.Plan.drop_all(analysis).is_exact
(True, False)

A plan carries the structure it was made for — per chain the layers (node names and
geometry, BatchNorm and pad nodes), activation kinds, identity skips, forced breaks and
consumers — and the example input shapes. Applying it re-traces the model and compares that
structure first, so a plan cannot be applied to a model it does not fit
(:class:`~fxmerge.PlanMismatchError` names the first difference). Plans round-trip through
JSON; a plan file is checked field by field when it is read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from fxmerge.arguments import check_torch_dtype, is_int
from fxmerge.errors import InvalidPlanError, MalformedFileError, PlanMismatchError
from fxmerge.geometry import conv_macs
from fxmerge.passes.dp import optimal_merge_times
from fxmerge.records import Analysis, Chain, LayerNodes, droppable_positions, residual_conflict, span_name
from fxmerge.report import PlanReport
from fxmerge.serialization import check_header, check_output_folder, read_json, write_json

FORMAT, VERSION = "fxmerge.plan", 2
RETIRED = {1: "a version-1 plan, which predates structure records (plans are now checked against the model's "
              "structure). Re-create it with fxmerge.plan."}
MAX_INPUT_ELEMENTS = 1 << 31  # an input shape beyond this is a typo, not a model input


@dataclass(frozen=True)
class ChainPlan:
    """One chain's structure (by node names) and its choice: kept activations and boundaries.

    ``layers[p - 1]`` are the nodes of layer p; ``activations`` maps positions to activation
    nodes; ``skips`` are ``(source, target, add node)``; ``breaks`` are interior forced
    breaks; ``borders`` are activation-free positions whose next layer pads its input (a merge
    across one moves that padding). ``keep`` holds the droppable positions whose activation
    stays and ``boundaries`` the interior positions where a merged convolution ends (⊇ keep ∪
    breaks); ``pruned`` the layers replaced by the identity (LayerMerge). ``signature`` is the
    chain's recorded structure, from which all of the above but the choice derive.
    """

    layers: tuple[LayerNodes, ...]
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
        return tuple(droppable_positions(self.length, self.activations, self.breaks))

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
        """The convs of segment (a, b] that are not pruned (numbered like positions; junctions,
        the residual adds, are no convs)."""
        return [p for p in range(a + 1, b + 1) if p not in self.pruned and not self.layers[p - 1].junction]

    def name(self) -> str:
        return span_name(self.layers[0].conv, self.layers[-1].conv)

    def block_name(self, i: int, j: int) -> str:
        return f"({i}, {j}] = {span_name(self.layers[i].conv, self.layers[j - 1].conv)}"

    def to_dict(self) -> dict:
        return {
            "layers": [{"conv": l.conv, "pad": l.pad, "bn": l.bn, **({"junction": True} if l.junction else {})}
                       for l in self.layers],
            "activations": {str(p): n for p, n in sorted(self.activations.items())},
            "skips": [list(s) for s in self.skips],
            "breaks": list(self.breaks),
            "borders": list(self.borders),
            "keep": [self.activations[p] for p in self.keep],
            "merge_after": [self.layers[p - 1].conv for p in self.boundaries],
            "signature": dict(self.signature),
            **({"prune": [self.layers[p - 1].conv for p in self.pruned]} if self.pruned else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "chain") -> "ChainPlan":
        """A chain plan from its JSON form. The structure comes from ``signature`` (the record
        checked against the model when the plan is applied); the plain fields beside it must
        agree with it. Raises :class:`MalformedFileError` naming the field."""
        structure = _structure_from_signature(_field(d, "signature", dict, where), where)
        for key in ("layers", "activations", "skips", "breaks"):
            if key in d and _plain(d[key], key) != _plain(structure[key], key):
                raise MalformedFileError(f"{where}.{key} disagrees with the chain's structure record (signature): "
                                         f"{_plain(d[key], key)!r} vs {_plain(structure[key], key)!r}; the file was "
                                         "edited or damaged: re-create the plan with fxmerge.plan")
        acts = structure["activations"]
        by_act = {n: p for p, n in acts.items()}
        by_conv = {layer.conv: p for p, layer in enumerate(structure["layers"], start=1)}
        keep, cut = _names(d, "keep", where), _names(d, "merge_after", where)
        prune = _names(d, "prune", where) if "prune" in d else []
        unknown = [n for n in keep if n not in by_act] + [c for c in cut + prune if c not in by_conv]
        if unknown:
            raise MalformedFileError(f"{where}: kept activations / merge boundaries / pruned convs {unknown} are not "
                                     "nodes of this chain")
        borders = _field(d, "borders", list, where)
        if not all(is_int(p) for p in borders):
            raise MalformedFileError(f"{where}.borders must be a list of positions (integers); got {borders!r}")
        n = len(structure["layers"])
        if borders != sorted(set(borders)) or not all(0 < p < n and p not in acts for p in borders):
            raise MalformedFileError(f"{where}.borders must list distinct interior positions (1..{n - 1}, in order) "
                                     f"that carry no activation; got {borders!r}: the file was edited or damaged")
        return cls(**structure, keep=tuple(sorted(by_act[n] for n in keep)),
                   boundaries=tuple(sorted(by_conv[c] for c in cut)), borders=tuple(borders),
                   signature=dict(d["signature"]), pruned=tuple(sorted(by_conv[c] for c in prune)))


def _field(d: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise MalformedFileError(f"{where} has no field '{key}'")
    if not isinstance(d[key], kind):
        raise MalformedFileError(f"{where}.{key} must be a JSON {'object' if kind is dict else 'array'}; "
                                 f"got {d[key]!r}")
    return d[key]


def _names(d: dict, key: str, where: str) -> list[str]:
    names = _field(d, key, list, where)
    if not all(isinstance(n, str) for n in names):
        raise MalformedFileError(f"{where}.{key} must be a list of node names; got {names!r}")
    return names


def _plain(value: Any, key: str) -> Any:
    """A structure field in one comparable form, from JSON or from the record."""
    if key == "layers":
        return [[l.get("conv"), l.get("pad"), l.get("bn"), bool(l.get("junction", False))] if isinstance(l, dict)
                else list(l) for l in value]
    if key == "activations":
        return {str(p): n for p, n in value.items()} if isinstance(value, dict) else value
    return [list(v) if isinstance(v, (list, tuple)) else v for v in value] if isinstance(value, (list, tuple)) else value


def _structure_from_signature(sig: dict, where: str) -> dict:
    """The rewrite's records (layers, activations, skips, breaks) from a chain signature,
    checked for type and range."""
    bad = f"{where}.signature"
    layers = sig.get("layers")
    if not isinstance(layers, list) or not layers or not all(
            isinstance(l, list) and len(l) == 4 and isinstance(l[0], str) and all(x is None or isinstance(x, str)
                                                                             for x in l[1:3]) for l in layers):
        raise MalformedFileError(f"{bad}.layers must list [conv, pad or null, bn or null, geometry] per layer; "
                                 f"got {layers!r}")
    n = len(layers)
    acts = sig.get("activations")
    if not isinstance(acts, dict) or not all(
            isinstance(p, str) and p.isdigit() and 0 < int(p) <= n and isinstance(v, list) and len(v) == 2
            and isinstance(v[0], str) for p, v in acts.items()):
        raise MalformedFileError(f"{bad}.activations must map positions 1..{n} to [node, kind]; got {acts!r}")
    skips = sig.get("skips")
    if not isinstance(skips, list) or not all(
            isinstance(s, list) and len(s) == 3 and is_int(s[0]) and is_int(s[1]) and 0 <= s[0] < s[1] <= n
            and isinstance(s[2], str) for s in skips):
        raise MalformedFileError(f"{bad}.skips must list [source, target, add node] with 0 <= source < target "
                                 f"<= {n}; got {skips!r}")
    breaks = sig.get("breaks")
    if not isinstance(breaks, dict) or not all(isinstance(p, str) and p.isdigit() and 0 < int(p) < n for p in breaks):
        raise MalformedFileError(f"{bad}.breaks must map interior positions to reasons; got {breaks!r}")
    if not isinstance(sig.get("end"), str):
        raise MalformedFileError(f"{bad}.end must say what consumes the chain's end; got {sig.get('end')!r}")
    return dict(layers=tuple(LayerNodes(*l[:3], junction=l[3].startswith("junction ")) for l in layers),
                activations={int(p): v[0] for p, v in acts.items()},
                skips=tuple((s[0], s[1], s[2]) for s in skips), breaks=tuple(sorted(int(p) for p in breaks)))


def _structure(chain: Chain) -> dict:
    return dict(
        layers=tuple(l.nodes for l in chain.layers),
        activations={p: name for p, (name, _) in chain.activations.items()},
        skips=tuple((s.source, s.target, s.add) for s in chain.skips),
        breaks=tuple(sorted(chain.breaks)),
        borders=tuple(chain.borders),
        signature=chain.signature(),
    )


def cheapest_cover(chain: Chain, fixed: Iterable[int], times: Mapping[tuple[int, int], float] | None = None) -> tuple[int, ...]:
    """Boundaries ⊇ ``fixed`` that cover each run between them with valid blocks at the least
    summed ``times`` (default: every block counts 1, so the fewest blocks)."""
    cuts = sorted({0, chain.length, *fixed})
    _, breaks = optimal_merge_times(times if times is not None else {b: 1.0 for b in chain.valid_blocks})
    out: set[int] = set()
    for a, b in zip(cuts[:-1], cuts[1:]):
        out.update(breaks[(a, b)])
    return tuple(sorted(out - {0, chain.length}))


def block_macs(chain: Chain, i: int, j: int) -> int | None:
    """Multiply-adds of block (i, j] merged into one conv (0 for a block that runs no conv,
    None where the analysis has no output shape)."""
    spec, shape = chain.specs.get((i, j)), chain.layers[j - 1].output_shape
    if spec is None:
        return 0 if (i, j) in chain.specs else None
    return None if shape is None else conv_macs(spec, shape)


def default_cover(chain: Chain, fixed: Iterable[int], lossy: bool) -> tuple[int, ...]:
    """Boundaries ⊇ ``fixed`` when a plan gives none: each run between them merged with the
    fewest valid blocks (the most merging), except, unless ``lossy``, a run that drops no
    activation: merging it is a pure rewrite of the original, so it takes the cover of fewest
    multiply-adds (:func:`fewest_macs`) and never computes more than the layers it replaces."""
    cuts = sorted({0, chain.length, *fixed})
    runs = list(zip(cuts[:-1], cuts[1:]))
    weights = None if lossy else fewest_macs(chain)
    pure = [(a, b) for a, b in runs if not any(a < p < b for p in chain.droppable)]
    out = set(cheapest_cover(chain, fixed))
    if weights is not None and pure:
        by_macs = set(cheapest_cover(chain, fixed, weights))
        for a, b in pure:
            out = {p for p in out if not a < p < b} | {p for p in by_macs if a < p < b}
    return tuple(sorted(out))


def fewest_macs(chain: Chain) -> dict[tuple[int, int], int] | None:
    """Block weights whose cheapest cover (:func:`cheapest_cover`) has the fewest multiply-adds
    and, among those, the fewest convs (a merge that costs no more is taken); None when a
    block's MACs are unknown (no shapes)."""
    macs = {b: block_macs(chain, *b) for b in chain.valid_blocks}
    if any(m is None for m in macs.values()):
        return None
    per_conv = chain.length + 1  # a cover has at most L blocks: one MAC outweighs every block count
    return {b: m * per_conv + 1 for b, m in macs.items()}


@dataclass
class Plan:
    """Per chain, the kept activations and the merge boundaries.

    Build one with :meth:`keep_all`, :meth:`fold_only`, :meth:`drop_all`, :meth:`from_sets` or
    the DP (``fxmerge.plan``); apply it with ``fxmerge.linearize`` / ``fxmerge.merge``.
    ``inputs`` records the example input shapes the plan was made at (re-tracing a model
    whose padding depends on the input size needs them), ``capture`` how the model was
    captured (``"fx"`` or ``"export"``), ``modules`` the submodules it compresses (empty:
    the whole model), ``report`` what ``fxmerge.plan`` predicted (and measured) for it;
    ``info`` is that report's JSON form.
    """

    chains: list[ChainPlan]
    report: PlanReport | None = None
    inputs: list[dict] = field(default_factory=list)
    capture: str = "fx"
    modules: list[str] = field(default_factory=list)

    @property
    def info(self) -> dict:
        """The plan's report as JSON (``{}`` for plans not made by ``fxmerge.plan``)."""
        return self.report.to_dict() if self.report is not None else {}

    # ------------------------------------------------------------------ constructors

    @classmethod
    def keep_all(cls, analysis: Analysis) -> "Plan":
        """Keep every activation; merge each activation-free run where merging stays exact
        (never across a border position) and costs no more multiply-adds: each run is covered
        by the valid blocks with the fewest MACs, then the fewest convs. The result equals the
        original model and never computes more than it (a depthwise conv and the pointwise
        conv after it stay two convs: merged, they are one dense conv of ~k² times the work)."""
        return cls.from_positions(analysis, {c.index: (c.droppable, None) for c in analysis.chains})

    @classmethod
    def drop_all(cls, analysis: Analysis) -> "Plan":
        """Drop every droppable activation and merge as far as valid, border positions included
        (the most merging the analysis allows; not equal to the original)."""
        return cls.from_positions(analysis, {c.index: ((), None) for c in analysis.chains}, lossy=True)

    @classmethod
    def fold_only(cls, analysis: Analysis) -> "Plan":
        """Keep every activation and merge nothing: each conv only absorbs its BatchNorm
        (the baseline speed-ups are measured against, as in the paper)."""
        return cls.from_positions(analysis, {c.index: (c.droppable, range(1, c.length)) for c in analysis.chains})

    @classmethod
    def from_positions(cls, analysis: Analysis, choice: Mapping[int, tuple[Iterable[int], Iterable[int] | None]], *,
                       lossy: bool = False, pruned: Mapping[int, Iterable[int]] | None = None) -> "Plan":
        """``choice[chain index] = (kept positions, boundaries or None)``; None merges each run
        between kept activations and forced breaks with the fewest valid blocks (unless
        ``lossy``, never across a border position), except, unless ``lossy``, a run that drops
        no activation: it takes the cover of fewest multiply-adds (:meth:`keep_all`,
        :func:`default_cover`). Chains not in ``choice`` keep all activations.
        ``pruned[chain index]`` lists layers (numbered 1..L) to replace by the identity."""
        chains = []
        pruned = pruned or {}
        for chain in analysis.chains:
            keep, bounds = choice.get(chain.index, (chain.droppable, None))
            keep = tuple(sorted(set(keep)))
            fixed = set(keep) | set(chain.breaks) | (set() if lossy else set(chain.borders))
            if bounds is None:
                bounds = default_cover(chain, fixed, lossy)
            else:
                bounds = tuple(sorted(set(bounds) | set(keep) | set(chain.breaks)))
            cp = ChainPlan(**_structure(chain), keep=keep, boundaries=bounds,
                           pruned=tuple(sorted(set(pruned.get(chain.index, ())))))
            check_chain_rules(cp, chain.index)
            check_prunable(cp, chain, chain.index)
            chains.append(cp)
        return cls(chains, inputs=list(analysis.inputs), capture=analysis.capture, modules=list(analysis.modules))

    @classmethod
    def from_sets(cls, analysis: Analysis, keep: Iterable[str], merge_after: Iterable[str] | None = None, *,
                  lossy: bool = False, prune: Iterable[str] = ()) -> "Plan":
        """A plan from explicit node names: ``keep`` the activation nodes to keep (every other
        droppable one is dropped); ``merge_after`` the conv nodes after which a merged conv
        must end (None: merge as far as valid, across border positions only if ``lossy``; a run
        that drops no activation only where it costs no more MACs, see :meth:`from_positions`);
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

    def check_structure(self, analysis: Analysis) -> None:
        """Raise :class:`PlanMismatchError` naming the first difference between the structure
        this plan was made for and ``analysis`` (a fresh trace of the model it is applied to)."""
        chains = analysis.chains
        for index, (cp, chain) in enumerate(zip(self.chains, chains)):
            difference = _first_difference(cp.signature, chain.signature())
            if difference is None and tuple(cp.borders) != tuple(chain.borders):
                difference = f"border positions {list(cp.borders)} in the plan, {chain.borders} in this model"
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
        from_dp = self.report is not None
        head = (f"fxmerge plan {self.fingerprint()}: {sum(c.length for c in self.chains)} -> {self.num_convs} convs; "
                f"{self._exactness()}")
        return "\n".join([head, self.report.table() if from_dp else self._chain_table()])

    def _exactness(self) -> str:
        if self.is_exact:
            return "exact: equals the original model"
        pruned = f", prunes {self.num_pruned} convs" if self.num_pruned else ""
        return (f"lossy: drops {sum(len(c.dropped) for c in self.chains)} activations{pruned}, "
                f"{len(self.border_changing())} merges move padding across borders")

    def _chain_table(self) -> str:
        from tabulate import tabulate

        rows = []
        for i, c in enumerate(self.chains):
            merged = [c.block_name(a, b) + (" (borders change)" if c.moved_borders(a, b) else "")
                      for a, b in c.segments() if b - a > 1]
            rows.append([i, c.name(), c.length, sum(1 for a, b in c.segments() if c.kept_layers(a, b)),
                         f"{len(c.keep)}/{len(c.droppable)}", "; ".join(merged) or "-",
                         ", ".join(c.layers[p - 1].conv for p in c.pruned) or "-"])
        return tabulate(rows, headers=["chain", "layers", "L", "convs after", "kept acts", "merged blocks", "pruned"])

    def prediction_report(self) -> str:
        """One row per merged conv and the predicted totals, for plans made by ``fxmerge.plan``."""
        if self.report is None:
            raise InvalidPlanError("this plan was not made by fxmerge.plan: it has no predictions")
        return self.report.table()

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "capture": self.capture, "modules": self.modules,
                "inputs": self.inputs, "chains": [c.to_dict() for c in self.chains], "info": self.info}

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "Plan":
        """A plan from its JSON form; a malformed one raises :class:`MalformedFileError` naming
        ``source`` and what is wrong."""
        check_header(d, FORMAT, VERSION, MalformedFileError, source=source, retired=RETIRED)
        try:
            chains = [ChainPlan.from_dict(c, f"chains[{k}]") for k, c in enumerate(_field(d, "chains", list, "plan"))]
            inputs = [_input_spec(x, f"inputs[{k}]") for k, x in enumerate(_field(d, "inputs", list, "plan"))]
            report = _report(d.get("info", {}))
            capture = d.get("capture", "fx")
            if capture not in ("fx", "export"):
                raise MalformedFileError(f"capture must be 'fx' or 'export'; got {capture!r}")
            modules = d.get("modules", [])
            if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
                raise MalformedFileError(f"modules must be a list of submodule names; got {modules!r}")
            plan = cls(chains, report, inputs, capture, modules)
            for i, c in enumerate(plan.chains):
                check_chain_rules(c, i)
        except (MalformedFileError, InvalidPlanError) as exc:
            raise MalformedFileError(f"{source}: {exc}") from None
        return plan

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON to ``path`` (atomically; its folder must exist)."""
        check_output_folder(path)
        write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_json(path, "plan"), source=str(path))


def _input_spec(x: Any, where: str) -> dict:
    """An example input record ``{"shape": [...], "dtype": "float32"}``, checked."""
    if not isinstance(x, dict):
        raise MalformedFileError(f"{where} must be an object {{'shape': [...], 'dtype': ...}}; got {x!r}")
    shape = x.get("shape")
    if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
        raise MalformedFileError(f"{where}.shape must be a list of sizes (integers >= 0); got {shape!r}")
    elements = 1
    for s in shape:
        elements *= s
    if elements > MAX_INPUT_ELEMENTS:
        raise MalformedFileError(f"{where}.shape {shape} has {elements:.3g} elements, more than any model input "
                                 f"fxmerge re-traces at ({MAX_INPUT_ELEMENTS:.3g}); the file is damaged")
    check_torch_dtype(f"{where}.dtype", x.get("dtype"), MalformedFileError)
    return {"shape": list(shape), "dtype": x["dtype"]}


def _report(info: Any) -> PlanReport | None:
    if not isinstance(info, dict):
        raise MalformedFileError(f"info must be a JSON object; got {info!r}")
    if not info:
        return None
    try:
        return PlanReport.from_dict(info)
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedFileError(f"info is not a plan report ({type(exc).__name__}: {exc})") from None


def check_chain_rules(c: ChainPlan, index: int) -> None:
    """Raise :class:`InvalidPlanError` if a chain's sets break a merge rule."""
    where = f"chain {index} ({c.name()})"
    if not set(c.keep) <= set(c.droppable):
        raise InvalidPlanError(f"{where}: kept positions {sorted(set(c.keep) - set(c.droppable))} hold no droppable activation")
    if not set(c.keep) | set(c.breaks) <= set(c.boundaries):
        raise InvalidPlanError(f"{where}: every kept activation and forced break must be a merge boundary")
    if any(not 0 < b < c.length for b in c.boundaries):
        raise InvalidPlanError(f"{where}: boundaries must lie strictly inside 0..{c.length}")
    adds = {(s, t): add for s, t, add in c.skips}
    for a, b in c.segments():
        conflict = residual_conflict(a, b, adds)
        if conflict is None:
            continue
        if len(conflict) == 1:
            (s, t), = conflict
            raise InvalidPlanError(
                f"{where}: merged block {c.block_name(a, b)} cuts the residual '{adds[(s, t)]}' "
                f"({s}, {t}); end the block at {s} or {t}, or let it contain the whole span")
        (s1, t1), (s2, t2) = conflict
        raise InvalidPlanError(
            f"{where}: merged block {c.block_name(a, b)} holds the residuals '{adds[(s1, t1)]}' ({s1}, {t1}) and "
            f"'{adds[(s2, t2)]}' ({s2}, {t2}), which cross; end a block at a position between {s2} and {t1}")


def check_prunable(c: ChainPlan, chain: Chain, index: int) -> None:
    """Raise :class:`InvalidPlanError` if the plan prunes a layer the identity cannot replace
    (``chain`` is the analysis' chain: it knows the layers' shapes)."""
    for p in c.pruned:
        if not 0 < p <= c.length:
            raise InvalidPlanError(f"chain {index} ({c.name()}): pruned layer {p} is not in 1..{c.length}")
        why = chain.layers[p - 1].prune_blocker()
        if why is not None:
            raise InvalidPlanError(f"chain {index} ({c.name()}): conv '{c.layers[p - 1].conv}' cannot be pruned: it "
                                   f"{why}, which the identity cannot do. Prune only convs that keep every shape.")


def _describe_layer(layer: list, other: list) -> str:
    """A recorded layer ``[conv, pad, bn, geometry]`` in words, naming its pad and BatchNorm
    where they are what differs from ``other``."""
    conv, pad, bn, geometry = layer
    parts = [geometry]
    if pad != other[1]:
        parts.append(f"zero pad {pad!r}" if pad else "no zero pad")
    if bn != other[2]:
        parts.append(f"BatchNorm {bn!r}" if bn else "no BatchNorm")
    return f"{conv} ({', '.join(parts)})"


def _first_difference(recorded: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """A sentence naming the first structural difference between two chain signatures."""
    if not recorded:
        return "the plan carries no structure record"
    rec_layers, layers = recorded["layers"], found["layers"]
    for p, (a, b) in enumerate(zip(rec_layers, layers), start=1):
        if list(a) != list(b):
            return f"layer {p}: the plan has {_describe_layer(a, b)}, this model {_describe_layer(b, a)}"
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
