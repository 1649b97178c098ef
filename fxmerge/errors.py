"""The public exception types. Every message names the node or block and says what to do."""


class FxMergeError(Exception):
    """Base class of every error fxmerge raises on purpose."""


class TraceFailedError(FxMergeError):
    """The model could not be traced into an fx graph."""


class PlanMismatchError(FxMergeError):
    """A plan does not fit the model it is applied to."""


class InvalidPlanError(FxMergeError):
    """A plan's activation or boundary sets break a merge rule."""
