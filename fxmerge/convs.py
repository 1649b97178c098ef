"""Building the convolution modules merge emits — in one place, so the latency table times
exactly what the rewrite produces."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.algebra import ConvGeometry, flat_pad, is_symmetric

CONV_MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def make_conv(weight: torch.Tensor, bias: torch.Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
              dilation: tuple[int, ...], groups: int) -> nn.Module:
    """An ``nn.ConvNd`` holding ``weight`` and ``bias`` (symmetric ``padding`` per dimension)."""
    ndim = weight.dim() - 2
    # skip_init: the random initialisation would be overwritten anyway and costs real time
    conv = nn.utils.skip_init(CONV_MODULE[ndim], weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                              stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True,
                              device=weight.device, dtype=weight.dtype)
    conv.weight = nn.Parameter(weight)
    conv.bias = nn.Parameter(bias)
    return conv


class Pad(nn.Module):
    """A constant-zero pad; asymmetric padding sits in front of the merged conv as ``F.pad``."""

    def __init__(self, pad: tuple[int, ...]):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


def conv_for_geometry(geometry: ConvGeometry, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A randomly initialised module with exactly the compute merge emits for ``geometry``."""
    g = geometry
    weight = torch.randn((g.out_channels, g.in_channels // g.groups) + g.kernel, dtype=dtype, device=device) * 0.01
    bias = torch.zeros(g.out_channels, dtype=dtype, device=device)
    if is_symmetric(g.padding):
        return make_conv(weight, bias, g.stride, tuple(lo for lo, _ in g.padding), g.dilation, g.groups)
    return nn.Sequential(Pad(flat_pad(g.padding)), make_conv(weight, bias, g.stride, (0,) * g.ndim, g.dilation, g.groups))
