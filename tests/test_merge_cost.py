"""What merging costs follows the merged conv, not the dilated grid or the order of the layers.

Merged kernels are kept on their own dilation grid, so a dilated conv absorbing its BatchNorm
costs its own 3x3 kernel (a 256-channel one at dilation 36 used to build its 73x73 zero-filled
extent in float64: 1.6 s and 2.7 GB), and a run is composed in the order its shapes make
cheapest (a wide block followed by a narrow head composes from the narrow end). Costs are
asserted on ``algebra.count_work``'s deterministic counts (multiply-adds done, elements of the
largest kernel built), never on wall time; every model is also checked for exactness.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

import fxmerge
from conftest import check_exact, randomize
from fxmerge import algebra


def cbr(cin, cout, k=3, d=1, g=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, padding=d * (k - 1) // 2, dilation=d, groups=g, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


def merge_work(model: nn.Module, x: torch.Tensor, kind: str, **analyze_kwargs) -> tuple[algebra.Work, nn.Module]:
    """The work of merging ``model`` with the ``kind`` plan, and the merged model."""
    plan = getattr(fxmerge.Plan, kind)(fxmerge.analyze(model, (x,), **analyze_kwargs))
    with algebra.count_work() as work:
        merged = fxmerge.merge(model, plan)
    return work, merged


def merged_convs(gm: nn.Module) -> list[nn.Conv2d]:
    return [m for n, m in gm.named_modules() if n.startswith(("merged__", "folded__"))]


# large numbers, not None: analysis.too_large compares with max_kernel unguarded (None raises TypeError)
NO_KERNEL_LIMITS = fxmerge.BlockLimits(max_kernel=1000, max_kernel_ratio=1000.0, max_macs_ratio=1000.0)


@pytest.mark.parametrize("dilation", [1, 6, 36])
def test_a_dilated_conv_absorbs_its_batchnorm_at_the_cost_of_its_own_kernel(dilation):
    """The issue's case, narrower: conv + BN at dilation 36 on a 6x6 map (padding 36)."""
    model = randomize(nn.Sequential(nn.Conv2d(32, 32, 3, padding=dilation, dilation=dilation),
                                    nn.BatchNorm2d(32)).eval())
    work, merged = merge_work(model, torch.randn(1, 32, 6, 6), "keep_all")
    assert work.largest == 32 * 32 * 3 * 3  # the conv's own kernel, never its (2d+1)^2 extent
    assert work.macs == 32 * 32 * 3 * 3  # folding the BatchNorm: one multiply per weight
    (conv,) = merged_convs(merged)
    assert conv.kernel_size == (3, 3) and conv.dilation == (dilation, dilation)
    check_exact(model, (torch.randn(2, 32, 6, 6),), dtype=torch.float64)


def test_dilated_runs_compose_on_their_own_grid_whatever_the_dilation():
    """Two 3x3 convs at dilation d merge into one 5x5 conv at dilation d, composed as 5x5."""
    works = {}
    for d in (1, 4, 12):
        model = randomize(nn.Sequential(cbr(16, 16, d=d), cbr(16, 16, d=d, act=False)).eval())
        works[d], merged = merge_work(model, torch.randn(1, 16, 8, 8), "drop_all", limits=NO_KERNEL_LIMITS)
        (conv,) = merged_convs(merged)
        assert conv.kernel_size == (5, 5) and conv.dilation == (d, d)
    assert works[1] == works[4] == works[12]
    assert works[12].largest == 16 * 16 * 5 * 5


@pytest.mark.parametrize("dilations, kernel, grid", [((2, 4), 7, 2), ((2, 3), 11, 1), ((6, 4), 11, 2)])
def test_mixed_dilations_compose_on_the_coarsest_exact_grid(dilations, kernel, grid):
    model = randomize(nn.Sequential(cbr(8, 8, d=dilations[0]), cbr(8, 8, d=dilations[1], act=False)).eval())
    x = torch.randn(2, 8, 9, 10)
    work, merged = merge_work(model, x[:1], "drop_all", limits=NO_KERNEL_LIMITS)
    (conv,) = merged_convs(merged)
    assert conv.kernel_size == (kernel, kernel) and conv.dilation == (grid, grid)
    assert work.largest == 8 * 8 * kernel * kernel
    check_exact(model, (x,), dtype=torch.float64, limits=NO_KERNEL_LIMITS)


