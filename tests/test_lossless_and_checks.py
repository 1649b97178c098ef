"""Issue 8's regressions on the passes: lossless unless asked, plans checked by structure, train
mode and weight hooks handled explicitly, merged weights composed in float64, exported graphs
refused, a scoped activation registry, and multi-chain plans against exhaustive search."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmerge
from conftest import count_convs, randomize, rel_err
from fxmerge.cost import CostModel
from fxmerge.passes import activations


def conv_bn(cin, cout, k=3, p=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, padding=p, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if act else layers


def border_net():
    """The issue's example: Conv3x3 -> BN -> Conv3x3(pad 1) -> ReLU, twice: the padded second
    conv follows no activation, so merging the pair moves its padding (borders change)."""
    return nn.Sequential(*conv_bn(3, 8, act=False), *conv_bn(8, 8), *conv_bn(8, 8, act=False), *conv_bn(8, 4))


def synthetic_table(model, x, ms) -> fxmerge.LatencyTable:
    """A latency table with every term ``model`` needs, priced by ``ms(key)`` (no timing)."""
    analysis = fxmerge.analyze(model, (x,))
    keys = CostModel(analysis, lambda k: 0.0).required_keys()
    return fxmerge.LatencyTable({k: {"ms": ms(k), "spread": 0.0, "repeats": 1, "calls": 1} for k in keys})


def merged_is_cheap(key: str) -> float:
    """Single 3x3 convs cost 1 ms, merged (5x5) ones 0.2 ms, everything else nothing."""
    if key.startswith("conv"):
        return 1.0 if "k=3x3" in key else 0.2
    return 0.0


@pytest.fixture
def net():
    x = torch.randn(2, 3, 10, 10)
    return randomize(border_net(), calibrate_on=x).eval(), x[:1]


def test_keep_all_and_budgetless_compress_never_move_padding(net):
    model, x = net
    analysis = fxmerge.analyze(model, (x,))
    chain = analysis.chains[0]
    assert chain.borders == [1, 3] and not chain.is_exact(0, 2) and chain.is_exact(1, 2)
    table = synthetic_table(model, x, merged_is_cheap)
    with torch.no_grad():
        original = model(x)
        for plan in (fxmerge.Plan.keep_all(analysis), fxmerge.plan(model, table, example_inputs=(x,))):
            assert plan.is_exact and plan.num_convs == 4  # merging would be faster, but not exact
            assert rel_err(fxmerge.merge(model, plan)(x), original) < 1e-5
        lossy = fxmerge.Plan.from_sets(analysis, keep=[chain.activations[2][0]], lossy=True)
        assert not lossy.is_exact and lossy.num_convs == 2
        assert rel_err(fxmerge.merge(model, lossy)(x), original) > 1e-2  # what used to happen silently


def test_budgeted_plans_price_border_changing_merges_like_dropped_activations(net):
    model, x = net
    table = synthetic_table(model, x, merged_is_cheap)
    roomy = fxmerge.plan(model, table, example_inputs=(x,), budget_ms=4.0)  # everything fits unmerged
    assert roomy.is_exact and not roomy.border_changing()  # uniform importance: losing a border costs
    tight = fxmerge.plan(model, table, example_inputs=(x,), budget_ms=2.5)  # one merge needed
    lost = len(tight.border_changing()) + sum(len(c.dropped) for c in tight.chains)
    assert lost == 1 and not tight.is_exact  # one border or the ReLU: each costs the same importance
    assert "lossy" in str(tight)
    border = fxmerge.plan(model, table, example_inputs=(x,), budget_ms=2.5,
                          importance={(0, 0, 2): 1.0, (0, 1, 3): 0.5, (0, 2, 4): 0.5, (0, 0, 1): 1.0, (0, 1, 2): 1.0,
                                      (0, 2, 3): 1.0, (0, 3, 4): 1.0})
    assert border.border_changing() == [(0, 0, 2)] and "borders change" in str(border)


class Branchless(nn.Module):
    def __init__(self, head: bool):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 4, 5) if head else None

    def forward(self, x):
        y = F.relu(self.c1(x))
        z = self.c3(F.relu(self.c2(y)))
        return (z, self.head(y)) if self.head is not None else z


def test_plan_for_an_edited_model_with_the_same_node_names_is_refused():
    x = torch.randn(1, 3, 12, 12)
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(Branchless(head=False).eval(), (x,)))
    edited = Branchless(head=True).eval()  # a side head after relu: same node names for the chain
    with pytest.raises(fxmerge.PlanMismatchError,
                       match=r"chain 0 \(c1..c3\): 3 layers in the plan, 1 in this model, where it ends at fan-out "
                             r"to 2 consumers: conv 'c2', conv 'head'"):
        fxmerge.merge(edited, plan)
    wider = Branchless(head=False).eval()
    wider.c2 = nn.Conv2d(4, 4, 5, padding=2)
    with pytest.raises(fxmerge.PlanMismatchError, match=r"chain 0 \(c1..c3\): layer 2: the plan has c2 \(4->4 3x3 p1x1\), this model c2 "
                                                          r"\(4->4 5x5 p2x2\)"):
        fxmerge.linearize(wider, plan)


def test_plan_json_keeps_the_structure_and_input_shapes(tmp_path):
    x = torch.randn(1, 3, 12, 12)
    model = Branchless(head=False).eval()
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(model, (x,)))
    plan.save(tmp_path / "p.json")
    again = fxmerge.Plan.load(tmp_path / "p.json")
    assert again.inputs == [{"shape": [1, 3, 12, 12], "dtype": "float32"}] and again.chains == plan.chains
    with pytest.raises(fxmerge.PlanMismatchError):
        fxmerge.merge(Branchless(head=True).eval(), again)


def test_train_mode_model_is_converted_explicitly_and_left_as_it_was():
    model = nn.Sequential(*conv_bn(3, 4), nn.Dropout(0.5), *conv_bn(4, 4)).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="train mode: fxmerge analyses and rewrites it in eval mode"):
        analysis = fxmerge.analyze(model, (x,))
    with pytest.warns(UserWarning, match="train mode"):
        merged = fxmerge.merge(model, fxmerge.Plan.fold_only(analysis))
    assert model.training and all(m.training for m in model.modules())  # the caller's mode is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # so are its statistics
    assert not merged.training  # the result comes back in eval mode: dropout off, folded BN
    with torch.no_grad():
        torch.testing.assert_close(merged(x), merged(x))
        torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm, modern", [(nn.utils.weight_norm, "parametrizations.weight_norm"),
                                          (nn.utils.spectral_norm, "parametrizations.spectral_norm")])
def test_old_style_weight_norm_and_spectral_norm_are_refused_with_the_modern_alternative(norm, modern):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old form itself
        norm(model[2])
    with pytest.raises(fxmerge.UnsupportedModelError, match=f"'2' .*forward pre-hook.*{modern}"):
        fxmerge.analyze(model, (torch.randn(1, 3, 8, 8),))


def test_forward_hooks_on_merged_modules_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(fxmerge.UnsupportedModelError, match="'0' .*forward hook"):
        fxmerge.analyze(model, (torch.randn(1, 3, 8, 8),))


def test_merged_weights_are_composed_in_float64_and_cast_once():
    """A deep drop-all merge of a float32 model gives exactly the float64 merge rounded once:
    no float32 rounding accumulates through the composition."""
    layers = []
    for i in range(12):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    x = torch.randn(2, 8, 32, 32)
    model = randomize(nn.Sequential(*layers), calibrate_on=x).eval()
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(model, (x[:1],), limits=fxmerge.BlockLimits(max_kernel=25)))
    single, double = fxmerge.merge(model, plan), fxmerge.merge(copy.deepcopy(model).double(), plan)
    merged = [n for n, _ in single.named_children() if n.startswith("merged__")]
    assert merged and count_convs(single) < 12
    for name in merged:
        assert torch.equal(getattr(single, name).weight, getattr(double, name).weight.float()), name
        assert torch.equal(getattr(single, name).bias, getattr(double, name).bias.float()), name


def test_an_exported_program_is_lowered_and_its_aten_module_refused_with_an_explanation():
    """An ExportedProgram goes through the export front-end (the same chains as the module);
    ``exported.module()``, a GraphModule of ATen calls, is refused with what to pass instead."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    exported = torch.export.export(model, (x,))
    by_export, by_fx = fxmerge.analyze(exported, (x,)), fxmerge.analyze(model, (x,))
    assert by_export.capture == "export" and by_fx.capture == "fx"
    assert [len(c.layers) for c in by_export.chains] == [len(c.layers) for c in by_fx.chains] == [2]
    with pytest.raises(fxmerge.UnsupportedModelError, match="ATen operators.*ExportedProgram itself"):
        fxmerge.analyze(exported.module(), (x,))


