"""Every ultralytics family and task through fxmerge's front door, with no extra arguments.

    python benchmarks/ultralytics_zoo.py                 # all configs below
    python benchmarks/ultralytics_zoo.py yolov10n.yaml   # some of them

For each (random init, BatchNorm statistics calibrated so outputs depend on the input; float64;
128x128, 64x64 for classifiers): analyze(model, (x,)), Plan.drop_all merge vs linearize,
Plan.keep_all vs the original (max relative error over every output tensor), how much another
input changes the output, the same chains from an ExportedProgram, and the merged model
exported again. fx cannot trace any of them (the layer loop): each is captured by torch.export.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

import fxmerge

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import randomize  # noqa: E402  (the suite's BatchNorm calibration, not a copy)

F64 = torch.float64
CASES = [("ClassificationModel", "yolov8n-cls.yaml"), ("SegmentationModel", "yolov8n-seg.yaml"),
         ("PoseModel", "yolov8n-pose.yaml"), ("OBBModel", "yolov8n-obb.yaml"), ("DetectionModel", "yolov5nu.yaml"),
         ("DetectionModel", "yolov10n.yaml"), ("DetectionModel", "yolov9t.yaml"),
         ("SegmentationModel", "yolo11n-seg.yaml"), ("DetectionModel", "yolov3-tinyu.yaml"),
         ("DetectionModel", "yolov6n.yaml"), ("ClassificationModel", "yolo11n-cls.yaml")]


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in tensors(item)] if isinstance(out, (list, tuple)) else []


def relative_error(a, b) -> float:
    return max(float((x - y).abs().max() / max(float(y.abs().max()), 1e-30)) for x, y in zip(tensors(a), tensors(b)))


def build(kind: str, cfg: str) -> tuple[torch.nn.Module, torch.Tensor]:
    from ultralytics.nn import tasks  # a benchmark extra, never a requirement

    torch.manual_seed(0)
    size = 64 if "cls" in cfg else 128
    model = randomize(getattr(tasks, kind)(cfg, verbose=False), calibrate_on=torch.randn(2, 3, size, size))
    return model.double().eval(), torch.randn(1, 3, size, size, dtype=F64)


def structure(analysis: fxmerge.Analysis) -> list:
    """The chains' convs, activation kinds by position, droppable positions and skips (an
    ExportedProgram names a shared activation module's calls by op: ``silu_9``, not
    ``model_0_act_9``)."""
    return [([layer.conv for layer in c.layers], {p: kind for p, (_, kind) in c.activations.items()},
             sorted(c.droppable), [(k.source, k.target) for k in c.skips]) for c in analysis.chains]


@torch.no_grad()
def check(kind: str, cfg: str) -> str:
    model, x = build(kind, cfg)
    analysis = fxmerge.analyze(model, (x,))
    drop, keep = fxmerge.Plan.drop_all(analysis), fxmerge.Plan.keep_all(analysis)
    merged = fxmerge.merge(model, drop)
    exact = relative_error(merged(x), fxmerge.linearize(model, drop)(x))
    lossless = relative_error(fxmerge.merge(model, keep)(x), model(x))
    depends = relative_error(model(torch.randn_like(x)), model(x))
    program = fxmerge.analyze(torch.export.export(model, (x,)), (x,))
    same = structure(program) == structure(analysis)
    torch.export.export(merged, (x,))  # raises if the merged model does not export
    junctions = sum(layer.junction for c in analysis.chains for layer in c.layers)
    return (f"capture={analysis.capture} convs {analysis.num_layers}->{drop.num_convs} junctions={junctions} "
            f"unmergeable={len(analysis.unmergeable)} merge-vs-lin {exact:.1e} keep-vs-orig {lossless:.1e} "
            f"dep {depends:.1e} ep-same {same} reexport ok")


def main() -> None:
    wanted = set(sys.argv[1:])
    for kind, cfg in CASES:
        if wanted and cfg not in wanted:
            continue
        start = time.perf_counter()
        try:
            print(f"OK {kind} {cfg}: {check(kind, cfg)}  {time.perf_counter() - start:.0f}s", flush=True)
        except Exception as exc:  # report and go on: one config's failure says nothing of the others
            print(f"FAIL {kind} {cfg}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)


if __name__ == "__main__":
    main()