def test_a_wide_run_into_a_narrow_head_composes_from_the_narrow_end():
    """64 -> 256 (1x1) -> 256 (3x3) -> 4 classes: left to right carries a 256 x 64 x 3x3 state
    (38 M multiply-adds); from the head end the widest state is 4 x 256 x 3x3 (3 M)."""
    model = randomize(nn.Sequential(cbr(64, 256, 1), cbr(256, 256, 3), nn.Conv2d(256, 4, 1)).eval())
    x = torch.randn(2, 64, 12, 12)
    work, merged = merge_work(model, x[:1], "drop_all")
    assert len(merged_convs(merged)) == 1
    folds = 256 * 64 + 256 * 256 * 9  # BatchNorms folded into the first two convs
    assert work.macs <= 4 * 256 * 256 * 9 + 4 * 256 * 64 * 9 + folds
    assert work.largest == 256 * 256 * 9  # the 3x3 conv's own weight: no state is larger
    check_exact(model, (x,), dtype=torch.float64)


class BottleneckIntoHead(nn.Module):
    """A dilated bottleneck with its identity, then a narrow head (FCN's last block + head)."""

    def __init__(self, channels=64, width=16, classes=3, dilation=2):
        super().__init__()
        self.a, self.b = cbr(channels, width, 1), cbr(width, width, 3, d=dilation)
        self.c = cbr(width, channels, 1, act=False)
        self.head, self.cls = cbr(channels, 16, 3), nn.Conv2d(16, classes, 1)

    def forward(self, x):
        return self.cls(self.head(torch.relu(self.c(self.b(self.a(x))) + x)))


def test_a_residual_before_a_narrow_head_is_composed_through_from_the_head():
    """Merged as a unit, the bottleneck is a 64 x 64 kernel; composed from the head end, no
    state is ever wider than the head: the merge never builds a 64 x 64 kernel."""
    model = randomize(BottleneckIntoHead()).eval()
    x = torch.randn(2, 64, 15, 15)
    work, merged = merge_work(model, x[:1], "drop_all")
    (conv,) = merged_convs(merged)
    assert conv.kernel_size == (7, 7) and conv.out_channels == 3
    assert work.largest < 64 * 64 * 3 * 3
    check_exact(model, (x,), dtype=torch.float64)


@pytest.mark.parametrize("as_unit", [True, False])
def test_the_residual_before_the_head_is_exact_in_either_order(as_unit):
    from unittest import mock

    model = randomize(BottleneckIntoHead(dilation=3)).eval()
    with mock.patch.object(algebra, "_unit_is_cheaper", lambda *args: as_unit):
        check_exact(model, (torch.randn(2, 64, 15, 15),), dtype=torch.float64, finetune=False)


def dilated_stage(groups: int = 1) -> nn.Module:
    """A stem and two identity bottlenecks at dilations 2 and 4 (fcn_resnet50's layer3/4
    pattern); ``groups`` > 1 makes them ResNeXt blocks."""
    width = 64 // groups
    return nn.Sequential(cbr(3, 64, 3), Bottleneck(64, 16, groups=groups, base_width=width, dilation=2),
                         Bottleneck(64, 16, groups=groups, base_width=width, dilation=4))


@pytest.mark.parametrize("groups", [1, 4])
def test_dilated_resnet_stage_merges_exactly(groups):
    x = torch.randn(2, 3, 19, 17)
    model = randomize(dilated_stage(groups), calibrate_on=x).eval()
    res = check_exact(model, (x[:1],), dtype=torch.float64)
    dilations = {conv.dilation for conv in merged_convs(res.merged["keep_all"])}
    assert {(2, 2), (4, 4)} <= dilations  # each dilated conv folded on its own grid


