"""Command line: ``fxmerge analyze|table|plan|compress|demo ...`` (also ``python -m fxmerge``).

MODEL is a torchvision model name (``mobilenet_v2``), ``timm:NAME`` (random init), or a
``package.module:factory`` that returns an ``nn.Module``; ``--checkpoint PATH`` loads a state
dict into it. Latency tables are cached in ``--cache-dir`` (default ``.fxmerge-cache``) and
reused by later commands on the same model, shape and backend.

Every argument is checked before anything is measured, and every user error ends as one line
``fxmerge: error: ...`` with exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from fxmerge.errors import FxMergeError, InvalidArgumentError, MalformedFileError
from fxmerge.backends import BACKENDS
from fxmerge.validation import check_budget


# --------------------------------------------------------------------------- models


def load_model(spec: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A model (in eval mode) from MODEL: a torchvision name, ``timm:NAME`` or a
    ``package.module:factory``; with ``checkpoint``, its state dict is loaded into it."""
    if spec.startswith("timm:"):
        model = _timm_model(spec[len("timm:"):])
    elif ":" in spec:
        model = _factory_model(spec)
    else:
        model = _torchvision_model(spec)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, spec)
    return model.eval()


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError:
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InvalidArgumentError(f"unknown model '{name}'{hint}: use a torchvision name, timm:NAME or "
                                   "package.module:factory") from None


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise InvalidArgumentError(f"MODEL 'timm:{name}' needs timm, which is not installed: pip install timm") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InvalidArgumentError(f"unknown timm model '{name}'{hint}; timm.list_models('*{name}*') lists similar names")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:  # whatever the model's constructor raises: the user's to fix
        raise InvalidArgumentError(f"timm.create_model('{name}', pretrained=False) raised "
                                   f"{type(exc).__name__}: {exc}") from None


def _factory_model(spec: str) -> nn.Module:
    module_name, attr = spec.split(":", 1)
    if not module_name or not attr:
        raise InvalidArgumentError(f"MODEL '{spec}' must look like package.module:factory")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the console script does not search the current folder
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise InvalidArgumentError(f"cannot import module '{module_name}' (MODEL '{spec}'): there is no module "
                                       f"'{exc.name}'; check the spelling, and that its folder is on PYTHONPATH") from None
        raise InvalidArgumentError(f"importing module '{module_name}' (MODEL '{spec}') failed: {exc}") from None
    except Exception as exc:
        raise InvalidArgumentError(f"importing module '{module_name}' (MODEL '{spec}') raised "
                                   f"{type(exc).__name__}: {exc}") from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = [n for n in dir(factory) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InvalidArgumentError(f"'{module_name}' has no attribute '{attr}' (MODEL '{spec}'){hint}")
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise InvalidArgumentError(f"MODEL '{spec}' is of type {type(factory).__name__}, not an nn.Module or a "
                                   "function that returns one")
    try:
        model = factory()
    except Exception as exc:
        raise InvalidArgumentError(f"calling {spec}() raised {type(exc).__name__}: {exc}; MODEL must name a function "
                                   "or class that builds the model without arguments") from None
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"{spec}() returned a value of type {type(model).__name__}, not an nn.Module")
    return model


