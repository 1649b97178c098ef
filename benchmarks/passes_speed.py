"""How long the passes take, how much memory they need, and what they find, on the model zoos
users start from.

    python benchmarks/passes_speed.py                  # torchvision + timm (if installed) + a long chain
    python benchmarks/passes_speed.py --models fcn_resnet50,timm:xception41 --chains ""

For each model at 1x3x224x224 (untrained weights, eval mode): analyze, then merge the keep-all
plan (BatchNorms folded, every activation kept: the original function) and the drop-all plan
(the most merging the analysis allows: every droppable activation dropped, blocks as long as
the limits allow) — droppable activations, BatchNorms folded, convs before -> after, wall time
of each pass and peak memory, each against one eager forward pass of the same model measured
in the same run (the baseline: how many forward passes the passes cost in time, how many times
a forward pass's memory they need). Target: analyze + merge <= 5 s per model and plan on a
2-core machine, peak memory <= 2x a forward pass.

How memory is measured: every model runs in three fresh subprocesses of this script — one
forward pass, analyze + keep-all merge, analyze + drop-all merge — so no process inherits
another's allocations or allocator caches. Each reports its peak resident set size
(``VmHWM`` in ``/proc/self/status``, the kernel's high-water mark) minus its
resident size right after the imports (torch, torchvision, timm for its rows and fxmerge, the
same in every job), before the model is built. The model's own weights count in every column:
the forward pass holds weights and activations; the passes hold the weights, the private
copies analyze and merge trace, the merged weights (composed in float64) and the activations
of their shape-propagation forward passes. Before analyze, the pass processes run one forward
pass at 64x64 (a twelfth of the activations at 224x224), so first-call library set-up is not
charged to analyze, as in a user's process that has run the model; forward times are the best
of three after a warm-up.

Then the analysis alone on one long chain (L x [3x3 conv, BN, ReLU], 16 channels, 32x32):
the candidate blocks are grown one layer at a time, so time grows about as L^2 (target:
L = 120 in <= 1 s).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn
from tabulate import tabulate

TORCHVISION = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "resnet18", "resnet50", "regnet_y_400mf",
               "convnext_tiny", "resnext50_32x4d", "wide_resnet50_2", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
TIMM = ["mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_lite0",
        "resnet50d", "regnety_002", "darknet53", "convnext_atto", "repvgg_a0", "xception41"]
SEGMENTATION = ("deeplabv3_", "fcn_", "lraspp_")  # torchvision builders with a backbone to leave unloaded
JOBS = ("forward", "keep_all", "drop_all")
SIZE = 224
WARMUP_SIZE = 64


def timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cpu_timed(fn: Callable):
    """Wall and CPU seconds (all threads of this process): on a loaded machine the CPU time
    moves far less than the wall time, so before/after comparisons read both."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def build(name: str) -> nn.Module:
    """The model, untrained, in eval mode; nothing is downloaded (segmentation models would
    otherwise fetch their backbone's ImageNet weights)."""
    if name.startswith("timm:"):
        import timm

        import fxmerge

        model = timm.create_model(name[5:], pretrained=False).eval()
        return fxmerge.reparameterize(model) if name[5:].startswith(("repvgg", "mobileone", "fastvit")) else model
    import torchvision

    extra = {"weights_backbone": None} if name.startswith(SEGMENTATION) else {}
    return torchvision.models.get_model(name, weights=None, **extra).eval()


def batchnorms(model: nn.Module) -> int:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) for m in model.modules())


