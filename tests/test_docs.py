"""Every docstring example in fxmerge runs, as written, against a small model and a latency
table made up by hand (so what they print never depends on this machine's speed)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch
import torch.nn as nn
import torchvision

import fxmerge
import fxmerge.passes
from synthetic import merging_pays_table


def _modules() -> list[str]:
    names = ["fxmerge"]
    for package in (fxmerge, fxmerge.passes):
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                  if not m.name.startswith("fxmerge.passes.") or package is fxmerge.passes]
    return sorted(set(n for n in names if not n.endswith("__main__")))


def _small_model() -> nn.Module:
    def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6())

    torch.manual_seed(0)
    return nn.Sequential(block(3, 8, 2), block(8, 8), block(8, 16), nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4)).eval()


def _globs() -> dict:
    model, x = _small_model(), torch.randn(1, 3, 16, 16)
    analysis = fxmerge.analyze(model, (x,))
    loader = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 3])) for _ in range(2)]
    return {"torch": torch, "torchvision": torchvision, "nn": nn, "fxmerge": fxmerge, "model": model, "x": x,
            "analysis": analysis, "table": merging_pays_table(analysis, (x,)), "loader": loader}


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # examples that save files write here
    module = importlib.import_module(name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(module, name, globs={**vars(module), **_globs()}) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"


def test_every_module_is_collected():
    assert {"fxmerge.planner", "fxmerge.passes.analysis", "fxmerge.cli.models", "fxmerge.passes.dp"} <= set(_modules())
