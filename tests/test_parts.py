"""Compressing parts of a model (``modules=[...]``, issue 15 point 4) and the front door's
messages: only the named submodules are captured, planned together and rewritten; the result
is a copy of the whole model with those submodules replaced."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torchvision

import fxmerge
from conftest import assert_same, count_convs, finetune_like, randomize
from fxmerge.passes.rewrite import merged_plan_record
from synthetic import merging_pays_table

F64 = torch.float64


class DataDependentHead(nn.Module):
    """A branch on tensor values: export cannot capture it, fx keeps it whole."""

    def forward(self, x):
        if x.sum() > 0:
            return x.mean((2, 3))
        return x.amax((2, 3))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU())
        self.head = DataDependentHead()

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def _net():
    torch.manual_seed(0)
    return randomize(Net()).eval().to(F64), torch.randn(2, 3, 12, 12, dtype=F64)


def _convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def test_parts_are_planned_together_and_put_back_exactly():
    model, x = _net()
    before = copy.deepcopy(model.state_dict())
    analysis = fxmerge.analyze(model, (x,), modules=["stem", "body"])
    assert analysis.modules == ["stem", "body"] and analysis.num_layers == 4 and len(analysis.chains) == 2
    drop = fxmerge.Plan.drop_all(analysis)
    linear, merged = fxmerge.linearize(model, drop), fxmerge.merge(model, drop)
    assert type(merged) is Net and merged.head is not model.head  # a copy of the whole model
    assert _convs(merged.stem) == 1 and _convs(merged.body) == 1 and _convs(model) == 4
    assert_same(merged, linear, (x,), F64, "parts: merge(drop_all) vs linearize")
    for kind in ("keep_all", "fold_only"):
        plan = getattr(fxmerge.Plan, kind)(analysis)
        assert_same(fxmerge.merge(model, plan), model, (x,), F64, f"parts: merge({kind}) vs the original")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched
    assert fxmerge.plan_of(merged).modules == ["stem", "body"] == merged_plan_record(merged)["modules"]
    assert fxmerge.Plan.from_dict(drop.to_dict()).modules == ["stem", "body"]


def test_a_fine_tuned_linearized_model_merges_to_itself():
    model, x = _net()
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(model, (x,), modules=["stem", "body"]))
    linear = fxmerge.linearize(model, plan)
    finetune_like(linear, (x,))
    assert_same(fxmerge.merge(linear, plan), linear, (x,), F64, "parts: merge(fine-tuned linearized)")
    assert linear.stem.training is False and sum(p.requires_grad for p in linear.parameters()) > 0


def test_a_part_is_a_whole_model_of_its_own_to_compress():
    """Compressing one part gives the same part as compressing that submodule alone."""
    model, x = _net()
    alone = fxmerge.merge(model.stem, fxmerge.Plan.drop_all(fxmerge.analyze(model.stem, (x,))))
    merged = fxmerge.merge(model, fxmerge.Plan.drop_all(fxmerge.analyze(model, (x,), modules=["stem"])))
    assert_same(merged.stem, alone, (x,), F64, "parts: stem compressed within the model vs alone")
    assert merged.body is not model.body and _convs(merged.body) == 2  # untouched parts are copies


@pytest.mark.parametrize("modules, match", [
    (["stem", "nope"], "'nope' is not a submodule of Net"),
    (["stem", "stem.0"], "'stem.0' is inside 'stem'"),
    ("stem", "a non-empty list of submodule names"),
    ([], "a non-empty list"),
])
def test_bad_module_lists_are_refused_by_name(modules, match):
    model, x = _net()
    with pytest.raises(fxmerge.InvalidArgumentError, match=match):
        fxmerge.analyze(model, (x,), modules=modules)


def test_a_part_called_twice_or_with_keywords_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

        def forward(self, x):
            return self.block(self.block(x))

    with pytest.raises(fxmerge.UnsupportedModelError, match="'block' ran 2 times"):
        fxmerge.analyze(Twice().eval(), (torch.randn(1, 4, 6, 6),), modules=["block"])


def test_full_detector_with_backbone_compressed_exactly():
    """torchvision's fasterrcnn_mobilenet_v3_large_320_fpn with modules=['backbone']: keep-all
    equals the whole detector's output in eval mode (scores threshold 0, so boxes are there and
    depend on the input), drop-all merges fewer backbone convs and equals its linearized twin."""
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, box_detections_per_img=20)
    detector = detector.eval().to(F64)
    images = torch.rand(1, 3, 320, 320, dtype=F64)
    features = detector.transform([images[0]])[0].tensors  # what the backbone runs on
    randomize(detector.backbone, calibrate_on=features)  # statistics that keep the signal alive
    analysis = fxmerge.analyze(detector, (images,), modules=["backbone"])
    assert analysis.num_layers == _convs(detector.backbone)
    assert analysis.inputs[0]["shape"] == [1, 3, 320, 320]
    keep = fxmerge.merge(detector, fxmerge.Plan.keep_all(analysis))
    with torch.no_grad():
        want, got = detector([images[0]]), keep([images[0]])
    assert want[0]["boxes"].shape == (20, 4)
    for key in ("boxes", "scores", "labels"):  # the whole detector's output ...
        assert torch.allclose(want[0][key].to(F64), got[0][key].to(F64), rtol=1e-9, atol=1e-9), key
    # ... is nearly the same for any image with random heads (scores ~1/91, anchor boxes), so the
    # backbone's features are compared too (assert_same checks that they depend on the input)
    assert_same(keep.backbone, detector.backbone, (features,), F64, "detector backbone: keep_all vs the original")
    drop = fxmerge.Plan.drop_all(analysis)
    merged, linear = fxmerge.merge(detector, drop), fxmerge.linearize(detector, drop)
    assert count_convs(merged.backbone) < _convs(detector.backbone)
    assert_same(merged.backbone, linear.backbone, (features,), F64, "detector backbone: merge vs linearize")


# --------------------------------------------------------------------------- the front door's messages


def test_a_wrong_input_names_the_node_and_the_cause_without_a_traceback(capfd):
    """Issue 18 item 4: the cause ('expected ... 3 channels') is in fxmerge's message, torch's
    traceback is not printed."""
    model = torchvision.models.mobilenet_v2().eval()
    with pytest.raises(fxmerge.InvalidArgumentError) as caught:
        fxmerge.analyze(model, (torch.randn(1, 4, 32, 32),))
    message = str(caught.value)
    assert "features_0_0" in message and "to have 3 channels" in message and "(1, 4, 32, 32) float32" in message
    with pytest.raises(fxmerge.InvalidArgumentError, match="expected scalar type Double"):
        fxmerge.analyze(model, (torch.randn(1, 3, 32, 32, dtype=F64),))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ShapeProp" not in err


def test_a_pickled_or_saved_compressed_model_keeps_its_plan(tmp_path):
    """Issue 18 item 9: GraphModule.meta is dropped by pickle and torch.save; the plan is not,
    so plan_of and save_compressed still take the copy."""
    model, x = _net()
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(model.stem, (x,)))
    merged = fxmerge.merge(model.stem, plan)
    buffer = io.BytesIO()
    torch.save(merged, buffer)
    buffer.seek(0)
    for copy_ in (pickle.loads(pickle.dumps(merged)), torch.load(buffer, weights_only=False)):
        assert copy_.meta.get("fxmerge") is None  # what torch keeps: nothing of meta ...
        assert merged_plan_record(copy_) == plan.to_dict()  # ... and the plan all the same
        assert fxmerge.plan_of(copy_).fingerprint() == plan.fingerprint()
        fxmerge.save_compressed(copy_, tmp_path / "copy.pt")
        assert fxmerge.load_compressed(tmp_path / "copy.pt", model.stem).state_dict().keys() == merged.state_dict().keys()
        assert_same(copy_, merged, (x,), F64, "pickled merged model")


def test_compress_with_modules_plans_the_parts_under_one_budget():
    """compress(..., modules=[...]) on a model that cannot be captured whole, with a table
    measured on the parts' analysis (synthetic timings: the plan, not the machine, is tested)."""
    model, x = _net()
    analysis = fxmerge.analyze(model, (x,), modules=["stem", "body"])
    table = merging_pays_table(analysis, (x,))
    compressed = fxmerge.compress(model, table, budget=0.8, example_inputs=(x,), modules=["stem", "body"])
    plan = fxmerge.plan_of(compressed)
    assert type(compressed) is Net and plan.modules == ["stem", "body"]
    assert plan.report.predicted_planned_ms <= 0.8 * plan.report.original_ms
    assert_same(compressed, fxmerge.linearize(model, plan), (x,), F64, "compress(modules) vs its linearized twin")
    with pytest.raises(fxmerge.InvalidArgumentError, match="the analysis passed covers"):
        fxmerge.plan(model, table, budget=0.8, example_inputs=(x,), analysis=analysis, modules=["stem"])


