"""Hand-built models, one per structure the passes must get exactly right."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmerge
from conftest import check_exact, count_convs, randomize


def cbr(cin, cout, k=3, s=1, p=None, g=1, d=1, act=True, eps=1e-5):
    p = d * (k - 1) // 2 if p is None else p
    layers = [nn.Conv2d(cin, cout, k, s, p, dilation=d, groups=g, bias=False), nn.BatchNorm2d(cout, eps=eps)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


def run_both_dtypes(model, x, **kw):
    model = randomize(model)
    check_exact(model, (x,), dtype=torch.float64, **kw)
    return check_exact(model, (x,), dtype=torch.float32, **kw)


def assert_fewer_convs(res):
    plan = res.plans["drop_all"]
    assert count_convs(res.merged["drop_all"]) < count_convs(res.linearized["drop_all"])
    assert plan.num_convs < sum(c.length for c in plan.chains)


def test_strided_conv_then_3x3_convs():
    model = nn.Sequential(cbr(3, 8, 3, s=2), cbr(8, 8, 3), cbr(8, 8, 3, act=False), cbr(8, 6, 5, s=2, p=2))
    res = run_both_dtypes(model, torch.randn(2, 3, 41, 37), limits=fxmerge.BlockLimits(max_kernel=19))
    assert_fewer_convs(res)
    merged = [m for n, m in res.merged["drop_all"].named_modules() if n.startswith("merged__")]
    assert len(merged) == 1 and merged[0].stride == (4, 4) and merged[0].kernel_size == (19, 19)


def test_grouped_and_depthwise_chains():
    model = nn.Sequential(cbr(8, 16, 3, g=4), cbr(16, 16, 3, g=16), cbr(16, 16, 5, g=16),
                          cbr(16, 32, 1, g=2), cbr(32, 32, 3, g=32, act=False))
    res = run_both_dtypes(model, torch.randn(2, 8, 16, 16))
    assert_fewer_convs(res)
    spec = res.analysis.chains[0].specs[(1, 3)]
    assert spec.groups == 16 and spec.kernel == (7, 7)  # dw ∘ dw stays depthwise
    assert res.analysis.chains[0].specs[(0, 2)].groups == 4  # g4 ∘ dw: coarsest exact grouping


def test_dilated_convs():
    model = nn.Sequential(cbr(4, 8, 3, d=2), cbr(8, 8, 3, d=2), cbr(8, 8, 3, d=3, act=False), cbr(8, 8, 3))
    res = run_both_dtypes(model, torch.randn(2, 4, 20, 20))
    assert_fewer_convs(res)
    spec = res.analysis.chains[0].specs[(0, 2)]
    assert spec.dilation == (2, 2) and spec.kernel == (5, 5)  # kept dilated, not zero-filled


def test_rectangular_kernels():
    model = nn.Sequential(
        nn.Conv2d(4, 8, (1, 3), padding=(0, 1)), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, (3, 1), padding=(1, 0)), nn.ReLU(),
        nn.Conv2d(8, 8, (3, 5), stride=(1, 2), padding=(1, 2)), nn.BatchNorm2d(8))
    res = run_both_dtypes(model, torch.randn(2, 4, 11, 14))
    assert_fewer_convs(res)
    assert res.analysis.chains[0].specs[(0, 2)].kernel == (3, 3)


class Functional(nn.Module):
    """Convs as F.conv2d on parameters, activations as functions and methods."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.w3 = nn.Parameter(torch.randn(4, 8, 1, 1) * 0.3)
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.batch_norm(F.conv2d(x, self.w2, None, 1, 1), self.mean, self.var, None, None, False, 0.1, 1e-3).relu()
        return torch.sigmoid(F.conv2d(x, self.w3))


def test_functional_convs_and_activations():
    res = run_both_dtypes(Functional(), torch.randn(2, 3, 10, 10))
    chain = res.analysis.chains[0]
    assert chain.length == 3 and len(chain.droppable) == 2
    assert {k for _, k in chain.activations.values()} == {"ReLU", "Sigmoid"}
    assert_fewer_convs(res)