def test_dilated_resnet_stage_drop_all_work_does_not_grow_with_the_dilation():
    """The same stage at dilations 1/2, 2/4 and 4/8 (the kernels' taps on grids 1, 2, 4):
    composing does the same work."""
    x = torch.randn(1, 3, 19, 17)
    works = []
    for dilations in ((1, 2), (2, 4), (4, 8)):
        # a 1x1 stem: a 3x3 one at dilation 1 would put every merged kernel on the dense grid
        model = nn.Sequential(cbr(3, 64, 1), *(Bottleneck(64, 16, dilation=d) for d in dilations)).eval()
        works.append(merge_work(randomize(model), x, "drop_all", limits=NO_KERNEL_LIMITS)[0])
    assert works[0] == works[1] == works[2]


class TinyDeepLab(nn.Module):
    """A strided, dilated backbone and torchvision's DeepLabV3 head: ASPP (a 1x1 branch, three
    atrous 3x3 branches, image pooling, concatenated and projected), then 3x3 and 1x1 convs."""

    def __init__(self, classes=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      cbr(16, 32, 3, d=2), cbr(32, 32, 3, d=4))
        self.head = DeepLabHead(32, classes, atrous_rates=(2, 4, 6))

    def forward(self, x):
        return {"out": self.head(self.backbone(x))}


def test_a_tiny_deeplab_head_merges_exactly():
    x = torch.randn(2, 3, 33, 31)
    model = randomize(TinyDeepLab(), calibrate_on=x).eval()
    res = check_exact(model, (x[:1],), dtype=torch.float64)
    atrous = {conv.dilation for conv in merged_convs(res.merged["keep_all"])}
    assert {(2, 2), (4, 4), (6, 6)} <= atrous
    assert res.plans["drop_all"].num_convs < res.analysis.num_layers


def test_count_work_counts_only_inside_its_block():
    conv = algebra.Conv(torch.randn(4, 4, 3, 3, dtype=torch.float64), None, (1, 1), (1, 1), 1)
    with algebra.count_work() as outer:
        algebra.compose_run([conv, conv], [])
        with algebra.count_work() as inner:
            algebra.compose_run([conv], [])
    algebra.compose_run([conv, conv], [])
    assert inner.macs == 0 and inner.largest == 4 * 4 * 9  # a single layer: its own kernel
    assert outer.macs == 4 * 4 * 4 * 9 * 9 and outer.largest == 4 * 4 * 5 * 5


def test_composing_never_writes_into_the_layers_tensors():
    """States are built without copying the layers' weights; sums may reuse a state's weight
    in place, never a layer's: inputs stay unchanged, and only a single layer's state is that
    layer's own tensor."""
    g = torch.Generator().manual_seed(0)

    def conv(cin, cout, k, groups=1):
        return algebra.Conv(torch.randn(cout, cin // groups, k, k, dtype=torch.float64, generator=g),
                            torch.randn(cout, dtype=torch.float64, generator=g), (1, 1), (1, 1), groups)

    for convs, skips in (([conv(8, 8, 3)], []), ([conv(8, 8, 1)], [(0, 1, (0, 0))]),
                         ([conv(8, 4, 1), conv(4, 8, 3)], [(0, 2, (1, 1))]),
                         ([conv(8, 8, 3, groups=8), conv(8, 8, 1), conv(8, 3, 1)], [(0, 2, (1, 1))])):
        before = [(c.weight.clone(), c.bias.clone()) for c in convs]
        state = algebra.compose_run(convs, skips)
        for c, (w, b) in zip(convs, before):
            assert torch.equal(c.weight, w) and torch.equal(c.bias, b)
            assert state.weight.data_ptr() != c.weight.data_ptr() or (len(convs) == 1 and not skips)
