"""Pure convolution algebra: the math that makes merging exact.

Everything here works on plain tensors and integers, for 1-, 2- and 3-d convolutions:

* :class:`ConvGeometry` — the shape-defining parameters of a convolution (a merged run's
  own geometry is grown layer by layer in :mod:`fxmerge.geometry`);
* :func:`padding_enlargement` / :func:`skip_offsets` — where padding goes once it is moved to
  the front of a run, and where identity skips land in the merged kernel;
* :class:`ConvState` with :func:`fold_batchnorm`, :func:`compose`, :func:`add_shifted` and
  :func:`finalize` — the weights of the merged convolution; :func:`compose_run` for a whole
  run, in the cheapest order its shapes admit; :func:`count_work` counts what composing did.

Conventions. A run of layers 1..n without padding between them is one convolution: with
σ_l = Π_{m<l} s_m, its kernel spans ``1 + Σ d_l (k_l − 1) σ_l`` pixels of the input, its stride
is ``Π s_l`` and its front padding ``Σ p_l σ_l`` per side. Merged weights are kept on their
own tap grid (the gcd of the tap offsets, which becomes the merged conv's dilation), never on
the dilation-1 grid: the cost of a merge follows the merged kernel, not its dilated extent.
Weights are kept grouped with the coarsest group count that is exact (the gcd of the layers'
groups), so depthwise runs stay depthwise. Paddings are ``((before, after), ...)`` per spatial
dimension in natural order.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

Pads = tuple[tuple[int, int], ...]



@dataclass(frozen=True)
class ConvGeometry:
    """The shape-defining parameters of one convolution (padding may be asymmetric)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Pads
    dilation: tuple[int, ...]
    groups: int

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @property
    def has_padding(self) -> bool:
        return any(lo or hi for lo, hi in self.padding)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel))
        parts = [f"{self.in_channels}->{self.out_channels}", k]
        if any(s != 1 for s in self.stride):
            parts.append("s" + "x".join(map(str, self.stride)))
        if any(d != 1 for d in self.dilation):
            parts.append("d" + "x".join(map(str, self.dilation)))
        if self.has_padding:
            sym = is_symmetric(self.padding)
            parts.append("p" + ("x".join(str(lo) for lo, _ in self.padding) if sym else
                                ",".join(f"{lo}-{hi}" for lo, hi in self.padding)))
        if self.groups > 1:
            parts.append("dw" if self.is_depthwise else f"g{self.groups}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel": list(self.kernel), "stride": list(self.stride),
            "padding": [list(p) for p in self.padding], "dilation": list(self.dilation),
            "groups": self.groups,
        }

    @classmethod
    def identity(cls, channels: int, ndim: int) -> "ConvGeometry":
        """The geometry a pruned layer takes: the identity as a depthwise 1x..x1 convolution."""
        return cls(channels, channels, (1,) * ndim, (1,) * ndim, ((0, 0),) * ndim, (1,) * ndim, channels)

    @classmethod
    def from_dict(cls, d: dict) -> "ConvGeometry":
        return cls(d["in_channels"], d["out_channels"], tuple(d["kernel"]), tuple(d["stride"]),
                   tuple(tuple(p) for p in d["padding"]), tuple(d["dilation"]), d["groups"])


def is_symmetric(padding: Pads) -> bool:
    return all(lo == hi for lo, hi in padding)


def flat_pad(padding: Pads) -> tuple[int, ...]:
    """``((before, after), ...)`` in natural order to ``F.pad``'s last-dimension-first list."""
    out: list[int] = []
    for lo, hi in reversed(padding):
        out += [lo, hi]
    return tuple(out)


