"""Depth compression (fxmerge) side by side with channel pruning (Torch-Pruning), and both together.

    pip install -e ".[bench]"
    python benchmarks/vs_channel_pruning.py --seeds 3            # MNIST: accuracy at matched measured speed-up
    python benchmarks/vs_channel_pruning.py --latency-224        # mobilenet_v2, EfficientNet-Lite0: latency only
    python benchmarks/vs_channel_pruning.py --quick              # smoke test of either mode (add --latency-224)

**MNIST mode** (default). Per seed, on ``examples/mnist_pipeline.py``'s split, trained net and
fine-tuning recipe (imported from there, not copied: ``setup_seed``, ``SeedSetup.tune``,
``plans_for``), three families of compressed nets, each linearized/pruned from the same trained
net and fine-tuned once with the same epochs and recipe (``--kd``: all with distillation):

* ``depth``: fxmerge's frontier with uniform importance (``--points`` plans between
  ``--min-budget`` and ``--max-budget`` of the original's predicted latency), exactly the
  pipeline's ``uniform`` strategy. Uniform, because the pipeline's 3-seed run
  (``benchmarks/results/mnist/output.txt``, depth-only) found measured (fine-tune) importance
  no better than uniform on this net at any matched speed-up (paired differences -0.4 to +0.2
  point), and because uniform needs no estimation: the "both" family
  can then plan every pruned net the same way without a second importance run per pruned net.
* ``channels``: Torch-Pruning's ``BasePruner`` at each of ``--ratios`` with each of
  ``--criteria`` (``magnitude``: ``GroupMagnitudeImportance(p=2)``, its documented default;
  ``taylor``: ``GroupTaylorImportance``, gradients of the cross-entropy on ``--taylor-batches``
  training batches), local (per-layer) ratios, ``round_to=--round-to``, the classifier left
  unpruned (``ignored_layers``). Deployed with BatchNorm folded (``Plan.fold_only``), like the
  original it is timed against.
* ``both``: the pruned nets at ``--both-ratios`` (criteria ``--both-criteria``), each with a
  latency table of its own (measured once per pruned architecture and shared by every seed and
  criterion: local ratios fix the shapes; its cost in seconds is reported) and its own uniform
  frontier: fxmerge plans the remaining budget, from ``--max-budget`` down to ``--min-budget``
  of the *pruned* net's latency.

Every deployed net is timed in one session, interleaved with the BatchNorm-folded original
(``fxmerge.backends.compare_latency``, batch ``--batch``, ``--threads`` threads) together with
``--copies`` copies of that original: the copies' measured speed-ups (ideally 1.00x) are the
timing noise. Nets with the same architecture (code and tensor shapes) are timed once.

A family's curve, per seed: the fine-tuned original at 1.00x, then its nets that no other net
of the family beats on the *holdout* split (500 digits: at least as fast and at least as
accurate there, the original included as a rival); test accuracy is interpolated along it at matched measured speed-ups. So a
family with several variants (two criteria, several pruning ratios) is judged by what a user
picking on held-out data would get, never by the test split. Each variant's own curve (all its
nets, no selection) is reported too. Mean +- std over seeds; differences paired by seed. The
run ends with one line, at the largest speed-up every family reaches in every seed:

    summary: at <S>x measured: depth <a> ± <s> %, channels <b> ± <s> %, both <c> ± <s> % (N seeds)

**Latency mode** (``--latency-224``): the same three families on torchvision mobilenet_v2
(untrained) and the pretrained EfficientNet-Lite0 at 1x3x224x224, for latency alone (no
labelled data, so no fine-tuning and one criterion: with local ratios the shapes, so the
latency, do not depend on it), on each of ``--backends`` (a table per model, pruned net and
backend; ``--plan-backend eager`` plans every backend's nets on the eager tables instead, so the
same nets are timed on each runtime and no table per backend is measured). Reported per net: convs, multiply-adds and parameters of the deployed net, measured
ms and speed-up, and the speed-up per unit of MAC reduction (where it falls far below 1, cutting
more stops paying on this CPU). It is a mode of this script, not a second one, so that both
modes build the families with the same functions (pruning, tables, frontiers, timing, noise).

Everything long is saved under ``--out`` and resumed: latency tables (per model and pruned
architecture, resumed mid-measurement too), each seed's trained weights, every fine-tuned net's
accuracies, one deployed module per architecture and the timings (``--retime`` times again).
A different configuration in the same ``--out`` is refused.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import fxmerge
from fxmerge.backends import compare_latency

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import mnist_pipeline as pipeline  # noqa: E402
from repro import Strategy, common_range, interpolate, mean_std, paired, pm, write_json  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # a benchmark extra, never a requirement of fxmerge
    tp = None

CRITERIA = ("magnitude", "taylor")
FAMILIES = ("depth", "channels", "both")
UNIFORM = Strategy("uniform", None)


def log(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------- shared by both modes


def prune_channels(model: nn.Module, x: torch.Tensor, ratio: float, criterion: str, round_to: int | None,
                   grad_batches: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of every prunable channel group removed by Torch-Pruning
    (local ratios, ``round_to``), the classifiers (``nn.Linear``) left unpruned; ``taylor`` first
    accumulates the gradients of the cross-entropy over ``grad_batches``. Plain modules out."""
    model = copy.deepcopy(model).eval()
    importance = {"magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
                  "taylor": lambda: tp.importance.GroupTaylorImportance()}[criterion]()
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.BasePruner(model, x, importance=importance, pruning_ratio=ratio, ignored_layers=ignored,
                                  round_to=round_to)
    if criterion == "taylor":
        if not grad_batches:
            raise ValueError("taylor importance needs labelled batches")
        model.zero_grad()
        for inputs, targets in grad_batches:
            F.cross_entropy(model(inputs), targets).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def fold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` with its BatchNorms folded and nothing else changed (how the original, and every
    channel-pruned net, is deployed and timed)."""
    return fxmerge.merge(model, fxmerge.Plan.fold_only(fxmerge.analyze(model, (x,)))).eval()


def arch_key(module: nn.Module) -> str:
    """Same key, same architecture: the module's printout (code and submodules) and the shape
    and dtype of every tensor. Latency on a dense CPU kernel depends on these, not on values."""
    h = hashlib.sha256(repr(module).encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def structure_key(module: nn.Module) -> str:
    """Key of an un-deployed net's shapes (which latency table serves it)."""
    return hashlib.sha256(";".join(f"{n}:{tuple(t.shape)}" for n, t in module.state_dict().items()).encode()
                          ).hexdigest()[:10]


def count_macs_params(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Multiply-adds per input image of every conv and linear layer (module hooks, so conv
    subclasses count too) and the number of parameters."""
    macs = [0]

    def hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(m, nn.modules.conv._ConvNd):
            macs[0] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        else:
            macs[0] += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return macs[0] // x.shape[0], sum(p.numel() for p in module.parameters())


def num_convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def measure_table(path: Path, model: nn.Module, x: torch.Tensor, costs: dict, backend: str = "eager",
                  **kwargs) -> fxmerge.LatencyTable:
    """The latency table of ``model`` in ``path``: measured there (resumed if interrupted, nothing
    re-timed if complete), then read back from the file. The seconds of a measurement this run
    made from scratch are kept in ``costs`` (by file name); a file that was already there (put
    there by hand, or left by an interrupted run) has an unknown cost: None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    start = time.perf_counter()
    fxmerge.LatencyTable.measure(model, (x,), backend=backend, path=path, **kwargs)
    seconds = time.perf_counter() - start
    if not existed:
        costs[path.name] = seconds
    else:
        costs.setdefault(path.name, None)
    log(f"latency table {path.name}: {'measured' if not existed else 'read back (checked/completed)'} in "
        f"{seconds:.0f} s; {costs_text({path.name: costs[path.name]})}")
    return fxmerge.LatencyTable.load(path)


def costs_text(costs: dict[str, float | None]) -> str:
    """What measuring each table cost, as this script saw it."""
    return ", ".join(f"{k} {'measured before this run, cost unknown' if v is None else f'measured in {v:.0f} s'}"
                     for k, v in costs.items())


def time_interleaved(modules: dict[str, nn.Module], x: torch.Tensor, copies: int, backend: str = "eager",
                     rounds: int = 5, repeats: int = 15) -> dict:
    """Speed-up of every module over ``modules['original']``, all timed in one interleaved
    session with ``copies`` deep copies of the original (their speed-ups are the noise)."""
    original = modules["original"]
    session = {"original": original, **{f"original (copy {k})": copy.deepcopy(original) for k in range(1, copies + 1)},
               **{k: v for k, v in modules.items() if k != "original"}}
    log(f"timing {len(session)} modules interleaved on {backend} ({copies} copies of the original; "
        f"input {tuple(x.shape)}, {torch.get_num_threads()} thread(s))")
    start = time.perf_counter()
    timings = compare_latency(session, (x,), backend=backend, rounds=rounds, repeats=repeats)
    base = timings["original"]
    noise = [base.ms / timings[f"original (copy {k})"].ms for k in range(1, copies + 1)]
    return {"speedup": {k: base.ms / timings[k].ms for k in modules if k != "original"},
            "ms": {k: t.ms for k, t in timings.items()}, "original_ms": base.ms,
            "original_iqr_ms": base.spread, "copies": noise, "seconds": time.perf_counter() - start,
            "backend": backend, "threads": torch.get_num_threads(), "input": list(x.shape), "torch": torch.__version__}


def noise_text(session: dict) -> str:
    copies = session["copies"]
    worst = max((abs(c - 1) for c in copies), default=float("nan"))
    return (f"original {session['original_ms']:.2f} ms (inter-quartile range of its samples "
            f"{session['original_iqr_ms']:.2f} ms); {len(copies)} copies of it measured "
            f"{', '.join(f'{c:.3f}x' for c in copies)} of it: speed-ups are good to about ±{100 * worst:.1f} %")


def check_config(out: Path, config: dict) -> None:
    """Refuse to resume from a folder made with other settings (its saved numbers mean something
    else); write the configuration for a fresh folder."""
    path = out / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(config)):
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != json.loads(json.dumps(config)).get(k))
            raise SystemExit(f"vs_channel_pruning: error: {out} holds results made with other settings "
                             f"({', '.join(diff)}); delete it or pass another --out")
    else:
        write_json(path, config)


# --------------------------------------------------------------------------- MNIST mode


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the MNIST numbers depend on besides the seed and the latency tables."""

    cfg: pipeline.Config
    ratios: tuple[float, ...]
    criteria: tuple[str, ...]
    both_ratios: tuple[float, ...]
    both_criteria: tuple[str, ...]
    both_points: int
    round_to: int | None
    taylor_batches: int
    kd: bool
    copies: int


class SeedBench:
    """One seed: the pipeline's trained net and recipe, and every compressed net of the three
    families, fine-tuned, deployed and scored (saved after each net, resumed from there)."""

    def __init__(self, s: Settings, seed: int, out: Path, table: fxmerge.LatencyTable, costs: dict):
        self.s, self.seed, self.out, self.table, self.costs = s, seed, out, table, costs
        self.folder = out / f"seed-{seed}"
        self.results_path = self.folder / "results.json"
        self.results: dict[str, Any] = (json.loads(self.results_path.read_text()) if self.results_path.exists()
                                        else {"seed": seed, "nets": {}})
        self.start = time.perf_counter()
        state_path = self.folder / "trained.pt"
        state = torch.load(state_path, weights_only=True) if state_path.exists() else None
        self.setup = pipeline.setup_seed(s.cfg, seed, state=state)
        if state is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.setup.model.state_dict(), state_path)
        self.holdout_acc = pipeline.accuracy(pipeline.batches(self.setup.holdout, 250))
        self.pruned: dict[tuple[str, float], nn.Module] = {}
        self.modules: dict[str, nn.Module] = {}  # architecture -> one deployed module of it
        log(f"seed {seed}: {'trained net loaded from ' + str(state_path) if state else 'trained'}, test accuracy "
            f"{self.setup.test_acc(self.setup.model):.1f} % ({self.elapsed()})")

    def elapsed(self) -> str:
        return f"{time.perf_counter() - self.start:.0f} s"

    def run(self) -> dict:
        s, model, x = self.s, self.setup.model, self.setup.x
        self.finish("original", "original", "-", "1.00", copy.deepcopy(model), fxmerge.Plan.fold_only(
            fxmerge.analyze(model, (x,))))
        analysis = fxmerge.analyze(model, (x,), limits=self.table.block_limits())
        for label, plan in pipeline.plans_for(UNIFORM, s.cfg, model, self.table, analysis, x, log):
            self.finish(f"depth/{label}", "depth", "depth", label, lambda p=plan: fxmerge.linearize(model, p), plan)
        for criterion in s.criteria:
            for ratio in s.ratios:
                self.finish(f"channels/{criterion}/{ratio:g}", "channels", f"channels {criterion}", f"{ratio:g}",
                            lambda c=criterion, r=ratio: self.prune(c, r), None)
        both_cfg = dataclasses.replace(s.cfg, points=s.both_points, budgets=())
        for criterion in s.both_criteria:
            for ratio in s.both_ratios:
                names = [f"both/{criterion}/{ratio:g}/f{k}" for k in range(s.both_points)]
                if all(n in self.results["nets"] for n in names):
                    continue
                pruned = self.prune(criterion, ratio)
                table = self.pruned_table(pruned, ratio)
                panalysis = fxmerge.analyze(pruned, (x,), limits=table.block_limits())
                for label, plan in pipeline.plans_for(UNIFORM, both_cfg, pruned, table, panalysis, x, log):
                    self.finish(f"both/{criterion}/{ratio:g}/{label}", "both", f"both {criterion} {ratio:g}",
                                label, lambda p=plan, m=pruned: fxmerge.linearize(m, p), plan)
        log(f"seed {self.seed}: done ({self.elapsed()})")
        return self.results

    def prune(self, criterion: str, ratio: float) -> nn.Module:
        key = (criterion, ratio)
        if key not in self.pruned:
            grads = pipeline.batches(self.setup.train_set, 64, seed=1000 * self.seed + 200)[: self.s.taylor_batches]
            self.pruned[key] = prune_channels(self.setup.model, self.setup.x, ratio, criterion, self.s.round_to, grads)
        return copy.deepcopy(self.pruned[key])

    def pruned_table(self, pruned: nn.Module, ratio: float) -> fxmerge.LatencyTable:
        path = self.out / "tables" / f"pruned-{ratio:g}-{structure_key(pruned)}.json"
        table = measure_table(path, pruned, self.setup.x, self.costs)
        write_json(self.out / "tables" / "costs.json", self.costs)
        return table

    def finish(self, name: str, family: str, variant: str, point: str,
               trainable: nn.Module | Callable[[], nn.Module], plan: fxmerge.Plan | None) -> None:
        """Fine-tune ``trainable`` with the seed's recipe, deploy it (``merge`` with ``plan``, or
        BatchNorm folded), score it on holdout and test; saved at once. Skipped when saved."""
        done = self.results["nets"].get(name)
        if done is not None and (done["arch"] in self.modules or self.deployed_file(done["arch"]).exists()):
            return
        if callable(trainable) and not isinstance(trainable, nn.Module):
            trainable = trainable()
        s, x = self.s, self.setup.x
        tuned = self.setup.tune(trainable, teacher=self.setup.model if s.kd else None)
        deployed = fxmerge.merge(tuned, plan).eval() if plan is not None else fold(tuned, x)
        with torch.no_grad():
            diff = (deployed(self.setup.test[0]) - tuned(self.setup.test[0])).abs().max().item()
        arch = arch_key(deployed)
        macs, params = count_macs_params(deployed, x)
        entry = {"family": family, "variant": variant, "point": point, "acc": self.setup.test_acc(deployed),
                 "holdout": self.holdout_acc(deployed), "convs": num_convs(deployed), "macs": macs,
                 "params": params, "arch": arch, "max_diff": diff}
        if plan is not None and family != "original":
            entry["predicted_speedup_of_its_input"] = (plan.info["predicted_ms"]["original"]
                                                       / plan.info["predicted_ms"]["planned"])
        self.results["nets"][name] = entry
        self.modules[arch] = deployed
        file = self.deployed_file(arch)
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(deployed, file)
        write_json(self.results_path, self.results)
        log(f"seed {self.seed}: {name}: {entry['convs']} convs, {macs / 1e3:.0f} K MACs, holdout "
            f"{entry['holdout']:.1f} %, test {entry['acc']:.1f} % ({self.elapsed()})")

    def deployed_file(self, arch: str) -> Path:
        return self.out / "nets" / f"{arch}.pt"


def mnist_timings(out: Path, benches: list[SeedBench], s: Settings, retime: bool, rounds: int, repeats: int) -> dict:
    """Measured speed-up of every architecture the seeds deployed, one interleaved session
    (``rounds`` x ``repeats`` samples each) for those not timed yet (all of them with
    ``retime``). Timing settings are not part of the refused-if-changed configuration: they
    change no fine-tuned net, and each session records its own."""
    path = out / "timings.json"
    saved = json.loads(path.read_text()) if path.exists() and not retime else {"speedup": {}, "sessions": []}
    archs = {e["arch"] for b in benches for e in b.results["nets"].values()}
    original = next(iter({b.results["nets"]["original"]["arch"] for b in benches}))
    todo = sorted(a for a in archs if a not in saved["speedup"] and a != original)
    if todo or not saved["sessions"]:
        x = benches[0].setup.x
        modules = {"original": load_deployed(out, benches, original)}
        modules.update({a: load_deployed(out, benches, a) for a in todo})
        session = time_interleaved(modules, x, s.copies, rounds=rounds, repeats=repeats)
        session.update(rounds=rounds, repeats=repeats)
        saved["speedup"].update(session.pop("speedup"))
        saved["speedup"][original] = 1.0
        saved["sessions"].append(session)
        write_json(path, saved)
        log(f"timing: {session['seconds']:.0f} s")
    else:
        log(f"timing: reusing {len(saved['speedup'])} measured speed-ups from {path} (--retime measures again)")
    return saved


def load_deployed(out: Path, benches: list[SeedBench], arch: str) -> nn.Module:
    for b in benches:
        if arch in b.modules:
            return b.modules[arch]
    return torch.load(out / "nets" / f"{arch}.pt", weights_only=False)  # written by this script


def beats(q: dict, p: dict) -> bool:
    """``q`` is at least as fast and at least as accurate on the holdout split as ``p``, better in one."""
    return (q["speedup"] >= p["speedup"] and q["holdout"] >= p["holdout"]
            and (q["speedup"] > p["speedup"] or q["holdout"] > p["holdout"]))


def pareto_on_holdout(points: list[dict], rivals: list[dict] = ()) -> list[dict]:
    """The ``points`` that no other point nor any of ``rivals`` beats on the holdout split."""
    return [p for p in points if not any(beats(q, p) for q in [*points, *rivals])]


def curve(results: dict, speedup: dict, select: Callable[[dict], bool], holdout_select: bool) -> list[tuple[float, float]]:
    """(measured speed-up, test accuracy) of the original and the chosen nets of one seed."""
    nets = [{**e, "speedup": speedup[e["arch"]]} for e in results["nets"].values() if select(e)]
    base = results["nets"]["original"]
    if holdout_select:  # a net slower and worse than the original on holdout is no choice either
        nets = pareto_on_holdout(nets, [{**base, "speedup": 1.0}])
    return sorted([(1.0, base["acc"])] + [(n["speedup"], n["acc"]) for n in nets])


def matched(curves: dict[str, list[list[tuple[float, float]]]], pairs: list[tuple[str, str]], title: str,
            rows_count: int = 4) -> tuple[list[dict], str]:
    """Accuracy of each curve set (one curve per seed, starting with the original at 1.00x) at
    speed-ups evenly spread up to the largest every curve reaches, and paired differences; as
    data and as a table. The rows start where every curve has a compressed net at or below
    them (so no row reads a chord from the original to a family's first net) when there is
    such a range; otherwise just above 1.00x, and the table says so."""
    all_curves = [c for per_seed in curves.values() for c in per_seed]
    span = common_range(all_curves)
    if span is None or span[1] <= 1.0:
        return [], f"\n{title}: no common measured speed-up range above 1.00x"
    hi = span[1]
    first = max(min((x for x, _ in c if x != 1.0), default=hi) for c in all_curves)  # every curve's first net
    note = ""
    if first < hi:
        first = max(first, 1.0)
        grid = [first + (hi - first) * k / (rows_count - 1) for k in range(rows_count)]
    else:
        grid = [1.0 + (hi - 1.0) * k / rows_count for k in range(1, rows_count + 1)]
        note = (f"\n(below {first:.2f}x some curve has no compressed net: its accuracy there is interpolated "
                f"from the original at 1.00x)")
    data, rows = [], []
    for x in grid:
        accs = {n: [interpolate(c, x) for c in per_seed] for n, per_seed in curves.items()}
        diffs = {f"{a} - {b}": paired(accs[a], accs[b]) for a, b in pairs}
        data.append({"speedup": x, "acc": accs, "paired": diffs})
        rows.append([f"{x:.2f}x", *[pm(v) for v in accs.values()], *[pm(d, sign=True) for d in diffs.values()]])
    table = tabulate(rows, headers=["speed-up", *curves, *diffs])
    return data, f"\n{title}:\n{table}{note}"


def mnist_report(s: Settings, benches: list[SeedBench], timings: dict) -> tuple[dict, str]:
    speedup = timings["speedup"]
    runs = [b.results for b in benches]
    n = len(runs)
    log(f"\nNets (mean ± std over {n} seed(s); speed-up measured, interleaved with the folded original; "
        f"MACs per image; 'point': frontier plan or pruning ratio):")
    rows = []
    for name in runs[0]["nets"]:
        entries = [r["nets"].get(name) for r in runs]
        if None in entries:
            continue
        e = entries[0]
        rows.append([e["family"], e["variant"], e["point"], f"{mean_std([x['convs'] for x in entries])[0]:.1f}",
                     f"{mean_std([x['macs'] for x in entries])[0] / 1e3:.0f}",
                     f"{mean_std([x['params'] for x in entries])[0] / 1e3:.1f}",
                     pm([speedup[x["arch"]] for x in entries], 2), pm([x["holdout"] for x in entries]),
                     pm([x["acc"] for x in entries]), f"{max(x['max_diff'] for x in entries):.1e}"])
    log(tabulate(rows, headers=["family", "variant", "point", "convs", "K MACs", "K params", "speed-up",
                                "holdout %", "test %", "deploy max |diff|"]))
    for session in timings["sessions"]:
        log(f"timing noise: {noise_text(session)}")
    costs = json.loads((benches[0].out / "tables" / "costs.json").read_text()) if (
        benches[0].out / "tables" / "costs.json").exists() else {}
    if costs:
        log("latency tables (measured once, shared by every seed): " + costs_text(costs))
    # families: holdout-selected curves; variants: every net, no selection
    family_curves = {f: [curve(r, speedup, lambda e, f=f: e["family"] == f, True) for r in runs] for f in FAMILIES}
    family_data, text = matched(family_curves, [("depth", "channels"), ("both", "channels"), ("both", "depth")],
                                f"Accuracy at matched measured speed-up, by family (test %, each seed's curve: the "
                                f"original and the family's nets unbeaten on the holdout split; mean ± std over {n} "
                                f"seed(s); differences paired by seed)")
    log(text)
    variants = list(dict.fromkeys(e["variant"] for e in runs[0]["nets"].values() if e["family"] != "original"))
    variant_curves = {v: [curve(r, speedup, lambda e, v=v: e["variant"] == v, False) for r in runs] for v in variants}
    criteria_pairs = [(f"channels {a}", f"channels {b}") for i, a in enumerate(s.criteria) for b in s.criteria[i + 1:]]
    variant_data, text = matched(variant_curves, criteria_pairs,
                                 "Accuracy at matched measured speed-up, by variant (test %, every net of the "
                                 "variant, no selection)")
    log(text)
    if family_data:
        last = family_data[-1]
        parts = [f"{f} {pm(last['acc'][f])} %" for f in FAMILIES]
        summary = f"summary: at {last['speedup']:.2f}x measured: {', '.join(parts)} ({n} seeds)"
    else:
        summary = f"summary: at 1.00x measured: no family reaches beyond the original ({n} seeds)"
    return {"families": family_data, "variants": variant_data, "summary": summary}, summary


def mnist_main(args: argparse.Namespace) -> None:
    if tp is None:
        raise SystemExit("vs_channel_pruning: error: torch_pruning is missing: pip install -e '.[bench]'")
    floats = lambda text: tuple(float(v) for v in text.split(",") if v.strip())  # noqa: E731
    cfg = dataclasses.replace(pipeline.Config(), epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                              points=args.points, min_budget=args.min_budget, max_budget=args.max_budget,
                              batch=args.batch, strategies=("uniform",), distill_budgets=())
    s = Settings(cfg, floats(args.ratios), tuple(args.criteria.split(",")), floats(args.both_ratios),
                 tuple(args.both_criteria.split(",")), args.both_points, args.round_to or None, args.taylor_batches,
                 args.kd, args.copies)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, {**{k: v for k, v in dataclasses.asdict(s).items() if k != "cfg"},
                       "cfg": dataclasses.asdict(cfg), "threads": args.threads})
    start = time.perf_counter()
    costs_path = out / "tables" / "costs.json"
    costs = json.loads(costs_path.read_text()) if costs_path.exists() else {}
    x = torch.randn(cfg.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # the pipeline's table input
    table = measure_table(args.table or out / "table.json", pipeline.DigitNet().eval(), x, costs)
    write_json(costs_path, costs)
    benches = []
    for seed in range(args.seed, args.seed + args.seeds):
        bench = SeedBench(s, seed, out, table, costs)
        bench.run()
        benches.append(bench)
    timings = mnist_timings(out, benches, s, args.retime, args.rounds, args.repeats)
    report, summary = mnist_report(s, benches, timings)
    write_json(out / "summary.json", report)
    log(f"\nMNIST test split of 1,000 digits per seed (a point is 10 digits), holdout 500; latency at batch "
        f"{cfg.batch}, {args.threads} thread(s); results in {out}; {time.perf_counter() - start:.0f} s in all")
    print(summary)


# --------------------------------------------------------------------------- latency mode (224x224)


def load_model(name: str) -> nn.Module:
    if name == "mobilenet_v2":
        import torchvision

        return torchvision.models.mobilenet_v2().eval()
    if name == "efficientnet_lite0":
        from efficientnet_lite0 import load_model as lite0  # examples/efficientnet_lite0.py

        return lite0().eval()
    raise SystemExit(f"vs_channel_pruning: error: unknown model {name!r} (mobilenet_v2, efficientnet_lite0)")


def latency_main(args: argparse.Namespace) -> None:
    if tp is None:
        raise SystemExit("vs_channel_pruning: error: torch_pruning is missing: pip install -e '.[bench]'")
    floats = lambda text: tuple(float(v) for v in text.split(",") if v.strip())  # noqa: E731
    ratios, both_ratios = floats(args.ratios), floats(args.both_ratios)
    cfg = dataclasses.replace(pipeline.Config(), points=args.points, min_budget=args.min_budget,
                              max_budget=args.max_budget, budgets=())
    both_cfg = dataclasses.replace(cfg, points=args.both_points)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, {"ratios": ratios, "both_ratios": both_ratios, "points": args.points,
                       "both_points": args.both_points, "min_budget": args.min_budget, "max_budget": args.max_budget,
                       "round_to": args.round_to, "size": args.size, "threads": args.threads, "copies": args.copies,
                       "plan_backend": args.plan_backend})  # timing settings: recorded per session
    costs_path = out / "tables" / "costs.json"
    costs = json.loads(costs_path.read_text()) if costs_path.exists() else {}
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    all_rows, records = [], {}
    for name in args.models.split(","):
        model = load_model(name)
        pruned = {r: prune_channels(model, x, r, "magnitude", args.round_to or None) for r in set(ratios) | set(both_ratios)}
        for backend in args.backends.split(","):
            path = out / f"{name}-{backend}.json"
            if path.exists() and not args.retime:
                record = json.loads(path.read_text())
                log(f"{name} on {backend}: reusing {path} (--retime measures again)")
            else:
                record = latency_run(name, model, pruned, x, backend, ratios, both_ratios, cfg, both_cfg, out,
                                     costs, args)
                write_json(path, record)
            records[f"{name}/{backend}"] = record
            rows = latency_rows(name, backend, record)
            all_rows += rows
            log(tabulate(rows, headers=LATENCY_HEADERS))
            log(f"timing noise ({name}, {backend}): {noise_text(record['session'])}")
    log(f"\nAll (1 x 3 x {args.size} x {args.size}, {args.threads} thread(s); speed-up measured interleaved with "
        f"the BatchNorm-folded original per model and backend; MACs and params of the deployed nets; "
        f"'per MAC' = speed-up / MAC reduction):")
    log(tabulate(all_rows, headers=LATENCY_HEADERS))
    log("latency tables: " + costs_text(costs))
    write_json(out / "summary.json", records)
    parts = []
    for key, record in records.items():
        best = {f: max([n["speedup"] for n in record["nets"].values() if n["family"] == f], default=1.0)
                for f in FAMILIES}
        parts.append(f"{key} depth {best['depth']:.2f}x, channels {best['channels']:.2f}x, both {best['both']:.2f}x")
    log(f"\n{time.perf_counter() - start:.0f} s in all; results in {out}")
    print("latency summary: fastest measured: " + "; ".join(parts))


LATENCY_HEADERS = ["model", "backend", "family", "point", "convs", "M MACs", "M params", "ms", "speed-up",
                   "MAC reduction", "per MAC", "param reduction"]


def latency_run(name: str, model: nn.Module, pruned: dict[float, nn.Module], x: torch.Tensor, backend: str,
                ratios: tuple[float, ...], both_ratios: tuple[float, ...], cfg: pipeline.Config,
                both_cfg: pipeline.Config, out: Path, costs: dict, args: argparse.Namespace) -> dict:
    """One model on one backend: the three families built (planned on ``args.plan_backend``'s
    tables, or on this backend's), measured in one interleaved session."""
    planned_on = args.plan_backend or backend
    log(f"\n{name} on {backend} (planned on {planned_on} latency tables):")
    nets: dict[str, tuple[str, str, nn.Module]] = {"original": ("original", "-", fold(model, x))}
    table = measure_table(out / "tables" / f"{name}-{planned_on}.json", model, x, costs, planned_on)
    write_json(out / "tables" / "costs.json", costs)
    analysis = fxmerge.analyze(model, (x,), limits=table.block_limits())
    for label, plan in pipeline.plans_for(UNIFORM, cfg, model, table, analysis, x, log):
        nets[f"depth/{label}"] = ("depth", label, fxmerge.merge(model, plan).eval())
    for r in ratios:
        nets[f"channels/{r:g}"] = ("channels", f"{r:g}", fold(pruned[r], x))
    for r in both_ratios:
        ptable = measure_table(out / "tables" / f"{name}-pruned-{r:g}-{planned_on}.json", pruned[r], x, costs,
                               planned_on)
        write_json(out / "tables" / "costs.json", costs)
        panalysis = fxmerge.analyze(pruned[r], (x,), limits=ptable.block_limits())
        for label, plan in pipeline.plans_for(UNIFORM, both_cfg, pruned[r], ptable, panalysis, x, log):
            nets[f"both/{r:g}/{label}"] = ("both", f"{r:g} {label}", fxmerge.merge(pruned[r], plan).eval())
    session = time_interleaved({k: v[2] for k, v in nets.items()}, x, args.copies, backend, args.rounds, args.repeats)
    session.update(rounds=args.rounds, repeats=args.repeats)
    speedup = {"original": 1.0, **session.pop("speedup")}
    record = {"session": session, "planned_on": planned_on, "nets": {}}
    for key, (family, point, module) in nets.items():
        macs, params = count_macs_params(module, x)
        record["nets"][key] = {"family": family, "point": point, "convs": num_convs(module), "macs": macs,
                               "params": params, "ms": session["ms"][key], "speedup": speedup[key]}
    return record


def latency_rows(name: str, backend: str, record: dict) -> list[list]:
    nets = record["nets"]
    base = nets["original"]
    rows = []
    for key, n in sorted(nets.items(), key=lambda kv: (FAMILIES.index(kv[1]["family"]) if kv[1]["family"] in FAMILIES
                                                        else -1, kv[1]["speedup"])):
        mac_red = base["macs"] / n["macs"]
        rows.append([name, backend, n["family"], n["point"], n["convs"], f"{n['macs'] / 1e6:.0f}",
                     f"{n['params'] / 1e6:.2f}", f"{n['ms']:.2f}", f"{n['speedup']:.2f}x", f"{mac_red:.2f}x",
                     f"{n['speedup'] / mac_red:.2f}", f"{base['params'] / n['params']:.2f}x"])
    return rows


# --------------------------------------------------------------------------- command line


QUICK = {"mnist": dict(epochs=1, finetune_epochs=1, points=2, ratios="0.35,0.6", both_ratios="0.5", both_points=2,
                       copies=1, taylor_batches=2),
         "latency": dict(size=96, points=2, ratios="0.5", both_ratios="0.5", both_points=2, copies=1, rounds=3,
                         repeats=5)}
_CFG = pipeline.Config()
DEFAULTS = {"mnist": dict(ratios="0.2,0.35,0.5,0.6,0.7", both_ratios="0.35,0.5", both_points=4, round_to=4,
                          points=_CFG.points, max_budget=_CFG.max_budget, epochs=_CFG.epochs,
                          finetune_epochs=_CFG.finetune_epochs, copies=2, taylor_batches=10, size=224, rounds=5,
                          repeats=15, out="vs-channel-runs"),
            "latency": dict(ratios="0.2,0.35,0.5,0.65", both_ratios="0.35,0.5", both_points=4, round_to=8, points=5,
                            max_budget=0.9, epochs=_CFG.epochs, finetune_epochs=_CFG.finetune_epochs, copies=2,
                            taylor_batches=10, size=224, rounds=5, repeats=15, out="vs-channel-runs-224")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options left out take the mode's default (``DEFAULTS``), or with ``--quick`` its smoke-test
    value (``QUICK``); options given always win."""
    d = _CFG
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-224", action="store_true", help="latency mode: mobilenet_v2 and EfficientNet-Lite0 at "
                   "1x3x224x224 on --backends (no training)")
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny settings (its own default --out)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (MNIST mode)")
    p.add_argument("--seeds", type=int, default=1, help="seeds SEED .. SEED+N-1 (MNIST mode)")
    p.add_argument("--out", type=Path, help="results, tables, nets and timings go (and are resumed from) here "
                   "(default vs-channel-runs, vs-channel-runs-224 with --latency-224; -quick appended with --quick)")
    p.add_argument("--table", type=Path, help="MNIST: the original's latency table (default OUT/table.json)")
    p.add_argument("--retime", action="store_true", help="time again instead of reusing saved timings")
    p.add_argument("--ratios", help="channel pruning ratios (MNIST default 0.2,0.35,0.5,0.6,0.7; 224: 0.2,0.35,0.5,0.65)")
    p.add_argument("--criteria", default=",".join(CRITERIA), help="MNIST: Torch-Pruning importance criteria "
                   f"({', '.join(CRITERIA)})")
    p.add_argument("--round-to", type=int, help="Torch-Pruning's round_to (MNIST default 4: with 8 its 16- and "
                   "24-channel groups are left unpruned at ratios >= 0.6; 224 default 8, Torch-Pruning's "
                   "recommendation; 0: none)")
    p.add_argument("--taylor-batches", type=int, help="MNIST: training batches of 64 whose gradients the taylor "
                   "criterion sums (default 10, as Torch-Pruning's benchmark script)")
    p.add_argument("--both-ratios", help="pruning ratios compressed further by fxmerge (default 0.35,0.5)")
    p.add_argument("--both-criteria", default="magnitude", help="MNIST: criteria of the 'both' family's pruned nets")
    p.add_argument("--both-points", type=int, help="frontier plans per pruned net in the 'both' family (default 4)")
    p.add_argument("--points", type=int, help=f"frontier plans of the depth family (MNIST default: the pipeline's "
                   f"{d.points}; 224: 5)")
    p.add_argument("--min-budget", type=float, default=d.min_budget,
                   help="frontier plans predicted at least this fraction of their input net's latency")
    p.add_argument("--max-budget", type=float, help=f"... and at most this fraction (MNIST default: the pipeline's "
                   f"{d.max_budget}; 224: 0.9)")
    p.add_argument("--epochs", type=int, help=f"MNIST: initial training epochs (the pipeline's {d.epochs})")
    p.add_argument("--finetune-epochs", type=int, help="MNIST: fine-tuning epochs of every net, the original "
                   f"included (the pipeline's {d.finetune_epochs})")
    p.add_argument("--kd", action="store_true", help="MNIST: fine-tune every net with distillation from the original")
    p.add_argument("--batch", type=int, default=d.batch, help="MNIST: batch of the latency tables and timings")
    p.add_argument("--copies", type=int, help="copies of the original timed with everything: the noise (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything")
    p.add_argument("--models", default="mobilenet_v2,efficientnet_lite0", help="224: models")
    p.add_argument("--backends", default="eager,onnxruntime", help="224: backends")
    p.add_argument("--plan-backend", help="224: plan every backend's nets on this backend's latency tables (the "
                   "same nets timed on each backend; saves measuring a table per backend); default: each its own")
    p.add_argument("--size", type=int, help="224: input height and width (default 224)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5)")
    p.add_argument("--repeats", type=int, help="samples per module and round (default 15)")
    args = p.parse_args(argv)
    mode = "latency" if args.latency_224 else "mnist"
    for key, value in {**DEFAULTS[mode], **(QUICK[mode] if args.quick else {})}.items():
        if key != "out" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = Path(DEFAULTS[mode]["out"] + ("-quick" if args.quick else ""))
    for name in args.criteria.split(",") + args.both_criteria.split(","):
        if name not in CRITERIA:
            p.error(f"--criteria/--both-criteria: {name!r} is not one of {', '.join(CRITERIA)}")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    (latency_main if args.latency_224 else mnist_main)(args)


if __name__ == "__main__":
    main()
