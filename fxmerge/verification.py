"""Plans measured on the table's backend, and corrected until they meet their budget:
``fxmerge.plan(..., verify=True)``.

Each round builds the compressed model, times it interleaved with the folded original, and
records the observation in the latency table (its correction re-fits on it, so the next plan on
this table starts corrected); a miss makes the planner aim lower and plan again. Observations
are saved only where the caller says (``save_to=``).

Budgets are fractions of the *measured* folded original, on the same backend, threads and
shapes as the table.

>>> plan = fxmerge.plan(model, table, budget=0.6, verify=True, save_to="table.json")  # doctest: +SKIP
>>> [r["ratio"] for r in plan.info["verify"]]                                        # doctest: +SKIP

(Not run as a doctest: what it prints depends on this machine's timings; tests/test_backends.py
checks the loop on a backend with known times.)
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from fxmerge.errors import InfeasibleBudgetError, VerificationError
from fxmerge.latency import LatencyTable
from fxmerge.measure import PlanTimings, time_plans
from fxmerge.passes.tracing import TraceOptions
from fxmerge.plans import Plan
from fxmerge.records import Analysis
from fxmerge.report import VerifyRound
from fxmerge.timing import NOISY_WIDTH, TimingNoiseWarning

TOLERANCE = 1.03  # a verified plan may measure at most 3 % over its budget (timing noise)


def observe(table: LatencyTable, model: nn.Module, inputs: Sequence[torch.Tensor], analysis: Analysis,
            plans: Mapping[str, Plan], *, kind: str, runners: dict | None = None,
            trace: TraceOptions | None = None) -> dict[str, float]:
    """Time ``plans`` interleaved with the folded original on the table's backend, record them
    in ``table`` as observations and return their measured ratios to the original. A plan
    whose ratio is too noisy to trust (:attr:`fxmerge.timing.Ratio.trusted`) is not recorded
    (a correction fitted to noise would mislead every later plan): a
    :class:`~fxmerge.timing.TimingNoiseWarning` names it."""
    return measure_plans(table, model, inputs, analysis, plans, kind=kind, runners=runners, trace=trace).ratios


def measure_plans(table: LatencyTable, model: nn.Module, inputs: Sequence[torch.Tensor], analysis: Analysis,
                  plans: Mapping[str, Plan], *, kind: str, runners: dict | None = None,
                  trace: TraceOptions | None = None) -> PlanTimings:
    """:func:`observe`, returning the timings with each ratio's confidence interval."""
    timings = time_plans(table.backend, model, inputs, analysis, plans, table.ms, kind=kind,
                         include_original=table.reference(analysis) is None, runners=runners, trace=trace)
    table.record(analysis, inputs, timings.trusted())
    for name in timings.noisy():
        r = timings.intervals[name]
        warnings.warn(f"plan {name!r} measured {r.value:.3f} of the folded original with a {100 * r.confidence:.0f} % "
                      f"interval {r.low:.3f}-{r.high:.3f} (+-{50 * r.width:.0f} %, over {r.pairs} paired samples): too "
                      "noisy to correct the cost model with, so it was not recorded. The machine's speed moved while "
                      "timing (other work running?)", TimingNoiseWarning, stacklevel=3)
    return timings


def save_observations(table: LatencyTable, save_to: str | os.PathLike | None) -> None:
    """Keep the observations where the caller asked: the next plan from that file starts corrected."""
    if save_to is None:
        return
    try:
        table.save(save_to)
    except OSError as exc:
        warnings.warn(f"could not save the verification's observations to {save_to}: {exc}", stacklevel=3)


