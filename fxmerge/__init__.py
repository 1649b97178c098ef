"""fxmerge: latency-aware CNN depth compression as torch.fx graph passes.

>>> import torch, torchvision, fxmerge
>>> model = torchvision.models.mobilenet_v2().eval()
>>> x = torch.randn(1, 3, 64, 64)
>>> analysis = fxmerge.analyze(model, (x,))
>>> merged = fxmerge.merge(model, fxmerge.Plan.drop_all(analysis))
"""
import os as _os

# The repository keeps the passes in a top-level `passes/` folder that setup.cfg installs as
# `fxmerge.passes`. When fxmerge is imported straight from a checkout (its root on sys.path),
# let the package find that folder too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "passes")) and _os.path.isfile(_os.path.join(_root, "passes", "dp.py")):
    __path__.append(_root)

from fxmerge.algebra import ConvGeometry
from fxmerge.artifacts import load, save
from fxmerge.api import analyze, compress, plan_of, reparameterize
from fxmerge.errors import (EnvironmentMismatchError, FxMergeError, InvalidArgumentError, InvalidPlanError,
                             MalformedFileError, PlanMismatchError, TraceFailedError, UnsupportedModelError)
from fxmerge.distill import distill_finetune, kd_loss
from fxmerge.importance import ImportanceTable
from fxmerge.latency import LatencyTable, MissingLatencyError
from fxmerge.planning import InfeasibleBudgetError, frontier, plan
from fxmerge.backends import BACKENDS, Backend, measure_latency, register_backend
from fxmerge.calibration import VerificationError
from fxmerge.passes.analysis import Analysis, BlockLimits, Chain
from fxmerge.passes.patterns import activation_registry, register_activation, unregister_activation
from fxmerge.passes.rewrite import linearize, merge
from fxmerge.plans import ChainPlan, Plan

__all__ = [
    "Analysis", "BACKENDS", "Backend", "BlockLimits", "Chain", "ChainPlan", "ConvGeometry", "EnvironmentMismatchError", "FxMergeError",
    "ImportanceTable", "InfeasibleBudgetError", "InvalidArgumentError", "InvalidPlanError", "MalformedFileError",
    "UnsupportedModelError", "VerificationError", "LatencyTable", "MissingLatencyError", "Plan", "PlanMismatchError", "TraceFailedError",
    "activation_registry", "analyze", "compress", "distill_finetune", "frontier", "kd_loss", "linearize", "load", "measure_latency", "merge", "plan", "plan_of",
    "register_activation", "register_backend", "reparameterize", "save", "unregister_activation",
]
__version__ = "0.1.0"