def test_activation_registry_is_scoped():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Softsign(), nn.Conv2d(2, 2, 3, padding=1)).eval()
    x = torch.randn(1, 2, 6, 6)
    before = activations.registered_activations()
    with fxmerge.activation_registry():
        fxmerge.register_activation("Softsign", modules=[nn.Softsign])
        assert fxmerge.analyze(model, (x,)).chains[0].length == 2
    assert activations.registered_activations() == before
    assert fxmerge.analyze(model, (x,)).chains[0].length == 1
    with fxmerge.activation_registry():
        fxmerge.register_activation("Softsign", modules=[nn.Softsign])
        fxmerge.unregister_activation("Softsign")
        assert "Softsign" not in activations.registered_activations()


def test_plan_files_with_unknown_nodes_or_an_old_version_are_refused(tmp_path):
    import json

    x = torch.randn(1, 3, 12, 12)
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(Branchless(head=False).eval(), (x,)))
    data = plan.to_dict()
    data["chains"][0]["keep"] = ["relu_999"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(fxmerge.MalformedFileError, match=r"bad.json: .*\['relu_999'\] are not nodes of this chain"):
        fxmerge.Plan.load(tmp_path / "bad.json")
    data = plan.to_dict()
    data["version"] = 1
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(fxmerge.MalformedFileError, match="version-1 plan.*Re-create it"):
        fxmerge.Plan.load(tmp_path / "old.json")
    with pytest.raises(fxmerge.InvalidPlanError, match="not droppable activations of this model: \\['relu_999'\\]"):
        fxmerge.Plan.from_sets(fxmerge.analyze(Branchless(head=False).eval(), (x,)), keep=["relu_999"])
