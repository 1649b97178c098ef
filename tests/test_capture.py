"""The torch.export capture front-end (``fxmerge.passes.capture``): models fx cannot trace are
exported and lowered to the graph the analysis knows; the whole pipeline then works on them,
exactly, and the results deploy like any fxmerge output."""
from __future__ import annotations

import copy
import io
import operator
import os

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxmerge
from conftest import assert_same, check_exact, count_convs, first_tensor, kept_activations, randomize
from fxmerge.passes.activations import registered_activations
from fxmerge.passes.capture import capture
from yolo_blocks import C2f, SPPF, Conv, ShapeLoop, TinyYolo, WithBackbone

F64 = torch.float64

BLOCKS = {
    "conv": lambda: (Conv(3, 8, 3), (1, 3, 16, 16)),
    "c2f_shortcut": lambda: (C2f(8, 8, 2, shortcut=True), (1, 8, 16, 16)),
    "c2f_plain": lambda: (C2f(8, 8, 2, shortcut=False), (1, 8, 16, 16)),
    "sppf": lambda: (SPPF(8, 8), (1, 8, 16, 16)),
    "detect_head": lambda: (WithBackbone(), (1, 3, 32, 32)),
    "tiny_yolo": lambda: (TinyYolo(), (1, 3, 64, 64)),
    "shape_loop": lambda: (ShapeLoop(), (1, 3, 48, 48)),
}


def _float64(name: str):
    """A block with non-trivial BatchNorm statistics, in float64, and its input."""
    model, shape = BLOCKS[name]()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=F64)
    model = randomize(model.double().eval(), calibrate_on=torch.randn((4,) + shape[1:], generator=g, dtype=F64))
    return model.eval(), x


def _structure(analysis: fxmerge.Analysis) -> list:
    """What a plan depends on, minus the wording of end reasons (fx names a pooling module,
    export its ATen op)."""
    return [([l.conv for l in c.layers], sorted(c.activations.items()), sorted(c.droppable),
             [(s.source, s.target) for s in c.skips], sorted(c.breaks)) for c in analysis.chains]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_merge_equals_linearize_and_keep_all_equals_the_original(name):
    model, x = _float64(name)
    gm = capture(model, (x,))
    checked = check_exact(gm, (x,), dtype=F64, finetune=False)
    analysis = checked.analysis
    assert analysis.num_layers == count_convs(gm) and not analysis.unmergeable  # every conv is seen
    for kind in ("keep_all", "fold_only"):
        merged = fxmerge.merge(gm, getattr(fxmerge.Plan, kind)(analysis))
        assert_same(merged, model, (x,), F64, f"{name}: merge({kind}) vs the original model")
    if any(c.droppable for c in analysis.chains):
        assert count_convs(checked.merged["drop_all"]) < count_convs(gm)


def test_models_fx_cannot_trace_are_captured_with_no_extra_arguments():
    """C2f (``list(x.chunk(...))``) and a shape-read loop bound stop fx at the model's own
    forward: analyze falls back to export by itself and sees every conv, the same chains as
    capturing first; a plan made there re-applies by export (``plan.capture``). Explicit
    TraceOptions mean fx was asked for: its failure is raised, not hidden."""
    for name in ("c2f_shortcut", "shape_loop"):
        model, x = _float64(name)
        analysis = fxmerge.analyze(model, (x,))
        assert analysis.capture == "export" and not analysis.unmergeable
        captured = capture(model, (x,))  # a shape branch may skip some of the model's convs
        assert analysis.num_layers == count_convs(captured) > 0
        assert _structure(analysis) == _structure(fxmerge.analyze(captured, (x,)))
        plan = fxmerge.Plan.drop_all(analysis)
        assert plan.capture == "export" and fxmerge.Plan.from_dict(plan.to_dict()).capture == "export"
        assert_same(fxmerge.merge(model, plan), fxmerge.linearize(model, plan), (x,), F64, f"{name}: drop_all")
        assert_same(fxmerge.merge(model, fxmerge.Plan.keep_all(analysis)), model, (x,), F64, f"{name}: keep_all")
        with pytest.raises(fxmerge.TraceFailedError, match="could not trace"):
            fxmerge.analyze(model, (x,), trace=fxmerge.TraceOptions(leaf_modules=(nn.Conv2d,)))


