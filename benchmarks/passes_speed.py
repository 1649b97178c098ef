"""How long the passes take, and what they find, on the model zoos users start from.

    python benchmarks/passes_speed.py                  # torchvision + timm (if installed) + a long chain
    python benchmarks/passes_speed.py --models resnet50,timm:darknet53

For each model at 1x3x224x224 (untrained weights, eval mode): analyze, then merge the drop-all
plan (the most merging the analysis allows: every droppable activation dropped, blocks as long
as the limits allow) — droppable activations, BatchNorms folded, convs before -> after, and
wall time of each pass, against one eager forward pass of the same model timed in the same
run (the baseline: how many forward passes the passes cost). Target: analyze + merge <= 2 s
per model on a 2-core machine.

Then the analysis alone on one long chain (L x [3x3 conv, BN, ReLU], 16 channels, 32x32):
the candidate blocks are grown one layer at a time, so time grows about as L^2 (target:
L = 120 in <= 1 s).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn as nn
import torchvision
from tabulate import tabulate

import fxmerge

TORCHVISION = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "resnet18", "resnet50", "regnet_y_400mf",
               "convnext_tiny"]
TIMM = ["mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_lite0",
        "resnet50d", "regnety_002", "darknet53", "convnext_atto", "repvgg_a0"]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def build(name: str) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False).eval()
        return fxmerge.reparameterize(model) if name[5:].startswith(("repvgg", "mobileone", "fastvit")) else model
    return torchvision.models.get_model(name, weights=None).eval()


def batchnorms(model: nn.Module) -> int:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) for m in model.modules())


def zoo_row(name: str, x: torch.Tensor) -> list:
    model = build(name)
    with torch.no_grad():
        model(x)
        _, forward = timed(lambda: model(x))
    analysis, t_analyze = timed(lambda: fxmerge.analyze(model, (x,)))
    plan = fxmerge.Plan.drop_all(analysis)
    _, t_merge = timed(lambda: fxmerge.merge(model, plan))
    total = t_analyze + t_merge
    folded = sum(1 for c in analysis.chains for layer in c.layers if layer.bn)
    droppable = sum(len(c.droppable) for c in analysis.chains)
    activations = sum(len(c.activations) for c in analysis.chains)
    left = f"{len(analysis.unmergeable)}" if analysis.unmergeable else "-"
    return [name, f"{droppable}/{activations}", f"{folded}/{batchnorms(model)}", f"{analysis.num_layers} -> {plan.num_convs}",
            left, f"{t_analyze:.2f}", f"{t_merge:.2f}", f"{total:.2f}", f"{total / forward:.0f}x"]


def chain_row(length: int) -> list:
    layers = []
    for _ in range(length):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    model, x = nn.Sequential(*layers).eval(), torch.randn(1, 16, 32, 32)
    analysis, seconds = timed(lambda: fxmerge.analyze(model, (x,)))
    return [length, sum(len(c.valid_blocks) for c in analysis.chains), f"{seconds:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated; torchvision names or timm:NAME (default: all)")
    parser.add_argument("--chains", default="30,60,120", help="lengths of the long-chain analysis benchmark")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.models:
        names = args.models.split(",")
    else:
        names = list(TORCHVISION)
        try:
            import timm  # noqa: F401

            names += [f"timm:{n}" for n in TIMM]
        except ImportError:
            print("(timm not installed: pip install timm for the timm rows)")
    x = torch.randn(1, 3, 224, 224)
    rows = []
    for name in names:
        rows.append(zoo_row(name, x))
        print(f"  {rows[-1][0]}: {rows[-1][7]} s", flush=True)
    print(tabulate(rows, headers=["model (224x224)", "droppable acts", "BN folded", "convs (drop-all)",
                                  "convs left alone", "analyze s", "merge s", "total s", "total / one forward"]))
    print()
    if args.chains:
        print(tabulate([chain_row(int(n)) for n in args.chains.split(",")],
                       headers=["chain length L", "candidate blocks", "analyze s"]))
    print(f"\nthreads: {torch.get_num_threads()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
