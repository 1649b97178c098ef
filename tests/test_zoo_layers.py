"""The layers model zoos are built from, hand-built so each construct is tested on its own (no
timm needed): BatchNorm+activation modules with shape asserts, identity-in-eval ops, frozen and
synchronised BatchNorm, computed and dynamic "same" padding, opaque leaves, re-parameterisable
blocks and parametrized (weight-normed) convs."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmerge
from conftest import check_exact, count_convs, randomize


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: asserts the rank (value-free nodes on the conv
    output), BatchNorm as F.batch_norm, an nn.Identity placeholder, then the activation."""

    def __init__(self, c):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class ZooBlock(nn.Module):
    """Conv -> BatchNormAct -> (Identity 'se', Dropout) -> conv -> BN -> drop path (Identity) + Identity shortcut."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 1, bias=False), BatchNormAct(2 * c)
        self.se, self.drop = nn.Identity(), nn.Dropout(0.2)
        self.conv2, self.bn2 = nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.drop_path, self.shortcut = nn.Identity(), nn.Identity()

    def forward(self, x):
        y = self.drop(self.se(self.bn1(self.conv1(x))))
        y = self.bn2(F.dropout(self.conv2(y), 0.1, self.training))
        return self.drop_path(y) + self.shortcut(x)


class ZooNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), BatchNormAct(6)
        self.blocks = nn.Sequential(ZooBlock(6), ZooBlock(6))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem_bn(self.stem(x))).contiguous())


def test_shape_asserts_and_identity_in_eval_ops_do_not_break_chains():
    x = torch.randn(2, 3, 12, 12)
    model = randomize(ZooNet(), calibrate_on=x).eval()
    res = check_exact(model, (x[:1],), dtype=torch.float64)
    check_exact(model, (x[:1],))
    chain = res.analysis.chains[0]
    assert len(res.analysis.chains) == 1 and chain.length == 6  # stem, 2 x (conv1, conv2), head
    assert sum(1 for layer in chain.layers if layer.bn) == 5  # every BatchNorm folded, F.batch_norm ones too
    assert [(s.source, s.target) for s in chain.skips] == [(1, 3), (3, 5)]  # residuals through Identity
    assert len(chain.droppable) == 3  # stem and both blocks' inner activations
    assert count_convs(res.merged["drop_all"]) == 1


def test_dropout_stays_in_the_linearized_net_for_fine_tuning():
    x = torch.randn(2, 3, 12, 12)
    model = randomize(ZooNet(), calibrate_on=x).eval()
    analysis = fxmerge.analyze(model, (x[:1],))
    lin = fxmerge.linearize(model, fxmerge.Plan.drop_all(analysis))
    assert any(isinstance(m, nn.Dropout) for m in lin.modules())  # still regularises when trained
    merged = fxmerge.merge(lin, fxmerge.Plan.drop_all(analysis))
    assert not any(isinstance(m, nn.Dropout) for m in merged.modules())  # gone with the merged segment


def test_frozen_and_synchronised_batchnorm_fold():
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(8)
    with torch.no_grad():
        frozen.running_mean.uniform_(-0.5, 0.5)
        frozen.running_var.uniform_(0.5, 1.5)
        frozen.weight.uniform_(0.5, 1.5)
        frozen.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), frozen, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.SyncBatchNorm(8), nn.SiLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 10, 10)
    model = randomize(model, calibrate_on=x).eval()
    res = check_exact(model, (x[:1],), dtype=torch.float64)
    assert [layer.bn is not None for layer in res.analysis.chains[0].layers] == [True, True, False]
    assert count_convs(res.merged["drop_all"]) == 1


class ComputedSamePad(nn.Module):
    """Padding computed from the input size in the forward (symbolically traceable arithmetic)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, stride=2), nn.Conv2d(6, 6, 3)

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h, pad_w = (h + 1) % 2 + 1, (w + 1) % 2 + 1  # 'same' for stride 2 and a 3x3 kernel
        x = F.relu(self.c1(F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))))
        return self.c2(F.pad(x, (1, 1, 1, 1)))


