"""Cost of capture: analyze + drop-all merge of a model fx cannot trace (ultralytics yolov8n,
captured by torch.export and lowered) against torchvision models of similar size that fx traces.

    python benchmarks/capture_cost.py                       # yolov8n vs mobilenet_v2, efficientnet_b0
    python benchmarks/capture_cost.py --size 320 --rounds 3 --profile capture.prof

Every model at 1x3xSIZExSIZE (640 by default: YOLO's deployment size; the same for all),
untrained weights, eval mode, ``torch.set_num_threads(--threads)``. One run: a cold round
(the first analyze + merge of each model in this process: torch.export's first call imports
and sets up dynamo, sympy and the fake-tensor machinery) and then ``--rounds`` warm rounds,
the models interleaved within each round so a busy machine's load falls on all alike; warm
numbers are medians, with the load average printed.

What is timed, wall and CPU (all threads of this process): ``fxmerge.analyze(model, (x,))``,
``fxmerge.Plan.drop_all`` and ``fxmerge.merge(model, plan)`` (merge captures the model again
to check the plan's structure). The time inside capture (``passes.tracing.capture_graph``,
called by analyze and by merge) is split out by wrapping, for this process only, the
functions it calls: the fx attempt (``tracing.trace``), the warm-up forward (``capture._warmed_copy``),
``torch.export`` (``capture._export``), the lowering (``capture._Lowering.run``) and the
check against the model (``capture._check_same``). "rest" is analyze + merge minus capture:
canonicalization, shape propagation, the analysis, the rewrite and composing the kernels.

Which fx model: yolov8n has 3.2 M parameters and 8.7 GFLOPs (4.4 G multiply-adds) at 640;
the script prints parameters, conv multiply-adds and conv count of each model it runs.
mobilenet_v2 is closest in parameters (3.5 M) and in conv count (52 vs 64; capture and
analysis scale with the graph); efficientnet_b0 (5.3 M, 81 convs) is closest in
multiply-adds at 640 (3.2 G vs 2.5 G for mobilenet_v2). resnet18 (11.7 M, 15 G) and
mobilenet_v3_large (5.5 M, 1.8 G) are further on both. Acceptance (issue 15, point 7):
yolov8n's analyze + drop-all merge within 2x of the fx model's.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import statistics
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn
from tabulate import tabulate

import fxmerge
from fxmerge.passes import capture, tracing

PHASES = ("fx attempt", "warm-up forward", "torch.export", "lowering", "check")


def yolov8n() -> nn.Module:
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", verbose=False).eval()


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval()
    return build


BUILDERS = {"yolov8n": yolov8n, **{n: torchvision_model(n) for n in
                                    ("mobilenet_v2", "efficientnet_b0", "mobilenet_v3_large", "resnet18")}}


class Clock:
    """Wall and CPU seconds spent in named phases (a phase nested in another counts in both)."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - wall
                self.cpu[name] += time.process_time() - cpu
        return timed


