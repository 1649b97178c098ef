"""fxmerge: latency-aware CNN depth compression as torch.fx graph passes.

>>> import torch, torchvision, fxmerge
>>> model = torchvision.models.mobilenet_v2().eval()
>>> x = torch.randn(1, 3, 64, 64)
>>> analysis = fxmerge.analyze(model, (x,))
>>> merged = fxmerge.merge(model, fxmerge.Plan.drop_all(analysis))

The public names below are loaded on first use (PEP 562), so that ``import fxmerge`` and
``fxmerge --help`` do not wait for torch; ARCHITECTURE.md says which module each comes from.
"""
from __future__ import annotations

import importlib
import importlib.util
import os as _os
import sys as _sys
from typing import TYPE_CHECKING, Any


def _passes_from_checkout() -> None:
    """The repository keeps the passes in a top-level ``passes/`` folder that setup.cfg installs
    as ``fxmerge.passes``. When fxmerge is imported straight from a checkout (not installed),
    load that folder as ``fxmerge.passes`` — also when an editable install of *another*
    checkout would answer for it (its finder knows only its own folder)."""
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "passes")
    if not _os.path.isfile(_os.path.join(folder, "dp.py")):
        return  # installed: the passes live inside the package
    found = importlib.util.find_spec(f"{__name__}.passes")
    if found is not None and found.origin and _os.path.dirname(_os.path.abspath(found.origin)) == folder:
        return
    spec = importlib.util.spec_from_file_location(f"{__name__}.passes", _os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_passes_from_checkout()

# public name -> the module that defines it
_PUBLIC = {
    "ConvGeometry": "fxmerge.algebra",
    "Analysis": "fxmerge.records", "BlockLimits": "fxmerge.records", "Chain": "fxmerge.records",
    "ImportanceKey": "fxmerge.records",
    "ChainPlan": "fxmerge.plans", "Plan": "fxmerge.plans", "PlanReport": "fxmerge.report",
    "TraceOptions": "fxmerge.passes.tracing",
    "analyze": "fxmerge.passes.analysis", "linearize": "fxmerge.passes.rewrite", "merge": "fxmerge.passes.rewrite",
    "activation_registry": "fxmerge.passes.activations", "register_activation": "fxmerge.passes.activations",
    "unregister_activation": "fxmerge.passes.activations",
    "reparameterize": "fxmerge.reparameterization",
    "LatencyTable": "fxmerge.latency", "ImportanceTable": "fxmerge.importance",
    "BACKENDS": "fxmerge.backends", "Backend": "fxmerge.backends", "backend_registry": "fxmerge.backends",
    "compare_latency": "fxmerge.backends", "measure_latency": "fxmerge.backends",
    "TimingNoiseWarning": "fxmerge.timing",
    "register_backend": "fxmerge.backends", "unregister_backend": "fxmerge.backends",
    "plan": "fxmerge.planner", "frontier": "fxmerge.planner",
    "compress": "fxmerge.api", "plan_of": "fxmerge.api",
    "distill_finetune": "fxmerge.distill", "kd_loss": "fxmerge.distill", "sgd_finetune": "fxmerge.distill",
    "save_compressed": "fxmerge.artifacts", "load_compressed": "fxmerge.artifacts",
    "save": "fxmerge.artifacts", "load": "fxmerge.artifacts",  # old names of the two above
    **{name: "fxmerge.errors" for name in (
        "FxMergeError", "EnvironmentMismatchError", "InfeasibleBudgetError", "InvalidArgumentError",
        "InvalidPlanError", "MalformedFileError", "MissingLatencyError", "PlanMismatchError", "TraceFailedError",
        "UnsupportedModelError", "VerificationError")},
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``fxmerge.importance``), imported on first use."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'fxmerge' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what IDEs and type checkers see
    from fxmerge.algebra import ConvGeometry
    from fxmerge.api import compress, plan_of
    from fxmerge.artifacts import load, load_compressed, save, save_compressed
    from fxmerge.backends import (BACKENDS, Backend, backend_registry, compare_latency, measure_latency,
                                  register_backend, unregister_backend)
    from fxmerge.distill import distill_finetune, kd_loss, sgd_finetune
    from fxmerge.errors import (EnvironmentMismatchError, FxMergeError, InfeasibleBudgetError, InvalidArgumentError,
                                InvalidPlanError, MalformedFileError, MissingLatencyError, PlanMismatchError,
                                TraceFailedError, UnsupportedModelError, VerificationError)
    from fxmerge.importance import ImportanceTable
    from fxmerge.latency import LatencyTable
    from fxmerge.passes.activations import activation_registry, register_activation, unregister_activation
    from fxmerge.passes.analysis import analyze
    from fxmerge.passes.rewrite import linearize, merge
    from fxmerge.passes.tracing import TraceOptions
    from fxmerge.planner import frontier, plan
    from fxmerge.plans import ChainPlan, Plan
    from fxmerge.records import Analysis, BlockLimits, Chain, ImportanceKey
    from fxmerge.reparameterization import reparameterize
    from fxmerge.report import PlanReport
    from fxmerge.timing import TimingNoiseWarning
