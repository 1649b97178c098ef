"""How long the three passes take on real architectures (2-core CPU target: < 2 s each).

    python benchmarks/passes_speed.py

Prints analyze / linearize / merge wall time for mobilenet_v2 and resnet50 at 224x224, for the
keep-all and drop-all plans, and the time of one eager forward pass of the same model as the
in-run baseline (the ratio says how many forward passes the passes cost).
"""
from __future__ import annotations

import time

import torch
import torchvision
from tabulate import tabulate

import fxmerge


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    rows = []
    for name in ("mobilenet_v2", "resnet50"):
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            model(x)
            _, forward = timed(lambda: model(x))
        analysis, t_analyze = timed(lambda: fxmerge.analyze(model, (x,)))
        for kind in ("keep_all", "drop_all"):
            plan = getattr(fxmerge.Plan, kind)(analysis)
            linear, t_lin = timed(lambda: fxmerge.linearize(model, plan))
            _, t_merge = timed(lambda: fxmerge.merge(linear, plan))
            total = t_analyze + t_lin + t_merge
            rows.append([name, kind, f"{plan.num_convs}/{analysis.num_layers}", f"{t_analyze:.2f}", f"{t_lin:.2f}",
                         f"{t_merge:.2f}", f"{total:.2f}", f"{total / forward:.0f}x"])
    print(tabulate(rows, headers=["model", "plan", "convs", "analyze s", "linearize s", "merge s", "total s",
                                  "total / one forward"]))
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
