"""Pure convolution algebra: the math that makes merging exact.

Everything here works on plain tensors and integers, for 1-, 2- and 3-d convolutions:

* :class:`ConvGeometry` and :func:`merged_geometry` — shape arithmetic of a merged run;
* :func:`padding_enlargement` / :func:`skip_offsets` — where padding goes once it is moved to
  the front of a run, and where identity skips land in the merged kernel;
* :class:`ConvState` with :func:`fold_batchnorm`, :func:`compose`, :func:`add_shifted` and
  :func:`finalize` — the weights of the merged convolution; :func:`compose_run` for a whole
  run, in the cheaper of two orders.

Conventions. A run of layers 1..n without padding between them is one convolution: with
σ_l = Π_{m<l} s_m, its kernel on the dilation-1 grid is ``1 + Σ d_l (k_l − 1) σ_l``, its stride
``Π s_l`` and its front padding ``Σ p_l σ_l`` per side. Weights are kept grouped with the
coarsest group count that is exact (the gcd of the layers' groups), so depthwise runs stay
depthwise. Paddings are ``((before, after), ...)`` per spatial dimension in natural order.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

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


def _strides_before(layers: Sequence[ConvGeometry], dim: int) -> list[int]:
    """σ_l for each layer: the product of the strides of the layers before it."""
    sigma, out = 1, []
    for g in layers:
        out.append(sigma)
        sigma *= g.stride[dim]
    return out


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


def merged_geometry(layers: Sequence[ConvGeometry], skips: Sequence[tuple[int, int]] = ()) -> ConvGeometry:
    """Geometry of the single convolution equal to ``layers`` with padding moved to the front
    and the identity ``skips`` (positions relative to the run) fused in."""
    first, ndim = layers[0], layers[0].ndim
    kernel, stride, dilation = [], [], []
    offsets = skip_offsets(layers, skips)
    for d in range(ndim):
        sig = _strides_before(layers, d)
        extent = sum(g.dilation[d] * (g.kernel[d] - 1) * s for g, s in zip(layers, sig))
        grid = 0
        for g, s in zip(layers, sig):
            if g.kernel[d] > 1:
                grid = math.gcd(grid, g.dilation[d] * s)
        for _, off in offsets.values():
            grid = math.gcd(grid, off[d])
        grid = grid or 1
        kernel.append(extent // grid + 1)
        dilation.append(grid)
        stride.append(sig[-1] * layers[-1].stride[d])
    groups = 0
    for g in layers:
        groups = math.gcd(groups, g.groups)
    return ConvGeometry(first.in_channels, layers[-1].out_channels, tuple(kernel), tuple(stride),
                        padding_enlargement(layers)[0], tuple(dilation), groups)


# --------------------------------------------------------------------------- merged weights


@dataclass
class ConvState:
    """A convolution being accumulated on the dilation-1 grid of the run's padded input.

    ``grid`` is the structural gcd of the tap offsets per dimension (0 = only the origin); it is
    what lets :func:`finalize` return a dilated kernel instead of one padded with zeros.
    """

    weight: Tensor  # (out, in // groups, *kernel)
    bias: Tensor  # (out,)
    stride: tuple[int, ...]
    groups: int
    grid: tuple[int, ...]


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
    return expanded.reshape((out_ch, ratio * in_per_group) + tuple(weight.shape[2:]))


def _grouped_matvec(mat: Tensor, vec: Tensor, groups: int) -> Tensor:
    """y[o] = Σ_m mat[o, m] vec[group(o) * M/g + m] for a grouped (out, in/g) matrix."""
    out_ch, in_per_group = mat.shape
    y = mat.reshape(groups, out_ch // groups, in_per_group) @ vec.reshape(groups, in_per_group, 1)
    return y.reshape(out_ch)


def _pointwise(first: Tensor, weight: Tensor, groups: int) -> Tensor:
    """``first`` (mid, in/g, *K) followed by a 1x..x1 conv ``weight`` (out, mid/groups): a
    grouped matrix product (``groups`` is a multiple of ``first``'s group count g)."""
    out_ch, mid = weight.shape[0], first.shape[0]
    if out_ch == groups == mid:  # depthwise: each output row scales one input row
        return first * weight.reshape((out_ch,) + (1,) * (first.dim() - 1))
    lhs = weight.reshape(groups, out_ch // groups, mid // groups)
    rhs = first.reshape(groups, mid // groups, -1)
    return (lhs @ rhs).reshape((out_ch,) + tuple(first.shape[1:]))


def _depthwise_full(first: Tensor, weight: Tensor, step: Sequence[int], size: Sequence[int]) -> Tensor:
    """``first`` followed by a depthwise layer: per row (output channel), the full convolution
    of its kernels with that channel's taps. Memory-bound, so done spatial-first (each tap
    scales contiguous rows) and in blocks of rows that stay in cache: 2x faster than whole
    strided windows on an inverted residual's widest state."""
    ndim, rows = weight.dim() - 2, first.shape[0]
    kernel = tuple(first.shape[2:])
    spatial_first = first.permute(tuple(range(2, 2 + ndim)) + (0, 1))  # (*K, rows, in)
    out = first.new_zeros(tuple(size) + tuple(first.shape[:2]))
    taps = weight.reshape(rows, -1)  # (rows, |k|)
    block = max(1, (1 << 19) // max(1, first.shape[1] * math.prod(size)))  # ~4 MB of output per block
    for r in range(0, rows, block):
        part, source = out[..., r:r + block, :], spatial_first[..., r:r + block, :]
        for index, tap in enumerate(itertools.product(*(range(k) for k in weight.shape[2:]))):
            window = tuple(slice(t * st, t * st + ks) for t, st, ks in zip(tap, step, kernel))
            part[window].addcmul_(source, taps[r:r + block, index].reshape(-1, 1))
    return out.permute((ndim, ndim + 1) + tuple(range(ndim))).contiguous()


def compose(state: ConvState, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
            dilation: Sequence[int], groups: int) -> ConvState:
    """The state followed by one convolution (no padding between them).

    The merged kernel is the full convolution of the two kernels: every tap b of the layer
    contributes its (grouped) matrix product with the state's kernel, shifted by b on the
    state's input grid. Tap by tap costs exactly out x mid x in x |K_state| x |k| multiply-adds,
    where a convolution over the zero-padded kernel would also multiply the padding.
    """
    ndim = weight.dim() - 2
    k2 = tuple(weight.shape[2:])
    step = tuple(s * d for s, d in zip(state.stride, dilation))
    grid = tuple(math.gcd(gr, st) if k > 1 else gr for gr, st, k in zip(state.grid, step, k2))
    new_stride = tuple(a * b for a, b in zip(state.stride, stride))
    if _is_identity(state):  # the segment's first layer: nothing to compose with
        new_bias = bias.clone() if bias is not None else weight.new_zeros(weight.shape[0])
        return ConvState(_dilate(weight, dilation), new_bias, new_stride, groups, grid)
    # The result has the coarser grouping g; only the state needs re-expressing in it. The
    # layer keeps its own (finer) groups: each of its groups lies inside one of the state's,
    # so a grouped product is exact and a depthwise layer costs what a depthwise conv costs.
    g = math.gcd(state.groups, groups)
    first = regroup(state.weight, state.groups, g)
    kernel = tuple(first.shape[2:])
    if all(k == 1 for k in k2):
        composed = _pointwise(first, weight.reshape(weight.shape[:2]), groups)
    else:
        size = tuple(ks + st * (k - 1) for ks, st, k in zip(kernel, step, k2))
        if weight.shape[0] == groups == first.shape[0]:
            composed = _depthwise_full(first, weight, step, size)
        else:
            composed = first.new_zeros((weight.shape[0], first.shape[1]) + size)
            for tap in itertools.product(*(range(k) for k in k2)):
                window = tuple(slice(t * st, t * st + ks) for t, st, ks in zip(tap, step, kernel))
                composed[(slice(None), slice(None)) + window] += _pointwise(first, weight[(slice(None), slice(None)) + tap], groups)
    new_bias = _grouped_matvec(weight.sum(dim=list(range(2, 2 + ndim))), state.bias, groups)
    if bias is not None:
        new_bias = new_bias + bias
    return ConvState(composed, new_bias, new_stride, g, grid)


def _dilate(weight: Tensor, dilation: Sequence[int]) -> Tensor:
    """A copy of the kernel on the dilation-1 grid (zeros between the taps)."""
    if all(d == 1 for d in dilation):
        return weight.clone()
    size = tuple(d * (k - 1) + 1 for k, d in zip(weight.shape[2:], dilation))
    out = weight.new_zeros(tuple(weight.shape[:2]) + size)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)] = weight
    return out


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
    return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1)), new_bias