class Residual(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.a, self.b = cbr(8, 8), cbr(8, 8, act=False)
        self.c = cbr(8, 8)

    def forward(self, x):
        y = self.b(self.a(x))
        if self.spelling == "reversed":
            y = x + y
        elif self.spelling == "torch.add":
            y = torch.add(x, y)
        elif self.spelling == "method":
            y = y.add(x)
        elif self.spelling == "iadd":
            y += x
        else:
            y = y + x
        return self.c(y)


@pytest.mark.parametrize("spelling", ["plain", "reversed", "torch.add", "method", "iadd"])
def test_residual_add_spellings(spelling):
    res = run_both_dtypes(Residual(spelling), torch.randn(2, 8, 9, 9))
    chain = res.analysis.chains[0]
    assert [(s.source, s.target) for s in chain.skips] == [(0, 2)]
    assert res.plans["drop_all"].num_convs == 1  # conv-conv-skip-conv fused into one 7x7
    assert_fewer_convs(res)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = cbr(6, 6), cbr(6, 6, act=False), cbr(6, 6, k=1, p=0), cbr(6, 6, act=False)

    def forward(self, x):
        inner = self.b(self.a(x)) + x
        return self.d(self.c(inner)) + x


def test_nested_residuals():
    res = run_both_dtypes(Nested(), torch.randn(2, 6, 12, 12))
    chain = res.analysis.chains[0]
    assert sorted((s.source, s.target) for s in chain.skips) == [(0, 2), (0, 4)]
    assert res.plans["drop_all"].num_convs == 1


class SharedActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = self.act(self.c2(x))
        x = self.pool(self.act(self.c3(x)))  # a break: this call must survive drop_all
        return self.act(self.c4(x))


def test_shared_activation_module_called_several_times():
    res = run_both_dtypes(SharedActivation(), torch.randn(2, 4, 8, 8))
    merged = res.merged["drop_all"]
    assert isinstance(merged.act, nn.ReLU)  # the module was never swapped for an Identity
    calls = [n for n in merged.graph.nodes if n.op == "call_module" and n.target == "act"]
    assert len(calls) == 2  # the two calls at chain ends stay, the two interior ones are gone
    assert count_convs(merged) == 2


def test_batchnorm_with_non_default_eps():
    model = nn.Sequential(cbr(3, 5, eps=0.3), cbr(5, 5, eps=1e-1, act=False), cbr(5, 4, k=1, p=0, eps=2.0))
    res = run_both_dtypes(model, torch.randn(2, 3, 7, 7))
    assert_fewer_convs(res)


class FanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(4, 4), cbr(4, 4), cbr(4, 4)

    def forward(self, x):
        y = self.a(x)
        z = self.b(y)
        return self.c(z) * 2 + z.mean()


def test_fan_out_is_a_forced_break():
    res = run_both_dtypes(FanOut(), torch.randn(2, 4, 8, 8))
    chain = res.analysis.chains[0]
    assert 2 in chain.breaks and "fan-out" in chain.breaks[2]
    assert all(not (i < 2 < j) for i, j in chain.valid_blocks)
    assert res.plans["drop_all"].num_convs == 2


class SEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.dw = cbr(8, 16, k=1, p=0), cbr(16, 16, g=16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.proj = cbr(16, 8, k=1, p=0, act=False)

    def forward(self, x):
        y = self.dw(self.a(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.proj(y * s) + x


def test_se_gate_breaks_the_chain():
    res = run_both_dtypes(SEBlock(), torch.randn(2, 8, 10, 10))
    first = res.analysis.chains[0]
    assert first.length == 2 and "fan-out" in first.end_reason
    assert "multiply" in first.end_reason
    assert_fewer_convs(res)


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(4, 8, s=2), cbr(8, 8, act=False)
        self.proj = cbr(4, 8, k=1, p=0, s=2, act=False)
        self.c = cbr(8, 8)

    def forward(self, x):
        return self.c(F.relu(self.b(self.a(x)) + self.proj(x)))


def test_residual_with_projection_branch():
    res = run_both_dtypes(Projection(), torch.randn(2, 4, 10, 10))
    chains = res.analysis.chains
    assert all(not c.skips for c in chains)
    assert "non-identity" in chains[0].end_reason
    assert res.plans["drop_all"].num_convs == 3  # a+b merge; proj and c stay


class TFSamePad(nn.Module):
    """EfficientNet-Lite style: explicit asymmetric ZeroPad2d / F.pad before unpadded convs."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, 2, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, groups=8)
        self.c3 = nn.Conv2d(8, 4, 2, padding="same")

    def forward(self, x):
        x = F.relu6(self.bn1(self.c1(self.pad(x))))
        x = F.relu6(self.c2(F.pad(x, (1, 2, 1, 2))))
        return self.c3(x)


def test_explicit_asymmetric_pads():
    res = run_both_dtypes(TFSamePad(), torch.randn(2, 3, 15, 16))
    chain = res.analysis.chains[0]
    assert chain.layers[0].geometry.padding == ((0, 1), (0, 1))
    assert chain.layers[1].geometry.padding == ((1, 2), (1, 2))
    assert chain.layers[2].geometry.padding == ((0, 1), (0, 1))  # "same" with an even kernel
    assert chain.specs[(0, 3)].padding == ((2, 7), (2, 7))
    assert res.plans["drop_all"].num_convs == 1


def test_conv1d_and_conv3d_chains():
    m1 = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.GELU(), nn.Conv1d(6, 6, 5, 2, 2), nn.Mish(),
                       nn.Conv1d(6, 2, 1))
    res = run_both_dtypes(m1, torch.randn(2, 3, 17))
    assert res.plans["drop_all"].num_convs == 1
    m3 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ELU(), nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1)),
                       nn.BatchNorm3d(4), nn.LeakyReLU(0.1), nn.Conv3d(4, 3, 1))
    res = run_both_dtypes(m3, torch.randn(2, 2, 5, 6, 7))
    assert res.plans["drop_all"].num_convs == 1


def test_every_registered_activation_form_is_found():
    acts = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(), nn.Hardtanh(), nn.Hardswish(), nn.SiLU(), nn.GELU(), nn.Mish(), nn.ELU()]
    layers = []
    for act in acts:
        layers += [nn.Conv2d(3, 3, 1), act]
    model = nn.Sequential(*layers, nn.Conv2d(3, 3, 1))
    with torch.no_grad():  # default init shrinks the signal to a constant over 10 layers
        for m in model:
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 1.0)
    res = run_both_dtypes(model, torch.randn(2, 3, 4, 4))
    kinds = [k for _, k in sorted(res.analysis.chains[0].activations.values())]
    assert sorted(kinds) == sorted(type(a).__name__ for a in acts)
    assert res.plans["drop_all"].num_convs == 1


def test_non_zero_padding_mode_is_left_alone():
    model = nn.Sequential(cbr(3, 4), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), cbr(4, 4), cbr(4, 4))
    res = run_both_dtypes(model, torch.randn(2, 3, 8, 8))
    assert any("padding_mode" in why for why in res.analysis.unmergeable.values())
    assert any("padding mode" in c.end_reason for c in res.analysis.chains)


def test_nothing_to_merge_comes_back_functionally_unchanged():
    model = randomize(nn.Sequential(cbr(3, 4), nn.MaxPool2d(2), cbr(4, 4), nn.AdaptiveAvgPool2d(1)))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = fxmerge.analyze(model, (x,))
    assert all(c.length == 1 for c in analysis.chains)
    merged = fxmerge.merge(model, fxmerge.Plan.drop_all(analysis))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_convs(merged) == 2


def test_custom_activation_registration():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Softsign(), nn.Conv2d(2, 2, 3, padding=1)).eval()
    x = torch.randn(1, 2, 6, 6)
    assert fxmerge.analyze(model, (x,)).chains[0].length == 1
    with fxmerge.activation_registry():  # leaves the registry as it found it
        fxmerge.register_activation("Softsign", modules=[nn.Softsign], functions=[F.softsign])
        assert fxmerge.analyze(model, (x,)).chains[0].length == 2
        check_exact(model, (x,))


class StridedThenResidual(nn.Module):
    """A residual after a strided conv: its identity term sits on a coarser grid of the run."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 6, 3, s=2)
        self.a, self.b = cbr(6, 12, 1, p=0), cbr(12, 6, 3, act=False)
        self.head = cbr(6, 4, 3, s=2, act=False)

    def forward(self, x):
        y = self.stem(x)
        return self.head(self.b(self.a(y)) + y)


@pytest.mark.parametrize("as_unit", [True, False])
def test_residual_after_a_strided_conv_merges_in_either_order(as_unit):
    from unittest import mock

    from fxmerge import algebra

    x = torch.randn(2, 3, 17, 19)
    model = randomize(StridedThenResidual(), calibrate_on=x).eval()
    with mock.patch.object(algebra, "_unit_is_cheaper", lambda *args: as_unit):
        res = check_exact(model, (x[:1],), dtype=torch.float64)
    assert res.plans["drop_all"].num_convs == 1
