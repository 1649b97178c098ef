"""Short digests that say what a file was made from: a model's structure and input shapes
(latency-table references), its weights (importance tables resume only into their own model).

>>> import torch, torch.nn as nn
>>> m = nn.Conv2d(1, 1, 1)
>>> parameter_digest(m) == parameter_digest(m)
True
"""
from __future__ import annotations

import hashlib
import json

import torch
import torch.nn as nn

from fxmerge.plans import Plan
from fxmerge.records import Analysis


def structure_digest(analysis: Analysis) -> str:
    """The model's structure as plans see it: the fold-only plan's fingerprint."""
    return Plan.fold_only(analysis).fingerprint()


def model_key(analysis: Analysis) -> str:
    """Identifies a model and input shape, for the end-to-end reference a table keeps."""
    inputs = [n.meta.get("tensor_meta") for n in analysis.graph_module.graph.nodes if n.op == "placeholder"]
    shapes = [list(m.shape) if m is not None and hasattr(m, "shape") else None for m in inputs]
    body = json.dumps({"plan": structure_digest(analysis), "inputs": shapes}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def parameter_digest(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes), in
    state_dict order: two models with the same digest compute the same function."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype} {tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # extra state: whatever the module chose to store
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def model_identity(model: nn.Module, analysis: Analysis) -> dict:
    """What an importance table was estimated on: the model's structure and its weights."""
    return {"structure": structure_digest(analysis), "parameters": parameter_digest(model)}
