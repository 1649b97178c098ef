"""ONNX Runtime: do a table's units add up to what the same convs cost inside the whole model?

    python benchmarks/ort_units_vs_model.py --table mbv2-ort-prune.json   # measured first if missing

For the folded original, the fastest depth-only plan and the two pruned reference plans of a
``prune_layers=True`` onnxruntime table (mobilenet_v2, 1x3x224x224, 1 thread): the whole
model is profiled by ONNX Runtime and, interleaved with it round by round, every conv unit it
runs is profiled exactly as ``OnnxRuntime.time_units`` profiles table units. Printed per plan:
the model's run, its conv kernels, the units' kernels (layout reorders left out, as the table
leaves them out) and the ratio. Kept activations are left out on both sides (ONNX Runtime
fuses them into the conv).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile

import torch
import torchvision

import fxmerge
from fxmerge.backends import BACKENDS
from fxmerge.cost import CostModel
from fxmerge.measure import pruned_reference_plans, unit_builders


def conv_keys(analysis, plan) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for chain, cp in zip(analysis.chains, plan.chains):
        for a, b in cp.segments():
            out.update(k for k in CostModel.segment_keys(chain, cp, a, b) if k.startswith("conv"))
    return out


def kernels(trace: str, skip: int) -> tuple[list[collections.Counter], list[float]]:
    """Per ``session.run``: milliseconds per op type, and the run's wall time."""
    with open(trace) as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per = [collections.Counter() for _ in runs]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            for k, (begin, end) in enumerate(runs):
                if begin <= e["ts"] <= end:
                    per[k][e["args"].get("op_name")] += e["dur"] / 1e3
                    break
    return per[skip:], [(end - begin) / 1e3 for begin, end in runs][skip:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="a prune_layers=True onnxruntime table (measured if missing)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    if os.path.exists(args.table):
        table = fxmerge.LatencyTable.load(args.table)
    else:
        table = fxmerge.LatencyTable.measure(model, (x,), backend="onnxruntime", prune_layers=True, path=args.table)
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits(), prune_layers=True)
    ort, builders = BACKENDS["onnxruntime"], unit_builders(analysis, x.dtype, "cpu", True)
    plans = {"folded original": fxmerge.Plan.fold_only(analysis),
             "depth-only, fastest": CostModel(analysis, table.ms).merge_where_faster(keep="none"),
             **pruned_reference_plans(analysis, table.ms)}
    tmp, warm = tempfile.mkdtemp(), 3
    for name, plan in plans.items():
        session, feeds = ort._session(fxmerge.merge(model, plan), (x,), fast=False, profile_prefix=f"{tmp}/model")
        keys = conv_keys(analysis, plan)
        units = {}
        for key in keys:
            module, inputs = builders[key]()
            units[key] = ort._session(module.eval(), inputs, fast=True, profile_prefix=f"{tmp}/unit")
        for _ in range(warm):
            session.run(None, feeds)
            for s, f in units.values():
                s.run(None, f)
        for _ in range(args.rounds):  # interleaved: the model, then every unit, round by round
            for _ in range(3):
                session.run(None, feeds)
            for s, f in units.values():
                for _ in range(3):
                    s.run(None, f)
        per, wall = kernels(session.end_profiling(), warm)
        model_conv = statistics.median(sum(v for op, v in p.items() if op in ("Conv", "FusedConv")) for p in per)
        unit_ms = 0.0
        for key, (s, _) in units.items():
            unit_per, _ = kernels(s.end_profiling(), warm)
            unit_ms += keys[key] * statistics.median(sum(v for op, v in p.items() if not op.startswith("Reorder"))
                                                     for p in unit_per)
        print(f"{name:20s} convs {plan.num_convs:3d} pruned {plan.num_pruned:2d} | model run {statistics.median(wall):6.2f} ms, "
              f"conv kernels {model_conv:6.2f} ms | units' kernels {unit_ms:6.2f} ms | in model / units "
              f"{model_conv / unit_ms:.2f}x", flush=True)


if __name__ == "__main__":
    main()