@contextmanager
def phases(clock: Clock):
    """Times capture and its parts by wrapping the functions capture_graph calls (restored after)."""
    patched = [(tracing, "capture_graph", "capture"), (tracing, "trace", "fx attempt"),
               (capture, "_warmed_copy", "warm-up forward"), (capture, "_export", "torch.export"),
               (capture._Lowering, "run", "lowering"), (capture, "_check_same", "check")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patched]
    try:
        for owner, attr, name in patched:
            setattr(owner, attr, clock.wrap(name, getattr(owner, attr)))
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def one_run(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    clock = Clock()
    with phases(clock):
        analysis = clock.wrap("analyze", fxmerge.analyze)(model, (x,))
        plan = fxmerge.Plan.drop_all(analysis)
        merged = clock.wrap("merge", fxmerge.merge)(model, plan)
    total, total_cpu = clock.wall["analyze"] + clock.wall["merge"], clock.cpu["analyze"] + clock.cpu["merge"]
    out = {"total": total, "total_cpu": total_cpu, "analyze": clock.wall["analyze"], "merge": clock.wall["merge"],
           "capture": clock.wall["capture"], "capture_cpu": clock.cpu["capture"],
           "rest": total - clock.wall["capture"], "rest_cpu": total_cpu - clock.cpu["capture"],
           **{p: clock.wall[p] for p in PHASES}, **{p + " cpu": clock.cpu[p] for p in PHASES}, "by": tracing.captured_by(merged) if hasattr(merged, "meta") else "?",
           "convs": analysis.num_layers, "convs_after": plan.num_convs}
    return out


def size_of(model: nn.Module, x: torch.Tensor) -> tuple[float, float, int]:
    """Parameters (M), conv multiply-adds at x (G), number of convs."""
    macs, convs = [0], [0]

    def hook(m, inp, out):
        macs[0] += out.numel() * m.in_channels // m.groups * m.weight[0, 0].numel()
        convs[0] += 1
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(p.numel() for p in model.parameters()) / 1e6, macs[0] / 1e9, convs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov8n,mobilenet_v2,efficientnet_b0",
                        help=f"comma-separated, the first is compared with the others; of {', '.join(BUILDERS)}")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds after the cold one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", help="write a cProfile of one warm analyze + merge of the first model here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    x = torch.randn(1, 3, args.size, args.size)
    models = {n: BUILDERS[n]() for n in names}
    sizes = {n: size_of(models[n], x) for n in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    loads = []
    for r in range(args.rounds + 1):
        for n in names:
            loads.append(os.getloadavg()[0])
            runs[n].append(one_run(models[n], x))
            print(f"  round {r} {n}: {runs[n][-1]['total']:.2f} s (capture {runs[n][-1]['capture']:.2f} s, "
                  f"by {runs[n][-1]['by']}; load {loads[-1]:.1f})", flush=True)
    report(names, sizes, runs, args)
    print(f"load average (1 min) at each start: min {min(loads):.1f}, median {statistics.median(loads):.1f}, "
          f"max {max(loads):.1f}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    if args.profile:
        cProfile.runctx("one_run(model, x)", globals(), {"one_run": one_run, "model": models[names[0]], "x": x},
                        args.profile)
        print(f"profile of {names[0]}: {args.profile} (python -m pstats)")


def report(names: list[str], sizes: dict, runs: dict[str, list[dict]], args) -> None:
    rows = []
    for n in names:
        cold, warm = runs[n][0], runs[n][1:]
        med = {k: statistics.median(r[k] for r in warm) for k in warm[0] if isinstance(warm[0][k], float)}
        params, macs, convs = sizes[n]
        rows.append([n, warm[0]["by"], f"{params:.2f}", f"{macs:.2f}", f"{convs} -> {warm[0]['convs_after']}",
                     f"{cold['total']:.2f}", f"{med['total']:.2f}", f"{med['total_cpu']:.2f}",
                     f"{med['analyze']:.2f}", f"{med['merge']:.2f}",
                     f"{med['capture']:.2f} ({med['capture'] / med['total']:.0%})", f"{med['rest']:.2f}",
                     " / ".join(f"{med[p]:.2f}" for p in PHASES),
                     " / ".join(f"{med[p + ' cpu']:.2f}" for p in PHASES)])
    print(f"\n1x3x{args.size}x{args.size}, analyze + Plan.drop_all merge; warm = median of {args.rounds} rounds")
    print(tabulate(rows, headers=["model", "captured by", "params M", "conv GMACs", "convs", "cold s", "warm s",
                                  "warm CPU s", "analyze s", "merge s", "capture s (share)", "rest s",
                                  " / ".join(PHASES) + " s", "the same, CPU s"], disable_numparse=True))
    first = names[0]
    ratios = []
    for n in names[1:]:
        for key, label in (("total", "wall"), ("total_cpu", "CPU"), ("rest", "rest (wall)")):
            a = statistics.median(r[key] for r in runs[first][1:])
            b = statistics.median(r[key] for r in runs[n][1:])
            ratios.append([f"{first} / {n}", label, f"{a:.2f} / {b:.2f}", f"{a / b:.2f}x"])
        ratios.append([f"{first} / {n}", "cold (wall)", f"{runs[first][0]['total']:.2f} / {runs[n][0]['total']:.2f}",
                       f"{runs[first][0]['total'] / runs[n][0]['total']:.2f}x"])
    print()
    print(tabulate(ratios, headers=["ratio", "of", "seconds", "ratio (target <= 2x)"], disable_numparse=True))


if __name__ == "__main__":
    main()
