"""Shared checks: every rewrite is compared numerically with the graph it claims to equal."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxmerge

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial statistics so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def perturb(gm: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Simulate fine-tuning: move every parameter and BN statistic a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in gm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.add_(scale * torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
                m.running_var.mul_(1 + scale * torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def count_convs(gm: fx.GraphModule) -> int:
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd):
            n += 1
        elif node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d):
            n += 1
    return n


@dataclass
class Checked:
    analysis: fxmerge.Analysis
    plans: dict
    linearized: dict
    merged: dict


def check_exact(model: nn.Module, inputs: tuple, *, dtype=torch.float32, plans=("drop_all", "keep_all"),
                finetune: bool = True, **analyze_kwargs) -> Checked:
    """merge(m, p) == linearize(m, p) in eval mode for each plan (also after 'fine-tuning' the
    linearized net), with graph.lint() on every output. Returns what it built."""
    model = copy.deepcopy(model).to(dtype).eval()
    inputs = tuple(x.to(dtype) for x in inputs)
    analysis = fxmerge.analyze(model, inputs, **analyze_kwargs)
    out = Checked(analysis, {}, {}, {})
    for kind in plans:
        plan = getattr(fxmerge.Plan, kind)(analysis)
        lin = fxmerge.linearize(model, plan, **_trace_kwargs(analyze_kwargs)).eval()
        merged = fxmerge.merge(model, plan, **_trace_kwargs(analyze_kwargs)).eval()
        for gm in (lin, merged):
            gm.graph.lint()
        with torch.no_grad():
            ref = lin(*inputs)
            err = rel_err(merged(*inputs), ref)
        assert err <= TOL[dtype], f"{kind}: merge differs from linearize by {err:.2e} ({dtype})"
        if finetune:
            tuned = copy.deepcopy(lin)
            perturb(tuned)
            merged_tuned = fxmerge.merge(tuned, plan).eval()
            merged_tuned.graph.lint()
            with torch.no_grad():
                err = rel_err(merged_tuned(*inputs), tuned(*inputs))
            assert err <= TOL[dtype], f"{kind} after fine-tuning: {err:.2e} ({dtype})"
        _assert_specs_match(analysis, plan, merged)
        out.plans[kind], out.linearized[kind], out.merged[kind] = plan, lin, merged
    return out


def _assert_specs_match(analysis: fxmerge.Analysis, plan: fxmerge.Plan, merged: fx.GraphModule) -> None:
    """The geometry the analysis predicts for each block is the conv merge really builds."""
    modules = dict(merged.named_modules())
    for chain, cp in zip(analysis.chains, plan.chains):
        for a, b in cp.segments():
            first, last = cp.layers[a][0], cp.layers[b - 1][0]
            name = f"folded__{first}" if a + 1 == b else f"merged__{first}__to__{last}"
            spec, conv = chain.specs[(a, b)], modules[name]
            assert (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), conv.groups) == (
                spec.kernel, spec.stride, spec.dilation, spec.groups), f"{name}: {conv} vs {spec}"


def feasible_budget(model: nn.Module, table: "fxmerge.LatencyTable", **kwargs) -> float:
    """Halfway between the smallest feasible budget and the original's predicted latency, in ms
    (quick test tables are noisy, so fixed fractions could be infeasible)."""
    with pytest.raises(fxmerge.InfeasibleBudgetError) as info:
        fxmerge.plan(model, table, budget_ms=0.0, **kwargs)
    original = fxmerge.plan(model, table, **kwargs).info["predicted_ms"]["original"]
    assert info.value.smallest_ms < original
    return (info.value.smallest_ms + original) / 2


def _trace_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k in ("tracer", "leaf_modules", "concrete_args")}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
