"""Outputs are ordinary GraphModules: torch.compile (aot_eager) and torch.export accept them."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxmerge
from conftest import randomize
from test_edge_cases import TFSamePad, Nested


def _outputs(model, x):
    analysis = fxmerge.analyze(model, (x,))
    plan = fxmerge.Plan.drop_all(analysis)
    return {"linearized": fxmerge.linearize(model, plan).eval(), "merged": fxmerge.merge(model, plan).eval()}


CASES = {
    "mobilenet_v2": lambda: (randomize(torchvision.models.mobilenet_v2()).eval(), torch.randn(2, 3, 64, 64)),
    "tf_same_pads": lambda: (randomize(TFSamePad()).eval(), torch.randn(2, 3, 15, 16)),
    "nested_residuals": lambda: (randomize(Nested()).eval(), torch.randn(2, 6, 12, 12)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compile_and_export(case):
    model, x = CASES[case]()
    for kind, gm in _outputs(model, x).items():
        with torch.no_grad():
            ref = gm(x)
            compiled = torch.compile(gm, backend="aot_eager")
            torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5, msg=f"{kind}: compile")
            exported = torch.export.export(gm, (x,))
            torch.testing.assert_close(exported.module()(x), ref, rtol=1e-5, atol=1e-5, msg=f"{kind}: export")