def _load_checkpoint(model: nn.Module, path: str | os.PathLike, spec: str) -> None:
    """Load a state dict saved with ``torch.save`` (only tensors are deserialised)."""
    from fxmerge.artifacts import load_tensors

    if not Path(path).is_file():
        raise InvalidArgumentError(f"--checkpoint {path}: no such file")
    try:
        state = load_tensors(path, "checkpoint", map_location="cpu")
    except MalformedFileError as exc:
        raise InvalidArgumentError(f"--checkpoint {exc}") from None
    for key in ("state_dict", "model_state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidArgumentError(f"--checkpoint {path} does not hold a state dict (a mapping name -> tensor)")
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise InvalidArgumentError(f"--checkpoint {path} does not fit MODEL '{spec}': {_listed('missing', missing)}"
                                   f"{'; ' if missing and unexpected else ''}{_listed('unexpected', unexpected)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes differ
        raise InvalidArgumentError(f"--checkpoint {path} does not fit MODEL '{spec}': "
                                   f"{' '.join(str(exc).split())[:500]}") from None


def _listed(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    return f"{len(keys)} {what} keys ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"


# --------------------------------------------------------------------------- argument types


def _arg_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type whose errors keep their message (argparse shows only ValueError's type)."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, FxMergeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = convert.__name__
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number; got {text!r}") from None


@_arg_type
def _threads(text: str) -> int:
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) < 1:
        raise ValueError(f"must be an integer >= 1 (intra-op threads, e.g. 1 or 4); got {text!r}")
    return int(text)


@_arg_type
def _shape(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if not all(re.fullmatch(r"\s*\d+\s*", p) and int(p) > 0 for p in parts):
        raise ValueError(f"expected sizes > 0 separated by commas, e.g. 1,3,224,224; got {text!r}")
    return tuple(int(p) for p in parts)


@_arg_type
def _budget(text: str) -> float:
    return check_budget("budget", _number(text), "a fraction of the original's latency, e.g. 0.6")


@_arg_type
def _budget_ms(text: str) -> float:
    return check_budget("budget_ms", _number(text), "the end-to-end latency in milliseconds, e.g. 12.5")


@_arg_type
def _budgets(text: str) -> list[float]:
    return [check_budget("budgets", _number(v), "fractions of the original's latency, e.g. 0.8,0.6")
            for v in text.split(",")]


def _check_output(args: argparse.Namespace) -> None:
    """``-o`` must be writable where it points before anything is measured."""
    output = getattr(args, "output", None)
    if not output:
        return
    path = Path(output)
    if path.is_dir():
        raise InvalidArgumentError(f"-o {output} is a folder; give a file name, e.g. {path / 'out'}")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"-o {output}: the folder '{path.parent}' does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise InvalidArgumentError(f"-o {output}: the folder '{path.parent}' is not writable")


# --------------------------------------------------------------------------- tables


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


def _cached_table(args: argparse.Namespace, inputs: tuple[torch.Tensor, ...]):
    """The table at the table path, if there is one (and ``--fresh`` does not ask to replace
    it), refused before any work when it was measured for another backend, dtype or device."""
    from fxmerge.latency import LatencyTable

    path = _table_path(args)
    if getattr(args, "fresh", False) or not path.exists():
        return None
    table = LatencyTable.load(path)
    table.check_environment(inputs, backend=args.backend, source=path)
    return table


def _get_table(args: argparse.Namespace, model: nn.Module, inputs: tuple[torch.Tensor, ...], table=None):
    """The cached table for this model, shape and backend, measured or completed as needed
    (an interrupted measurement resumes). ``--fresh`` measures beside the old file and
    replaces it only once the new table is complete."""
    from fxmerge.latency import LatencyTable

    path = _table_path(args)
    table = table if table is not None else _cached_table(args, inputs)
    if table is not None:
        table.measure_missing(model, inputs, path=path, prune_layers=_prune(args),  # writes nothing when complete
                              **_timing_kwargs(args))
        print(f"latency table: {path} ({len(table)} entries, reused; --fresh re-measures)")
        return table
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".fresh") if getattr(args, "fresh", False) and path.exists() else path
    resumed = " (resuming)" if target.exists() else ""
    print(f"measuring the latency table ({args.backend}, {torch.get_num_threads()} threads){resumed} -> {target}")
    table = LatencyTable.measure(model, inputs, backend=args.backend, path=target, prune_layers=_prune(args),
                                 **_timing_kwargs(args))
    if target != path:
        os.replace(target, path)  # the old table stays until the new one is complete
        table.path = path
    print(f"latency table: {path}, {len(table)} entries")
    return table


# --------------------------------------------------------------------------- commands


def _cmd_analyze(args: argparse.Namespace) -> None:
    from fxmerge.api import analyze

    print(analyze(load_model(args.model, args.checkpoint), _inputs(args)))


def _cmd_table(args: argparse.Namespace) -> None:
    inputs = _inputs(args)
    cached = _cached_table(args, inputs)
    print(_get_table(args, load_model(args.model, args.checkpoint), inputs, cached))


def _model_and_table(args: argparse.Namespace):
    inputs = _inputs(args)
    cached = _cached_table(args, inputs)
    model = load_model(args.model, args.checkpoint)
    return model, inputs, _get_table(args, model, inputs, cached)


def _make_plan(args: argparse.Namespace):
    from fxmerge.planning import plan

    model, inputs, table = _model_and_table(args)
    chosen = plan(model, table, budget=args.budget, budget_ms=args.budget_ms, example_inputs=inputs,
                  backend=args.backend, verify=args.verify, prune_layers=_prune(args))
    return model, inputs, chosen


def _prune(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "prune_layers", False))


def _cmd_plan(args: argparse.Namespace) -> None:
    if args.frontier:
        return _print_frontier(args)
    _, _, chosen = _make_plan(args)
    print(chosen)
    if args.verify:
        print(_verify_report(chosen))
    if args.output:
        chosen.save(args.output)
        print(f"plan saved to {args.output}")


def _verify_report(chosen) -> str:
    from tabulate import tabulate

    rows = [[r["round"], f"{r['predicted_ms']:.3f}", f"{r['measured_ms']:.3f}", f"{r['ratio']:.3f}"]
            for r in chosen.info.get("verify", [])]
    return "verification:\n" + tabulate(rows, headers=["round", "predicted ms", "measured ms", "measured / original"])


def _print_frontier(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from fxmerge.planning import frontier

    model, inputs, table = _model_and_table(args)
    points = frontier(model, table, example_inputs=inputs, backend=args.backend, verify=args.verify,
                      points=args.points, prune_layers=_prune(args))
    rows = []
    for p in points:
        pred = p.info["predicted_ms"]
        row = [p.num_convs, sum(len(c.keep) for c in p.chains), f"{pred['planned']:.3f}", f"{p.info['budget_ratio']:.3f}",
               f"{pred['original'] / pred['planned']:.2f}x", "exact" if p.is_exact else "lossy"]
        if "measured_ms" in p.info:
            row += [f"{p.info['measured_ms']:.3f}", f"{1 / p.info['measured_ratio']:.2f}x"]
        rows.append(row)
    headers = ["convs", "kept", "predicted ms", "/ original", "pred. speed-up", ""]
    if args.verify:
        headers += ["measured ms", "speed-up"]
    print(f"Pareto frontier of {args.model} on {table.backend} ({len(points)} plans; original measured "
          f"{points[0].info['original_ms']:.3f} ms):")
    print(tabulate(rows, headers=headers))


def _cmd_compress(args: argparse.Namespace) -> None:
    from fxmerge import artifacts
    from fxmerge.passes.rewrite import merge

    model, inputs, chosen = _make_plan(args)
    compressed = merge(model, chosen)
    print(chosen)
    if Path(args.output).suffix == ".pt2":
        _export(compressed, inputs, args.output)
        print(f"exported program saved to {args.output} (load with torch.export.load(path).module())")
    else:
        artifacts.save(compressed, args.output)
        print(f"compressed model saved to {args.output} (load with fxmerge.artifacts.load(path, model), "
              "where model is the original architecture; only tensors and JSON are read)")


def _export(compressed: nn.Module, inputs: tuple[torch.Tensor, ...], path: str) -> None:
    try:
        program = torch.export.export(compressed, inputs)
    except Exception as exc:  # export failures come in many types: say so in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FxMergeError(f"torch.export could not export the compressed model ({type(exc).__name__}: {first}); "
                           "save it with -o NAME.pt instead") from None
    torch.export.save(program, path)


def _cmd_demo(args: argparse.Namespace) -> None:
    from fxmerge.demo import run_demo

    args.model, args.input_shape = "mobilenet_v2", (1, 3, 224, 224)
    run_demo(args, _get_table)


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Argument errors in the same form as every other user error."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"fxmerge: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxmerge", description="Latency-aware CNN depth compression as torch.fx passes.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, *, model: bool = True, table: bool = True):
        p = sub.add_parser(name, help=help)
        if model:
            p.add_argument("model", help="torchvision model name, timm:NAME or package.module:factory")
            p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), help="e.g. 1,3,224,224")
            p.add_argument("--checkpoint", help="a state dict (torch.save) to load into the model")
        if table:
            p.add_argument("--backend", default="eager", choices=sorted(BACKENDS))
            p.add_argument("--table", help="latency table JSON to use or create (default: in --cache-dir)")
            p.add_argument("--cache-dir", default=".fxmerge-cache")
            p.add_argument("--fresh", action="store_true",
                           help="re-measure even if a table exists (it is replaced once the new one is complete)")
            p.add_argument("--quick", action="store_true", help="few, short timing repeats (noisy)")
            p.add_argument("--threads", type=_threads, default=1 if name == "demo" else None,
                           help="intra-op threads for timing (default: torch's; the demo uses 1, which is "
                                "stable on shared machines)")
            if name != "demo":
                p.add_argument("--prune-layers", action="store_true",
                               help="also let plans replace convs inside merged segments by the identity (LayerMerge; "
                                    "the table measures those specs too)")
        p.set_defaults(func=func)
        return p

    command("analyze", _cmd_analyze, "print the chains, activations and valid blocks of a model", table=False)
    command("table", _cmd_table, "measure (or resume) the latency table of a model")
    for name, func, what in (("plan", _cmd_plan, "choose activations and merges under a budget"),
                             ("compress", _cmd_compress, "plan, merge and save the compressed model")):
        p = command(name, func, what)
        budgets = p.add_mutually_exclusive_group()
        budgets.add_argument("--budget", type=_budget,
                             help="fraction of the folded original's latency measured on the backend, e.g. 0.6")
        budgets.add_argument("--budget-ms", type=_budget_ms, help="absolute latency budget in ms")
        p.add_argument("--verify", action="store_true",
                       help="time the plan on the backend; if it misses the budget, correct the cost model and plan "
                            "again (the observations are kept in the table)")
        p.add_argument("-o", "--output", required=name == "compress",
                       help="where to save the plan (JSON) / the model (.pt: fxmerge artifact; .pt2: torch.export)")
        if name == "plan":
            p.add_argument("--frontier", action="store_true",
                           help="print the Pareto frontier of plans (with --verify: measure --points of them)")
            p.add_argument("--points", type=_points, default=None,
                           help="how many frontier plans to show (default: all; 8 with --verify)")
    p = command("demo", _cmd_demo, "mobilenet_v2 on this CPU: table, plans, exactness, measured speed-ups", model=False)
    p.add_argument("--budgets", type=_budgets, default=[0.8, 0.7, 0.6])
    return parser


def _points(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2; got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "frontier", False) and args.verify and args.points is None:
        args.points = 8
    try:
        _check_output(args)
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        args.func(args)
    except FxMergeError as exc:
        print(f"fxmerge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written: the user's to fix, not a bug
        print(f"fxmerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxmerge: interrupted (a table being measured keeps its progress and resumes)", file=sys.stderr)
        return 130
    return 0