def test_export_sees_inside_what_fx_keeps_whole():
    """fx keeps TinyYolo's C2f blocks and head whole (they do not trace), hiding their convs;
    analyze then prefers the export-captured graph, in which all of them are layers."""
    model, x = _float64("tiny_yolo")
    auto, by_export = fxmerge.analyze(model, (x,)), fxmerge.analyze(capture(model, (x,)), (x,))
    assert auto.capture == "export" and not auto.unmergeable and _structure(auto) == _structure(by_export)
    assert auto.num_layers == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    by_fx = fxmerge.analyze(model, (x,), trace=fxmerge.TraceOptions(leaf_modules=(nn.LSTM,)))  # fx asked for
    assert by_fx.capture == "fx" and by_fx.unmergeable


def test_shape_branches_are_fixed_for_the_example_inputs():
    model = ShapeLoop().eval()
    narrow, wide = capture(model, (torch.randn(1, 3, 32, 32),)), capture(model, (torch.randn(1, 3, 48, 48),))
    assert count_convs(narrow) == 1 + 2 + 1 and count_convs(wide) == 1 + 3 + 1 + 1


# --------------------------------------------------------------------------- the canonical form


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_same_chains_and_names_as_fx(name):
    model = randomize(getattr(torchvision.models, name)()).eval()
    x = torch.randn(1, 3, 64, 64)
    by_fx, by_export = fxmerge.analyze(model, (x,)), fxmerge.analyze(capture(model, (x,)), (x,))
    assert _structure(by_export) == _structure(by_fx)


def test_blocks_fx_traces_give_the_same_chains():
    for name in ("conv", "sppf"):
        model, x = _float64(name)
        assert _structure(fxmerge.analyze(capture(model, (x,)), (x,))) == _structure(fxmerge.analyze(model, (x,)))


def test_lowered_graph_is_torch_level():
    """Convs, BatchNorms and activations are modules of the model (the same Parameters), adds
    are ``+``; asserts, shape reads and dead nodes are gone."""
    model, x = _float64("tiny_yolo")
    gm = capture(model, (x,))
    kinds = {type(gm.get_submodule(n.target)) for n in gm.graph.find_nodes(op="call_module")}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.MaxPool2d, nn.Upsample} <= kinds
    own = {id(p) for p in model.parameters()}
    assert own.isdisjoint(id(p) for p in gm.parameters())  # the user's model is not shared ...
    assert len(list(gm.parameters())) == len(list(model.parameters()))  # ... but all of it is there
    for node in gm.graph.nodes:
        assert not (node.op == "call_function" and "conv" in str(node.target))
        assert "assert" not in str(node.target) and "sym_" not in str(node.target)
        assert node.users or node.op == "output", f"dead node {node.name}"
    assert len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor)) == 0


def test_activations_in_every_form_and_from_the_registry():
    """Functional, method and module forms, with their arguments, come back as registered
    activations of the right kind; so does one the user registers (module and multi-op
    function), and an ExportedProgram's activations (no modules left there)."""

    class Acts(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(13))
            self.r6, self.lrelu, self.prelu = nn.ReLU6(), nn.LeakyReLU(0.2), nn.PReLU()

        def forward(self, x):
            acts = [F.silu, lambda t: F.leaky_relu(t, 0.2), lambda t: F.gelu(t, approximate="tanh"),
                    lambda t: F.hardtanh(t, -2.0, 2.0), F.relu6, torch.sigmoid, lambda t: t.relu(),
                    lambda t: F.elu(t, 0.5), self.r6, self.lrelu, self.prelu, F.hardswish, torch.tanh]
            for conv, act in zip(self.convs, acts):
                x = act(conv(x))
            return x

    # tanh-GELU is timm's own kind once the process imported timm (the registry then knows
    # GELUTanh, which computes exactly it), plain GELU otherwise: the suite's order decides
    gelu_tanh = "GELUTanh" if "GELUTanh" in registered_activations() else "GELU"
    kinds = ["SiLU", "LeakyReLU", gelu_tanh, "Hardtanh", "ReLU6", "Sigmoid", "ReLU", "ELU", "ReLU6", "LeakyReLU",
             "PReLU", "Hardswish", "Tanh"]
    model, x = Acts().eval(), torch.randn(1, 4, 8, 8)
    for source in (model, torch.export.export(model, (x,))):
        analysis = fxmerge.analyze(capture(source, (x,)), (x,))
        assert [k for c in analysis.chains for _, k in c.activations.values()] == kinds
    with fxmerge.activation_registry():
        fxmerge.register_activation("Softsign", modules=[nn.Softsign], functions=[F.softsign])
        model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Softsign(), nn.Conv2d(4, 4, 1)).eval()
        functional = _Functional(F.softsign).eval()  # x / (1 + |x|): three ATen ops, one activation
        for m in (model, functional):
            chain = fxmerge.analyze(capture(m, (x,)), (x,)).chains[0]
            assert [k for _, k in chain.activations.values()] == ["Softsign"] and chain.droppable == [1]