def unflat_pad(pad: Sequence[int], ndim: int) -> Pads:
    """``F.pad``'s list (which may cover only the last dims) to natural-order pairs."""
    pairs = [(0, 0)] * ndim
    for i in range(len(pad) // 2):
        pairs[ndim - 1 - i] = (int(pad[2 * i]), int(pad[2 * i + 1]))
    return tuple(pairs)


def padding_enlargement(layers: Sequence[ConvGeometry]) -> list[Pads]:
    """E_p for p = 0..n: how much larger than in the original run the map after layer p is once
    all padding sits in front of layer 1 (E_0 is the front padding itself, E_n is zero)."""
    n, ndim = len(layers), layers[0].ndim
    out = []
    for p in range(n + 1):
        per_dim = []
        for d in range(ndim):
            lo = hi = 0
            sigma = 1
            for g in layers[p:]:
                lo += g.padding[d][0] * sigma
                hi += g.padding[d][1] * sigma
                sigma *= g.stride[d]
            per_dim.append((lo, hi))
        out.append(tuple(per_dim))
    return out


def skip_offsets(layers: Sequence[ConvGeometry], skips: Sequence[tuple[int, int]]) -> dict[int, tuple[int, tuple[int, ...]]]:
    """For identity skips (s, t) nested in a run (0 <= s < t <= n, stride 1 across the span):
    ``{t: (s, offset)}`` where ``offset`` is where, on the front-padded input grid of the run,
    the identity term's kernel starts (the crop of x_s that aligns it with x_t)."""
    enl = padding_enlargement(layers)
    out = {}
    for s, t in skips:
        offset = []
        for d in range(layers[0].ndim):
            sigma = math.prod(g.stride[d] for g in layers[:s])
            offset.append(sigma * (enl[s][d][0] - enl[t][d][0]))
        out[t] = (s, tuple(offset))
    return out


# --------------------------------------------------------------------------- merged weights


@dataclass
class ConvState:
    """A convolution being accumulated on the run's padded input, kept on its own grid.

    Tap ``i`` of ``weight`` along dimension d sits ``i * grid[d]`` pixels into the run's
    (dilation-1) input; ``grid`` is the structural gcd of the tap offsets (0 where the kernel
    has a single tap). A dilated conv is stored as its own kernel, never as its zero-filled
    extent (a 3x3 conv at dilation 36 is 9 taps, not 73x73), runs of dilated layers compose on
    the coarsest grid that holds every tap, and :func:`finalize` returns ``weight`` with
    dilation ``grid`` as it stands.
    """

    weight: Tensor  # (out, in // groups, *kernel): taps on the grid
    bias: Tensor  # (out,)
    stride: tuple[int, ...]
    groups: int
    grid: tuple[int, ...]


@dataclass
class Work:
    """What composing cost, counted as it is done: multiply-adds of the kernel products and
    BatchNorm folds, and the elements of the largest kernel tensor built. Deterministic, so
    tests can bound a merge's cost (see :func:`count_work`)."""

    macs: int = 0
    largest: int = 0


_COUNTERS: list[Work] = []


@contextlib.contextmanager
def count_work() -> Iterator[Work]:
    """Count the work of every composition inside the ``with`` block::

        with algebra.count_work() as work:
            fxmerge.merge(model, plan)
        work.macs, work.largest
    """
    work = Work()
    _COUNTERS.append(work)
    try:
        yield work
    finally:
        _COUNTERS.remove(work)


def _record(macs: int, built: Tensor | None = None) -> None:
    for work in _COUNTERS:
        work.macs += macs
        if built is not None:
            work.largest = max(work.largest, built.numel())


def identity_state(channels: int, ndim: int, *, dtype: torch.dtype, device: torch.device) -> ConvState:
    """The identity map as a depthwise 1x..x1 convolution (the state at a segment's start)."""
    weight = torch.ones((channels, 1) + (1,) * ndim, dtype=dtype, device=device)
    return ConvState(weight, torch.zeros(channels, dtype=dtype, device=device), (1,) * ndim, channels, (0,) * ndim)


def regroup(weight: Tensor, groups: int, new_groups: int) -> Tensor:
    """Re-express a grouped weight with ``new_groups`` (a divisor of ``groups``) groups, filling
    the connections the finer grouping lacks with zeros."""
    if new_groups == groups:
        return weight
    ratio = groups // new_groups
    out_ch, in_per_group = weight.shape[:2]
    expanded = weight.new_zeros((out_ch, ratio, in_per_group) + tuple(weight.shape[2:]))
    fine_group = torch.arange(out_ch, device=weight.device) // (out_ch // groups)
    expanded[torch.arange(out_ch, device=weight.device), fine_group % ratio] = weight
    _record(0, expanded)
    return expanded.reshape((out_ch, ratio * in_per_group) + tuple(weight.shape[2:]))


def _grouped_matvec(mat: Tensor, vec: Tensor, groups: int) -> Tensor:
    """y[o] = Σ_m mat[o, m] vec[group(o) * M/g + m] for a grouped (out, in/g) matrix."""
    out_ch, in_per_group = mat.shape
    y = mat.reshape(groups, out_ch // groups, in_per_group) @ vec.reshape(groups, in_per_group, 1)
    return y.reshape(out_ch)


def _group_plan(first_groups: int, groups: int) -> tuple[int, int]:
    """How a state with ``first_groups`` groups composes with a layer of ``groups``: the
    composed group count and how many of the state's groups each composed group spans
    (0: neither grouping refines the other, the state is regrouped to their gcd first)."""
    if groups % first_groups == 0:  # each layer group lies inside one state group
        return first_groups, 1
    if first_groups % groups == 0:  # each layer group spans several state groups
        return groups, first_groups // groups
    return math.gcd(first_groups, groups), 0


def _pointwise(first: Tensor, first_groups: int, weight: Tensor, groups: int) -> Tensor:
    """``first`` (mid, in/g_S, *K) with ``first_groups`` = g_S groups, followed by a 1x..x1
    conv ``weight`` (out, mid/groups): grouped matrix products over the connections that exist,
    never over the zeros a common regrouping would add (``first`` is regrouped by the caller
    when neither grouping refines the other). The result has :func:`_group_plan`'s groups."""
    out_ch, mid = weight.shape[0], first.shape[0]
    kernel = tuple(first.shape[2:])
    if out_ch == groups == mid:  # depthwise: each output row scales one input row
        _record(first.numel())
        return first * weight.reshape((out_ch,) + (1,) * (first.dim() - 1))
    new_groups, ratio = _group_plan(first_groups, groups)
    if ratio == 1:  # one product per layer group (contiguous operands: a strided one is 50x slower in float64)
        _record(out_ch * (mid // groups) * first[0].numel())
        if groups == 1:
            return (weight.contiguous() @ first.reshape(mid, -1)).reshape((out_ch,) + tuple(first.shape[1:]))
        lhs = weight.reshape(groups, out_ch // groups, mid // groups).contiguous()
        rhs = first.reshape(groups, mid // groups, -1)
        return (lhs @ rhs).reshape((out_ch,) + tuple(first.shape[1:]))
    # a finer state (a depthwise kernel before a dense layer): one product per pair of a layer
    # group and a state group in it, placed side by side in the composed group's columns
    cols, per_state = first.shape[1], mid // first_groups
    _record(out_ch * per_state * first[0].numel())
    lhs = weight.reshape(groups, out_ch // groups, ratio, per_state).transpose(1, 2).contiguous()
    rhs = first.reshape(groups, ratio, per_state, -1)
    prod = (lhs @ rhs).reshape(groups, ratio, out_ch // groups, cols, -1)  # (layer group, state group, out, in, K)
    return prod.transpose(1, 2).reshape((out_ch, ratio * cols) + kernel)


@dataclass(frozen=True)
class _Layout:
    """Where a state's taps and a layer's taps land in their composition, per dimension, in
    units of the composed kernel's grid: the state's tap i at ``i * spread``, the layer's tap t
    shifts it by ``t * shift``; ``size`` taps in all."""

    grid: tuple[int, ...]
    spread: tuple[int, ...]
    shift: tuple[int, ...]
    size: tuple[int, ...]

    def window(self, tap: Sequence[int], kernel: Sequence[int]) -> tuple[slice, ...]:
        """The state's taps in the composed kernel once moved by the layer's tap ``tap``."""
        return tuple(slice(t * sh, t * sh + (k - 1) * sp + 1, sp)
                     for t, sh, sp, k in zip(tap, self.shift, self.spread, kernel))


def _layout(grid: Sequence[int], kernel: Sequence[int], step: Sequence[int], k2: Sequence[int]) -> _Layout:
    """The composition of a state (taps ``grid`` apart, ``kernel`` of them) with a layer whose
    ``k2`` taps are ``step`` apart on the same input: the coarsest grid holding both (a tap
    alone imposes no spacing), so composing dilated layers costs their kernels on that grid."""
    new_grid, spread, shift, size = [], [], [], []
    for gr, k, st, kk in zip(grid, kernel, step, k2):
        g = math.gcd(gr, st) if kk > 1 else gr
        sp = gr // g if k > 1 else 1
        sh = st // g if kk > 1 else 0
        new_grid.append(g)
        spread.append(sp)
        shift.append(sh)
        size.append((k - 1) * sp + (kk - 1) * sh + 1)
    return _Layout(tuple(new_grid), tuple(spread), tuple(shift), tuple(size))


def _depthwise_full(first: Tensor, weight: Tensor, layout: _Layout) -> Tensor:
    """``first`` followed by a depthwise layer: per row (output channel), the full convolution
    of its kernels with that channel's taps. Memory-bound, so done spatial-first (each tap
    scales contiguous rows) and in blocks of rows that stay in cache: 2x faster than whole
    strided windows on an inverted residual's widest state."""
    ndim, rows = weight.dim() - 2, first.shape[0]
    kernel = tuple(first.shape[2:])
    spatial_first = first.permute(tuple(range(2, 2 + ndim)) + (0, 1))  # (*K, rows, in)
    out = first.new_zeros(layout.size + tuple(first.shape[:2]))
    taps = weight.reshape(rows, -1)  # (rows, |k|)
    block = max(1, (1 << 19) // max(1, first.shape[1] * math.prod(layout.size)))  # ~4 MB of output per block
    for r in range(0, rows, block):
        part, source = out[..., r:r + block, :], spatial_first[..., r:r + block, :]
        for index, tap in enumerate(itertools.product(*(range(k) for k in weight.shape[2:]))):
            part[layout.window(tap, kernel)].addcmul_(source, taps[r:r + block, index].reshape(-1, 1))
    _record(first.numel() * taps.shape[1], out)
    return out.permute((ndim, ndim + 1) + tuple(range(ndim))).contiguous()


def _dense_full(first: Tensor, first_groups: int, weight: Tensor, groups: int, layout: _Layout) -> Tensor:
    """``first`` followed by a (grouped) layer: every tap of the layer contributes its grouped
    matrix product with the state's kernel, moved by that tap."""
    kernel = tuple(first.shape[2:])
    ratio = _group_plan(first_groups, groups)[1]
    if ratio == 1 and all(k == 1 for k in kernel):
        return _all_taps(first, weight, groups)
    composed = first.new_zeros((weight.shape[0], first.shape[1] * ratio) + layout.size)
    _record(0, composed)
    for tap in itertools.product(*(range(k) for k in weight.shape[2:])):
        window = (slice(None), slice(None)) + layout.window(tap, kernel)
        composed[window] += _pointwise(first, first_groups, weight[(slice(None), slice(None)) + tap], groups)
    return composed


def _all_taps(first: Tensor, weight: Tensor, groups: int) -> Tensor:
    """A 1x..x1 state followed by a layer whose groups refine the state's: the taps do not
    overlap, so one matrix product per block of output rows gives their composed kernel over
    all taps at once (no zero fill, no strided adds: a third faster than tap by tap on a
    1024-wide 1x1 -> 3x3), re-laid out block by block so the product never doubles the
    kernel's memory."""
    out_ch, mid, cols = weight.shape[0], first.shape[0], first.shape[1]
    k2 = tuple(weight.shape[2:])
    taps, rows, width = math.prod(k2), out_ch // groups, mid // groups
    composed = first.new_empty((out_ch, cols) + k2)
    _record(out_ch * width * cols * taps, composed)
    block = max(1, _BLOCK_ELEMENTS // max(1, taps * cols))  # output rows per product
    for g in range(groups):
        rhs = first[g * width:(g + 1) * width].reshape(width, cols)
        for r in range(g * rows, (g + 1) * rows, block):
            end = min(r + block, (g + 1) * rows)
            lhs = weight[r:end].reshape(end - r, width, taps).transpose(1, 2).reshape((end - r) * taps, width)
            product = (lhs @ rhs).reshape(end - r, taps, cols)
            composed[r:end].copy_(product.transpose(1, 2).reshape((end - r, cols) + k2))
    return composed


# Elements of one block of a product re-laid out into the composed kernel (8 MB in float64).
_BLOCK_ELEMENTS = 1 << 20


def compose(state: ConvState, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
            dilation: Sequence[int], groups: int) -> ConvState:
    """The state followed by one convolution (no padding between them).

    The merged kernel is the full convolution of the two kernels: every tap b of the layer
    contributes its (grouped) matrix product with the state's kernel, shifted by b on the
    state's input grid. Tap by tap costs exactly out x mid x in x |K_state| x |k| multiply-adds
    over the connections that exist, where a convolution over the zero-padded kernel would also
    multiply the padding; both kernels stay on their own grids, so dilation costs nothing.
    """
    ndim = weight.dim() - 2
    k2 = tuple(weight.shape[2:])
    step = tuple(s * d for s, d in zip(state.stride, dilation))  # the layer's tap spacing on the run's input
    new_stride = tuple(a * b for a, b in zip(state.stride, stride))
    if _is_identity(state):  # the segment's first layer: nothing to compose with, its kernel as it is
        first = _first_layer(weight, bias, stride, dilation, groups)
        clone = first.weight.clone()  # never the caller's tensor: it may be added into in place
        _record(0, clone)
        return ConvState(clone, first.bias, first.stride, first.groups, first.grid)
    # Only the state is ever re-expressed in a coarser grouping, and only when neither
    # grouping refines the other; the layer keeps its own groups, so a grouped or depthwise
    # layer costs what its connections cost.
    first, first_groups = state.weight, state.groups
    new_groups, ratio = _group_plan(first_groups, groups)
    if ratio == 0:
        first, first_groups = regroup(first, first_groups, new_groups), new_groups
    layout = _layout(state.grid, tuple(first.shape[2:]), step, k2)
    if all(k == 1 for k in k2):
        composed = _pointwise(first, first_groups, weight.reshape(weight.shape[:2]), groups)
    elif weight.shape[0] == groups == first.shape[0]:
        composed = _depthwise_full(first, weight, layout)
    else:
        composed = _dense_full(first, first_groups, weight, groups, layout)
    new_bias = _grouped_matvec(weight.sum(dim=list(range(2, 2 + ndim))), state.bias, groups)
    if bias is not None:
        new_bias = new_bias + bias
    return ConvState(composed, new_bias, new_stride, new_groups, layout.grid)


def _first_layer(weight: Tensor, bias: Tensor | None, stride: Sequence[int], dilation: Sequence[int],
                 groups: int) -> ConvState:
    """One layer as a state on its own input: its kernel as it is, on its dilation grid (the
    weight is the caller's tensor, not a copy)."""
    ndim = weight.dim() - 2
    layout = _layout((0,) * ndim, (1,) * ndim, dilation, tuple(weight.shape[2:]))
    new_bias = bias.clone() if bias is not None else weight.new_zeros(weight.shape[0])
    _record(0, weight)
    return ConvState(weight, new_bias, tuple(stride), groups, layout.grid)


def _is_identity(state: ConvState) -> bool:
    return (state.groups == state.weight.shape[0] and state.weight.numel() == state.weight.shape[0]
            and all(s == 1 for s in state.stride) and bool((state.weight == 1).all()) and not state.bias.any())


def fold_batchnorm(weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, gamma: Tensor | None,
                   beta: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """A conv's weight and bias with the eval-mode BatchNorm after it folded in (its running
    statistics and its own ``eps``). Folding into the layer before composing is cheaper than
    scaling the accumulated kernel."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    new_bias = ((bias if bias is not None else 0) - mean) * scale
    if beta is not None:
        new_bias = new_bias + beta
    folded = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    _record(weight.numel(), folded)
    return folded, new_bias


def _placement(kernel: Sequence[int], grid: Sequence[int], new_grid: Sequence[int],
               offset: Sequence[int]) -> tuple[slice, ...]:
    """Where a kernel whose taps are ``grid`` apart, starting ``offset`` pixels in, sits on the
    coarser ``new_grid`` (a divisor of both)."""
    out = []
    for k, gr, ng, o in zip(kernel, grid, new_grid, offset):
        unit = ng or 1  # 0: every kernel involved has one tap, at offset 0
        step = gr // unit if k > 1 else 1
        out.append(slice(o // unit, o // unit + (k - 1) * step + 1, step))
    return tuple(out)


def add_shifted(state: ConvState, other: ConvState, offset: Sequence[int], *, reuse: bool = False) -> ConvState:
    """``state + other`` where ``other``'s kernel starts ``offset`` pixels (on the run's input)
    into ``state``'s — the identity branch of a residual, already expressed on the run's
    input. The sum lives on the coarsest grid holding both kernels' taps and the offset.
    ``reuse=True``: the caller owns ``state`` and drops it, so the sum may be added into its
    weight (no copy of the widest kernel of a residual)."""
    if state.stride != other.stride:
        raise ValueError(f"cannot add convolutions with strides {state.stride} and {other.stride}")
    g = math.gcd(state.groups, other.groups)
    a = regroup(state.weight, state.groups, g)
    b = regroup(other.weight, other.groups, g)
    ndim = a.dim() - 2
    grid = tuple(math.gcd(math.gcd(x, y), o) for x, y, o in zip(state.grid, other.grid, offset))
    assert len(grid) == ndim
    place_a = _placement(a.shape[2:], state.grid, grid, (0,) * ndim)
    place_b = _placement(b.shape[2:], other.grid, grid, offset)
    size = [max(pa.stop, pb.stop) for pa, pb in zip(place_a, place_b)]
    in_place = list(a.shape[2:]) == size  # then a covers the sum's grid one to one
    if in_place and (reuse or a is not state.weight):
        out = a  # a fresh regrouped copy, or one the caller gives up: add in place
    elif in_place:
        out = a.clone()
    else:
        out = a.new_zeros(tuple(a.shape[:2]) + tuple(size))
        out[(slice(None), slice(None)) + place_a] += a
    out[(slice(None), slice(None)) + place_b] += b
    _record(b.numel(), out)
    return ConvState(out, state.bias + other.bias, state.stride, g, grid)


def finalize(state: ConvState) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Weight, bias and dilation of the merged convolution: the state's kernel is already on
    its grid, which is the dilation."""
    return state.weight.contiguous(), state.bias, tuple(g or 1 for g in state.grid)


# --------------------------------------------------------------------------- a whole run


@dataclass(frozen=True)
class Conv:
    """One layer of a run (BatchNorm already folded)."""

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class _Span:
    """An identity residual (s, t] nested in a run: x_t = F(x_s) + x_s, with F the items inside."""

    source: int
    target: int
    offset: tuple[int, ...]  # where the identity term lands, on the run's input grid
    items: tuple  # layer positions (ints) and nested spans, in order


def _nest(first: int, last: int, spans: list[tuple[int, int, tuple[int, ...]]]) -> tuple:
    """Layers first..last and the spans inside them as a tree (spans are nested or disjoint)."""
    items, p = [], first
    while p <= last:
        outer = [sp for sp in spans if sp[0] == p - 1 and sp[1] <= last]
        if outer:
            s, t, offset = max(outer, key=lambda sp: sp[1])
            inner = [sp for sp in spans if sp != (s, t, offset) and s <= sp[0] and sp[1] <= t]
            items.append(_Span(s, t, offset, _nest(s + 1, t, inner)))
            p = t + 1
        else:
            items.append(p)
            p += 1
    return tuple(items)


# Memory-bound passes (depthwise taps, adding a product into its window, re-laying a product
# out) run ~50x slower per element than a dense matrix product per multiply-add.
_MEMORY_COST = 50
# Longer runs compose left to right instead of searching all O(n^3) orders.
_MAX_ORDERED = 32


@dataclass(frozen=True)
class _Shape:
    """What composing costs depends on: a state's rows, columns, kernel (on its grid), stride,
    groups and grid. Costs are in dense multiply-adds, estimated as :func:`compose` and
    :func:`add_shifted` do the work."""

    rows: int
    cols: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    grid: tuple[int, ...]

    @classmethod
    def identity(cls, channels: int, ndim: int) -> "_Shape":
        return cls(channels, 1, (1,) * ndim, (1,) * ndim, channels, (0,) * ndim)

    @classmethod
    def of(cls, state: ConvState) -> "_Shape":
        w = state.weight
        return cls(w.shape[0], w.shape[1], tuple(w.shape[2:]), state.stride, state.groups, state.grid)

    def as_layer(self) -> "Conv":
        """The convolution this state finalizes to, as a layer (only its shape is real)."""
        return Conv(_ShapeOnly((self.rows, self.cols) + self.kernel), None, self.stride,
                    tuple(g or 1 for g in self.grid), self.groups)

    def then(self, conv: "Conv") -> tuple["_Shape", float]:
        """The shape after ``conv`` and the cost of composing it (as :func:`compose` does)."""
        k, out = tuple(conv.weight.shape[2:]), conv.weight.shape[0]
        step = tuple(s * d for s, d in zip(self.stride, conv.dilation))
        layout = _layout(self.grid, self.kernel, step, k)
        stride = tuple(a * b for a, b in zip(self.stride, conv.stride))
        if self.rows == self.groups and self.cols == 1 and all(x == 1 for x in self.kernel) and self.stride == (1,) * len(k):
            return _Shape(out, conv.weight.shape[1], k, stride, conv.groups, layout.grid), 0.0
        area, taps = math.prod(self.kernel), math.prod(k)
        if out == conv.groups == self.rows:  # a depthwise layer: elementwise, the state's grouping stays
            cost = _MEMORY_COST * self.rows * self.cols * area * taps
            return _Shape(out, self.cols, layout.size, stride, self.groups, layout.grid), cost
        groups, ratio = _group_plan(self.groups, conv.groups)
        cols, per_product, cost = self.cols, self.rows // conv.groups, 0.0
        if ratio == 0:  # the state is regrouped first
            cols, ratio = self.cols * self.groups // groups, 1
            cost += _MEMORY_COST * self.rows * cols * area
        elif ratio > 1:  # one product per state group, re-laid out side by side
            per_product = self.rows // self.groups
            cost += _MEMORY_COST * out * cols * ratio * area * taps
        cost += out * per_product * cols * area * taps
        if taps > 1 and (area > 1 or ratio > 1):  # each tap's product is added into its window
            cost += _MEMORY_COST * out * cols * ratio * area * taps
        return _Shape(out, cols * ratio, layout.size, stride, groups, layout.grid), cost

    def plus(self, other: "_Shape", offset: Sequence[int]) -> tuple["_Shape", float]:
        """The shape of ``add_shifted`` of the two states and its cost."""
        groups = math.gcd(self.groups, other.groups)
        cols = self.cols * self.groups // groups
        grid = tuple(math.gcd(math.gcd(x, y), o) for x, y, o in zip(self.grid, other.grid, offset))
        ndim = len(self.kernel)
        place_a = _placement(self.kernel, self.grid, grid, (0,) * ndim)
        place_b = _placement(other.kernel, other.grid, grid, offset)
        size = tuple(max(pa.stop, pb.stop) for pa, pb in zip(place_a, place_b))
        return (_Shape(self.rows, cols, size, self.stride, groups, grid),
                _MEMORY_COST * self.rows * cols * math.prod(size))


def compose_run(convs: Sequence[Conv], skips: Sequence[tuple[int, int, Sequence[int]]]) -> ConvState:
    """The merged state of a run of layers with nested identity residuals ``(s, t, offset)``
    (positions 0..n; ``offset`` as :func:`skip_offsets` gives it). The layers' tensors are
    only read; the state of a single layer holds that layer's weight tensor itself.

    Composition is associative, so the run is merged in the cheapest order its shapes admit
    (the matrix-chain search over split points): a wide backbone block followed by a
    21-class head composes from the narrow end instead of carrying a 512 x 2048 x 11 x 11
    state. Each residual is merged on its own first, the identity added and the result joined
    as one layer (an inverted residual's branch C -> 6C -> C is a small C x C kernel), or —
    when cheaper — composed through in order (the state at s kept and added at t). Every order
    gives the same kernel; costs are estimated from shapes.
    """
    run = _Run(convs)
    tree = _nest(1, len(convs), [(s, t, tuple(o)) for s, t, o in skips])
    # A single layer's state is that layer's weight as given (BatchNorm already folded into it):
    # a copy would be one more kernel-sized float64 tensor per conv, and nothing writes into it.
    return run.execute(run.plan(tree, 0)[0])


# A plan says how to build one state (and its shape and estimated cost travel with it):
#   ("layer", p)                        layer p alone, from the identity on its input
#   ("unit", span, inner)               a residual merged on its own: its items plus the identity
#   ("join", left, right)               left's state followed by right's, as one layer
#   ("left", outer, key, inner, span, origin)
#                                       outer's state (what precedes the residual) composed
#                                       through the residual's items (inner, where ("bound", key)
#                                       stands for outer's state), plus outer's state at the
#                                       identity's offset; origin: the position outer reads
#   ("right", outer, key, inner, span)  the residual's items followed by outer's state (what
#                                       follows it), plus outer's state at the identity's offset
#   ("bound", key)                      the state an enclosing "left"/"right" built
_Plan = tuple
_Option = tuple  # (plan, the _Shape it builds, its estimated cost)


class _Run:
    """One run being merged: its layers, σ_p (the strides before each position, to put a
    residual's offset on the grid of wherever a partial merge starts), and the plans found."""

    def __init__(self, convs: Sequence[Conv]):
        self.convs = convs
        self.ndim = convs[0].weight.dim() - 2
        self.sigma = [(1,) * self.ndim]
        for c in convs:
            self.sigma.append(tuple(a * b for a, b in zip(self.sigma[-1], c.stride)))
        self.memo: dict[tuple, _Option] = {}

    # ----------------------------------------------------------------- geometry of items

    def start(self, item: int | _Span) -> int:
        """The position of the map an item reads."""
        return item - 1 if isinstance(item, int) else item.source

    def end(self, item: int | _Span) -> int:
        """The position of the map an item writes."""
        return item if isinstance(item, int) else item.target

    def channels(self, item: int | _Span) -> int:
        if isinstance(item, _Span):
            return self.channels(item.items[0])
        conv = self.convs[item - 1]
        return conv.weight.shape[1] * conv.groups

    def local(self, span: _Span, origin: int) -> tuple[int, ...]:
        """The span's identity offset on the grid of position ``origin``'s map (exact: σ_origin
        divides σ_source, which divides the offset)."""
        return tuple(o // s for o, s in zip(span.offset, self.sigma[origin]))

    def is_input(self, weight: Tensor) -> bool:
        """Whether ``weight`` is one of the layers' own tensors (states never add into those)."""
        return any(weight is c.weight for c in self.convs)

    def identity(self, channels: int) -> ConvState:
        ref = self.convs[0].weight
        return identity_state(channels, self.ndim, dtype=ref.dtype, device=ref.device)

    # ----------------------------------------------------------------- planning (shapes only)

    def leaf(self, item: int | _Span) -> _Option:
        """An item merged on its own, from the identity on its input."""
        start = _Shape.identity(self.channels(item), self.ndim)
        if isinstance(item, int):
            return ("layer", item), start.then(self.convs[item - 1])[0], 0.0
        inner, shape, cost = self.plan(item.items, item.source)
        shape, add = shape.plus(start, self.local(item, item.source))
        return ("unit", item, inner), shape, cost + add

    def plan(self, items: tuple, origin: int, bound: tuple | None = None) -> _Option:
        """The cheapest order to merge ``items`` (reading position ``origin``'s map): the best
        split point of every interval (matrix-chain order), a residual possibly composed through
        from its left or its right neighbours. ``bound`` = (side, key, shape): a state already
        built that precedes ("left") or follows ("right") the items and is merged with them."""
        memo = (items, origin, bound)
        if memo not in self.memo:
            elements = [(item, self.leaf(item), self.start(item)) for item in items]
            if bound is not None:
                side, key, shape = bound
                element = (None, (("bound", key), shape, 0.0), origin if side == "left" else self.end(items[-1]))
                elements = [element] + elements if side == "left" else elements + [element]
            self.memo[memo] = self.order(elements)
        return self.memo[memo]

    def order(self, elements: list) -> _Option:
        n = len(elements)
        table = {(i, i): element[1] for i, element in enumerate(elements)}
        if n > _MAX_ORDERED:  # left to right: n joins instead of n^3
            for j in range(1, n):
                table[(0, j)] = self.best(elements, table, 0, j, splits=[j - 1])
            return table[(0, n - 1)]
        for length in range(2, n + 1):
            for i in range(n - length + 1):
                table[(i, i + length - 1)] = self.best(elements, table, i, i + length - 1, range(i, i + length - 1))
        return table[(0, n - 1)]

    def best(self, elements: list, table: dict, i: int, j: int, splits: Sequence[int]) -> _Option:
        """The cheapest way to build elements i..j: a split into two joined parts, or a
        residual at either end composed through from the other parts."""
        split = min((self.join(table[(i, m)], table[(m + 1, j)]) for m in splits), key=lambda o: o[2])
        throughs = []
        first, last = elements[i][0], elements[j][0]
        if isinstance(last, _Span):
            throughs.append(self.left_through(table[(i, j - 1)], last, elements[i][2]))
        if isinstance(first, _Span) and (i + 1, j) in table:
            throughs.append(self.right_through(table[(i + 1, j)], first))
        if throughs:
            through = min(throughs, key=lambda o: o[2])
            if not _unit_is_cheaper(through[2], split[2]):
                return through
        return split

    def join(self, left: _Option, right: _Option) -> _Option:
        after, cost = left[1].then(right[1].as_layer())
        return ("join", left[0], right[0]), after, left[2] + right[2] + cost

    def left_through(self, outer: _Option, span: _Span, origin: int) -> _Option:
        key = ("left", span.source, origin, outer[1])
        inner, shape, cost = self.plan(span.items, origin, ("left", key, outer[1]))
        shape, add = shape.plus(outer[1], self.local(span, origin))
        return ("left", outer[0], key, inner, span, origin), shape, outer[2] + cost + add

    def right_through(self, outer: _Option, span: _Span) -> _Option:
        key = ("right", span.source, outer[1])
        inner, shape, cost = self.plan(span.items, span.source, ("right", key, outer[1]))
        shape, add = shape.plus(outer[1], self.local(span, span.source))
        return ("right", outer[0], key, inner, span), shape, outer[2] + cost + add

    # ----------------------------------------------------------------- execution (the tensors)

    def execute(self, plan: _Plan, bound: dict | None = None) -> ConvState:
        bound = {} if bound is None else bound
        kind = plan[0]
        if kind == "layer":  # the layer's own tensor: composing only reads it
            c = self.convs[plan[1] - 1]
            return _first_layer(c.weight, c.bias, c.stride, c.dilation, c.groups)
        if kind == "bound":
            return bound[plan[1]]
        if kind == "unit":
            span, merged = plan[1], self.execute(plan[2], bound)
            return add_shifted(merged, self.identity(self.channels(span)), self.local(span, span.source),
                               reuse=not self.is_input(merged.weight))
        if kind == "join":
            return _then(self.execute(plan[1], bound), self.execute(plan[2], bound))
        outer_plan, key, inner, span = plan[1:5]
        origin = plan[5] if kind == "left" else span.source
        outer = self.execute(outer_plan, bound)
        # bindings nest like scopes: two residuals from one source can compose through with the
        # same key, the inner one shadowing the outer only while its own plan runs
        shadowed = bound.get(key)
        bound[key] = outer
        merged = self.execute(inner, bound)
        if shadowed is None:
            del bound[key]
        else:
            bound[key] = shadowed
        if kind == "right":  # R(F(x) + x) = R(F(x)) + W_R x: R's bias is in the first term only
            outer = ConvState(outer.weight, torch.zeros_like(outer.bias), outer.stride, outer.groups, outer.grid)
        # merged was built for this sum alone (the inner plan has two or more parts)
        return add_shifted(merged, outer, self.local(span, origin),
                           reuse=not self.is_input(merged.weight) and merged.weight is not outer.weight)


def _then(state: ConvState, after: ConvState) -> ConvState:
    """``state`` followed by the merged convolution ``after`` (whose input is its output)."""
    weight, bias, dilation = finalize(after)
    return compose(state, weight, bias, after.stride, dilation, after.groups)


def _unit_is_cheaper(through: float, as_unit: float) -> bool:
    """Whether the parts of a run are joined (each residual as a unit) rather than a residual
    composed through from its neighbours (a hook tests patch to force either way: both must
    give the same kernel)."""
    return as_unit <= through


class _ShapeOnly:
    """Stands in for a weight tensor where only its shape is read (cost estimates)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)
