"""The cost model (DESIGN.md): a plan's latency is the sum over merged segments of the measured
time of the merged conv (plus the explicit add of any residual the plan cuts), plus the time of
each kept activation, plus the constant rest of the network — plus a per-op overhead.

The overhead is what an op costs inside a model beyond its isolated timing (dispatch, cold
caches); measured on this VM it is ~20 us per op in eager mode, enough to make a 96-op model
and an 18-op model disagree by 2 ms with a constant rest alone. The latency table calibrates it
with two end-to-end references.

This module names the terms (latency-table keys) and adds them up; it measures nothing.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable, Sequence

from fxmerge.algebra import ConvGeometry
from fxmerge.passes.analysis import Analysis, Chain
from fxmerge.plans import ChainPlan, Plan


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


def model_key(analysis: Analysis) -> str:
    """Identifies a model and input shape, for the end-to-end reference a table keeps."""
    inputs = [n.meta.get("tensor_meta") for n in analysis.graph_module.graph.nodes if n.op == "placeholder"]
    shapes = [list(m.shape) if m is not None and hasattr(m, "shape") else None for m in inputs]
    body = json.dumps({"plan": Plan.fold_only(analysis).fingerprint(), "inputs": shapes}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class CostModel:
    """Adds up the latency-table terms of plans over one analysis.

    ``lookup(key) -> ms`` is the table (it raises for a missing key).
    """

    def __init__(self, analysis: Analysis, lookup: Callable[[str], float], overhead_ms: float = 0.0):
        self.analysis, self.lookup, self.overhead_ms = analysis, lookup, overhead_ms

    # ---------------------------------------------------------------- the terms

    @staticmethod
    def block_keys(chain: Chain, i: int, j: int) -> list[str]:
        """The merged conv of block (i, j] plus the adds of residuals ending at j that the
        block does not contain (they stay explicit)."""
        keys = [conv_key(chain.specs[(i, j)], chain.input_shapes[i])]
        keys += [add_key(chain.layers[j - 1].output_shape) for s in chain.skips if s.target == j and s.source < i]
        return keys

    @staticmethod
    def producer_key(chain: Chain, p: int) -> str:
        """The single conv of layer p, which stands for whatever merged conv ends at p."""
        return conv_key(chain.specs[(p - 1, p)], chain.input_shapes[p - 1])

    @classmethod
    def activation_keys(cls, chain: Chain) -> dict[int, str]:
        """Droppable activations: their time counts only when a plan keeps them."""
        return {p: activation_key(chain.activations[p][1], cls.producer_key(chain, p)) for p in chain.droppable}

    def required_keys(self) -> set[str]:
        keys: set[str] = set()
        for chain in self.analysis.chains:
            for i, j in chain.valid_blocks:
                keys.update(self.block_keys(chain, i, j))
            keys.update(self.activation_keys(chain).values())
            keys.update(self.producer_key(chain, p) for p in chain.droppable)
        return keys

    def block_ms(self, chain: Chain, i: int, j: int) -> float:
        return sum(self.lookup(k) + self.overhead_ms for k in self.block_keys(chain, i, j))

    def activation_ms(self, chain: Chain) -> dict[int, float]:
        """Kept-activation cost: conv-then-activation minus the conv alone (never negative)."""
        return {p: max(0.0, self.lookup(k) - self.lookup(self.producer_key(chain, p))) + self.overhead_ms
                for p, k in self.activation_keys(chain).items()}

    # ---------------------------------------------------------------- plans

    def chain_ms(self, chain: Chain, cp: ChainPlan) -> float:
        acts = self.activation_ms(chain)
        return sum(self.block_ms(chain, a, b) for a, b in cp.segments()) + sum(acts[p] for p in cp.keep)

    def op_count(self, plan: Plan) -> int:
        """Ops a plan's chains run: merged convs, explicit residual adds, kept activations."""
        return sum(len(self.block_keys(c, a, b)) for c, cp in zip(self.analysis.chains, plan.chains)
                   for a, b in cp.segments()) + sum(len(cp.keep) for cp in plan.chains)

    def terms_ms(self, plan: Plan) -> float:
        """The plan-dependent part of the predicted latency."""
        return sum(self.chain_ms(c, cp) for c, cp in zip(self.analysis.chains, plan.chains))

    def segment_rows(self, plan: Plan) -> Iterable[tuple[int, int, int, ChainPlan, float]]:
        for c, cp in zip(self.analysis.chains, plan.chains):
            for a, b in cp.segments():
                yield c.index, a, b, cp, self.block_ms(c, a, b)
