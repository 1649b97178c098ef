"""The user-facing entry points: one function per arrow of the data flow (DESIGN.md)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.passes.analysis import Analysis, BlockLimits, analyze_graph
from fxmerge.passes.pruning import add_prune_options
from fxmerge.passes.tracing import check_model, input_specs, prepare
from fxmerge.validation import check_inputs

if TYPE_CHECKING:
    from fxmerge.plans import Plan


def analyze(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, tracer: fx.Tracer | None = None,
            leaf_modules: Sequence[type] = (), concrete_args: dict[str, Any] | None = None,
            limits: BlockLimits | None = None, prune_layers: bool = False) -> Analysis:
    """Trace ``model`` (an ``nn.Module``, a ``torch.compile``d one, or a GraphModule) and find its
    mergeable chains, droppable activations, identity skips, forced breaks, border positions
    and valid blocks.

    ``example_inputs`` is a tuple of tensors, as for ``torch.export``; shapes come from running
    them through the traced graph once, and padding that depends on the input size is fixed for
    them. The model is analysed in eval mode on a private copy (a model in train mode gets a
    warning and is left as it is). Submodules fx cannot trace are kept whole; convs inside them
    are listed in ``print(analysis)``. ``tracer`` / ``leaf_modules`` / ``concrete_args`` help
    with models fx cannot trace as they are. ``limits`` bounds the candidate blocks.
    ``prune_layers=True`` also finds each block's ways of pruning layers (LayerMerge;
    ``chain.options``, :mod:`fxmerge.passes.pruning`).

    >>> import torch, torchvision, fxmerge
    >>> a = fxmerge.analyze(torchvision.models.mobilenet_v2(), (torch.randn(1, 3, 64, 64),))
    >>> a.chains[0].length, len(a.chains[0].droppable)
    (52, 34)
    """
    example_inputs = check_inputs("example_inputs", example_inputs)
    gm = prepare(model, example_inputs, tracer=tracer, leaf_modules=leaf_modules, concrete_args=concrete_args)
    analysis = analyze_graph(gm, limits, inputs=input_specs(example_inputs))
    return add_prune_options(analysis) if prune_layers else analysis


def compress(model: nn.Module, latency_table: Any, **kwargs: Any) -> fx.GraphModule:
    """``plan`` -> ``linearize`` -> ``merge`` in one call: the faster, equivalent GraphModule.

    Keyword arguments go to :func:`fxmerge.plan` (``budget``, ``budget_ms``, ``importance``,
    ``example_inputs``, ...). The plan stays retrievable with :func:`fxmerge.plan_of`.

    >>> compressed = fxmerge.compress(model, table, budget=0.6)  # doctest: +SKIP
    >>> print(fxmerge.plan_of(compressed))                        # doctest: +SKIP
    """
    from fxmerge.passes.rewrite import merge
    from fxmerge.planning import plan

    trace_kwargs = {k: kwargs[k] for k in ("tracer", "leaf_modules", "concrete_args") if k in kwargs}
    chosen = plan(model, latency_table, **kwargs)
    return merge(model, chosen, **trace_kwargs)


def plan_of(module: fx.GraphModule) -> "Plan":
    """The plan a module returned by :func:`merge` / :func:`compress` was built with."""
    from fxmerge.errors import FxMergeError
    from fxmerge.plans import Plan

    record = getattr(module, "meta", {}).get("fxmerge", {})
    if "plan_json" not in record:
        raise FxMergeError("this module was not produced by fxmerge.merge / fxmerge.compress")
    return Plan.from_dict(record["plan_json"])


_REPARAMETERIZE_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")


def reparameterize(model: nn.Module) -> nn.Module:
    """A deploy-form copy of a model with train-time branches (RepVGG, MobileOne, FastViT, ...):
    every submodule exposing ``fuse()`` (which returns its replacement), ``reparameterize()`` or
    ``switch_to_deploy()`` (in place) has it called, on a copy in eval mode. The convention
    timm's ``reparameterize_model`` follows; here for any model, with or without timm. Run it
    before fxmerge: the branches become plain convs, which fxmerge then merges across.

    >>> import timm, torch, fxmerge                                       # doctest: +SKIP
    >>> deploy = fxmerge.reparameterize(timm.create_model("repvgg_a0"))   # doctest: +SKIP
    >>> fxmerge.analyze(deploy, (torch.randn(1, 3, 224, 224),))           # doctest: +SKIP
    """
    model = copy.deepcopy(check_model(model)).eval()

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            for hook in _REPARAMETERIZE_HOOKS:
                fn = getattr(child, hook, None)
                if callable(fn):
                    result = fn()
                    if hook == "fuse" and isinstance(result, nn.Module) and result is not child:
                        setattr(parent, name, result)
                        child = result
                    break
            visit(child)

    visit(model)
    return model.eval()
