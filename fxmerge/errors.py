"""The public exception types. Every message names the argument, file, node or block and says
what to do. All of them are :class:`FxMergeError`, so ``except fxmerge.FxMergeError`` catches
everything fxmerge raises on purpose."""


class FxMergeError(Exception):
    """Base class of every error fxmerge raises on purpose."""


class InvalidArgumentError(FxMergeError, ValueError):
    """An argument of a public function or CLI command has the wrong type or value."""


class MalformedFileError(FxMergeError):
    """A plan, latency-table or importance file cannot be read: not JSON, truncated, or with
    entries of the wrong type (the message names the file and the entry)."""


class EnvironmentMismatchError(FxMergeError):
    """A file was made for another backend, dtype, device or model than it is used with."""


class UnsupportedModelError(FxMergeError):
    """The model holds something fxmerge cannot handle faithfully (e.g. forward pre-hooks that
    rewrite conv weights, or an already exported ATen graph)."""


class TraceFailedError(FxMergeError):
    """The model could not be traced into an fx graph."""


class PlanMismatchError(FxMergeError):
    """A plan does not fit the model it is applied to."""


class InvalidPlanError(FxMergeError):
    """A plan's activation or boundary sets break a merge rule."""


class InfeasibleBudgetError(FxMergeError):
    """No plan fits the latency budget; ``smallest_ms`` (also in the message) is the least
    budget that has one."""

    def __init__(self, message: str, smallest_ms: float):
        super().__init__(message)
        self.smallest_ms = smallest_ms


class MissingLatencyError(FxMergeError):
    """The latency table lacks terms a model needs."""


class VerificationError(FxMergeError):
    """Verified planning ran out of rounds before a plan measured within the budget. ``rounds``
    holds what each round predicted and measured; ``best`` is the fastest plan measured."""

    def __init__(self, message: str, rounds: list, best: object):
        super().__init__(message)
        self.rounds, self.best = rounds, best


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of its message"`` (just the type when the message is empty): how
    fxmerge carries a library's error into one line of its own."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
