"""Shape arithmetic of merged convolutions, grown one layer at a time.

>>> from fxmerge.algebra import ConvGeometry
>>> conv3 = ConvGeometry(8, 8, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
>>> run = MergedRun([conv3, conv3], skips=[], start=0)
>>> run.extend(1).kernel, run.extend(2).kernel
((3, 3), (5, 5))

A run of layers i+1..j without padding between them is one convolution (ARCHITECTURE.md, "the
math"): with σ_l the product of the strides before layer l, its kernel spans
``1 + Σ d_l (k_l − 1) σ_l`` pixels, its stride is ``Π s_l`` and its front padding ``Σ p_l σ_l``
per side. :class:`MergedRun` keeps these sums, so every block of a chain costs O(1) per layer
(O(L²) for all blocks of a chain instead of O(L⁴)). Identity residuals nested in the run put
their Dirac term at an offset that joins the kernel's tap grid (its dilation).
"""
from __future__ import annotations

import math
from typing import Sequence

from fxmerge.algebra import ConvGeometry


def conv_params(geometry: ConvGeometry) -> int:
    """Weights of one convolution (bias left out)."""
    return geometry.out_channels * geometry.in_channels // geometry.groups * math.prod(geometry.kernel)


def conv_macs(geometry: ConvGeometry, output_shape: Sequence[int]) -> int:
    """Multiply-adds of one convolution producing ``output_shape`` (batch included)."""
    return (math.prod(output_shape) * geometry.in_channels // geometry.groups) * math.prod(geometry.kernel)


def kernel_spans(geometry: ConvGeometry) -> tuple[int, ...]:
    """The pixels a conv's taps span per dimension, dilation included."""
    return tuple(d * (k - 1) + 1 for k, d in zip(geometry.kernel, geometry.dilation))


class MergedRun:
    """The merged geometry of layers ``start+1 .. j`` of a chain, grown one layer at a time.

    ``layers`` are the chain's layer geometries (padding includes explicit pads), ``skips`` its
    identity residuals as ``(source, target)`` positions.
    """

    def __init__(self, layers: Sequence[ConvGeometry], skips: Sequence[tuple[int, int]], start: int):
        self.layers, self.skips, self.start, self.end = layers, tuple(skips), start, start
        ndim = layers[start].ndim
        self.sigma = [1] * ndim  # product of the strides so far, per dimension
        self.extent, self.grid = [0] * ndim, [0] * ndim
        self.pad = [[0, 0] for _ in range(ndim)]
        self.groups = 0
        self.sigma_at: dict[int, list[int]] = {start: [1] * ndim}  # strides before each position
        self.pad_sum: dict[int, list[int]] = {start: [0] * ndim}  # front padding summed up to each position

    def copy(self) -> "MergedRun":
        other = object.__new__(MergedRun)
        other.layers, other.skips, other.start, other.end = self.layers, self.skips, self.start, self.end
        other.sigma, other.extent, other.grid = list(self.sigma), list(self.extent), list(self.grid)
        other.pad = [list(p) for p in self.pad]
        other.groups = self.groups
        other.sigma_at, other.pad_sum = dict(self.sigma_at), dict(self.pad_sum)
        return other

    def state(self) -> tuple:
        """Everything later layers' merged geometry depends on: runs with equal states grow
        into equal geometries (pruning enumerates subsets by merging equal states)."""
        open_skips = tuple((s, tuple(self.sigma_at[s]), tuple(self.pad_sum[s]))
                           for s, t in self.skips if self.start <= s <= self.end < t)
        return (tuple(self.sigma), tuple(self.extent), tuple(self.grid), tuple(map(tuple, self.pad)), self.groups,
                tuple(self.pad_sum[self.end]), open_skips)

    @property
    def spans(self) -> tuple[int, ...]:
        """The pixels the merged kernel's taps span per dimension (dilated or not)."""
        return tuple(e + 1 for e in self.extent)

    def extend(self, j: int, geometry: ConvGeometry | None = None) -> ConvGeometry:
        """Add layer j (the run becomes (start, j]) and return its merged geometry;
        ``geometry`` stands in for the layer's own (a pruned layer's is the identity)."""
        g = geometry or self.layers[j - 1]
        self.end = j
        for d in range(g.ndim):
            step = g.dilation[d] * self.sigma[d]
            self.extent[d] += (g.kernel[d] - 1) * step
            if g.kernel[d] > 1:
                self.grid[d] = math.gcd(self.grid[d], step)
            self.pad[d][0] += g.padding[d][0] * self.sigma[d]
            self.pad[d][1] += g.padding[d][1] * self.sigma[d]
            self.sigma[d] *= g.stride[d]
        self.groups = math.gcd(self.groups, g.groups)
        self.sigma_at[j] = list(self.sigma)
        self.pad_sum[j] = [a + p[0] for a, p in zip(self.pad_sum[j - 1], g.padding)]
        for s, t in self.skips:
            if t == j and s >= self.start:  # nested: its identity term sits at this offset
                for d in range(g.ndim):
                    offset = self.sigma_at[s][d] * (self.pad_sum[j][d] - self.pad_sum[s][d])
                    self.grid[d] = math.gcd(self.grid[d], offset)
        first = self.layers[self.start]
        grid = [gr or 1 for gr in self.grid]
        return ConvGeometry(first.in_channels, g.out_channels, tuple(e // gr + 1 for e, gr in zip(self.extent, grid)),
                            tuple(self.sigma), tuple((lo, hi) for lo, hi in self.pad), tuple(grid), self.groups)