def test_a_model_neither_front_end_captures_says_so_and_points_to_modules():
    class Branchy(Net):
        def forward(self, x):
            y = self.body(self.stem(x))
            return y.mean() if y.sum() > 0 else y.amax()  # the model's own forward branches on values

    model, x = Branchy().eval(), torch.randn(1, 3, 12, 12)
    with pytest.raises(fxmerge.TraceFailedError, match=r"torch.export could not capture it either.*modules=\["):
        fxmerge.analyze(model, (x,))
    assert fxmerge.analyze(model, (x,), modules=["stem", "body"]).num_layers == 4


def test_what_is_not_a_model_or_an_analysis_is_named():
    model, x = _net()
    plan = fxmerge.Plan.drop_all(fxmerge.analyze(model.stem, (x,)))
    for call in (lambda: fxmerge.merge("resnet18", plan), lambda: fxmerge.linearize(None, plan)):
        with pytest.raises(fxmerge.InvalidArgumentError, match="model must be a torch.nn.Module"):
            call()
    table = merging_pays_table(fxmerge.analyze(model.stem, (x,)), (x,))
    with pytest.raises(fxmerge.InvalidArgumentError, match="analysis must be the fxmerge.Analysis"):
        fxmerge.plan(model.stem, table, budget=0.9, example_inputs=(x,), analysis="a")


