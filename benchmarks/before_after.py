"""Before/after timing of checkouts of fxmerge, interleaved, for "no slowdown" claims.

    git worktree add /work/before <old commit>
    python benchmarks/before_after.py --trees /work/before,/work/main --repeats 2

Every measurement runs in a fresh subprocess with ``PYTHONPATH=<tree>`` (and a site hook that
removes an editable install's finder, see ``_SHIM``), so each imports its own fxmerge and
passes (the import paths are printed and checked against the tree before anything is timed).
The order is interleaved — for each benchmark and each repeat, every tree in turn — so a busy
machine's load falls on both alike; the load average is recorded next to every number.

Benchmarks: each tree's own ``benchmarks/dp_speed.py`` and ``prune_dp_speed.py`` (the same
measurement in both, up to renamed imports), and, for the zoo, *this* checkout's
``passes_speed.py --job keep_all|drop_all`` run against each tree's library (one measurement
code for both: analyze + merge wall time and peak RSS above the post-import RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

HERE = Path(__file__).resolve().parent
PASSES_SPEED = HERE / "passes_speed.py"
MODELS = "mobilenet_v2,resnet50,efficientnet_b0,timm:efficientnet_lite0,timm:darknet53"


# An editable install of fxmerge maps ``fxmerge.passes`` to *its* checkout's passes/ through a
# meta-path finder, which outranks another checkout's own folder: with PYTHONPATH alone, an old
# checkout imports its fxmerge/ with the installed passes/. This site hook removes that finder.
_SHIM = tempfile.mkdtemp(prefix="fxmerge-no-editable-")
Path(_SHIM, "sitecustomize.py").write_text(
    "import sys\nsys.meta_path[:] = [f for f in sys.meta_path\n"
    "                 if '_EditableFinder' not in getattr(f, '__name__', type(f).__name__)]\n")


def run(tree: str, cmd: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{_SHIM}{os.pathsep}{tree}"}
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tree)
    if done.returncode:
        raise RuntimeError(f"{cmd} in {tree} failed:\n{done.stderr[-3000:]}")
    return done.stdout, load


def check_imports(tree: str) -> str:
    code = ("import fxmerge, fxmerge.passes.dp as d, fxmerge.passes.rewrite as r, fxmerge.algebra as a; "
            "print(fxmerge.__file__, d.__file__, r.__file__, a.__file__)")
    out, _ = run(tree, [sys.executable, "-c", code], 120)
    paths = out.split()
    assert all(p.startswith(tree.rstrip("/") + "/") for p in paths), (tree, paths)
    return out.strip()


def dp_numbers(out: str) -> dict[str, float]:
    """dp_speed's table: one budget and whole frontier, baseline ms and fxmerge ms."""
    one = re.search(r"one budget.*?\s([\d.]+)\s+([\d.]+)\s+\d+x", out)
    front = re.search(r"whole frontier.*?\)\s+([\d.]+)\s+([\d.]+)\s+\d+x", out)
    return {"one_dict": float(one[1]), "one_ms": float(one[2]), "front_dict": float(front[1]),
            "front_ms": float(front[2])}


def prune_numbers(out: str) -> dict[str, float]:
    rows = {}
    for kind in ("depth-only", "with pruning"):
        m = re.search(rf"^{kind}\s+\d+\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
        rows[f"{kind} frontier"], rows[f"{kind} dp"], rows[f"{kind} plan"] = (float(v) for v in m.groups())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", required=True, help="comma-separated checkout roots, the first the baseline")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=MODELS, help="zoo models for passes_speed jobs ('' for none)")
    parser.add_argument("--skip", default="", help="comma-separated of dp,prune,zoo to leave out")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="write every sample here")
    args = parser.parse_args()
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    for tree in trees:
        print(f"{tree}: imports {check_imports(tree)}", flush=True)
    samples: list[dict] = []

    def record(bench: str, tree: str, values: dict, load: float) -> None:
        samples.append({"bench": bench, "tree": tree, "load": load, **values})
        print(f"  {bench} {Path(tree).name}: {values} (load {load:.1f})", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(samples, indent=1))

    skip = set(args.skip.split(","))
    for rep in range(args.repeats):
        if "dp" not in skip:
            for tree in trees:
                out, load = run(tree, [sys.executable, "benchmarks/dp_speed.py"], args.timeout)
                record("dp_speed", tree, dp_numbers(out), load)
        if "prune" not in skip:
            for tree in trees:
                out, load = run(tree, [sys.executable, "benchmarks/prune_dp_speed.py"], args.timeout)
                record("prune_dp_speed", tree, prune_numbers(out), load)
        for name in (args.models.split(",") if args.models and "zoo" not in skip else []):
            for job in ("keep_all", "drop_all"):
                for tree in trees:
                    cmd = [sys.executable, str(PASSES_SPEED), "--job", job, "--models", name, "--threads", "2"]
                    out, load = run(tree, cmd, args.timeout)
                    res = json.loads(out.strip().splitlines()[-1])
                    record(f"{name} {job}", tree, {k: res[k] for k in ("analyze_s", "merge_s", "analyze_cpu_s",
                                                                        "merge_cpu_s", "peak_mb", "convs_after")}, load)
    summarize(samples, trees)


def summarize(samples: list[dict], trees: list[str]) -> None:
    """Per benchmark and quantity: every run of every tree, and each later tree against the
    first as the median of the per-repeat ratios (each repeat's runs were adjacent in time)."""
    for s in samples:
        if "analyze_s" in s:
            s["total_s"] = s["analyze_s"] + s["merge_s"]
            s["total_cpu_s"] = s["analyze_cpu_s"] + s["merge_cpu_s"]
    rows = []
    for bench in dict.fromkeys(s["bench"] for s in samples):
        runs = {tree: [s for s in samples if s["bench"] == bench and s["tree"] == tree] for tree in trees}
        first = runs[trees[0]][0]
        keys = ["analyze_s", "merge_s", "total_s", "total_cpu_s", "peak_mb", "convs_after"] if "analyze_s" in first \
            else [k for k in first if k not in ("bench", "tree", "load")]
        for key in keys:
            row = [bench, key] + [" / ".join(f"{r[key]:.3g}" for r in runs[t]) for t in trees]
            for t in trees[1:]:
                ratios = [a[key] / b[key] for a, b in zip(runs[t], runs[trees[0]]) if b[key]]
                row.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
            rows.append(row)
    loads = [s["load"] for s in samples]
    names = [Path(t).name for t in trees]
    print(tabulate(rows, headers=["benchmark", "quantity"] + [f"{n} (each run)" for n in names]
                   + [f"{n} / {names[0]}" for n in names[1:]], disable_numparse=True))
    print(f"load average (1 min) at each start: min {min(loads):.1f}, median {statistics.median(loads):.1f}, "
          f"max {max(loads):.1f}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
