"""What a latency table must hold, checked where it enters (constructed or read from a file):
every part with the type and sign the cost model relies on. Errors name the part; the table's
loader adds the file.

>>> check_reference("references['x']", {"original_ms": -1, "inputs": [[1, 3, 8, 8]], "observations": []})
Traceback (most recent call last):
fxmerge.errors.InvalidArgumentError: references['x']['original_ms'] must be a finite number > 0 (milliseconds; re-measure the table); got -1
"""
from __future__ import annotations

import dataclasses
from typing import Any

from fxmerge.arguments import (check_choice, check_count, check_mapping, check_number, check_shape,
                               check_torch_dtype)
from fxmerge.backends import BACKENDS
from fxmerge.errors import InvalidArgumentError
from fxmerge.records import BlockLimits


def check_table_contents(*, fingerprint: Any, entries: Any, references: Any, limits: Any, pending: Any) -> None:
    """Every part of a table has the type and sign the cost model relies on; raises
    :class:`InvalidArgumentError` naming the part (``from_dict`` adds the file's name)."""
    for name, value in (("entries", entries), ("fingerprint", fingerprint), ("references", references),
                        ("limits", limits), ("pending", pending)):
        check_mapping(name, value)
    fp = fingerprint
    if "backend" in fp:
        check_choice("fingerprint['backend']", fp["backend"], tuple(BACKENDS))
    if "dtype" in fp:
        check_torch_dtype("fingerprint['dtype']", fp["dtype"])
    if "threads" in fp:
        check_count("fingerprint['threads']", fp["threads"])
    for key, entry in entries.items():
        name = f"entries[{key!r}]"
        check_mapping(name, entry)
        check_number(f"{name}['ms']", entry.get("ms"), minimum=0, hint="milliseconds per call")
        if "spread" in entry:
            check_number(f"{name}['spread']", entry["spread"], minimum=0)
        for count in ("repeats", "calls"):
            if count in entry:
                check_count(f"{name}[{count!r}]", entry[count])
    for key, ref in references.items():
        check_reference(f"references[{key!r}]", ref)
    known = set(limits_dict(BlockLimits()))
    if not set(limits) <= known:
        raise InvalidArgumentError(f"limits may hold only {sorted(known)}; got {sorted(limits)}")
    for key, value in limits.items():
        if value is not None:  # None: that limit is off
            check_number(f"limits[{key!r}]", value, minimum=0, strict=True)
    for key, state in pending.items():
        name = f"pending[{key!r}]"
        check_mapping(name, state)
        samples = state.get("samples")
        if not isinstance(samples, list):
            raise InvalidArgumentError(f"{name}['samples'] must be a list of milliseconds; got {samples!r}")
        for k, v in enumerate(samples):
            check_number(f"{name}['samples'][{k}]", v, minimum=0)
        check_count(f"{name}['calls']", state.get("calls"), minimum=0)
        check_count(f"{name}['rounds']", state.get("rounds"), minimum=0)


def check_reference(name: str, ref: Any) -> None:
    """An end-to-end reference: the measured original (finite, > 0), the input shapes, and
    observations with finite, non-negative terms and ratios (a negative one would let plans
    predict below zero)."""
    check_mapping(name, ref)
    check_number(f"{name}['original_ms']", ref.get("original_ms"), minimum=0, strict=True,
                 hint="milliseconds; re-measure the table")
    inputs = ref.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgumentError(f"{name}['inputs'] must be a list of input shapes; got {inputs!r}")
    for k, shape in enumerate(inputs):
        check_shape(f"{name}['inputs'][{k}]", shape)
    observations = ref.get("observations")
    if not isinstance(observations, list) or not observations:
        raise InvalidArgumentError(f"{name}['observations'] must be a non-empty list; got {observations!r}")
    for k, obs in enumerate(observations):
        where = f"{name}['observations'][{k}]"
        check_mapping(where, obs)
        check_number(f"{where}['terms_ms']", obs.get("terms_ms"), minimum=0, hint="milliseconds")
        check_count(f"{where}['ops']", obs.get("ops"), minimum=0)
        check_number(f"{where}['ratio']", obs.get("ratio"), minimum=0, strict=True, hint="measured / original")
        if "pruned" in obs:
            check_count(f"{where}['pruned']", obs["pruned"], minimum=0)


def limits_dict(limits: BlockLimits) -> dict:
    return dataclasses.asdict(limits)
