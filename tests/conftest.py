"""Shared checks: every rewrite is compared numerically with the graph it claims to equal."""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxmerge
from fxmerge.algebra import ConvGeometry

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}

# One intra-op thread: the suite's tensors are small, and with more threads than free cores
# (CI runners, a busy laptop) OpenMP barriers make small convs 100-1000x slower.
torch.set_num_threads(1)


def randomize(model: nn.Module, seed: int = 0, calibrate_on: torch.Tensor | None = None) -> nn.Module:
    """Give BatchNorms non-trivial statistics so folding is really exercised.

    With ``calibrate_on``, the running statistics are first measured on that batch (as training
    would leave them), then jittered: signals keep their scale through deep nets, so outputs
    keep depending on the input (random statistics can kill the signal of a deep net)."""
    g = torch.Generator().manual_seed(seed)
    bns = _batchnorms(model)
    with torch.no_grad():
        for m in bns:
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        if calibrate_on is not None:
            recalibrate(model, calibrate_on)
            for m in bns:
                m.running_mean.add_(0.1 * (torch.rand(m.running_mean.shape, generator=g) - 0.5))
                m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
        else:
            for m in bns:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


@torch.no_grad()
def recalibrate(model: nn.Module, batch: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``batch`` flowing through ``model``
    (one train-mode pass, cumulative average), as training leaves them."""
    bns = _batchnorms(model)
    momentum = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()(batch)
    model.train(was_training)
    for m in bns:
        m.momentum = momentum[m]


def finetune_like(linear: nn.Module, inputs: tuple, seed: int = 1, scale: float = 0.05) -> None:
    """Simulate fine-tuning a linearized net: its BatchNorm statistics re-measured on a batch
    like ``inputs`` (so, as after real fine-tuning, signals keep their scale with activations
    dropped), then every parameter moved a little."""
    g = torch.Generator().manual_seed(seed)
    x = inputs[0]
    recalibrate(linear, torch.randn((4,) + tuple(x.shape[1:]), generator=g, dtype=x.dtype))
    with torch.no_grad():
        for p in linear.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype) * p.abs().mean())


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


def conv_work(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every conv a forward pass of ``model`` runs (from its real output shapes)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_channels // module.groups * module.weight[0, 0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def first_tensor(out):
    """A model's output as one tensor (dicts and tuples of outputs concatenated)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return torch.cat([first_tensor(v).flatten() for v in out.values()])
    return torch.cat([first_tensor(v).flatten() for v in out])


def kept_activations(plan: fxmerge.Plan) -> list[str]:
    """Activation nodes a plan keeps: they survive in the linearized and the merged graph, and
    their inputs are the maps at the chains' kept positions and ends."""
    return [c.activations[p] for c in plan.chains for p in sorted(c.activations) if p not in c.dropped]


def tapped(model: fx.GraphModule, taps: list[str]) -> fx.GraphModule:
    """A copy of fxmerge's graph of ``model`` that returns its output and the input of every
    node named in ``taps`` (the same names exist in the original trace, the linearized and the
    merged graph), so comparisons see every chain's pre-activation maps, not just a head that
    may saturate."""
    gm = copy.deepcopy(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = [output.args[0]] + [nodes[name].args[0] for name in taps if name in nodes]
    gm.graph.erase_node(output)
    gm.graph.output(tuple(values))
    gm.recompile()
    gm.meta["tapped"] = True
    return gm


def _values(module: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*inputs)
    if getattr(module, "meta", {}).get("tapped"):
        return [first_tensor(out[0])] + [v for v in out[1:]]
    return [first_tensor(out)]


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(rel_err(x, y) for x, y in zip(a, b))


def assert_same(candidate: nn.Module, reference: nn.Module, inputs: tuple, dtype, what: str,
                taps: list[str] = ()) -> None:
    """``candidate`` computes what ``reference`` does, up to float rounding: their outputs and
    (for fxmerge GraphModules) the inputs of the ``taps`` nodes, each compared on its own
    scale; and what is compared depends on the input (a saturated head would make two wrong
    models agree).

    float64: relative error <= 1e-9. float32: both are compared with ``reference`` run in
    float64; the candidate may be off by at most 4x the reference's own float32 rounding error
    (and never less than 1e-4) — deep nets amplify rounding (drop-all on random weights
    overflows float32's range), and a merged conv must not add more error than float32
    arithmetic of the reference does."""
    if taps:
        candidate, reference = tapped(candidate, list(taps)), tapped(reference, list(taps))
    got, want = _values(candidate, inputs), _values(reference, inputs)
    assert len(got) == len(want), f"{what}: {len(got)} vs {len(want)} tapped values"
    other = _values(reference, tuple(torch.randn_like(x) if x.is_floating_point() else x for x in inputs))
    assert _max_err(other, want) > 1e-3, f"{what}: the compared values barely depend on the input"
    if dtype == torch.float64:
        err = _max_err(got, want)
        assert err <= TOL[dtype], f"{what}: {err:.2e} (float64)"
        return
    truth = _values(copy.deepcopy(reference).double(), tuple(x.double() for x in inputs))
    floor = _max_err([w.double() for w in want], truth)
    err = _max_err([g.double() for g in got], truth)
    assert err <= max(TOL[dtype], 4 * floor), f"{what}: {err:.2e} from the float64 result, float32 rounding {floor:.2e}"


def check_equals_original(model: nn.Module, inputs: tuple, analysis: fxmerge.Analysis, dtype,
                          trace: fxmerge.TraceOptions | None = None) -> None:
    """Plans that keep every activation (keep-all, fold-only) give the *original* model back:
    linearized and merged, compared with the model itself (its output), and with its plain
    trace at every activation's input."""
    traced = fxmerge.passes.tracing.prepare(model, inputs, fxmerge.passes.tracing.check_trace(trace))
    for kind in ("keep_all", "fold_only"):
        plan = getattr(fxmerge.Plan, kind)(analysis)
        assert plan.is_exact, f"{kind} is not exact"
        for rewrite in (fxmerge.linearize, fxmerge.merge):
            gm = rewrite(model, plan, trace=trace)
            gm.graph.lint()
            assert_same(gm, model, inputs, dtype, f"{rewrite.__name__}({kind}) vs the original model")
            assert_same(gm, traced, inputs, dtype, f"{rewrite.__name__}({kind}) vs the original, per activation",
                        kept_activations(plan))


def check_exact(model: nn.Module, inputs: tuple, *, dtype=torch.float32, plans=("drop_all", "keep_all"),
                finetune: bool = True, **analyze_kwargs) -> Checked:
    """merge(m, p) == linearize(m, p) in eval mode for each plan (also after 'fine-tuning' the
    linearized net), at the output and every kept activation's input, with graph.lint() on
    every output; keep-all and fold-only plans equal the original model; every compared value
    depends on the input. Returns what it built."""
    model = copy.deepcopy(model).to(dtype).eval()
    inputs = tuple(x.to(dtype) for x in inputs)
    analysis = fxmerge.analyze(model, inputs, **analyze_kwargs)
    trace = analyze_kwargs.get("trace")
    check_equals_original(model, inputs, analysis, dtype, trace)
    out = Checked(analysis, {}, {}, {})
    if any(c.prunable for c in analysis.chains):
        plans = (*plans, "random_prune")  # every exactness check also prunes (LayerMerge)
    for kind in plans:
        plan = random_prune_plan(analysis) if kind == "random_prune" else getattr(fxmerge.Plan, kind)(analysis)
        lin = fxmerge.linearize(model, plan, trace=trace).eval()
        merged = fxmerge.merge(model, plan, trace=trace).eval()
        for gm in (lin, merged):
            gm.graph.lint()
        taps = kept_activations(plan)
        # A lossy plan applied to weights trained with its activations makes signals explode
        # (1e5 after drop-all); BatchNorm folded at that scale is ill-conditioned in float32,
        # for any folding tool. float32 is checked on the fine-tuned net, whose scale is sane.
        if dtype == torch.float64 or plan.is_exact:
            assert_same(merged, lin, inputs, dtype, f"{kind}: merge vs linearize", taps)
        if finetune or not plan.is_exact:
            tuned = copy.deepcopy(lin)
            finetune_like(tuned, inputs)
            merged_tuned = fxmerge.merge(tuned, plan).eval()
            merged_tuned.graph.lint()
            assert_same(merged_tuned, tuned, inputs, dtype, f"{kind} after fine-tuning: merge vs linearize", taps)
        _assert_specs_match(analysis, plan, merged)
        out.plans[kind], out.linearized[kind], out.merged[kind] = plan, lin, merged
    return out


def random_prune_plan(analysis: fxmerge.Analysis, seed: int = 0) -> fxmerge.Plan:
    """About half the droppable activations kept and half the prunable convs pruned, at
    random (seeded), merged as far as valid."""
    rng = random.Random(seed + analysis.num_layers)
    choice = {c.index: ([p for p in c.droppable if rng.random() < 0.5], None) for c in analysis.chains}
    pruned = {c.index: [p for p in c.prunable if rng.random() < 0.5] for c in analysis.chains}
    return fxmerge.Plan.from_positions(analysis, choice, lossy=True, pruned=pruned)


def segment_spec(chain, cp: fxmerge.plans.ChainPlan, a: int, b: int):
    """The merged geometry of segment (a, b] with the plan's pruned layers as identities."""
    if not cp.pruned:
        return chain.specs[(a, b)]
    geoms = [ConvGeometry.identity(l.geometry.in_channels, l.geometry.ndim) if p in cp.pruned else l.geometry
             for p, l in enumerate(chain.layers[a:b], start=a + 1)]
    return probe_geometry(geoms, [(s.source - a, s.target - a) for s in chain.skips if a <= s.source and s.target <= b])


# --------------------------------------------------------------------------- geometry oracle


def probe_geometry(layers: list[ConvGeometry], skips: list[tuple[int, int]] = ()) -> ConvGeometry:
    """The geometry of the one convolution equal to the run ``layers`` (padding moved to its
    front) with identity residuals ``skips`` ((s, t): the map after layer t gets the map after
    layer s added), found by running the layers, not by a formula: convolutions with positive
    weights on positive inputs (so no term cancels and every structural dependency shows).

    Spatially, a one-channel copy of the run: the input pixels one output pixel depends on
    give the taps (kernel and dilation: their extent and the gcd of their offsets), the shift
    between two neighbouring outputs' taps the stride, where the taps start the front padding,
    and the output sizes over ``stride`` consecutive input sizes the total padding. Channels:
    the run as 1x1 convolutions with the layers' groups, on one one-hot input per input channel;
    the groups are the most blocks the output-to-input dependencies fit in."""
    kernel, stride, dilation, padding = _probe_spatial(layers, skips)
    return ConvGeometry(layers[0].in_channels, layers[-1].out_channels, kernel, stride, padding, dilation,
                        _probe_groups(layers, skips))


def _run_layers(layers, skips, x, weights, kernels: bool = True):
    conv = (F.conv1d, F.conv2d, F.conv3d)[layers[0].ndim - 1]
    maps = [x]
    for p, (g, w) in enumerate(zip(layers, weights), start=1):
        if kernels:
            pad = [v for lo, hi in reversed(g.padding) for v in (lo, hi)]  # F.pad: last dimension first
            h = conv(F.pad(maps[-1], pad), w, stride=g.stride, dilation=g.dilation)
        else:
            h = F.conv1d(maps[-1], w, groups=g.groups)
        for s, t in skips:
            if t == p:
                h = h + maps[s]
        maps.append(h)
    return maps[-1]


def _full_pixels(layers, skips, weights, size: int):
    """The output pixels whose inputs all lie inside an input of ``size`` (none reads padding),
    as one index range per dimension; None when there are fewer than two along a dimension.
    With positive weights on an all-ones input, a pixel's value is the sum over all its paths,
    so exactly those pixels reach the value of an unbounded input (here: a twice larger one)."""
    ones = [torch.ones((1, 1) + (n,) * layers[0].ndim, dtype=torch.float64) for n in (size, 2 * size)]
    try:  # an input too small for the run raises
        with torch.no_grad():
            y, y_large = (_run_layers(layers, skips, x, weights)[0, 0] for x in ones)
    except RuntimeError:
        return None
    if not y.numel() or not math.isclose(float(y.max()), float(y_large.max()), rel_tol=1e-9):
        return None
    full = (y >= float(y_large.max()) * (1 - 1e-9)).nonzero()
    ranges = [(int(full[:, d].min()), int(full[:, d].max())) for d in range(layers[0].ndim)]
    return ranges if all(hi > lo for lo, hi in ranges) else None


def _taps(layers, skips, weights, size: int, at: tuple[int, ...]) -> list[list[int]]:
    """Per dimension, the sorted input positions the output pixel ``at`` depends on."""
    x = torch.ones((1, 1) + (size,) * layers[0].ndim, dtype=torch.float64, requires_grad=True)
    _run_layers(layers, skips, x, weights)[(0, 0) + at].backward()
    nz = x.grad[0, 0].nonzero()
    return [sorted(set(nz[:, d].tolist())) for d in range(layers[0].ndim)]


def _probe_spatial(layers, skips):
    g = torch.Generator().manual_seed(0)
    weights = [torch.rand((1, 1) + l.kernel, generator=g, dtype=torch.float64) + 0.5 for l in layers]
    ndim, size = layers[0].ndim, 8
    while (full := _full_pixels(layers, skips, weights, size)) is None:
        assert size < 4096, "the run's receptive field did not fit in 4096 pixels"
        size *= 2
    at = tuple(lo for lo, _ in full)
    here, there = _taps(layers, skips, weights, size, at), _taps(layers, skips, weights, size, tuple(j + 1 for j in at))
    kernel, stride, dilation, padding = [], [], [], []
    for d in range(ndim):
        taps, first = here[d], here[d][0]
        grid = math.gcd(*(t - first for t in taps)) or 1
        extent, step = taps[-1] - first, there[d][0] - first
        front = at[d] * step - first
        total = _total_padding(layers, skips, weights, size, d, extent, step)
        kernel.append(extent // grid + 1)
        dilation.append(grid)
        stride.append(step)
        padding.append((front, total - front))
    return tuple(kernel), tuple(stride), tuple(dilation), tuple(padding)


def _total_padding(layers, skips, weights, size: int, d: int, extent: int, step: int) -> int:
    """Front + back padding along d: the one value P for which floor((n + P - extent - 1) / step) + 1
    (a convolution's output size, ``extent`` = dilation * (kernel - 1)) is the run's output size
    at ``step`` consecutive input sizes n."""
    candidates = None
    for n in range(size, size + step):
        shape = [size] * layers[0].ndim
        shape[d] = n
        with torch.no_grad():
            m = _run_layers(layers, skips, torch.ones([1, 1] + shape, dtype=torch.float64), weights).shape[2 + d]
        low = step * (m - 1) - n + extent + 1
        here = set(range(low, low + step))
        candidates = here if candidates is None else candidates & here
    (total,) = candidates
    return total


def _probe_groups(layers, skips) -> int:
    g = torch.Generator().manual_seed(1)
    weights = [torch.rand((l.out_channels, l.in_channels // l.groups, 1), generator=g) + 0.5 for l in layers]
    c_in, c_out = layers[0].in_channels, layers[-1].out_channels
    with torch.no_grad():
        y = _run_layers(layers, skips, torch.eye(c_in)[:, :, None], weights, kernels=False)
    depends = y[:, :, 0].T > 0  # (output channel, input channel)
    for groups in range(math.gcd(c_in, c_out), 0, -1):
        if c_in % groups == 0 and c_out % groups == 0:
            blocks = depends.reshape(groups, c_out // groups, groups, c_in // groups).any(3).any(1)
            if not (blocks & ~torch.eye(groups, dtype=torch.bool)).any():  # no output block reads another's input
                return groups
    raise AssertionError("unreachable: one group always fits")


def _assert_specs_match(analysis: fxmerge.Analysis, plan: fxmerge.Plan, merged: fx.GraphModule) -> None:
    """The geometry the analysis predicts for each block is the conv merge really builds (and
    a fully pruned segment builds none)."""
    modules = dict(merged.named_modules())
    for chain, cp in zip(analysis.chains, plan.chains):
        for a, b in cp.segments():
            kept = cp.kept_layers(a, b)
            if not kept:
                gone = {cp.layers[p - 1][0] for p in range(a + 1, b + 1)}
                assert not any(gone & set(name.split("__")[1:]) for name in modules), f"{gone} still built"
                continue
            first, last = cp.layers[kept[0] - 1][0], cp.layers[kept[-1] - 1][0]
            name = f"folded__{first}" if first == last else f"merged__{first}__to__{last}"
            spec, conv = segment_spec(chain, cp, a, b), modules[name]
            assert (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), conv.groups) == (
                spec.kernel, spec.stride, spec.dilation, spec.groups), f"{name}: {conv} vs {spec}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Training tests run on one torch thread: results then repeat bit for bit whatever the
    machine's core count (reductions are ordered by the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