def add_shifted(state: ConvState, other: ConvState, offset: Sequence[int]) -> ConvState:
    """``state + other`` where ``other``'s kernel starts ``offset`` taps into ``state``'s — the
    identity branch of a residual, already expressed on the run's input."""
    if state.stride != other.stride:
        raise ValueError(f"cannot add convolutions with strides {state.stride} and {other.stride}")
    g = math.gcd(state.groups, other.groups)
    a = regroup(state.weight, state.groups, g)
    b = regroup(other.weight, other.groups, g)
    ndim = a.dim() - 2
    size = [max(ka, o + kb) for ka, o, kb in zip(a.shape[2:], offset, b.shape[2:])]
    if list(a.shape[2:]) == size and a is not state.weight:
        out = a  # a fresh regrouped copy: add in place
    elif list(a.shape[2:]) == size:
        out = a.clone()
    else:
        out = a.new_zeros(tuple(a.shape[:2]) + tuple(size))
        out[(slice(None), slice(None)) + tuple(slice(0, k) for k in a.shape[2:])] += a
    out[(slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offset, b.shape[2:]))] += b
    grid = tuple(math.gcd(math.gcd(x, y), o) for x, y, o in zip(state.grid, other.grid, offset))
    assert len(grid) == ndim
    return ConvState(out, state.bias + other.bias, state.stride, g, grid)


