"""What depth compression buys on ultralytics YOLO detectors, on the runtimes they ship with.

    YOLO_OFFLINE=1 python benchmarks/yolo.py                       # yolov8n, yolo11n; eager and onnxruntime; 320
    YOLO_OFFLINE=1 python benchmarks/yolo.py --models yolov8n --backends onnxruntime --size 640

For each model (built from its yaml config, random init: no weights download) and backend, at
1 thread: capture (fx cannot trace YOLO: the front door falls back to torch.export), measure a
fresh latency table (its build time reported), the frontier, and plans at each feasible budget
with ``verify=True``; then the folded original and every plan are timed interleaved in one
run. Reported per plan: predicted and measured speed-up, verified rounds. Exactness first: in
float64, drop-all merge vs linearize on the detector's output (boxes and class scores),
keep-all vs the original.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tabulate import tabulate

import fxmerge
from fxmerge.backends import compare_latency

os.environ.setdefault("YOLO_OFFLINE", "1")
CONFIGS = {"yolov8n": "yolov8n.yaml", "yolo11n": "yolo11n.yaml"}


def build(name: str) -> torch.nn.Module:
    from ultralytics.nn.tasks import DetectionModel  # a benchmark extra, never a requirement

    torch.manual_seed(0)
    return DetectionModel(CONFIGS[name], verbose=False).eval()


@torch.no_grad()
def calibrate(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BatchNorm statistics of ``x`` flowing through the net (one train-mode pass, as training
    leaves them): with a fresh init's statistics (mean 0, var 1) the signal fades through 60
    layers and the output hardly depends on the image, which would make any two nets agree."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics
    model.train()(x)
    return model.eval()


def _boxes_and_scores(out):
    """The detector's decoded output ([batch, 4 + classes, anchors]) from its eval-mode tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def exactness(name: str, size: int) -> dict:
    model = build(name).double()
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    calibrate(model, torch.rand(2, 3, size, size, dtype=torch.float64))
    analysis = fxmerge.analyze(model, (x,))
    drop, keep = fxmerge.Plan.drop_all(analysis), fxmerge.Plan.keep_all(analysis)
    with torch.no_grad():
        want = _boxes_and_scores(model(x))
        merged = _boxes_and_scores(fxmerge.merge(model, drop)(x))
        linear = _boxes_and_scores(fxmerge.linearize(model, drop)(x))
        kept = _boxes_and_scores(fxmerge.merge(model, keep)(x))
        other = _boxes_and_scores(model(torch.rand_like(x)))

    def rel(a, b):  # boxes (pixels) and class scores (0..1) each on its own scale
        return max(float((a[:, s] - b[:, s]).abs().max() / b[:, s].abs().max()) for s in (slice(0, 4), slice(4, None)))

    def depends(a, b):  # the smaller of the two parts' changes for another image
        return min(float((a[:, s] - b[:, s]).abs().max() / b[:, s].abs().max()) for s in (slice(0, 4), slice(4, None)))

    return {"capture": analysis.capture, "convs": analysis.num_layers, "convs after drop-all": drop.num_convs,
            "merge vs linearize": rel(merged, linear), "keep-all vs original": rel(kept, want),
            "output change for another image": depends(other, want),
            "junctions": sum(l.junction for c in analysis.chains for l in c.layers)}


def timings(name: str, backend: str, size: int, budgets: list[float], points: int) -> tuple[list, dict]:
    model = build(name)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    calibrate(model, torch.rand(2, 3, size, size))
    start = time.perf_counter()
    table = fxmerge.LatencyTable.measure(model, (x,), backend=backend)
    table_s = time.perf_counter() - start
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits())
    frontier = fxmerge.frontier(model, table, example_inputs=(x,), analysis=analysis, points=points)
    modules = {"original": fxmerge.merge(model, fxmerge.Plan.fold_only(analysis))}
    plans, notes = {}, {}
    for k, p in enumerate(frontier):
        plans[f"frontier {k}"] = p
    for budget in budgets:
        label = f"{budget:g} verified"
        try:
            plans[label] = fxmerge.plan(model, table, budget=budget, example_inputs=(x,), analysis=analysis,
                                        verify=True)
        except (fxmerge.InfeasibleBudgetError, fxmerge.VerificationError) as exc:
            notes[label] = str(exc).split(". ")[0]
    for label, p in plans.items():
        modules[label] = fxmerge.merge(model, p)
    measured = compare_latency(modules, (x,), backend=backend)
    base = measured["original"].ms
    original_ms = frontier[0].report.original_ms
    rows = [[name, backend, "original (folded)", analysis.num_layers, f"{original_ms:.2f}", f"{base:.2f}", "1.00x",
             "1.00x", f"table {table_s:.0f} s"]]
    record = {"table_s": table_s, "original_ms": base, "plans": {}}
    for label, p in plans.items():
        pred, meas = p.report.predicted_planned_ms, measured[label].ms
        rounds = len(p.report.verify) if p.report.verify else 0
        rows.append([name, backend, label, p.num_convs, f"{pred:.2f}", f"{meas:.2f}", f"{original_ms / pred:.2f}x",
                     f"{base / meas:.2f}x", f"{rounds} round(s)" if rounds else ""])
        record["plans"][label] = {"predicted_ms": pred, "measured_ms": meas, "convs": p.num_convs,
                                  "predicted_speedup": original_ms / pred, "speedup": base / meas, "rounds": rounds}
    rows += [[name, backend, label, "-", "-", "-", "-", "-", note] for label, note in notes.items()]
    return rows, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov8n,yolo11n")
    parser.add_argument("--backends", default="eager,onnxruntime")
    parser.add_argument("--size", type=int, default=320, help="input height and width (640 is ultralytics' default)")
    parser.add_argument("--budgets", default="0.9,0.8")
    parser.add_argument("--points", type=int, default=4, help="frontier plans timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every number to this file too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names, budgets = args.models.split(","), [float(b) for b in args.budgets.split(",")]
    records: dict = {"exactness": {}, "timings": {}}
    for name in names:
        records["exactness"][name] = exactness(name, args.size)
        print(name, json.dumps(records["exactness"][name]), flush=True)
    rows = []
    headers = ["model", "backend", "plan", "convs", "predicted ms", "measured ms", "pred. speed-up", "speed-up", ""]
    for backend in args.backends.split(","):
        for name in names:
            new, records["timings"][f"{name}/{backend}"] = timings(name, backend, args.size, budgets, args.points)
            rows += new
            print(tabulate(rows, headers=headers), flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), input 1x3x{args.size}x{args.size}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
