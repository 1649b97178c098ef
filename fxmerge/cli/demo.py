"""``fxmerge demo``: the whole method on torchvision mobilenet_v2 on this machine's CPU.

Measure (or reuse) the latency table, plan at a few budgets, compress, check every compressed
model against its linearized twin, then time the BatchNorm-folded original and the compressed
models interleaved and print predicted vs measured latency and speed-up.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torchvision
from tabulate import tabulate

from fxmerge.backends import compare_latency
from fxmerge.errors import InfeasibleBudgetError
from fxmerge.passes.analysis import analyze
from fxmerge.passes.rewrite import linearize, merge
from fxmerge.planner import plan
from fxmerge.plans import Plan


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
    timings = compare_latency(modules, (x,), backend=args.backend)
    base = timings["original"].ms
    original = _predicted(plans)
    rows = [["original (BN folded)", analysis.num_layers, f"{original:.2f}", f"{base:.2f}",
             f"{100 * (base - original) / original:+.1f}%", "1.00x", "1.00x", ""]]
    results = []
    for name, chosen in plans.items():
        pred, meas = chosen.report.predicted_planned_ms, timings[name].ms
        rows.append([name, chosen.num_convs, f"{pred:.2f}", f"{meas:.2f}", f"{100 * (meas - pred) / pred:+.1f}%",
                     f"{original / pred:.2f}x", f"{base / meas:.2f}x", f"{errors[name]:.1e}"])
        results.append({"budget": name, "predicted_ms": pred, "measured_ms": meas, "speedup": base / meas,
                        "max_rel_err": errors[name]})
    print()
    print(tabulate(rows, headers=["mobilenet_v2, 1x3x224x224", "convs", "predicted ms", "measured ms",
                                  "pred. error", "pred. speed-up", "speed-up", "merge vs linearize"]))
    print("(the table was measured earlier than this timing: a drifting machine shifts all measured ms "
          "alike, so compare the speed-ups)" if abs(base - original) > 0.1 * original else "")
    if plans:
        name = list(plans)[-1]
        print(f"\nplan at {name}:")
        print(plans[name].report.table())
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s, {torch.get_num_threads()} thread(s)")
    return results


def _predicted(plans: dict) -> float:
    return next(iter(plans.values())).report.predicted_original_ms if plans else float("nan")
