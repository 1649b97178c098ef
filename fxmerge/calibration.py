"""Whole plans timed end to end on the table's backend, and what that teaches the cost model.

This is the one place that builds plans in order to measure them:

* :func:`measure_references` — when a latency table is measured, a few plans spanning what the
  DP can choose (the BatchNorm-folded original, the DP's own picks at 80 % and 60 % of its
  summed terms, the fastest plan) are timed interleaved with the folded original;
  :meth:`LatencyTable.correction` fits the scale, the constant rest and the per-op overhead to
  them;
* :func:`verify` — ``fxmerge.plan(..., verify=True)``: plan, build the compressed model, time it
  interleaved with the folded original, and when it misses the budget record the observation
  (the next plan on this table starts corrected), re-fit, aim lower and plan again.

Budgets are fractions of the *measured* folded original, on the same backend, threads and
shapes as the table.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge.backends import get_backend
from fxmerge.cost import CostModel
from fxmerge.errors import FxMergeError
from fxmerge.latency import LatencyTable
from fxmerge.passes.analysis import Analysis
from fxmerge.passes.rewrite import merge
from fxmerge.plans import Plan
from fxmerge.planning import probe_plans

log = logging.getLogger("fxmerge")

TOLERANCE = 1.03  # a verified plan may measure at most 3 % over its budget (timing noise)
REFERENCE_FRACTIONS = (0.8, 0.6)  # the DP's picks between the two bounding plans


class VerificationError(FxMergeError):
    """Verified planning ran out of rounds before a plan measured within the budget. ``rounds``
    holds what each round predicted and measured; ``best`` is the fastest plan measured."""

    def __init__(self, message: str, rounds: list[dict], best: Plan | None):
        super().__init__(message)
        self.rounds, self.best = rounds, best


def observe_plans(table: LatencyTable, model: nn.Module, inputs: Sequence[torch.Tensor], analysis: Analysis,
                  plans: Mapping[str, Plan], *, kind: str, runners: dict | None = None,
                  **trace_kwargs: Any) -> dict[str, float]:
    """Time ``plans`` (merged) interleaved with the folded original on the table's backend,
    record each as an observation in ``table`` and return their measured ratios to the
    original. ``runners`` caches compiled/exported modules between calls (a verification
    compiles the original once)."""
    backend = get_backend(table.backend)
    folded = Plan.fold_only(analysis)
    raw = CostModel(analysis, table.ms)
    # modules are named by plan fingerprint: a cached runner is only ever the same plan's
    modules = {folded.fingerprint(): merge(model, folded, **trace_kwargs)}
    modules.update({plan.fingerprint(): merge(model, plan, **trace_kwargs) for plan in plans.values()
                    if plan.fingerprint() not in modules})
    timings = backend.compare(modules, inputs, rounds=3, repeats=9, runners=runners)
    original_ms = timings[folded.fingerprint()].ms
    ratios = {name: timings[plan.fingerprint()].ms / original_ms for name, plan in plans.items()}
    observations = [{"plan": plan.fingerprint(), "kind": kind, "terms_ms": raw.terms_ms(plan), "ops": raw.op_count(plan),
                     "ratio": ratios[name]} for name, plan in plans.items()]
    if table.reference(analysis) is None and all(p.fingerprint() != folded.fingerprint() for p in plans.values()):
        observations.insert(0, {"plan": folded.fingerprint(), "kind": "fold-only", "terms_ms": raw.terms_ms(folded),
                                "ops": raw.op_count(folded), "ratio": 1.0})
    table.observe(analysis, inputs, original_ms, observations)
    return ratios


def measure_references(table: LatencyTable, model: nn.Module, inputs: Sequence[torch.Tensor], analysis: Analysis,
                       **trace_kwargs: Any) -> None:
    """The table's end-to-end references for this model (see the module's docstring)."""
    cost = CostModel(analysis, table.ms)
    plans = {**cost.bounding_plans(), **probe_plans(analysis, cost, REFERENCE_FRACTIONS)}
    log.info("fxmerge: timing %d reference plans end to end (%s)", len(plans), table.backend)
    observe_plans(table, model, inputs, analysis, plans, kind="reference", **trace_kwargs)


def verify(select: Callable[[float], Plan], predict: Callable[[Plan], float], table: LatencyTable, model: nn.Module,
           inputs: Sequence[torch.Tensor], analysis: Analysis, target_ms: float, *, rounds: int = 3,
           **trace_kwargs: Any) -> Plan:
    """The closed loop of ``fxmerge.plan(..., verify=True)``.

    ``select(aim_ms)`` plans under a predicted-latency aim with the table's current
    correction; ``predict(plan)`` predicts with it. Each round times the plan interleaved with
    the folded original; a miss is recorded (the correction re-fits on it) and the next aim is
    the budget scaled by how far the re-fitted prediction of that plan still was from its
    measurement (a secant step, so a backend whose real cost bends away from the table's is
    still met). Returns the first plan that measures within ``TOLERANCE`` of the budget, with
    every round in ``plan.info["verify"]``; raises :class:`VerificationError` otherwise.
    """
    original_ms = table.reference(analysis)["original_ms"]
    runners: dict = {}
    history: list[dict] = []
    best: tuple[float, Plan] | None = None
    aim = target_ms
    for round_ in range(1, rounds + 1):
        chosen = select(aim)
        predicted = predict(chosen)
        ratio = observe_plans(table, model, inputs, analysis, {"candidate": chosen}, kind="verify", runners=runners,
                              **trace_kwargs)["candidate"]
        measured = ratio * original_ms
        history.append({"round": round_, "aim_ms": aim, "predicted_ms": predicted, "measured_ms": measured,
                        "ratio": ratio, "budget_ratio": target_ms / original_ms})
        if best is None or measured < best[0]:
            best = (measured, chosen)
        if measured <= target_ms * TOLERANCE:
            break
        refit = predict(chosen)  # the re-fitted model's view of the plan just measured
        aim = min(target_ms * refit / measured, refit * (1 - 1e-3))  # and never the same plan again
    else:
        save_observations(table)
        last = history[-1]
        raise VerificationError(
            f"no plan measured within the budget after {rounds} rounds: the closest measured "
            f"{best[0]:.3f} ms ({best[0] / original_ms:.2f} of the folded original's {original_ms:.3f} ms) against "
            f"{target_ms:.3f} ms ({target_ms / original_ms:.2f}, +{100 * (TOLERANCE - 1):.0f} % tolerance); the last "
            f"round aimed at {last['aim_ms']:.3f} ms predicted. Raise the budget or allow more rounds "
            "(verify_rounds=...); every round is in error.rounds.", history, best[1])
    save_observations(table)
    chosen.info["verify"] = history
    return chosen


def save_observations(table: LatencyTable) -> None:
    """Keep the observations: the next plan on this table starts corrected."""
    if table.path is None:
        return
    try:
        table.save(table.path)
    except OSError as exc:
        warnings.warn(f"could not save the verification's observations to {table.path}: {exc}", stacklevel=3)