def peak_mb() -> float:
    """This process's peak resident set size so far, in MB: the kernel's high-water mark of its
    own memory (``VmHWM``; ``ru_maxrss`` would start from the parent's, kept across ``exec``)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


# --------------------------------------------------------------------------- one job, in a child


def run_job(job: str, name: str) -> dict:
    """One measurement in this (fresh) process: a forward pass or analyze + one merge."""
    import torchvision  # noqa: F401  every job imports the same libraries before its base

    import fxmerge  # noqa: F401

    if name.startswith("timm:"):
        import timm  # noqa: F401
    # fxmerge imports its modules on first use of a public name: do it here, so neither the
    # import time nor the modules' memory is charged to analyze (as in a process that used them)
    fxmerge.analyze, fxmerge.merge, fxmerge.Plan  # noqa: B018
    base = peak_mb()  # right after the imports: the interpreter, torch, torchvision, timm, fxmerge
    model, x = build(name), torch.randn(1, 3, SIZE, SIZE)
    if job == "forward":
        return _forward_job(model, x, base)
    return _passes_job(job, model, x, base)


@torch.no_grad()
def _forward_job(model: nn.Module, x: torch.Tensor, base: float) -> dict:
    model(x)  # a segmentation model returns a dict: nothing here reads the output
    seconds = min(timed(lambda: model(x))[1] for _ in range(3))
    return {"forward_s": seconds, "peak_mb": peak_mb() - base}


def _passes_job(job: str, model: nn.Module, x: torch.Tensor, base: float) -> dict:
    import fxmerge

    with torch.no_grad():
        model(torch.randn(1, 3, WARMUP_SIZE, WARMUP_SIZE))
    analysis, t_analyze, cpu_analyze = cpu_timed(lambda: fxmerge.analyze(model, (x,)))
    plan = getattr(fxmerge.Plan, job)(analysis)
    _, t_merge, cpu_merge = cpu_timed(lambda: fxmerge.merge(model, plan))
    return {
        "analyze_s": t_analyze, "merge_s": t_merge, "analyze_cpu_s": cpu_analyze, "merge_cpu_s": cpu_merge,
        "peak_mb": peak_mb() - base, "load": os.getloadavg()[0],
        "convs": analysis.num_layers, "convs_after": plan.num_convs,
        "folded": sum(1 for c in analysis.chains for layer in c.layers if layer.bn),
        "batchnorms": batchnorms(model),
        "droppable": sum(len(c.droppable) for c in analysis.chains),
        "activations": sum(len(c.activations) for c in analysis.chains),
    }


# --------------------------------------------------------------------------- the parent


def measure(name: str, threads: int, timeout: float) -> dict[str, dict | None]:
    """The three jobs of one model, each in a fresh subprocess (None: it failed or timed out)."""
    out: dict[str, dict | None] = {}
    for job in JOBS:
        cmd = [sys.executable, __file__, "--job", job, "--models", name, "--threads", str(threads)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  {name} {job}: timed out after {timeout:.0f} s", flush=True)
            out[job] = None
            continue
        if done.returncode:
            print(f"  {name} {job}: failed\n{done.stderr[-2000:]}", flush=True)
            out[job] = None
            continue
        out[job] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def zoo_row(name: str, jobs: dict[str, dict | None]) -> list:
    forward, keep, drop = (jobs[j] for j in JOBS)
    info = keep or drop
    row = [name]
    if info:
        row += [f"{info['droppable']}/{info['activations']}", f"{info['folded']}/{info['batchnorms']}",
                f"{info['convs']} -> {keep['convs_after'] if keep else '?'} / {drop['convs_after'] if drop else '?'}"]
    else:
        row += ["?"] * 3
    row.append(f"{keep['analyze_s']:.2f}" if keep else "-")
    for res in (keep, drop):
        row.append(f"{res['merge_s']:.2f}" if res else "timeout/failed")
    for res in (keep, drop):
        total = res["analyze_s"] + res["merge_s"] if res else None
        row.append(f"{total:.2f} ({total / forward['forward_s']:.0f}x)" if res and forward else "-")
    row.append(f"{forward['peak_mb']:.0f}" if forward else "-")
    for res in (keep, drop):
        row.append(f"{res['peak_mb']:.0f} ({res['peak_mb'] / forward['peak_mb']:.2f}x)" if res and forward else "-")
    return row


HEADERS = ["model (224x224)", "droppable acts", "BN folded", "convs: keep-all / drop-all", "analyze s",
           "keep-all merge s", "drop-all merge s", "analyze+keep s (/ fwd)", "analyze+drop s (/ fwd)",
           "fwd peak MB", "keep peak MB (/ fwd)", "drop peak MB (/ fwd)"]


def chain_row(length: int) -> list:
    import fxmerge

    layers = []
    for _ in range(length):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    model, x = nn.Sequential(*layers).eval(), torch.randn(1, 16, 32, 32)
    analysis, seconds = timed(lambda: fxmerge.analyze(model, (x,)))
    return [length, sum(len(c.valid_blocks) for c in analysis.chains), f"{seconds:.2f}"]


def default_models() -> list[str]:
    names = list(TORCHVISION)
    try:
        import timm  # noqa: F401

        names += [f"timm:{n}" for n in TIMM]
    except ImportError:
        print("(timm not installed: pip install timm for the timm rows)")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated; torchvision names or timm:NAME (default: all)")
    parser.add_argument("--chains", default="30,60,120", help="lengths of the long-chain analysis benchmark")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed to each subprocess")
    parser.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)  # a child: one job, JSON on stdout
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    if args.job:
        print(json.dumps(run_job(args.job, args.models)))
        return
    rows = []
    for name in args.models.split(",") if args.models else default_models():
        rows.append(zoo_row(name, measure(name, args.threads, args.timeout)))
        print(f"  {rows[-1][0]}: keep-all {rows[-1][7]} s, drop-all {rows[-1][8]} s", flush=True)
    print(tabulate(rows, headers=HEADERS, disable_numparse=True))
    print()
    if args.chains:
        print(tabulate([chain_row(int(n)) for n in args.chains.split(",")],
                       headers=["chain length L", "candidate blocks", "analyze s"]))
    print(f"\nthreads: {torch.get_num_threads()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