def finalize(state: ConvState) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Weight, bias and dilation of the merged convolution (kernel subsampled by its grid)."""
    dilation = tuple(g or 1 for g in state.grid)
    if all(d == 1 for d in dilation):
        return state.weight.contiguous(), state.bias, dilation
    index = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)
    return state.weight[index].contiguous(), state.bias, dilation


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


# Memory-bound depthwise taps run ~50x slower per multiply-add than a dense matrix product.
_DEPTHWISE_COST = 50


@dataclass(frozen=True)
class _Shape:
    """What composing costs depends on: a state's rows, columns, kernel, stride, groups."""

    rows: int
    cols: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int

    @classmethod
    def identity(cls, channels: int, ndim: int) -> "_Shape":
        return cls(channels, 1, (1,) * ndim, (1,) * ndim, channels)

    def then(self, conv: "Conv") -> tuple["_Shape", float]:
        """The shape after ``conv`` and the cost of composing it (as :func:`compose` does)."""
        k = tuple(conv.weight.shape[2:])
        if self.rows == self.groups and self.cols == 1 and all(x == 1 for x in self.kernel) and self.stride == (1,) * len(k):
            return _Shape(conv.weight.shape[0], conv.weight.shape[1], k, conv.stride, conv.groups), 0.0
        g = math.gcd(self.groups, conv.groups)
        cols = self.cols * self.groups // g
        kernel = tuple(ks + st * d * (kk - 1) for ks, st, d, kk in zip(self.kernel, self.stride, conv.dilation, k))
        out = conv.weight.shape[0]
        per_tap = self.rows * cols * math.prod(self.kernel)
        if out == conv.groups == self.rows:
            cost = _DEPTHWISE_COST * per_tap * math.prod(k)
        else:
            cost = out * (self.rows // conv.groups) * cols * math.prod(self.kernel) * math.prod(k)
        return _Shape(out, cols, kernel, tuple(a * b for a, b in zip(self.stride, conv.stride)), g), cost


def compose_run(convs: Sequence[Conv], skips: Sequence[tuple[int, int, Sequence[int]]]) -> ConvState:
    """The merged state of a run of layers with nested identity residuals ``(s, t, offset)``
    (positions 0..n; ``offset`` as :func:`skip_offsets` gives it).

    Each residual is either composed through in order (the state at s is kept and added at t),
    or — when cheaper — its branch is merged on its own first, the identity added, and the
    result composed as one layer: an inverted residual's branch (C -> 6C -> C) is a small
    C x C kernel, while composing through it carries a state six times wider than the run's
    output. The two orders give the same kernel; costs are estimated from shapes.
    """
    ndim = convs[0].weight.dim() - 2
    channels = convs[0].weight.shape[1] * convs[0].groups
    tree = _nest(1, len(convs), [(s, t, tuple(o)) for s, t, o in skips])
    ref = convs[0].weight
    start = identity_state(channels, ndim, dtype=ref.dtype, device=ref.device)
    return _compose_items(tree, start, convs)


def _compose_items(items: tuple, state: ConvState, convs: Sequence[Conv]) -> ConvState:
    shape = _Shape(state.weight.shape[0], state.weight.shape[1], tuple(state.weight.shape[2:]), state.stride, state.groups)
    for item in items:
        if isinstance(item, int):
            c = convs[item - 1]
            state = compose(state, c.weight, c.bias, c.stride, c.dilation, c.groups)
        elif _unit_composes_exactly(item, shape) and _unit_is_cheaper(item, shape, convs):
            state = _compose_unit(item, state, convs)
        else:
            state = add_shifted(_compose_items(item.items, state, convs), state, item.offset)
        shape = _Shape(state.weight.shape[0], state.weight.shape[1], tuple(state.weight.shape[2:]), state.stride,
                       state.groups)
    return state


def _compose_unit(span: _Span, state: ConvState, convs: Sequence[Conv]) -> ConvState:
    """The residual's branch merged on its own (on x_s's grid), plus the identity, then
    composed onto ``state`` as one layer."""
    ndim, channels = state.weight.dim() - 2, state.weight.shape[0]
    ref = state.weight
    identity = identity_state(channels, ndim, dtype=ref.dtype, device=ref.device)
    local = tuple(o // s for o, s in zip(span.offset, state.stride))  # x_s's grid, not the run input's
    unit = add_shifted(_compose_items(span.items, identity, convs), identity, local)
    weight, bias, dilation = finalize(unit)
    return compose(state, weight, bias, unit.stride, dilation, unit.groups)


def _items_cost(items: tuple, shape: _Shape, convs: Sequence[Conv]) -> tuple[_Shape, float]:
    total = 0.0
    for item in items:
        if isinstance(item, int):
            shape, cost = shape.then(convs[item - 1])
        else:
            shape, cost = _span_cost(item, shape, convs)
        total += cost
    return shape, total


def _span_costs(span: _Span, shape: _Shape, convs: Sequence[Conv]) -> tuple[_Shape, float, float]:
    """Shape after the span, and the cost of composing through it and of merging it as a unit."""
    after, through = _items_cost(span.items, shape, convs)
    unit, inner = _items_cost(span.items, _Shape.identity(shape.rows, len(shape.kernel)), convs)
    as_layer = Conv(_ShapeOnly((unit.rows, unit.cols) + unit.kernel), None, unit.stride, (1,) * len(shape.kernel),
                    unit.groups)
    return after, through, inner + shape.then(as_layer)[1]


def _span_cost(span: _Span, shape: _Shape, convs: Sequence[Conv]) -> tuple[_Shape, float]:
    after, through, as_unit = _span_costs(span, shape, convs)
    return after, min(through, as_unit)


def _unit_composes_exactly(span: _Span, shape: _Shape) -> bool:
    """A branch holding residuals of its own keeps their offsets on the run input's grid; on a
    strided state's grid they would land between taps, so such a branch composes in order."""
    return all(s == 1 for s in shape.stride) or all(isinstance(item, int) for item in span.items)


def _unit_is_cheaper(span: _Span, shape: _Shape, convs: Sequence[Conv]) -> bool:
    _, through, as_unit = _span_costs(span, shape, convs)
    return as_unit < through


class _ShapeOnly:
    """Stands in for a weight tensor where only its shape is read (cost estimates)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)
