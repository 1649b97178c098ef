"""Command line: ``fxmerge analyze MODEL`` (also ``python -m fxmerge ...``).

MODEL is a torchvision model name (``mobilenet_v2``) or a ``package.module:attr`` factory that
returns an ``nn.Module``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

import torch
import torch.nn as nn

from fxmerge.api import analyze
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision model name or package.module:factory")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), help="example input, e.g. 1,3,224,224")


def _cmd_analyze(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    print(analyze(model, (torch.randn(args.input_shape),)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxmerge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="print the chains, activations and valid blocks of a model")
    _common(p)
    p.set_defaults(func=_cmd_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FxMergeError as exc:
        print(f"fxmerge: error: {exc}", file=sys.stderr)
        return 2
    return 0