class DynamicSameConv(nn.Conv2d):
    """A conv subclass that pads like TensorFlow's 'SAME', with Python max()/ceil on the input
    size (fx cannot trace it: timm's Conv2dSame does this)."""

    def forward(self, x):
        pads = []
        for size, k, s, d in reversed(list(zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation))):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_padding_computed_from_the_input_size_is_made_concrete():
    x = torch.randn(2, 3, 15, 16)
    model = ComputedSamePad().eval()
    res = check_exact(model, (x,), dtype=torch.float64)
    chain = res.analysis.chains[0]
    assert chain.length == 2 and chain.layers[0].geometry.padding == ((0, 1), (1, 1))  # for 15x16
    assert count_convs(res.merged["drop_all"]) == 1


def test_dynamic_same_padding_conv_subclass_traces_without_user_help():
    model = nn.Sequential(DynamicSameConv(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(),
                          DynamicSameConv(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 16, 17)
    model = randomize(model, calibrate_on=x).eval()
    res = check_exact(model, (x[:1],), dtype=torch.float64)
    chain = res.analysis.chains[0]
    assert chain.length == 3 and not res.analysis.unmergeable
    assert chain.layers[0].geometry.padding == ((0, 1), (1, 1))  # TF's extra pixel after, fixed for 16x17
    assert count_convs(res.merged["drop_all"]) == 1


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if x.mean() > -1e9 else x  # data-dependent: fx cannot trace it


def test_no_conv_disappears_silently():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), Opaque(), nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(1, 3, 6, 6)
    analysis = fxmerge.analyze(model, (x,))
    assert "'2' (Opaque) holds convs" in analysis.unmergeable["_2"]  # keyed by node, naming the module
    text = str(analysis)
    assert "convs left alone" in text and "control flow" in text
    leaf = fxmerge.analyze(model, (x,), trace=fxmerge.TraceOptions(leaf_modules=[Opaque]))  # a user's leaf is reported too
    assert "Opaque" in leaf.unmergeable["_2"]
    with torch.no_grad():
        torch.testing.assert_close(fxmerge.merge(model, fxmerge.Plan.drop_all(analysis))(x), model(x))


class RepBlock(nn.Module):
    """RepVGG-style: 3x3 + 1x1 + identity branches while training, one 3x3 conv after
    ``reparameterize()`` (the convention timm and MobileOne follow)."""

    def __init__(self, c):
        super().__init__()
        self.c3, self.c1, self.act = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.ReLU()
        self.fused = None

    def forward(self, x):
        if self.fused is not None:
            return self.act(self.fused(x))
        return self.act(self.c3(x) + self.c1(x) + x)

    def reparameterize(self):
        fused = nn.Conv2d(self.c3.in_channels, self.c3.out_channels, 3, padding=1)
        with torch.no_grad():
            w = self.c3.weight.clone()
            w[:, :, 1:2, 1:2] += self.c1.weight
            w[:, :, 1, 1] += torch.eye(w.shape[0])
            fused.weight.copy_(w)
            fused.bias.copy_(self.c3.bias + self.c1.bias)
        self.fused = fused
        del self.c3, self.c1


def test_reparameterize_turns_branches_into_mergeable_convs():
    model = nn.Sequential(RepBlock(4), RepBlock(4), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 4, 9, 9)
    before = fxmerge.analyze(model, (x,))
    deploy = fxmerge.reparameterize(model)
    assert hasattr(model[0], "c3")  # the user's model keeps its branches
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-5, atol=1e-5)
    res = check_exact(deploy, (x,), dtype=torch.float64)
    assert sum(len(c.droppable) for c in before.chains) == 0 and len(res.analysis.chains[0].droppable) == 2
    assert count_convs(res.merged["drop_all"]) == 1


def test_parametrized_weight_norm_conv_merges_with_its_computed_weight():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    x = torch.randn(1, 3, 8, 8)
    res = check_exact(model, (x,), dtype=torch.float64)
    assert res.analysis.chains[0].length == 2
