"""Command line: ``fxmerge analyze|table|plan|compress|demo ...`` (also ``python -m fxmerge``).

MODEL is a torchvision model name (``mobilenet_v2``), ``timm:NAME`` (random init), or a
``package.module:factory`` that returns an ``nn.Module``; ``--checkpoint PATH`` loads a state
dict into it (:mod:`fxmerge.cli.models`). Latency tables are cached in ``--cache-dir`` (default
``.fxmerge-cache``) and reused by later commands on the same model, shape and backend
(:mod:`fxmerge.cli.cache`).

Every argument is checked before anything is measured, and every user error ends as one line
``fxmerge: error: ...`` with exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from fxmerge.errors import FxMergeError, InvalidArgumentError, first_line

# fxmerge's modules (and torch) are imported by the commands that need them, so that
# `fxmerge --help` answers at once.


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


def _positive(name: str, text: str, hint: str) -> float:
    from fxmerge.arguments import check_budget

    return check_budget(name, _number(text), hint)


@_arg_type
def _budget(text: str) -> float:
    return _positive("budget", text, "a fraction of the original's latency, e.g. 0.6")


@_arg_type
def _budget_ms(text: str) -> float:
    return _positive("budget_ms", text, "the end-to-end latency in milliseconds, e.g. 12.5")


@_arg_type
def _budgets(text: str) -> list[float]:
    return [_positive("budgets", v, "fractions of the original's latency, e.g. 0.8,0.6") for v in text.split(",")]


@_arg_type
def _backend(text: str) -> str:
    from fxmerge.arguments import check_choice
    from fxmerge.backends import BACKENDS

    return check_choice("--backend", text, tuple(BACKENDS))


# what `compress -o NAME.SUFFIX` writes, by suffix
MODEL_FORMATS = {".pt": "an fxmerge artifact (plan JSON + tensors; fxmerge.load_compressed)",
                 ".pth": "an fxmerge artifact (plan JSON + tensors; fxmerge.load_compressed)",
                 ".pt2": "a torch.export program (torch.export.load)",
                 ".onnx": "an ONNX model (torch.onnx.export; needs pip install 'fxmerge[onnx]')"}


def _check_output(args: argparse.Namespace) -> None:
    """``-o`` must be writable where it points, and name a file of a kind the command writes,
    before anything is measured."""
    output = getattr(args, "output", None)
    if output is None:
        return
    if not output.strip():
        raise InvalidArgumentError("-o is empty; give a file name, e.g. -o model.pt")
    path = Path(output)
    if path.is_dir():
        raise InvalidArgumentError(f"-o {output} is a folder; give a file name, e.g. {path / 'out'}")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"-o {output}: the folder '{path.parent}' does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise InvalidArgumentError(f"-o {output}: the folder '{path.parent}' is not writable")
    _check_output_kind(args.command, output)


def _check_output_kind(command: str, output: str) -> None:
    suffix = Path(output).suffix.lower()
    if command == "plan" and suffix in MODEL_FORMATS:
        raise InvalidArgumentError(f"-o {output}: fxmerge plan writes a plan (JSON), not a model; name it NAME.json, "
                                   f"or run fxmerge compress -o {output} to save the compressed model")
    if command != "compress":
        return
    if suffix not in MODEL_FORMATS:
        kinds = "; ".join(f"{s}: {what}" for s, what in MODEL_FORMATS.items())
        raise InvalidArgumentError(f"-o {output}: the suffix says what compress writes, and "
                                   f"{suffix or 'no suffix'} is none of {', '.join(MODEL_FORMATS)} ({kinds})")
    if suffix == ".onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise InvalidArgumentError(f"-o {output}: writing ONNX needs {' and '.join(missing)}: "
                                       "pip install 'fxmerge[onnx]' (or save NAME.pt / NAME.pt2 instead)")


# --------------------------------------------------------------------------- commands


def _inputs(args: argparse.Namespace) -> tuple:
    import torch

    return (torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0)),)


def _cmd_analyze(args: argparse.Namespace) -> None:
    from fxmerge.cli.models import load_model
    from fxmerge.passes.analysis import analyze

    print(analyze(load_model(args.model, args.checkpoint), _inputs(args)))


def _cmd_table(args: argparse.Namespace) -> None:
    print(_model_and_table(args)[2])


def _model_and_table(args: argparse.Namespace):
    from fxmerge.cli.cache import cached_table, get_table
    from fxmerge.cli.models import load_model

    inputs = _inputs(args)
    cached = cached_table(args, inputs)  # a table for another backend is refused before the model is built
    model = load_model(args.model, args.checkpoint)
    return model, inputs, get_table(args, model, inputs, cached)


def _make_plan(args: argparse.Namespace):
    from fxmerge.cli.cache import table_path
    from fxmerge.planner import plan

    model, inputs, table = _model_and_table(args)
    chosen = plan(model, table, budget=args.budget, budget_ms=args.budget_ms, example_inputs=inputs,
                  backend=args.backend, verify=args.verify, prune_layers=args.prune_layers,
                  save_to=table_path(args) if args.verify else None)
    return model, inputs, chosen


def _cmd_plan(args: argparse.Namespace) -> None:
    if args.frontier:
        return _print_frontier(args)
    _, _, chosen = _make_plan(args)
    print(chosen)
    if args.verify:
        print(chosen.report.verify_table())
    if args.output:
        chosen.save(args.output)
        print(f"plan saved to {args.output}")


def _print_frontier(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from fxmerge.cli.cache import table_path
    from fxmerge.planner import frontier

    model, inputs, table = _model_and_table(args)
    points = frontier(model, table, example_inputs=inputs, backend=args.backend, verify=args.verify,
                      points=args.points, prune_layers=args.prune_layers,
                      save_to=table_path(args) if args.verify else None)
    rows = []
    for p in points:
        r = p.report
        row = [p.num_convs, sum(len(c.keep) for c in p.chains), f"{r.predicted_planned_ms:.3f}",
               f"{r.budget_ratio:.3f}", f"{r.predicted_speedup:.2f}x", "exact" if p.is_exact else "lossy"]
        if r.measured_ms is not None:
            row += [f"{r.measured_ms:.3f}", f"{1 / r.measured_ratio:.2f}x"]
        rows.append(row)
    headers = ["convs", "kept", "predicted ms", "/ original", "pred. speed-up", ""]
    if args.verify:
        headers += ["measured ms", "speed-up"]
    print(f"Pareto frontier of {args.model} on {table.backend} ({len(points)} plans; original measured "
          f"{points[0].report.original_ms:.3f} ms):")
    print(tabulate(rows, headers=headers))


def _cmd_compress(args: argparse.Namespace) -> None:
    from fxmerge.artifacts import save_compressed
    from fxmerge.passes.rewrite import merge

    model, inputs, chosen = _make_plan(args)
    compressed = merge(model, chosen)
    print(chosen)
    suffix = Path(args.output).suffix.lower()
    if suffix == ".pt2":
        _export(compressed, inputs, args.output)
        print(f"exported program saved to {args.output} (load with torch.export.load(path).module())")
    elif suffix == ".onnx":
        _export_onnx(compressed, inputs, args.output)
        print(f"ONNX model saved to {args.output} (run it with onnxruntime.InferenceSession(path))")
    else:
        save_compressed(compressed, args.output)
        print(f"compressed model saved to {args.output} (load with fxmerge.load_compressed(path, model), "
              "where model is the original architecture; only tensors and JSON are read)")


def _export(compressed, inputs: tuple, path: str) -> None:
    import torch

    try:
        program = torch.export.export(compressed, inputs)
    except Exception as exc:  # export failures come in many types: say so in one line
        raise FxMergeError(f"torch.export could not export the compressed model ({first_line(exc)}); "
                           "save it with -o NAME.pt instead") from None
    torch.export.save(program, path)


def _export_onnx(compressed, inputs: tuple, path: str) -> None:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(compressed, inputs, dynamo=True, verbose=False)
    except Exception as exc:  # exporter failures come in many types: say so in one line
        raise FxMergeError(f"torch.onnx.export could not export the compressed model ({first_line(exc)}); "
                           "save it with -o NAME.pt or NAME.pt2 instead") from None
    program.save(path)  # written only once the export succeeded: never a partial file


def _cmd_demo(args: argparse.Namespace) -> None:
    from fxmerge.cli.cache import get_table
    from fxmerge.cli.demo import run_demo

    args.model, args.input_shape = "mobilenet_v2", (1, 3, 224, 224)
    run_demo(args, get_table)


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
            p.add_argument("--backend", default="eager", type=_backend,
                           help="eager (default), inductor, onnxruntime, or a backend registered with "
                                "fxmerge.register_backend")
            p.add_argument("--table", help="latency table JSON to use or create (default: in --cache-dir)")
            p.add_argument("--cache-dir", default=".fxmerge-cache")
            p.add_argument("--fresh", action="store_true",
                           help="re-measure even if a table exists (it is replaced once the new one is complete)")
            p.add_argument("--quick", action="store_true", help="few, short timing repeats (noisy)")
            p.add_argument("--threads", type=_threads, default=1 if name == "demo" else None,
                           help="intra-op threads for timing (default: torch's; the demo uses 1, which is "
                                "stable on shared machines)")
            p.set_defaults(prune_layers=False)
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
                       help="where to save the plan (JSON) / the model (.pt: fxmerge artifact; .pt2: torch.export; "
                                 ".onnx: ONNX)")
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
        if getattr(args, "points", None) is not None and not args.frontier:
            raise InvalidArgumentError("--points chooses how many frontier plans to show: add --frontier, or drop it")
        _check_output(args)
        if getattr(args, "cache_dir", None) is not None:
            from fxmerge.cli.cache import check_locations

            check_locations(args)
        if getattr(args, "threads", None):
            import torch

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
