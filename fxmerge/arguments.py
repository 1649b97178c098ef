"""Argument checks where inputs enter fxmerge, in one place.

Each checker takes the argument's *name* (as the user spells it) and its value, returns the
value in a normal form, and raises :class:`~fxmerge.errors.InvalidArgumentError` (also a
``ValueError``) whose message names the argument, says what is wrong and what to give instead.
The public functions call these before any tracing or timing, so bad input fails in
milliseconds, not after a twenty-minute measurement.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fxmerge.errors import FxMergeError, InvalidArgumentError


def _shown(value: Any) -> str:
    """The value as a message shows it: short, and with its type when that is the problem."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool) else \
        f"{text} ({type(value).__name__})"


def is_real(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an int to Python, never a budget to us)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A real number (not a bool) that is neither infinite nor NaN."""
    return is_real(value) and math.isfinite(value)


def check_number(name: str, value: Any, *, minimum: float | None = None, strict: bool = False,
                 hint: str = "", error: type[FxMergeError] = InvalidArgumentError) -> float:
    """A finite real number, at least ``minimum`` (``> minimum`` with ``strict``)."""
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    if not is_finite(value) or (
            minimum is not None and (value <= minimum if strict else value < minimum)):
        raise error(f"{name} must be a finite number{bound}{f' ({hint})' if hint else ''}; got {_shown(value)}")
    return float(value)


def check_budget(name: str, value: Any, hint: str) -> float:
    """A latency budget: a finite number > 0. ``hint`` says what the unit is, with an example,
    e.g. ``"a fraction of the original's latency, e.g. 0.6"``."""
    return check_number(name, value, minimum=0, strict=True, hint=hint)


def check_count(name: str, value: Any, *, minimum: int = 1, hint: str = "",
                error: type[FxMergeError] = InvalidArgumentError) -> int:
    """An integer (not a bool, not a float) of at least ``minimum``."""
    if not is_int(value) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}{f' ({hint})' if hint else ''}; got {_shown(value)}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str],
                 error: type[FxMergeError] = InvalidArgumentError) -> str:
    if not isinstance(value, str) or value not in choices:
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}; got {_shown(value)}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False; got {_shown(value)}")
    return value


def check_mapping(name: str, value: Any, error: type[FxMergeError] = InvalidArgumentError) -> Mapping:
    if not isinstance(value, Mapping):
        raise error(f"{name} must be a JSON object / dict; got {_shown(value)}")
    return value


def check_torch_dtype(name: str, value: Any, error: type[FxMergeError] = InvalidArgumentError) -> torch.dtype:
    """The name of a torch dtype, as ``str(dtype)`` without ``torch.`` (e.g. ``"float32"``)."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise error(f"{name} must name a torch dtype such as 'float32' or 'bfloat16'; got {_shown(value)}")
    return dtype


def check_shape(name: str, value: Any, error: type[FxMergeError] = InvalidArgumentError) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(is_int(v) and v >= 0 for v in value):
        raise error(f"{name} must be a list of sizes (integers >= 0), e.g. [1, 3, 224, 224]; got {_shown(value)}")
    return list(value)


# --------------------------------------------------------------------------- the DP grid


def check_resolution(value: Any) -> float | None:
    """``resolution``: None (the DP picks budget / 1000) or a finite number of ms > 0. How fine
    it may be for a budget is the DP's to say (:data:`fxmerge.passes.dp.MAX_GRID_UNITS` grid
    cells at most, so ``resolution=1e-9`` is refused instead of allocating gigabytes)."""
    if value is None:
        return None
    return check_number("resolution", value, minimum=0, strict=True,
                        hint="the DP's cost grid in ms, e.g. 0.01; None picks budget / 1000")


# --------------------------------------------------------------------------- tensors, batches


def check_inputs(name: str, value: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs: a tensor or a non-empty tuple/list of tensors (as for ``torch.export``)."""
    inputs = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InvalidArgumentError(f"{name} must be a tensor or a tuple of tensors, e.g. "
                                   f"(torch.randn(1, 3, 224, 224),); got {_shown(value)}")
    return inputs


def check_batches(name: str, value: Any) -> list:
    """A non-empty sequence of batches (each a tensor or a tuple of model inputs)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Iterable) or isinstance(value, (str, bytes, Mapping)):
        raise InvalidArgumentError(f"{name} must be a list of batches (each a tensor or a tuple of model inputs); "
                                   f"got {_shown(value)}")
    batches = list(value)
    if not batches:
        raise InvalidArgumentError(f"{name} is empty: give at least one batch")
    for k, batch in enumerate(batches):
        check_inputs(f"{name}[{k}]", batch)
    return batches


# --------------------------------------------------------------------------- importance


def check_importance_scores(scores: Any) -> Mapping:
    """Importance scores: a mapping ``(chain, i, j) -> score`` with integer keys ``0 <= i < j``
    and finite scores (pruning options: ``(chain, i, j, pruned layers)``, the layers a tuple of
    integers in i+1..j). Returns it unchanged."""
    if not isinstance(scores, Mapping):
        raise InvalidArgumentError(f"importance must be an ImportanceTable or a mapping (chain, i, j) -> score; "
                                   f"got {_shown(scores)}")
    for key, score in scores.items():
        if not is_importance_key(key):
            raise InvalidArgumentError(f"importance key {key!r} is not a pair (chain, i, j) of integers with "
                                       "0 <= i < j (positions of one chain, as in ImportanceTable), or a pruning "
                                       "option (chain, i, j, (pruned layers in i+1..j, ...))")
        if not is_finite(score):
            raise InvalidArgumentError(f"importance[{key!r}] is {_shown(score)}; every score must be a finite number "
                                       "(re-estimate that pair, or leave it out to forbid it)")
    return scores


def is_importance_key(key: Any) -> bool:
    """``(chain, i, j)`` with integers 0 <= i < j, or ``(chain, i, j, pruned)`` with ``pruned``
    a non-empty sorted tuple of distinct layers in i+1..j."""
    if not (isinstance(key, tuple) and len(key) in (3, 4) and all(is_int(k) for k in key[:3]) and 0 <= key[1] < key[2]):
        return False
    if len(key) == 3:
        return True
    pruned = key[3]
    return (isinstance(pruned, tuple) and len(pruned) > 0 and all(is_int(p) and key[1] < p <= key[2] for p in pruned)
            and list(pruned) == sorted(set(pruned)))


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
