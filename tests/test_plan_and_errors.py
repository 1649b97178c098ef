"""Plans (constructors, validation, JSON), clear errors on bad input, and no mutation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import fxmerge
from conftest import check_exact, randomize


@pytest.fixture(scope="module")
def mbv2():
    model = randomize(torchvision.models.mobilenet_v2()).eval()
    x = torch.randn(1, 3, 64, 64)
    return model, x, fxmerge.analyze(model, (x,))


def test_plan_json_round_trip(mbv2, tmp_path):
    _, _, analysis = mbv2
    plan = fxmerge.Plan.drop_all(analysis)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = fxmerge.Plan.load(path)
    assert again.chains == plan.chains and again.fingerprint() == plan.fingerprint()
    text = path.read_text()
    assert "features_1_conv_0_0" in text  # stored by node names, readable


def test_plan_from_sets_equals_constructors(mbv2):
    model, x, analysis = mbv2
    chain = analysis.chains[0]
    keep_names = [chain.activations[p][0] for p in chain.droppable]
    assert fxmerge.Plan.from_sets(analysis, keep=keep_names).chains == fxmerge.Plan.keep_all(analysis).chains
    assert fxmerge.Plan.from_sets(analysis, keep=[]).chains == fxmerge.Plan.drop_all(analysis).chains
    some = keep_names[::3]
    plan = fxmerge.Plan.from_sets(analysis, keep=some)
    assert [chain.activations[p][0] for p in plan.chains[0].keep] == some
    merged, lin = fxmerge.merge(model, plan).eval(), fxmerge.linearize(model, plan).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lin(x), rtol=1e-4, atol=1e-4)


def test_plan_from_sets_with_explicit_boundaries(mbv2):
    _, _, analysis = mbv2
    chain = analysis.chains[0]
    # cut after every layer: keeps every conv separate
    plan = fxmerge.Plan.from_sets(analysis, keep=[], merge_after=[l.conv for l in chain.layers])
    assert plan.chains[0].segments() == [(p, p + 1) for p in range(chain.length)]


def test_invalid_boundary_set_is_rejected(mbv2):
    _, _, analysis = mbv2
    chain = analysis.chains[0]
    skip = chain.skips[0]
    inside = chain.layers[skip.source].conv  # a cut strictly inside the residual span
    with pytest.raises(fxmerge.InvalidPlanError, match="cuts the residual"):
        fxmerge.Plan.from_sets(analysis, keep=[], merge_after=[inside])
    with pytest.raises(fxmerge.InvalidPlanError, match="not droppable"):
        fxmerge.Plan.from_sets(analysis, keep=["no_such_relu"])
    with pytest.raises(fxmerge.InvalidPlanError, match="not conv layers"):
        fxmerge.Plan.from_sets(analysis, keep=[], merge_after=["classifier_1"])


def test_plan_for_a_different_model_is_rejected(mbv2):
    _, _, analysis = mbv2
    plan = fxmerge.Plan.drop_all(analysis)
    other = torchvision.models.resnet18().eval()
    with pytest.raises(fxmerge.PlanMismatchError, match="different model"):
        fxmerge.merge(other, plan)
    with pytest.raises(fxmerge.PlanMismatchError, match="different model"):
        fxmerge.linearize(other, plan)


def test_linearized_with_another_plan_is_rejected(mbv2):
    model, _, analysis = mbv2
    lin = fxmerge.linearize(model, fxmerge.Plan.drop_all(analysis))
    with pytest.raises(fxmerge.PlanMismatchError, match="different plan"):
        fxmerge.merge(lin, fxmerge.Plan.keep_all(analysis))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


def test_untraceable_submodule_is_kept_whole_and_its_convs_are_listed():
    model = Untraceable().eval()
    analysis = fxmerge.analyze(model, (torch.randn(1, 3, 8, 8),))
    assert analysis.chains == []  # the conv hides in a kept-whole submodule ...
    why = analysis.unmergeable["inner"]  # ... and is said to be left alone, with the reason
    assert "Branchy" in why and "control flow" in why
    assert "inner" in str(analysis)


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow in the model's own forward
            return self.conv(x)
        return x


def test_untraceable_model_error_names_where_and_what_to_try():
    with pytest.raises(fxmerge.TraceFailedError) as info:
        fxmerge.analyze(UntraceableRoot().eval(), (torch.randn(1, 3, 8, 8),))
    msg = str(info.value)
    assert "UntraceableRoot.forward" in msg and "concrete_args" in msg and "leaf_modules" in msg
    assert isinstance(info.value, fxmerge.FxMergeError)


def test_user_model_is_never_mutated(mbv2):
    model, x, analysis = mbv2
    before = copy.deepcopy(model.state_dict())
    graph_before = str(torch.fx.symbolic_trace(model).graph)
    for kind in ("drop_all", "keep_all"):
        plan = getattr(fxmerge.Plan, kind)(analysis)
        lin = fxmerge.linearize(model, plan)
        fxmerge.merge(model, plan)
        with torch.no_grad():  # changing the linearized net must not reach the user's model
            for p in lin.parameters():
                p.add_(1.0)
        fxmerge.merge(lin, plan)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert str(torch.fx.symbolic_trace(model).graph) == graph_before
    assert all(not isinstance(m, nn.Identity) for m in model.modules())


def test_user_graph_module_is_never_mutated():
    model = torch.fx.symbolic_trace(randomize(torchvision.models.resnet18()).eval())
    code, meta = model.code, [dict(n.meta) for n in model.graph.nodes]
    check_exact(model, (torch.randn(1, 3, 32, 32),))
    assert model.code == code and [dict(n.meta) for n in model.graph.nodes] == meta


def test_compiled_module_is_unwrapped():
    model = randomize(torchvision.models.resnet18()).eval()
    compiled = torch.compile(model, backend="eager")
    analysis = fxmerge.analyze(compiled, (torch.randn(1, 3, 32, 32),))
    assert analysis.num_layers == 20


def test_linearized_model_trains():
    model = randomize(torchvision.models.mobilenet_v2(num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(model.eval(), (x,)))
    lin = fxmerge.linearize(model, plan).train()
    opt = torch.optim.SGD(lin.parameters(), lr=0.01)
    loss = lin(x).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in lin.parameters() if p.requires_grad)
    opt.step()
    lin.eval()
    merged = fxmerge.merge(lin, plan).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lin(x), rtol=1e-4, atol=1e-4)


def test_analysis_prints_tables(mbv2):
    _, _, analysis = mbv2
    text = str(analysis)
    assert "chain" in text and "features_1_conv_0_0" in text and "ReLU6" in text
    assert "pooling" in text  # why the chain ends


def test_custom_tracer_is_used():
    class LeafBranchy(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Branchy) or super().is_leaf_module(m, qualname)

    analysis = fxmerge.analyze(Untraceable().eval(), (torch.randn(1, 3, 8, 8),), trace=fxmerge.TraceOptions(tracer=LeafBranchy()))
    assert analysis.chains == []
    node_ops = {n.op for n in analysis.graph_module.graph.nodes}
    assert "call_module" in node_ops  # Branchy stayed a leaf: traced by the user's tracer
