"""What keep-all costs: conv multiply-adds of the model, of its keep-all merge as it was before
issue 18 item 14 (each activation-free run covered by the fewest blocks, which fuses a
depthwise conv and the pointwise conv after it into one dense conv), and as it is now (the
cover of fewest MACs), with the relative error of keep-all against the model.

    python benchmarks/keep_all_macs.py xception41 legacy_xception ese_vovnet19b_dw ghostnet_100

timm models (random init, eval mode) at 1x3x96x96 (``--size``); MACs are counted from each
conv's real output shape in a forward pass (hooks), so they do not depend on machine speed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

import fxmerge
from fxmerge.plans import cheapest_cover

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import conv_work  # noqa: E402  (the suite's MAC count from real output shapes)


def fewest_blocks(analysis: fxmerge.Analysis) -> fxmerge.Plan:
    """Keep-all as it was: every run between kept activations, breaks and borders covered by
    the fewest valid blocks."""
    return fxmerge.Plan.from_positions(analysis, {
        c.index: (c.droppable, cheapest_cover(c, set(c.droppable) | set(c.breaks) | set(c.borders)))
        for c in analysis.chains})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, 3, args.size, args.size)
        analysis = fxmerge.analyze(model, (x,))
        before, now = fewest_blocks(analysis), fxmerge.Plan.keep_all(analysis)
        merged_before, merged_now = fxmerge.merge(model, before), fxmerge.merge(model, now)
        with torch.no_grad():
            ref = model(x)
            err = ((merged_now(x) - ref).abs().max() / ref.abs().max()).item()
        print(f"{name}: convs {analysis.num_layers} -> before {before.num_convs} / now {now.num_convs}; conv MACs "
              f"{conv_work(model, x) / 1e6:,.0f} M -> before {conv_work(merged_before, x) / 1e6:,.0f} M / now "
              f"{conv_work(merged_now, x) / 1e6:,.0f} M; keep-all vs model now {err:.1e} (float32)", flush=True)


if __name__ == "__main__":
    main()
