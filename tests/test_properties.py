"""Property-based: random conv runs (kernel 1-5, stride 1-2, dilation 1-2, groups, padding,
BN or not, identity residuals) always merge to exactly their linearized graph.

The suite must not fail by chance (issue 18, item 16): every test here runs under
:data:`SEEDED` — derandomized (the same examples on every run and machine, no example
database), no deadline — with a bounded number of examples, and the generators discard
vacuous cases (a run whose output does not depend on its input, e.g. when every tap of a
dilated kernel lands in the padding) with ``assume`` instead of failing on them.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

import fxmerge
from conftest import check_exact, rel_err

CHANNELS = 4

# Deterministic and bounded: derandomize draws the same examples from a fixed seed on every run
# (so a failure is reproducible and a pass cannot turn into a failure by chance); no database
# (a failure found once on one machine does not change what the next run draws); no deadline
# (the machine may be loaded); too_slow is not a failure (a busy machine is).
SEEDED = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow])


class RandomRun(nn.Module):
    def __init__(self, specs, residuals):
        super().__init__()
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.residuals = residuals
        for k, s, d, g, p, bn, bias in specs:
            self.convs.append(nn.Conv2d(CHANNELS, CHANNELS, k, s, p, dilation=d, groups=g, bias=bias))
            self.bns.append(nn.BatchNorm2d(CHANNELS) if bn else nn.Identity())
        self.act = nn.LeakyReLU(0.1)  # never a dead map: the output always depends on the input

    def forward(self, x):
        saved = {}
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            saved[i] = x
            y = conv(x)
            y = bn(y) if not isinstance(bn, nn.Identity) else y
            src = self.residuals.get(i)
            x = y + saved[src] if src is not None else y
            if i < len(self.convs) - 1:  # a linear output: never a dead ReLU map, so it depends on the input
                x = self.act(x)
        return x


@st.composite
def runs(draw):
    n = draw(st.integers(1, 4))
    specs, residuals = [], {}
    for i in range(n):
        k = draw(st.integers(1, 5))
        d = draw(st.integers(1, 2))
        g = draw(st.sampled_from([1, 2, 4]))
        strided = draw(st.booleans()) and draw(st.booleans())
        if strided:
            s, p = 2, draw(st.integers(0, (d * (k - 1)) // 2))
        elif (d * (k - 1)) % 2 == 0:
            s, p = 1, d * (k - 1) // 2  # "same" size, so identity residuals can span it
        else:
            s, p = 1, draw(st.integers(0, 2))
        specs.append((k, s, d, g, p, draw(st.booleans()), draw(st.booleans())))
    # an identity residual over a same-size, stride-1 span ending at layer j, starting at i
    for j in range(n):
        for i in range(j + 1):
            same = all(specs[l][1] == 1 and 2 * specs[l][4] == specs[l][2] * (specs[l][0] - 1) for l in range(i, j + 1))
            if same and draw(st.booleans()) and draw(st.booleans()):
                residuals[j] = i
                break
    size = draw(st.integers(9, 16))
    return specs, residuals, size


def depends_on_input(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``'s output changes with its input (as the exactness checks require)."""
    with torch.no_grad():
        return rel_err(module(torch.randn_like(x)), module(x)) > 1e-3


def is_test_case(model: nn.Module, x: torch.Tensor) -> bool:
    """False for runs that are no test case (the tests ``assume`` it): strides shrank the map
    below a kernel, or the output of the model or of its drop-all linearization does not
    depend on the input (every tap of a kernel in the zero padding: any two models agree)."""
    try:
        model(x)
    except RuntimeError:  # not a valid model at this size
        return False
    if not depends_on_input(model, x):
        return False
    x64, model64 = x.double(), copy.deepcopy(model).double()
    analysis = fxmerge.analyze(model64, (x64,))
    return depends_on_input(fxmerge.linearize(model64, fxmerge.Plan.drop_all(analysis)), x64)


@settings(SEEDED, max_examples=40)
@given(runs())
# the case: the last kernel's taps all land in the padding, so the output is zero
@example(([(1, 2, 1, 1, 0, False, False), (3, 2, 2, 1, 0, False, False), (2, 1, 2, 1, 1, False, False)], {}, 9))
def test_random_conv_runs_merge_exactly(run):
    specs, residuals, size = run
    torch.manual_seed(len(specs) * 7 + size)
    model = RandomRun(specs, residuals).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, CHANNELS, size, size + 1)
    assume(is_test_case(model, x))
    res = check_exact(model, (x,), dtype=torch.float64)
    assert len(res.analysis.chains[0].skips) == len(residuals)


@settings(SEEDED, max_examples=20)
@given(runs(), st.booleans())
# nested residuals after a stride, around a dilated even kernel: composed as a unit, the inner
# identity landed between taps (0.61 off in float64) until such branches composed in order
@example(([(1, 1, 1, 1, 0, False, False), (1, 2, 1, 1, 0, False, False), (2, 1, 2, 1, 1, False, False),
           (1, 1, 1, 1, 0, False, False)], {2: 2, 3: 2}, 9), True)
def test_residual_branches_merge_exactly_in_either_order(run, as_unit):
    """A residual's branch merged on its own, then composed (cheap for inverted residuals), or
    composed through in order: the cost model picks one; both must give the same kernel."""
    from unittest import mock

    from fxmerge import algebra

    specs, residuals, size = run
    assume(residuals)
    torch.manual_seed(len(specs) * 11 + size)
    model = RandomRun(specs, residuals).eval()
    x = torch.randn(2, CHANNELS, size, size + 1)
    assume(is_test_case(model, x))
    with mock.patch.object(algebra, "_unit_is_cheaper", lambda *args: as_unit):
        check_exact(model, (x,), dtype=torch.float64, finetune=False)


def test_two_residuals_from_one_source_compose_in_order():
    """Residuals (1, 3) and (1, 4) after a dilated even kernel, composed in order: merge must
    equal linearize (found by hypothesis: the inner residual's binding, under the same key as
    the outer one, was deleted while the outer's plan still read it - a KeyError)."""
    from unittest import mock

    from fxmerge import algebra

    specs = [(2, 1, 1, 1, 0, False, False), (2, 1, 2, 1, 1, False, False), (1, 1, 1, 1, 0, False, False),
             (1, 1, 1, 1, 0, False, False)]
    torch.manual_seed(len(specs) * 11 + 9)
    model = RandomRun(specs, {2: 1, 3: 1}).eval()
    x = torch.randn(2, CHANNELS, 9, 10)
    assert is_test_case(model, x)
    with mock.patch.object(algebra, "_unit_is_cheaper", lambda *args: False):
        check_exact(model, (x,), dtype=torch.float64, finetune=False)