def verify(select: Callable[[float], Plan], predict: Callable[[Plan], float], table: LatencyTable, model: nn.Module,
           inputs: Sequence[torch.Tensor], analysis: Analysis, target_ms: float, *, rounds: int = 3,
           save_to: str | os.PathLike | None = None, trace: TraceOptions | None = None) -> Plan:
    """The closed loop of ``fxmerge.plan(..., verify=True)``.

    ``select(aim_ms)`` plans under a predicted-latency aim with the table's current
    correction; ``predict(plan)`` predicts with it. Each round times the plan interleaved with
    the folded original; a miss is recorded (the correction re-fits on it) and the next aim is
    the budget scaled by how far the re-fitted prediction of that plan still was from its
    measurement (a secant step, so a backend whose real cost bends away from the table's is
    still met). An aim below the smallest feasible plan is raised to it (the fastest plan is
    worth measuring). A round whose measurement is too noisy to trust (its ratio's confidence
    interval wider than :data:`fxmerge.timing.NOISY_WIDTH`) corrects nothing: it is not
    recorded, and when it misses the next round times the same plan again; one that meets the
    budget on its median is returned with a :class:`~fxmerge.timing.TimingNoiseWarning` giving
    its interval. Returns the first plan that
    measures within ``TOLERANCE`` of the budget,
    with every round in its report; raises :class:`~fxmerge.VerificationError` with the closest
    plan otherwise. Every round's observation is saved to ``save_to`` either way.
    """
    original_ms = table.reference(analysis)["original_ms"]
    runners: dict = {}
    history: list[VerifyRound] = []
    best: tuple[float, Plan] | None = None
    measured_plans: set[str] = set()
    aim = target_ms
    try:
        for round_ in range(1, rounds + 1):
            chosen = _select_within_reach(select, aim, first=round_ == 1)
            if chosen.fingerprint() in measured_plans:
                break  # the aim leads back to a plan already measured: nothing new to learn
            predicted = predict(chosen)
            timings = measure_plans(table, model, inputs, analysis, {"candidate": chosen}, kind="verify",
                                    runners=runners, trace=trace)
            ratio, interval = timings.ratios["candidate"], timings.intervals["candidate"]
            measured = ratio * original_ms
            history.append(VerifyRound(round_, predicted, measured, ratio, aim_ms=aim,
                                       budget_ratio=target_ms / original_ms, ratio_interval=interval.interval()))
            if best is None or measured < best[0]:
                best = (measured, chosen)
            if measured <= target_ms * TOLERANCE:
                if not interval.trusted:
                    warnings.warn(f"the plan met its budget on a noisy measurement: {ratio:.3f} of the folded original "
                                  f"against {target_ms / original_ms:.3f}, {100 * interval.confidence:.0f} % interval "
                                  f"{interval.low:.3f}-{interval.high:.3f}; the verification is only as sure as that "
                                  "(plan.info['verify'])", TimingNoiseWarning, stacklevel=3)
                chosen.report = dataclasses.replace(chosen.report, verify=history)
                return chosen
            if not interval.trusted:
                continue  # too noisy to correct with (not recorded): the same aim, the plan timed again
            measured_plans.add(chosen.fingerprint())
            refit = predict(chosen)  # the re-fitted model's view of the plan just measured
            aim = min(target_ms * refit / measured, refit * (1 - 1e-3))  # and never the same plan again
    finally:
        save_observations(table, save_to)
    raise _out_of_rounds(history, best, original_ms, target_ms)


def _select_within_reach(select: Callable[[float], Plan], aim: float, *, first: bool) -> Plan:
    """``select(aim)``; after the first round an aim below every plan is raised to the
    smallest feasible one (the user's own budget, in the first round, is theirs to raise)."""
    try:
        return select(aim)
    except InfeasibleBudgetError as exc:
        if first:
            raise
        return select(exc.smallest_ms * (1 + 1e-9))


def _out_of_rounds(history: list[VerifyRound], best: tuple[float, Plan], original_ms: float,
                   target_ms: float) -> VerificationError:
    last = history[-1]
    noisy = sum(1 for r in history if r.ratio_interval is not None and r.ratio_interval[1] - r.ratio_interval[0] >
                NOISY_WIDTH * r.ratio)
    noise = (f" {noisy} of the rounds were too noisy to correct the cost model with (their 95 % intervals are in "
             "error.rounds): the machine's speed moved while timing; try again when it is quieter." if noisy else "")
    return VerificationError(
        f"no plan measured within the budget after {len(history)} round(s): the closest measured "
        f"{best[0]:.3f} ms ({best[0] / original_ms:.2f} of the folded original's {original_ms:.3f} ms) against "
        f"{target_ms:.3f} ms ({target_ms / original_ms:.2f}, +{100 * (TOLERANCE - 1):.0f} % tolerance); the last "
        f"round aimed at {last.aim_ms:.3f} ms predicted. Raise the budget or allow more rounds "
        f"(verify_rounds=...); every round is in error.rounds.{noise}", [r.to_dict() for r in history], best[1])
