"""The cost model (ARCHITECTURE.md): a plan's latency is the sum over merged segments of the measured
time of the merged conv (plus the explicit add of any residual the plan cuts), plus the time of
each kept activation, plus the constant rest of the network — plus a per-op overhead.

The rest and the overhead are a :class:`Correction`, fitted by least squares to end-to-end
observations of whole plans on the table's backend (the table's references, and every plan
``verify=True`` measured). The overhead is what an op costs inside a model beyond its table
time: in eager mode ~20 us per op here (dispatch, cold caches), enough to make a 96-op model
and an 18-op model disagree by 2 ms with a constant rest alone.

This module names the terms (latency-table keys), adds them up, and fits the correction; it
measures nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from fxmerge.algebra import ConvGeometry
from fxmerge.passes.pruning import pruned_spec
from fxmerge.plans import ChainPlan, Plan, cheapest_cover
from fxmerge.records import Analysis, Chain


def _shape(shape: Sequence[int] | None) -> str:
    return "x".join(map(str, shape)) if shape is not None else "?"


def conv_key(spec: ConvGeometry, input_shape: Sequence[int] | None) -> str:
    """Table key of one merged convolution at its input shape."""
    pad = ";".join(f"{lo},{hi}" for lo, hi in spec.padding)
    return (f"conv{spec.ndim}d in={spec.in_channels} out={spec.out_channels} k={_shape(spec.kernel)} "
            f"s={_shape(spec.stride)} d={_shape(spec.dilation)} g={spec.groups} pad={pad} input={_shape(input_shape)}")


def activation_key(kind: str, producer: str) -> str:
    """Table key of an activation run right after the conv ``producer`` (a conv key): its cost
    is what it adds to that conv, which a fusing compiler makes far less than running it alone."""
    return f"act {kind} after {producer}"


def add_key(shape: Sequence[int] | None) -> str:
    return f"add input={_shape(shape)}"


@dataclass(frozen=True)
class Correction:
    """What whole models measure, given the sum of their table terms: ``scale`` x terms +
    ``overhead_ms`` per op + a constant ``rest_ms`` (the network outside the chains, the call
    itself). The scale absorbs what isolated timings get systematically wrong on a backend
    (warm caches, profiler overhead on tiny kernels), the overhead what each op costs inside a
    model beyond its table time (dispatch; ~20 us per op in eager mode here)."""

    rest_ms: float = 0.0
    overhead_ms: float = 0.0
    scale: float = 1.0

    @classmethod
    def fit(cls, points: Sequence[tuple[float, int, float]]) -> "Correction":
        """Non-negative least squares over observations ``(terms_ms, ops, measured_ms)``. Three
        or more observations fit all three terms; two fix the scale at 1; one fixes the rest
        alone. Nothing can be negative: that would let a plan predict below zero."""
        if not points:
            return cls()
        columns = {"scale": [t for t, _, _ in points], "overhead_ms": [float(o) for _, o, _ in points],
                   "rest_ms": [1.0] * len(points)}
        target = [m for _, _, m in points]
        free = ["scale", "overhead_ms", "rest_ms"] if len(points) >= 3 else \
            ["overhead_ms", "rest_ms"] if len(points) == 2 else ["rest_ms"]
        fixed = {"scale": 1.0, "overhead_ms": 0.0, "rest_ms": 0.0}
        base = [sum(fixed[n] * columns[n][k] for n in columns if n not in free) for k in range(len(points))]
        best: tuple[float, dict] | None = None
        others = [n for n in free if n != "scale"]
        # an active-set search: a handful of tiny linear solves; the scale, when free, stays in
        # every one (terms that counted for nothing would be no model of latency)
        for subset in _subsets(others):
            subset = (["scale"] if "scale" in free else []) + subset
            solution = _least_squares([columns[n] for n in subset], [y - b for y, b in zip(target, base)])
            if solution is None or any(v < 0 for v in solution) or ("scale" in subset and solution[0] <= 0):
                continue
            values = {**fixed, **{n: 0.0 for n in free}, **dict(zip(subset, solution))}
            error = sum((sum(values[n] * columns[n][k] for n in columns) - target[k]) ** 2 for k in range(len(points)))
            if best is None or error < best[0] - 1e-15:
                best = (error, values)
        values = best[1] if best is not None else fixed
        return cls(values["rest_ms"], values["overhead_ms"], values["scale"])


def _subsets(names: list[str]) -> list[list[str]]:
    return [[n for k, n in enumerate(names) if mask >> k & 1] for mask in range(1 << len(names))]


def _least_squares(columns: list[list[float]], target: list[float]) -> list[float] | None:
    """min ||A x - y|| for the few columns of A (normal equations, Gaussian elimination)."""
    n = len(columns)
    if n == 0:
        return []
    a = [[sum(ci * cj for ci, cj in zip(columns[i], columns[j])) for j in range(n)] for i in range(n)]
    b = [sum(ci * y for ci, y in zip(columns[i], target)) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, max(abs(v) for row in a for v in row)):
            return None  # degenerate (e.g. every observation has the same op count)
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] for i in range(n)]


class CostModel:
    """Adds up the latency-table terms of plans over one analysis.

    ``lookup(key) -> ms`` is the table (it raises for a missing key); ``correction`` adds the
    rest of the network and the per-op overhead.
    """

    def __init__(self, analysis: Analysis, lookup: Callable[[str], float], correction: Correction = Correction()):
        self.analysis, self.lookup, self.correction = analysis, lookup, correction
        self.overhead_ms = correction.overhead_ms

    # ---------------------------------------------------------------- the terms

    @classmethod
    def block_keys(cls, chain: Chain, i: int, j: int) -> list[str]:
        """The merged conv of block (i, j] plus the adds of residuals ending at j that the
        block does not contain (they stay explicit)."""
        return cls._terms(chain, i, j, chain.specs[(i, j)])

    @classmethod
    def pruned_keys(cls, chain: Chain, i: int, j: int, pruned: Iterable[int]) -> list[str]:
        """Block (i, j] with layers ``pruned`` replaced by the identity: the merged conv of the
        kept layers, plus the adds of residuals ending at j that it does not contain."""
        return cls._terms(chain, i, j, pruned_spec(chain, i, j, pruned))

    @staticmethod
    def _terms(chain: Chain, i: int, j: int, spec: ConvGeometry | None) -> list[str]:
        """The merged conv ``spec`` at the block's input — or, for a block that runs no conv
        (every layer pruned, or a junction alone), the adds of the residuals inside it, which
        stay explicit (``x + x``) — and the adds of residuals ending at j from before i."""
        if spec is not None:
            keys = [conv_key(spec, chain.input_shapes[i])]
        else:
            keys = [add_key(chain.layers[s.target - 1].output_shape) for s in chain.skips
                    if i <= s.source and s.target <= j]
        keys += [add_key(chain.layers[j - 1].output_shape) for s in chain.skips if s.target == j and s.source < i]
        return keys

    @classmethod
    def segment_keys(cls, chain: Chain, cp: ChainPlan, a: int, b: int) -> list[str]:
        """The terms of one planned segment, pruned layers and all."""
        pruned = [p for p in cp.pruned if a < p <= b]
        return cls.pruned_keys(chain, a, b, pruned) if pruned else cls.block_keys(chain, a, b)

    @staticmethod
    def producer_key(chain: Chain, p: int) -> str:
        """The single conv of layer p, which stands for whatever merged conv ends at p."""
        return conv_key(chain.specs[(p - 1, p)], chain.input_shapes[p - 1])

    @classmethod
    def activation_keys(cls, chain: Chain) -> dict[int, str]:
        """Droppable activations: their time counts only when a plan keeps them."""
        return {p: activation_key(chain.activations[p][1], cls.producer_key(chain, p)) for p in chain.droppable}

    def required_keys(self, prune_layers: bool | None = None) -> set[str]:
        """Every term the analysis' candidate blocks need; with ``prune_layers`` (default: as
        the analysis was made) their pruning options' too."""
        prune_layers = self.analysis.prune_layers if prune_layers is None else prune_layers
        keys: set[str] = set()
        for chain in self.analysis.chains:
            for i, j in chain.valid_blocks:
                keys.update(self.block_keys(chain, i, j))
            if prune_layers:
                for (i, j), options in chain.options.items():
                    for option in options:
                        keys.update(self.pruned_keys(chain, i, j, option.pruned))
            keys.update(self.activation_keys(chain).values())
            keys.update(self.producer_key(chain, p) for p in chain.droppable)
        return keys

    def block_ms(self, chain: Chain, i: int, j: int) -> float:
        return self._keys_ms(self.block_keys(chain, i, j))

    def pruned_ms(self, chain: Chain, i: int, j: int, pruned: Iterable[int]) -> float:
        return self._keys_ms(self.pruned_keys(chain, i, j, pruned))

    def segment_ms(self, chain: Chain, cp: ChainPlan, a: int, b: int) -> float:
        return self._keys_ms(self.segment_keys(chain, cp, a, b))

    def _keys_ms(self, keys: Iterable[str]) -> float:
        scale = self.correction.scale
        return sum(scale * self.lookup(k) + self.overhead_ms for k in keys)

    def activation_ms(self, chain: Chain) -> dict[int, float]:
        """Kept-activation cost: conv-then-activation minus the conv alone (never negative)."""
        scale = self.correction.scale
        return {p: scale * max(0.0, self.lookup(k) - self.lookup(self.producer_key(chain, p))) + self.overhead_ms
                for p, k in self.activation_keys(chain).items()}

    # ---------------------------------------------------------------- plans

    def chain_ms(self, chain: Chain, cp: ChainPlan) -> float:
        acts = self.activation_ms(chain)
        return sum(self.segment_ms(chain, cp, a, b) for a, b in cp.segments()) + sum(acts[p] for p in cp.keep)

    def op_count(self, plan: Plan) -> int:
        """Ops a plan's chains run: merged convs, explicit residual adds, kept activations."""
        return sum(len(self.segment_keys(c, cp, a, b)) for c, cp in zip(self.analysis.chains, plan.chains)
                   for a, b in cp.segments()) + sum(len(cp.keep) for cp in plan.chains)

    def terms_ms(self, plan: Plan) -> float:
        """The plan-dependent part of the predicted latency (per-op overhead included)."""
        return sum(self.chain_ms(c, cp) for c, cp in zip(self.analysis.chains, plan.chains))

    def predict_ms(self, plan: Plan) -> float:
        """The predicted end-to-end latency: terms, overhead and the constant rest."""
        return self.correction.rest_ms + self.terms_ms(plan)

    def segment_rows(self, plan: Plan) -> Iterable[tuple[int, int, int, ChainPlan, float]]:
        for c, cp in zip(self.analysis.chains, plan.chains):
            for a, b in cp.segments():
                yield c.index, a, b, cp, self.segment_ms(c, cp, a, b)

    # ---------------------------------------------------------------- plans without a budget

    def merge_where_faster(self, *, keep: str) -> Plan:
        """Every chain merged where the table says it is faster, keeping ``"all"`` droppable
        activations (exact merges only: the plan equals the original model) or ``"none"`` (the
        fastest plan there is: what the DP returns at its smallest feasible budget)."""
        choice = {}
        for chain in self.analysis.chains:
            kept = {"all": chain.droppable, "none": []}[keep]
            times = {(i, j): self.block_ms(chain, i, j) for i, j in chain.valid_blocks}
            fixed = [*kept, *chain.breaks, *(chain.borders if keep == "all" else ())]
            choice[chain.index] = (kept, cheapest_cover(chain, fixed, times))
        return Plan.from_positions(self.analysis, choice, lossy=keep != "all")

    def bounding_plans(self) -> dict[str, Plan]:
        """The slowest and the fastest plan there is: the BatchNorm-folded original and every
        droppable activation dropped, merged where faster."""
        plans = {"fold-only": Plan.fold_only(self.analysis), "fastest": self.merge_where_faster(keep="none")}
        return plans if plans["fastest"].fingerprint() != plans["fold-only"].fingerprint() else {"fold-only": plans["fold-only"]}
