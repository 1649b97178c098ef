"""Speed of the DP with pruning options (LayerMerge) on a measured mobilenet_v2 table.

    python benchmarks/prune_dp_speed.py [table.json]

The table (default: ``benchmarks/results/mobilenet_v2-eager-prune.json``, measured by
``benchmarks/speedup.py --prune-layers --save-tables benchmarks/results`` at 1x3x224x224) holds
the depth-only specs and every pruning option's. Timed, median of 7 (the analysis, built once,
is not): the whole Pareto frontier and one budget (0.6), depth-only (the baseline) and with
``prune_layers=True``, through ``fxmerge.frontier`` / ``fxmerge.plan`` (building the DP's
inputs from the table included), and the bare stage-2 solve (``passes.dp.frontier``) on the
same inputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import fxmerge
from fxmerge.passes import dp
from fxmerge.planner import Planner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_speed import timed as dp_timed  # noqa: E402

DEFAULT = Path(__file__).resolve().parent / "results" / "mobilenet_v2-eager-prune.json"


def timed(fn):
    return dp_timed(fn, repeats=7)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    table = fxmerge.LatencyTable.load(path)
    torch.set_num_threads(table.fingerprint.get("threads", 1))  # the table's: planning warns on another count
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 224, 224)
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits(), prune_layers=True)
    options = sum(len(o) for c in analysis.chains for o in c.options.values())
    rows = []
    for prune in (False, True):
        kind = "with pruning" if prune else "depth-only"
        front, front_ms = timed(lambda: fxmerge.frontier(model, table, example_inputs=(x,), analysis=analysis,
                                                         prune_layers=prune))
        _, one_ms = timed(lambda: fxmerge.plan(model, table, budget=0.6, example_inputs=(x,),
                                               analysis=analysis, prune_layers=prune))
        problem = Planner(table, analysis, None, None, prune).problem
        _, bare_ms = timed(lambda: dp.frontier(problem.times, problem.importance, problem.length,
                                               candidates=problem.candidates, position_costs=problem.position_costs,
                                               options=problem.options))
        segments = len(problem.importance) + sum(len(v) for v in problem.options.values())
        rows.append([kind, segments, len(front), f"{front_ms:.1f}", f"{bare_ms:.1f}", f"{one_ms:.1f}"])
    print(f"{path.name}: mobilenet_v2, {analysis.num_layers} layers, {options} pruning options, "
          f"{len(table)} table entries")
    print(tabulate(rows, headers=["DP", "segment choices", "frontier plans", "fxmerge.frontier ms",
                                  "dp.frontier ms", "fxmerge.plan ms (one budget)"]))
    print(f"with pruning / depth-only, fxmerge.frontier: {float(rows[1][3]) / float(rows[0][3]):.2f}x the time")


if __name__ == "__main__":
    main()
