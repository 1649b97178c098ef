"""Model zoos: timm's CNN families (optional extra) and torchvision's detection backbones.

timm models are built with ``pretrained=False`` (nothing downloads), their BatchNorm statistics
calibrated on the test batch and jittered, so signals keep their scale and every compared
output depends on the input. drop_all on random weights overflows float32's range in deep
nets, so merge == linearize is checked in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

import fxmerge
from conftest import check_exact, count_convs, randomize

TIMM_MODELS = ["mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "efficientnet_lite0",
               "tf_efficientnet_lite0", "resnet50d", "regnety_002", "darknet53", "convnext_atto", "repvgg_a0"]
_IDENTITY_IN_EVAL = (nn.Identity, nn.Dropout, nn.Dropout2d)


def timm_model(name: str, x: torch.Tensor) -> nn.Module:
    timm = pytest.importorskip("timm")
    model = randomize(timm.create_model(name, pretrained=False), calibrate_on=x).eval()
    if name == "repvgg_a0":  # train-time branches: re-parameterise first (see the README)
        model = fxmerge.reparameterize(model)
    return model


def batchnorm_count(model: nn.Module) -> int:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) for m in model.modules())


def _next_value_users(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """Users of ``node``, looking through identity-in-eval modules (an independent definition,
    written here with plain fx, not with the analysis' own helpers)."""
    out = []
    for user in node.users:
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), _IDENTITY_IN_EVAL):
            out += _next_value_users(gm, user)
        else:
            out.append(user)
    return out


def activations_between_layers(analysis: fxmerge.Analysis) -> set[str]:
    """Activation nodes that directly follow a layer's conv(+BN) and feed exactly one other
    layer's conv: the activations a mergeable run holds."""
    gm = analysis.graph_module
    layer_out = {l.bn or l.conv for c in analysis.chains for l in c.layers}
    layer_in = {l.pad or l.conv for c in analysis.chains for l in c.layers}
    found = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or not node.args:
            continue
        producer = node.args[0]
        while isinstance(producer, fx.Node) and producer.op == "call_module" and \
                isinstance(gm.get_submodule(producer.target), _IDENTITY_IN_EVAL):
            producer = producer.args[0]
        if not isinstance(producer, fx.Node) or producer.name not in layer_out or node.name in layer_out:
            continue
        users = _next_value_users(gm, node)
        if len(users) == 1 and users[0].name in layer_in and fxmerge.passes.patterns.activation_kind(gm, node):
            found.add(node.name)
    return found


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model(name):
    x = torch.randn(2, 3, 64, 64)
    model = timm_model(name, x)
    analysis = fxmerge.analyze(model, (x[:1],))
    folded = sum(1 for c in analysis.chains for layer in c.layers if layer.bn)
    assert folded == batchnorm_count(model), f"{folded} of {batchnorm_count(model)} BatchNorms folded"
    expected = activations_between_layers(analysis)
    droppable = {c.activations[p][0] for c in analysis.chains for p in c.droppable}
    assert expected and expected <= droppable, f"not droppable: {sorted(expected - droppable)}"
    assert not analysis.unmergeable, analysis.unmergeable
    res = check_exact(model, (x[:1],), dtype=torch.float64, finetune=False)
    assert count_convs(res.merged["drop_all"]) < count_convs(res.linearized["drop_all"])


@pytest.mark.parametrize("name, limit", [("mobilenetv2_100", 8), ("efficientnet_lite0", 16)])
def test_timm_drop_all_reaches_the_torchvision_conv_counts(name, limit):
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 224, 224)
    analysis = fxmerge.analyze(timm.create_model(name).eval(), (x,))
    assert fxmerge.Plan.drop_all(analysis).num_convs <= limit < analysis.num_layers


def test_tf_ported_model_needs_no_user_help_and_merges_like_its_twin():
    """timm's ``tf_`` ports pad dynamically ('same', computed from the input size): the tracer
    keeps those convs whole, recognises what they compute and fixes the padding for the example
    size, so the analysis matches the statically padded twin."""
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 224, 224)
    tf = fxmerge.analyze(timm.create_model("tf_efficientnet_lite0").eval(), (x,))
    plain = fxmerge.analyze(timm.create_model("efficientnet_lite0").eval(), (x,))
    assert tf.num_layers == plain.num_layers == 49 and not tf.unmergeable
    for kind in ("drop_all", "keep_all", "fold_only"):
        assert getattr(fxmerge.Plan, kind)(tf).num_convs == getattr(fxmerge.Plan, kind)(plain).num_convs
    assert any(layer.geometry.padding == ((0, 1), (0, 1)) for layer in tf.chains[0].layers)  # TF's extra pixel after


def test_timm_activation_modules_are_recognised():
    pytest.importorskip("timm")
    from timm.layers import activations as acts, activations_me as me

    kinds = [acts.Swish(), me.HardSwishMe(), acts.HardSigmoid(), acts.GELU(), acts.Mish(), acts.QuickGELU()]
    layers = []
    for act in kinds:
        layers += [nn.Conv2d(4, 4, 1), act]
    model = nn.Sequential(*layers, nn.Conv2d(4, 4, 1)).eval()
    analysis = fxmerge.analyze(model, (torch.randn(1, 4, 5, 5),))
    chain = analysis.chains[0]
    assert chain.length == len(kinds) + 1 and len(chain.droppable) == len(kinds)
    assert [chain.activations[p][1] for p in chain.droppable] == ["SiLU", "Hardswish", "Hardsigmoid", "GELU", "Mish",
                                                                  "QuickGELU"]


def test_reparameterize_gives_timms_deploy_form():
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    x = torch.randn(1, 3, 64, 64)
    model = randomize(timm.create_model("repvgg_a0"), calibrate_on=torch.randn(2, 3, 64, 64)).eval()
    ours, theirs = fxmerge.reparameterize(model), reparameterize_model(model)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours(x), model(x), rtol=1e-4, atol=1e-4)
    assert model.stages[0][0].conv_1x1 is not None  # the user's model keeps its branches
    before = fxmerge.analyze(model, (x,))
    after = fxmerge.analyze(ours, (x,))
    assert sum(len(c.droppable) for c in after.chains) > sum(len(c.droppable) for c in before.chains)


def _frozen_fpn_backbone() -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d)


def _randomize_frozen(model: nn.Module) -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                for t in (m.running_mean, m.bias):
                    t.copy_(torch.rand(t.shape, generator=g) - 0.5)
                for t in (m.running_var, m.weight):
                    t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
    return model


@pytest.mark.parametrize("backbone", ["fasterrcnn_resnet50_fpn", "frozen_batchnorm_fpn"])
def test_detection_backbone_folds_its_batchnorms_and_merges_exactly(backbone):
    x = torch.randn(2, 3, 64, 64)
    if backbone == "fasterrcnn_resnet50_fpn":  # the example: untrained, so plain BatchNorm2d
        detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        model = randomize(detector.backbone, calibrate_on=x).eval()
    else:  # what pretrained detection models use
        model = _randomize_frozen(_frozen_fpn_backbone()).eval()
    analysis = fxmerge.analyze(model, (x[:1],))
    assert sum(1 for c in analysis.chains for layer in c.layers if layer.bn) == batchnorm_count(model) == 53
    res = check_exact(model, (x[:1],), dtype=torch.float64, finetune=False, plans=("drop_all",))
    assert count_convs(res.merged["drop_all"]) < count_convs(res.linearized["drop_all"])