class _Functional(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.act = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), act

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_exported_program_input():
    model, x = _float64("tiny_yolo")
    program = torch.export.export(model, (x,))
    gm = capture(program)  # its own example inputs
    by_program, by_module = fxmerge.analyze(gm, (x,)), fxmerge.analyze(capture(model, (x,)), (x,))
    assert [(len(c.layers), c.droppable, c.skips) for c in by_program.chains] == \
        [(len(c.layers), c.droppable, c.skips) for c in by_module.chains]
    assert {type(gm.get_submodule(n.target)) for n in gm.graph.find_nodes(op="call_module")} >= {nn.Conv2d,
                                                                                                 nn.BatchNorm2d}
    plan = fxmerge.Plan.drop_all(by_program)
    assert_same(fxmerge.merge(gm, plan), fxmerge.linearize(gm, plan), (x,), F64, "program: merge vs linearize")
    assert_same(fxmerge.merge(gm, fxmerge.Plan.keep_all(by_program)), model, (x,), F64, "program: keep-all")
    before = {k: v.clone() for k, v in program.state_dict.items()}
    first_tensor(fxmerge.linearize(gm, plan).train()(x)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in program.state_dict.items())  # never changed


def test_in_place_ops_and_mutated_views():
    """``relu_``/``+=`` on private tensors become out-of-place ops; a mutated view (whose
    base is read later) makes the lowering functionalize instead, still exact."""

    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            y[:, :2].relu_()  # mutates y through a view
            z = self.b(y)
            z += x
            return torch.relu_(z)

    x = torch.randn(1, 4, 8, 8)
    for model in (Views().eval(), torchvision.models.resnet18().eval()):
        gm = capture(model, (x if model.__class__ is Views else torch.randn(1, 3, 32, 32),))
        assert not any(str(n.target).endswith("_.default") or str(n.target).endswith("_.Tensor")
                       for n in gm.graph.nodes)


def test_output_structure_is_the_models():
    model, x = _float64("tiny_yolo")
    with torch.no_grad():
        want, got = model(x), capture(model, (x,))(x)
    assert type(got) is type(want) is tuple and type(got[1]) is type(want[1]) is list and len(got[1]) == 2

    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.c(x)
            return {"y": y, "parts": [y[:, :2], (y.sum(),)], "n": x.shape[-1]}

    out = capture(Dict().eval(), (torch.randn(1, 3, 4, 4),))(torch.randn(1, 3, 4, 4))
    assert set(out) == {"y", "parts", "n"} and isinstance(out["parts"][1], tuple) and out["n"] == 4


def test_names_are_deterministic_and_plans_reapply():
    model, x = _float64("tiny_yolo")
    first, second = capture(model, (x,)), capture(copy.deepcopy(model), (x,))
    assert [n.name for n in first.graph.nodes] == [n.name for n in second.graph.nodes]
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(first, (x,)))
    assert_same(fxmerge.merge(second, plan), fxmerge.linearize(first, plan), (x,), F64, "plan re-applied")
    model(x)  # a model that already ran (lazily built state in place) captures the same
    assert [n.name for n in capture(model, (x,)).graph.nodes] == [n.name for n in first.graph.nodes]


