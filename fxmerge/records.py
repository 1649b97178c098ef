"""The records the passes hand each other, and the structural rules they share.

The analysis pass fills an :class:`Analysis` (chains of :class:`Layer` s with their
:class:`Skip` s, forced breaks and candidate blocks, each block's :class:`PruneOption` s when
asked); planning scores segments by :class:`ImportanceKey`; ``linearize`` hands ``merge`` one
:class:`Segment` per merged conv. Vocabulary (ARCHITECTURE.md): a *layer* is a conv with an
optional zero pad before and BatchNorm after; *position* p of a chain is the map after layer p
(0 is the chain's input); an *activation at p* is a registered nonlinearity on that map; a
*skip* (s, t) is an identity residual ``x_t = y_t + x_s``; a *forced break* is a position no
merged conv may cross; a *block* (i, j] is layers i+1..j merged into one conv.

>>> from fxmerge.records import ImportanceKey
>>> ImportanceKey(0, 1, 3) == (0, 1, 3), ImportanceKey(0, 1, 3, (2,)).pruned
(True, (2,))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch.fx as fx
from tabulate import tabulate

from fxmerge.algebra import ConvGeometry, Pads
from fxmerge.geometry import conv_macs, conv_params, kernel_spans

# --------------------------------------------------------------------------- rules shared by analyses and plans


def residual_conflict(i: int, j: int, skips: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...] | None:
    """Why block (i, j] may not be merged because of the residuals ``(s, t)`` of its chain, or
    None: a block must contain every skip span it touches or be disjoint from it (touching
    endpoints allowed) — returns ``((s, t),)`` for a span it cuts — and the spans inside it must
    nest among themselves (two that cross, x2 = f(x1) + x0 and x3 = g(x2) + x1, have no order
    to compose in) — returns the two crossing spans."""
    skips = list(skips)
    for s, t in skips:
        if i < s < j < t or s < i < t < j:
            return ((s, t),)
    inside = [(s, t) for s, t in skips if i <= s and t <= j]
    for s1, t1 in inside:
        for s2, t2 in inside:
            if s1 < s2 < t1 < t2:
                return ((s1, t1), (s2, t2))
    return None


def droppable_positions(length: int, activations: Iterable[int], breaks: Iterable[int]) -> list[int]:
    """Interior positions whose activation a plan may drop (not at a forced break)."""
    breaks = set(breaks)
    return sorted(p for p in activations if 0 < p < length and p not in breaks)


def span_name(first: str, last: str) -> str:
    """A chain or block named by its first and last conv nodes."""
    return first if first == last else f"{first}..{last}"


# --------------------------------------------------------------------------- candidate blocks


@dataclass(frozen=True)
class BlockLimits:
    """Which multi-layer blocks are worth considering (single layers are always valid).

    Deep chains have O(L²) blocks and the long ones have absurd kernels, which only slow the
    latency table and the merge down. A block of two or more layers is a candidate only when,
    in every spatial dimension, its merged kernel spans at most ``max_kernel`` pixels and at
    most ``max_kernel_ratio`` times the block's input map, and when the merged conv needs at
    most ``max_macs_ratio`` times the multiply-adds of the layers it replaces, and has at most
    ``max_params`` weights (None turns a limit off). The paper's MobileNetV2 candidate set
    needs up to 33x the MACs (a 384->576 7x7 conv); the default keeps all of it but its four
    most expensive blocks, and ``BlockLimits(max_macs_ratio=None)`` keeps every one. The weight
    cap (2^24, about 16.8 M: two thirds of all of ResNet-50's) drops kernels such as ResNet's
    two-bottleneck 1024->1024 5x5 (26 M weights, 12x the MACs of what it replaces): never a
    speed-up on any hardware, and seconds to compose and to time. It keeps every block of the
    paper's MobileNetV2 table that the MACs limit keeps.
    """

    max_kernel: int = 15
    max_kernel_ratio: float = 1.5
    max_macs_ratio: float | None = 12.0
    max_params: int | None = 1 << 24

    def kernel_fits(self, spans: Sequence[int], input_shape: Sequence[int] | None) -> bool:
        """Whether a merged kernel spanning ``spans`` pixels per dimension is within the kernel
        limits for a block reading ``input_shape``. Spans only grow as a block grows, so a
        block that fails this has no longer candidate after it either."""
        spatial = list(input_shape[2:]) if input_shape is not None else [None] * len(spans)
        return all(span <= self.max_kernel and (size is None or span <= self.max_kernel_ratio * size)
                   for span, size in zip(spans, spatial))

    def allows(self, spec: ConvGeometry, input_shape: Sequence[int] | None, output_shape: Sequence[int] | None,
               replaced_macs: int | None) -> bool:
        """Whether a multi-layer block with merged geometry ``spec`` is a candidate, given its
        input and output shapes and the multiply-adds of the layers it replaces."""
        if not self.kernel_fits(kernel_spans(spec), input_shape):
            return False
        if self.max_params is not None and conv_params(spec) > self.max_params:
            return False
        if self.max_macs_ratio is not None and output_shape is not None and replaced_macs:
            return conv_macs(spec, output_shape) <= self.max_macs_ratio * replaced_macs
        return True


# --------------------------------------------------------------------------- analysis records


class LayerNodes(NamedTuple):
    """The fx nodes of one layer, by name: its conv, the zero pad before it, the BatchNorm after.
    A *junction* (``junction=True``) is the residual add of an activation-before-add residual
    (``x + act(conv(...))``), named by its add node: a layer that computes the identity."""

    conv: str
    pad: str | None
    bn: str | None
    junction: bool = False


@dataclass(frozen=True)
class Layer:
    """One convolution with its optional zero pad before and BatchNorm after — or a *junction*:
    the residual add of ``x_s + act(z_p)``, which sits in the chain as a layer of its own that
    computes the identity, so the activation before it (position p) and the map after the add
    (position p + 1) are two positions. Kept, the activation runs before an explicit add;
    dropped, the residual is an identity skip (s, p + 1) like any other, fused into a merged
    kernel that contains it. ``conv`` names the add node of a junction."""

    conv: str
    pad: str | None
    bn: str | None
    geometry: ConvGeometry  # padding includes the explicit pad; a junction's is the identity
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    junction: bool = False

    @property
    def nodes(self) -> LayerNodes:
        return LayerNodes(self.conv, self.pad, self.bn, self.junction)

    def describe(self) -> str:
        """The layer's geometry in words (as plans record it)."""
        return f"junction {self.geometry.in_channels}" if self.junction else self.geometry.describe()

    def prune_blocker(self) -> str | None:
        """Why replacing this layer (conv, pad and BatchNorm) by the identity would change a
        shape, or None when it may be pruned (LayerMerge): identity cannot change the channel
        count, downsample, or grow or shrink the map the way unpadded or over-padded convs do."""
        g = self.geometry
        if self.junction:
            return "is a residual add, not a conv"
        if g.in_channels != g.out_channels:
            return f"changes channels ({g.in_channels} -> {g.out_channels})"
        if any(s != 1 for s in g.stride):
            return f"strided ({'x'.join(map(str, g.stride))})"
        if any(lo + hi != d * (k - 1) for (lo, hi), d, k in zip(g.padding, g.dilation, g.kernel)):
            return "changes the map size (its padding is not 'same')"
        return None


@dataclass(frozen=True)
class Skip:
    """An identity residual from position ``source`` to position ``target`` via node ``add``."""

    source: int
    target: int
    add: str


@dataclass(frozen=True)
class PruneOption:
    """Block (i, j] with layers ``pruned`` (numbered like positions) replaced by the identity:
    ``spec`` is the merged conv of the kept layers (None: none kept, the block is the identity),
    ``norm`` the summed L1 norm of its kept prunable layers (the representative rule)."""

    pruned: tuple[int, ...]
    spec: ConvGeometry | None
    norm: float


@dataclass
class Chain:
    """A run of layers linked through single-consumer edges, activations and identity skips."""

    index: int
    layers: list[Layer]
    positions: list[str]  # node name of the map at each position 0..L
    activations: dict[int, tuple[str, str]]  # position -> (node name, kind)
    skips: list[Skip]
    breaks: dict[int, str]  # interior forced breaks -> reason
    end_reason: str
    borders: list[int] = field(default_factory=list)  # activation-free positions whose next layer pads
    valid_blocks: list[tuple[int, int]] = field(default_factory=list)
    specs: dict[tuple[int, int], ConvGeometry | None] = field(default_factory=dict)  # None: runs no conv
    input_shapes: dict[int, tuple[int, ...] | None] = field(default_factory=dict)
    # block -> ways to prune layers inside it (filled by passes.pruning when asked for)
    options: dict[tuple[int, int], list[PruneOption]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.layers)

    @property
    def droppable(self) -> list[int]:
        """Interior positions whose activation a plan may drop."""
        return droppable_positions(self.length, self.activations, self.breaks)

    @property
    def prunable(self) -> list[int]:
        """Layers (numbered 1..L like positions) a plan may replace by the identity."""
        return [p for p, layer in enumerate(self.layers, start=1) if layer.prune_blocker() is None]

    @property
    def forced(self) -> list[int]:
        """Interior breaks that carry an activation: it stays, whatever the plan."""
        return sorted(p for p in self.breaks if p in self.activations)

    @property
    def kept_candidates(self) -> list[int]:
        """Positions a plan may keep as they are: the chain's ends, its droppable and forced
        activations, and its border positions (kept = a merge boundary there, so no padding
        moves across it). Consecutive kept positions are what importance scores."""
        return [0] + sorted(set(self.droppable) | set(self.forced) | set(self.borders)) + [self.length]

    def runs_conv(self, i: int, j: int, pruned: Iterable[int] = ()) -> bool:
        """Whether block (i, j] holds a conv to run: a layer that is neither a junction nor in
        ``pruned`` (a block of identities runs only the adds of residuals inside it)."""
        pruned = set(pruned)
        return any(not self.layers[p - 1].junction and p not in pruned for p in range(i + 1, j + 1))

    def is_exact(self, i: int, j: int) -> bool:
        """Whether merging block (i, j] equals the original layers, borders included: no padded
        layer after its first, so no padding has to move."""
        return not any(self.layers[p].geometry.has_padding for p in range(i + 1, j))

    def signature(self) -> dict:
        """The chain's structure as plans record it: layers by node name and geometry (with
        whether a BatchNorm follows), activation kinds, identity skips, forced breaks and what
        consumes its end."""
        return {
            "layers": [[l.conv, l.pad, l.bn, l.describe()] for l in self.layers],
            "activations": {str(p): [n, k] for p, (n, k) in sorted(self.activations.items())},
            "skips": [[s.source, s.target, s.add] for s in self.skips],
            "breaks": {str(p): r for p, r in sorted(self.breaks.items())},
            "end": self.end_reason,
        }

    def skip_pairs(self) -> list[tuple[int, int]]:
        return [(s.source, s.target) for s in self.skips]

    def name(self) -> str:
        return span_name(self.layers[0].conv, self.layers[-1].conv)


@dataclass
class Analysis:
    """What the analysis pass found; ``print(analysis)`` shows it as tables."""

    graph_module: fx.GraphModule
    chains: list[Chain]
    limits: BlockLimits
    unmergeable: dict[str, str]  # conv node (or kept-whole module) -> why it is no layer
    inputs: list[dict] = field(default_factory=list)  # example input shapes and dtypes
    prune_layers: bool = False  # whether chains carry pruning options (passes.pruning)
    capture: str = "fx"  # how the model was captured ("fx" or "export"): plans re-capture the same way
    modules: list[str] = field(default_factory=list)  # the submodules analysed (empty: the whole model)

    @property
    def num_layers(self) -> int:
        """Conv layers (a residual junction is a chain position, not a layer that computes)."""
        return sum(not layer.junction for c in self.chains for layer in c.layers)

    def signature(self) -> list[dict]:
        """Every chain's structure (see :meth:`Chain.signature`)."""
        return [c.signature() for c in self.chains]

    def summary_table(self) -> str:
        rows = []
        for c in self.chains:
            breaks = "; ".join(f"@{p}: {r}" for p, r in sorted(c.breaks.items()))
            rows.append([c.index, c.name(), c.length, len(c.droppable), len(c.skips), len(c.borders),
                         len(c.valid_blocks), breaks or "-", c.end_reason])
        return tabulate(rows, headers=["chain", "layers", "L", "droppable", "skips", "borders", "valid blocks",
                                       "forced breaks", "ends at"], tablefmt="simple")

    def layer_table(self) -> str:
        rows = []
        for c in self.chains:
            skip_at = {s.target: f"+x{s.source}" for s in c.skips}
            for p, layer in enumerate(c.layers, start=1):
                act = c.activations.get(p)
                mark = "" if act is None else (act[1] if p in c.droppable else f"{act[1]} (kept)")
                note = "break" if p in c.breaks else ("border" if p in c.borders else "")
                rows.append([c.index, p, layer.conv, layer.describe(), "BN" if layer.bn else "",
                             skip_at.get(p, ""), mark, note])
        return tabulate(rows, headers=["chain", "pos", "conv", "geometry", "bn", "skip", "activation", ""],
                        tablefmt="simple")

    def _pruning_summary(self) -> str:
        if not self.prune_layers:
            return ""
        options = sum(len(o) for c in self.chains for o in c.options.values())
        return f", {sum(len(c.prunable) for c in self.chains)} prunable convs, {options} pruning options"

    def __str__(self) -> str:
        head = (f"fxmerge analysis: {len(self.chains)} chains, {self.num_layers} layers, "
                f"{sum(len(c.droppable) for c in self.chains)} droppable activations, "
                f"{sum(len(c.valid_blocks) for c in self.chains)} valid blocks{self._pruning_summary()} "
                f"(limits: kernel <= {self.limits.max_kernel} and <= {self.limits.max_kernel_ratio}x input, "
                f"MACs <= {self.limits.max_macs_ratio}x, weights <= {self.limits.max_params})")
        legend = ("\n'border': no activation there, but the next conv pads its input; a merge across it moves "
                  "that padding and changes the output near the borders, so only budgeted plans do it "
                  "(priced like dropping an activation).") if any(c.borders for c in self.chains) else ""
        extra = ""
        if self.unmergeable:
            extra = "\nconvs left alone:\n" + "\n".join(f"  {k}: {v}" for k, v in self.unmergeable.items())
        return f"{head}\n\n{self.summary_table()}\n\n{self.layer_table()}{legend}{extra}"


# --------------------------------------------------------------------------- importance keys


class ImportanceKey(tuple):
    """What an importance score is for: ``(chain, i, j)`` — keep the activations at positions i
    and j of a chain, drop every one between, merge the segment — or ``(chain, i, j, pruned)``
    for a pruning option of that segment (its layers ``pruned`` replaced by the identity).

    It *is* that plain tuple (equal, same hash), so mappings keyed by plain tuples work as they
    are; it only names the parts.
    """

    def __new__(cls, chain: int, i: int, j: int, pruned: Iterable[int] = ()) -> "ImportanceKey":
        pruned = tuple(pruned)
        return super().__new__(cls, (chain, i, j, pruned) if pruned else (chain, i, j))

    def __getnewargs__(self) -> tuple:  # copy and pickle (torch.distributed gathers keys) rebuild it
        return (self[0], self[1], self[2], self.pruned)

    @classmethod
    def of(cls, key: Sequence[Any]) -> "ImportanceKey":
        """A key from a plain tuple (or list) of 3 or 4 items; the 4th may be a list."""
        return cls(key[0], key[1], key[2], tuple(key[3]) if len(key) == 4 else ())

    @property
    def chain(self) -> int:
        return self[0]

    @property
    def segment(self) -> tuple[int, int]:
        return self[1], self[2]

    @property
    def pruned(self) -> tuple[int, ...]:
        return self[3] if len(self) == 4 else ()

    @property
    def is_option(self) -> bool:
        """Whether this scores a pruning option rather than a plain segment."""
        return len(self) == 4

    def row(self, score: float) -> list:
        """The key and its score as an importance file stores them."""
        return [self[0], self[1], self[2], list(self.pruned), score] if self.is_option else [*self, score]


# --------------------------------------------------------------------------- what linearize hands merge


@dataclass(frozen=True)
class NestedSkip:
    """An identity residual inside a merged segment: positions relative to the segment, its add
    node, and where its identity term lands in the merged kernel (on the front-padded input)."""

    source: int
    target: int
    add: str
    offset: tuple[int, ...]


@dataclass(frozen=True)
class Segment:
    """One planned segment of a linearized model, as ``merge`` needs it: the node it reads
    (``start``), the padding in front of it (``front``), its layers (``pruned`` maps indices of
    layers replaced by the identity to their channel count), its nested residuals, and the node
    whose value it computes last (``end``)."""

    start: str
    front: Pads
    layers: tuple[LayerNodes, ...]
    pruned: dict[int, int]
    skips: tuple[NestedSkip, ...]
    end: str

    @property
    def kept(self) -> list[LayerNodes]:
        return [layer for k, layer in enumerate(self.layers) if k not in self.pruned]

    def renamed(self, names: Mapping[str, str]) -> "Segment":
        """The same segment in a graph where node ``a`` is called ``names.get(a, a)`` (a part
        split out of a larger graph)."""
        def new(name: str | None) -> str | None:
            return None if name is None else names.get(name, name)
        layers = tuple(LayerNodes(new(l.conv), new(l.pad), new(l.bn), l.junction) for l in self.layers)
        skips = tuple(NestedSkip(k.source, k.target, new(k.add), k.offset) for k in self.skips)
        return Segment(new(self.start), self.front, layers, self.pruned, skips, new(self.end))
