"""``fxmerge demo``: the whole method on torchvision mobilenet_v2 on this machine's CPU.

Measure (or reuse) the latency table, plan at a few budgets, compress, check every compressed
model against its linearized twin, then time the BatchNorm-folded original and the compressed
models interleaved and print predicted vs measured latency and speed-up, each measured
speed-up with its 95 % interval, and say when the machine was too noisy to measure them.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Mapping

import torch
import torchvision
from tabulate import tabulate

from fxmerge.backends import compare_latency
from fxmerge.errors import InfeasibleBudgetError
from fxmerge.passes.analysis import analyze
from fxmerge.passes.rewrite import linearize, merge
from fxmerge.planner import plan
from fxmerge.plans import Plan
from fxmerge.timing import Ratio, Timing, TimingNoiseWarning, ratio


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_demo(args, get_table: Callable) -> list[dict]:
    start = time.perf_counter()
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
    table = get_table(args, model, (x,))
    analysis = analyze(model, (x,), limits=table.block_limits())
    modules = {"original": merge(model, Plan.fold_only(analysis))}
    plans, errors = {}, {}
    for budget in args.budgets:
        name = f"budget {budget:g}"
        try:
            chosen = plan(model, table, budget=budget, example_inputs=(x,), analysis=analysis)
        except InfeasibleBudgetError as exc:
            print(f"{name}: {exc}")
            continue
        linear = linearize(model, chosen).eval()
        compressed = merge(linear, chosen).eval()
        with torch.no_grad():
            errors[name] = _rel_err(compressed(x), linear(x))
        plans[name], modules[name] = chosen, compressed
    print(f"timing {len(modules)} models interleaved ({args.backend}) ...")
    with warnings.catch_warnings():  # the verdict below says it, with every interval
        warnings.simplefilter("ignore", TimingNoiseWarning)
        timings = compare_latency(modules, (x,), backend=args.backend, baseline="original")
    base = timings["original"].ms
    original = _predicted(plans)
    speedups, verdict = speedup_summary(timings, "original")
    rows = [["original (BN folded)", analysis.num_layers, f"{original:.2f}", f"{base:.2f}",
             f"{100 * (base - original) / original:+.1f}%", "1.00x", "1.00x", "", ""]]
    results = []
    for name, chosen in plans.items():
        pred, meas, s = chosen.report.predicted_planned_ms, timings[name].ms, speedups[name]
        rows.append([name, chosen.num_convs, f"{pred:.2f}", f"{meas:.2f}", f"{100 * (meas - pred) / pred:+.1f}%",
                     f"{original / pred:.2f}x", f"{s.value:.2f}x", f"{s.low:.2f}-{s.high:.2f}x", f"{errors[name]:.1e}"])
        results.append({"budget": name, "predicted_ms": pred, "measured_ms": meas, "speedup": s.value,
                        "speedup_interval": [s.low, s.high], "trusted": s.trusted, "max_rel_err": errors[name]})
    print()
    print(tabulate(rows, headers=["mobilenet_v2, 1x3x224x224", "convs", "predicted ms", "measured ms",
                                  "pred. error", "pred. speed-up", "speed-up", "95% interval", "merge vs linearize"]))
    print(verdict)
    print("(the table was measured earlier than this timing: a drifting machine shifts all measured ms "
          "alike, so compare the speed-ups)" if abs(base - original) > 0.1 * original else "")
    if plans:
        name = list(plans)[-1]
        print(f"\nplan at {name}:")
        print(plans[name].report.table())
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s, {torch.get_num_threads()} thread(s)")
    return results


def speedup_summary(timings: Mapping[str, Timing], baseline: str) -> tuple[dict[str, Ratio], str]:
    """Each module's speed-up over ``baseline`` with its 95 % interval (paired samples of the
    interleaved rounds), and one line saying whether they can be trusted: how close they are,
    or that the machine was too noisy to measure them and which speed-up is worst off."""
    speedups = {name: ratio(timings[baseline], t) for name, t in timings.items() if name != baseline}
    if not speedups:
        return {}, ""
    noisy = {name: s for name, s in speedups.items() if not s.trusted}
    pairs = min(s.pairs for s in speedups.values())
    if not noisy:
        worst = max(s.width for s in speedups.values())
        return speedups, (f"timing: every speed-up is within +-{50 * worst:.1f} % (95 % intervals from {pairs} paired "
                          "samples of interleaved rounds)")
    name = max(noisy, key=lambda n: noisy[n].width)
    s = noisy[name]
    return speedups, (f"the machine was too noisy to measure {len(noisy)} of these {len(speedups)} speed-ups: "
                      f"{name} measured {s.value:.2f}x, but its 95 % interval is {s.low:.2f}x-{s.high:.2f}x "
                      f"(+-{50 * s.width:.0f} %; the original's samples spread {100 * timings[baseline].relative_spread:.0f} % "
                      "across the rounds). Other work is running here: measure again when the machine is quieter.")


def _predicted(plans: dict) -> float:
    return next(iter(plans.values())).report.predicted_original_ms if plans else float("nan")
