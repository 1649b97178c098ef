"""Where the command line keeps latency tables, and when it measures them.

A table lives at ``--table PATH``, or in ``--cache-dir`` under a name made of the model, input
shape, backend and thread count; later commands on the same model reuse it. A cached table
that is complete is only read (a read-only folder serves); one that lacks entries is completed
in place; ``--fresh`` measures a new one beside the old file and replaces it only once
complete. Whether the table's folder can be written is checked before anything is measured.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from fxmerge.errors import InvalidArgumentError
from fxmerge.latency import LatencyTable
from fxmerge.fingerprints import model_key
from fxmerge.passes.analysis import analyze


def timing_kwargs(args: argparse.Namespace) -> dict:
    if args.quick:  # fast and noisy: for smoke tests and trying things out
        return {"repeats": 2, "rounds": 1, "min_repeat_ms": 1.0, "warmup": 1}
    return {}


def table_path(args: argparse.Namespace) -> Path:
    if getattr(args, "table", None):
        return Path(args.table)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model)
    shape = "x".join(map(str, args.input_shape))
    return Path(args.cache_dir) / f"{name}-{shape}-{args.backend}-t{torch.get_num_threads()}.json"


def check_locations(args: argparse.Namespace) -> None:
    """``--cache-dir`` and ``--table`` name places a table can be: a folder (or one to be
    made), and a file in a folder — refused before any work otherwise."""
    cache = getattr(args, "cache_dir", None)
    if cache is not None and Path(cache).exists() and not Path(cache).is_dir():
        raise InvalidArgumentError(f"--cache-dir {cache} is a file, not a folder; give a folder for the latency tables")
    table = getattr(args, "table", None)
    if table is not None and Path(table).is_dir():
        raise InvalidArgumentError(f"--table {table} is a folder; give a file name, e.g. {Path(table) / 'table.json'}")


def _check_writable(path: Path, args: argparse.Namespace) -> None:
    """The folder of ``path`` (or its nearest existing parent, for one to be made) is writable."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        flag = "--table" if getattr(args, "table", None) else "--cache-dir"
        raise InvalidArgumentError(f"the latency table {path} must be measured, but the folder '{folder}' cannot be "
                                   f"written; choose another {flag}, or make the folder writable")


def cached_table(args: argparse.Namespace, inputs: tuple[torch.Tensor, ...]) -> LatencyTable | None:
    """The table at the table path, if there is one (and ``--fresh`` does not ask to replace
    it), refused before any work when it was measured for another backend, dtype or device."""
    path = table_path(args)
    if getattr(args, "fresh", False) or not path.exists():
        return None
    table = LatencyTable.load(path)
    table.check_environment(inputs, backend=args.backend, source=path)
    return table


def get_table(args: argparse.Namespace, model: nn.Module, inputs: tuple[torch.Tensor, ...],
              table: LatencyTable | None = None) -> LatencyTable:
    """The cached table for this model, shape and backend, measured or completed as needed
    (an interrupted measurement resumes)."""
    path = table_path(args)
    prune = bool(getattr(args, "prune_layers", False))
    table = table if table is not None else cached_table(args, inputs)
    if table is not None:
        analysis = analyze(model, inputs, limits=table.block_limits(), prune_layers=prune)
        if table.missing(analysis, prune) or model_key(analysis) not in table.references:
            _check_writable(path, args)
        table.measure_missing(model, inputs, analysis=analysis, path=path, prune_layers=prune,  # writes nothing when complete
                              **timing_kwargs(args))
        print(f"latency table: {path} ({len(table)} entries, reused; --fresh re-measures)")
        return table
    _check_writable(path, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".fresh") if getattr(args, "fresh", False) and path.exists() else path
    resumed = " (resuming)" if target.exists() else ""
    print(f"measuring the latency table ({args.backend}, {torch.get_num_threads()} threads){resumed} -> {target}")
    table = LatencyTable.measure(model, inputs, backend=args.backend, path=target, prune_layers=prune,
                                 **timing_kwargs(args))
    if target != path:
        os.replace(target, path)  # the old table stays until the new one is complete
    print(f"latency table: {path}, {len(table)} entries")
    return table