def test_a_table_measured_for_parts_covers_them():
    """LatencyTable.measure(..., modules=[...]) measures the parts' terms (asserted on what it
    holds, never on the times)."""
    model, x = _net()
    model, x = model.float(), x.float()
    table = fxmerge.LatencyTable.measure(model, (x,), modules=["stem", "body"], repeats=2, rounds=1,
                                         min_repeat_ms=0.1, references=False, progress=False)
    analysis = fxmerge.analyze(model, (x,), modules=["stem", "body"])
    assert not table.missing(analysis) and len(table) > 0


def test_parts_fx_cannot_trace_are_captured_by_export_and_put_back():
    """Parts that only torch.export captures (C2f's list(chunk)) go through the same split."""
    from yolo_blocks import C2f

    class TwoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = C2f(8, 8, 2, shortcut=True), C2f(8, 8, 1, shortcut=True)

        def forward(self, x):
            y = self.b(self.a(x))
            return y.mean() if y.sum() > 0 else y.amax()  # the whole model captures in neither

    model = randomize(TwoBlocks()).eval().to(F64)
    x = torch.randn(1, 8, 16, 16, dtype=F64)
    analysis = fxmerge.analyze(model, (x,), modules=["a", "b"])
    assert analysis.capture == "export" and analysis.num_layers == _convs(model)
    drop = fxmerge.Plan.drop_all(analysis)
    merged, linear = fxmerge.merge(model, drop), fxmerge.linearize(model, drop)
    body = nn.Sequential  # the two parts in a row: what the branchy head reads
    assert_same(body(merged.a, merged.b), body(linear.a, linear.b), (x,), F64, "export parts: merge vs linearize")
    keep = fxmerge.merge(model, fxmerge.Plan.keep_all(analysis))
    assert_same(body(keep.a, keep.b), body(model.a, model.b), (x,), F64, "export parts: keep_all vs the original")