def test_user_model_is_untouched():
    model = TinyYolo().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="train mode"):
        gm = capture(model, (torch.randn(2, 3, 64, 64),))
    assert model.training and not gm.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- training and deploying


def test_gradients_reach_every_parameter_of_the_linearized_model():
    model, x = _float64("tiny_yolo")
    gm = capture(model, (x,))
    linear = fxmerge.linearize(gm, fxmerge.Plan.drop_all(fxmerge.analyze(gm, (x,)))).train()
    bn = next(m for m in linear.modules() if isinstance(m, nn.BatchNorm2d))
    mean = bn.running_mean.clone()
    first_tensor(linear(torch.randn(2, *x.shape[1:], dtype=F64))).square().mean().backward()
    params = dict(linear.named_parameters())
    assert len(params) > 0
    missing = [name for name, p in params.items() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"no gradient reached {missing}"
    assert not torch.equal(bn.running_mean, mean)  # BatchNorm trains as BatchNorm


def test_merged_result_exports_compiles_and_runs_in_onnx_runtime():
    model, x = _float64("tiny_yolo")
    model, x = model.float(), x.float()
    gm = capture(model, (x,))
    merged = fxmerge.merge(gm, fxmerge.Plan.drop_all(fxmerge.analyze(gm, (x,))))
    with torch.no_grad():
        want = merged(x)
        again = torch.export.export(merged, (x,)).module()(x)
        compiled = torch.compile(merged, backend="aot_eager")(x)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, want, rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    torch.onnx.export(merged, (x,), buffer, dynamo=False, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    flat = torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(flat)
    for a, b in zip(got, flat):  # drop-all on random weights: values up to ~1e2, float32 kernels differ
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


# --------------------------------------------------------------------------- ultralytics


def _yolo(cfg: str):
    pytest.importorskip("ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = randomize(DetectionModel(cfg, verbose=False), calibrate_on=torch.randn(2, 3, 320, 320))  # signals live
    return model.double().eval(), torch.randn(1, 3, 320, 320, dtype=F64)


class _RawHead(nn.Module):
    """A detector's raw head outputs (``out[1]``): the decoded boxes (``out[0]``) are dominated
    by the anchor grid and barely depend on the input."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        return self.detector(x)[1]


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_ultralytics_detection(cfg):
    """Through the front door with no extra arguments (fx fails on the layer loop, export
    captures it): every conv a layer, the bottlenecks' residual adds fused by drop-all, exact,
    and the merged model exports again."""
    model, x = _yolo(cfg)
    gm = capture(model, (x,))
    analysis = fxmerge.analyze(model, (x,))
    assert analysis.capture == "export" and _structure(analysis) == _structure(fxmerge.analyze(gm, (x,)))
    assert analysis.num_layers == sum(isinstance(m, nn.Conv2d) for m in model.modules()) and not analysis.unmergeable
    assert any(layer.junction for c in analysis.chains for layer in c.layers)  # x + act(bn(conv(...)))
    plan = fxmerge.Plan.drop_all(analysis)
    merged, linear = fxmerge.merge(model, plan), fxmerge.linearize(model, plan)

    def adds(module):
        return sum(n.target in (operator.add, torch.add) for n in module.graph.nodes)
    assert adds(merged) < adds(gm)  # residual adds fused into merged kernels
    exported = torch.export.export(merged, (x,))
    assert_same(exported.module(), merged, (x,), F64, f"{cfg}: the merged model exported again")
    assert_same(_RawHead(merged), _RawHead(linear), (x,), F64, f"{cfg}: drop-all merge vs linearize")
    assert_same(merged, linear, (x,), F64, f"{cfg}: drop-all merge vs linearize, per kept activation",
                kept_activations(plan))
    assert count_convs(merged) < count_convs(gm)
    keep_all = fxmerge.merge(model, fxmerge.Plan.keep_all(analysis))
    assert_same(_RawHead(keep_all), _RawHead(model), (x,), F64, f"{cfg}: keep-all vs the original model")
