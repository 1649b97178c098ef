"""Command line: ``fxmerge analyze|table|plan|compress|demo ...`` (also ``python -m fxmerge``).

MODEL is a torchvision model name (``mobilenet_v2``) or a ``package.module:attr`` factory that
returns an ``nn.Module``. Latency tables are cached in ``--cache-dir`` (default
``.fxmerge-cache``) and reused by later commands on the same model, shape and backend.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from fxmerge.errors import FxMergeError


def load_model(spec: str) -> nn.Module:
    """A model from a torchvision name or a ``package.module:attr`` factory (untrained weights)."""
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        factory = getattr(importlib.import_module(module_name), attr)
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(spec, weights=None)
        except ValueError as exc:
            raise FxMergeError(f"unknown model '{spec}': use a torchvision name or package.module:factory") from exc
    if not isinstance(model, nn.Module):
        raise FxMergeError(f"'{spec}' did not give an nn.Module")
    return model.eval()


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _budgets(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _timing_kwargs(args: argparse.Namespace) -> dict:
    if args.quick:  # fast and noisy: for smoke tests and trying things out
        return {"repeats": 2, "rounds": 1, "min_repeat_ms": 1.0, "warmup": 1}
    return {}


def _table_path(args: argparse.Namespace) -> Path:
    if getattr(args, "table", None):
        return Path(args.table)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model)
    shape = "x".join(map(str, args.input_shape))
    return Path(args.cache_dir) / f"{name}-{shape}-{args.backend}-t{torch.get_num_threads()}.json"


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    return (torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0)),)


def _get_table(args: argparse.Namespace, model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """The cached table for this model, shape and backend, measured or completed as needed
    (an interrupted measurement resumes)."""
    from fxmerge.latency import LatencyTable

    path = _table_path(args)
    if getattr(args, "fresh", False) and path.exists():
        path.unlink()
    if path.exists():
        table = LatencyTable.load(path)
        table.measure_missing(model, inputs, path=path, **_timing_kwargs(args))  # nothing to do when complete
        print(f"latency table: {path} ({len(table)} entries, reused; --fresh re-measures)")
        return table
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"measuring the latency table ({args.backend}, {torch.get_num_threads()} threads) -> {path}")
    table = LatencyTable.measure(model, inputs, backend=args.backend, path=path, **_timing_kwargs(args))
    print(f"latency table: {len(table)} entries")
    return table


def _cmd_analyze(args: argparse.Namespace) -> None:
    from fxmerge.api import analyze

    print(analyze(load_model(args.model), _inputs(args)))


def _cmd_table(args: argparse.Namespace) -> None:
    model, inputs = load_model(args.model), _inputs(args)
    print(_get_table(args, model, inputs))


def _make_plan(args: argparse.Namespace):
    from fxmerge.planning import plan

    model, inputs = load_model(args.model), _inputs(args)
    table = _get_table(args, model, inputs)
    return model, inputs, plan(model, table, budget=args.budget, budget_ms=args.budget_ms, example_inputs=inputs)


def _cmd_plan(args: argparse.Namespace) -> None:
    _, _, chosen = _make_plan(args)
    print(chosen)
    if args.output:
        chosen.save(args.output)
        print(f"plan saved to {args.output}")


def _cmd_compress(args: argparse.Namespace) -> None:
    from fxmerge.passes.rewrite import merge

    model, inputs, chosen = _make_plan(args)
    compressed = merge(model, chosen)
    print(chosen)
    torch.save(compressed, args.output)
    print(f"compressed GraphModule saved to {args.output} (load with torch.load(path, weights_only=False))")


def _cmd_demo(args: argparse.Namespace) -> None:
    from fxmerge.demo import run_demo

    args.model, args.input_shape = "mobilenet_v2", (1, 3, 224, 224)
    run_demo(args, _get_table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxmerge", description="Latency-aware CNN depth compression as torch.fx passes.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, *, model: bool = True, table: bool = True):
        p = sub.add_parser(name, help=help)
        if model:
            p.add_argument("model", help="torchvision model name or package.module:factory")
            p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), help="e.g. 1,3,224,224")
        if table:
            p.add_argument("--backend", default="eager", choices=["eager", "inductor", "onnxruntime"])
            p.add_argument("--table", help="latency table JSON to use or create (default: in --cache-dir)")
            p.add_argument("--cache-dir", default=".fxmerge-cache")
            p.add_argument("--fresh", action="store_true", help="re-measure even if a cached table exists")
            p.add_argument("--quick", action="store_true", help="few, short timing repeats (noisy)")
            p.add_argument("--threads", type=int, default=1 if name == "demo" else None,
                           help="intra-op threads for timing (default: torch's; the demo uses 1, which is "
                                "stable on shared machines)")
        p.set_defaults(func=func)
        return p

    command("analyze", _cmd_analyze, "print the chains, activations and valid blocks of a model", table=False)
    command("table", _cmd_table, "measure (or resume) the latency table of a model")
    for name, func, what in (("plan", _cmd_plan, "choose activations and merges under a budget"),
                             ("compress", _cmd_compress, "plan, merge and save the compressed GraphModule")):
        p = command(name, func, what)
        p.add_argument("--budget", type=float, help="fraction of the original's predicted latency, e.g. 0.6")
        p.add_argument("--budget-ms", type=float, help="absolute latency budget in ms")
        p.add_argument("-o", "--output", required=name == "compress", help="where to save the plan / model")
    p = command("demo", _cmd_demo, "mobilenet_v2 on this CPU: table, plans, exactness, measured speed-ups", model=False)
    p.add_argument("--budgets", type=_budgets, default=[0.8, 0.7, 0.6])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except FxMergeError as exc:
        print(f"fxmerge: error: {exc}", file=sys.stderr)
        return 2
    return 0
