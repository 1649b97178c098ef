"""Recognisers for the fx nodes the passes care about: convolutions, BatchNorm, zero pads,
activations (module, function and method forms, from an extensible registry) and identity adds.

Modules are matched by exact type, as ``torch.fx.experimental.optimization.fuse`` does: a
subclass with its own ``forward`` is traced through, not trusted.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.algebra import ConvGeometry, Pads, unflat_pad

_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class ActivationKind:
    """One registered nonlinearity and the fx forms it appears in."""

    name: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()


_ACTIVATIONS: dict[str, ActivationKind] = {}


def register_activation(name: str, *, modules: Iterable[type] = (), functions: Iterable[Callable] = (),
                        methods: Iterable[str] = ()) -> ActivationKind:
    """Teach the analysis a new elementwise activation (or more forms of a known one).

    >>> import torch.nn as nn
    >>> register_activation("Softsign", modules=[nn.Softsign]).name
    'Softsign'
    """
    old = _ACTIVATIONS.get(name, ActivationKind(name))
    kind = ActivationKind(name, old.modules + tuple(modules), old.functions + tuple(functions),
                          old.methods + tuple(methods))
    _ACTIVATIONS[name] = kind
    return kind


def registered_activations() -> dict[str, ActivationKind]:
    return dict(_ACTIVATIONS)


register_activation("ReLU", modules=[nn.ReLU], functions=[F.relu, F.relu_, torch.relu, torch.relu_], methods=["relu", "relu_"])
register_activation("ReLU6", modules=[nn.ReLU6], functions=[F.relu6])
register_activation("LeakyReLU", modules=[nn.LeakyReLU], functions=[F.leaky_relu, F.leaky_relu_])
register_activation("Hardtanh", modules=[nn.Hardtanh], functions=[F.hardtanh, F.hardtanh_])
register_activation("Hardswish", modules=[nn.Hardswish], functions=[F.hardswish])
register_activation("SiLU", modules=[nn.SiLU], functions=[F.silu])
register_activation("GELU", modules=[nn.GELU], functions=[F.gelu])
register_activation("Mish", modules=[nn.Mish], functions=[F.mish])
register_activation("ELU", modules=[nn.ELU], functions=[F.elu, F.elu_])
register_activation("CELU", modules=[nn.CELU], functions=[F.celu])
register_activation("SELU", modules=[nn.SELU], functions=[F.selu, torch.selu])
register_activation("Sigmoid", modules=[nn.Sigmoid], functions=[torch.sigmoid, F.sigmoid], methods=["sigmoid", "sigmoid_"])
register_activation("Hardsigmoid", modules=[nn.Hardsigmoid], functions=[F.hardsigmoid])
register_activation("Tanh", modules=[nn.Tanh], functions=[torch.tanh, F.tanh], methods=["tanh", "tanh_"])


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The registered activation ``node`` applies to its first argument, or None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    for kind in _ACTIVATIONS.values():
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in kind.modules:
            return kind.name
        if node.op == "call_function" and node.target in kind.functions:
            return kind.name
        if node.op == "call_method" and node.target in kind.methods:
            return kind.name
    return None


# --------------------------------------------------------------------------- convolutions


@dataclass(frozen=True)
class ConvCall:
    """A recognised convolution node: its geometry (own padding only) and where its weights live."""

    geometry: ConvGeometry
    weight_target: str  # qualified name of the weight parameter
    bias_target: str | None
    module_target: str | None  # for call_module convs


def _tuple(value: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)


def _conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> Pads:
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    if padding == "same":  # PyTorch puts the odd extra pixel after
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _tuple(padding, len(kernel)))


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def conv_call(gm: fx.GraphModule, node: fx.Node) -> tuple[ConvCall | None, str | None]:
    """Recognise a convolution; returns ``(call, None)`` or ``(None, why-not)`` for convs that
    cannot be merged (``why-not`` is None for nodes that are no convolution at all)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        ndim = _CONV_MODULES.get(type(mod))
        if ndim is None:
            return None, None
        if mod.padding_mode != "zeros":
            return None, f"conv '{node.target}' uses padding_mode={mod.padding_mode!r}, which cannot move"
        geom = ConvGeometry(mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                            _conv_padding(mod.padding, tuple(mod.kernel_size), tuple(mod.dilation)),
                            tuple(mod.dilation), mod.groups)
        bias = f"{node.target}.bias" if mod.bias is not None else None
        return ConvCall(geom, f"{node.target}.weight", bias, node.target), None
    if node.op != "call_function" or node.target not in _CONV_FUNCTIONS:
        return None, None
    ndim = _CONV_FUNCTIONS[node.target]
    weight, bias = _arg(node, 1, "weight", None), _arg(node, 2, "bias", None)
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None, f"conv '{node.name}' takes a computed weight; only parameters can merge"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None, f"conv '{node.name}' takes a computed bias; only parameters can merge"
    rest = [_arg(node, i, n, d) for i, n, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))]
    if any(isinstance(r, fx.Node) for r in rest):
        return None, f"conv '{node.name}' has stride/padding/dilation/groups computed at run time"
    stride, padding, dilation, groups = rest
    w = _get_attr(gm, weight.target)
    kernel, dil = tuple(w.shape[2:]), _tuple(dilation, ndim)
    geom = ConvGeometry(w.shape[1] * groups, w.shape[0], kernel, _tuple(stride, ndim),
                        _conv_padding(padding, kernel, dil), dil, int(groups))
    return ConvCall(geom, weight.target, bias.target if bias is not None else None, None), None


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def get_tensor(gm: fx.GraphModule, target: str | None) -> torch.Tensor | None:
    """The parameter or buffer at a qualified name (None for None)."""
    return None if target is None else _get_attr(gm, target)


# --------------------------------------------------------------------------- BatchNorm


@dataclass(frozen=True)
class BatchNormCall:
    """Where a BatchNorm node's statistics and affine parameters live."""

    mean: str
    var: str
    weight: str | None
    bias: str | None
    eps: float
    num_features: int


def batchnorm_call(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
    """Recognise an eval-foldable BatchNorm (module with running stats, or ``F.batch_norm``
    on parameters with ``training=False``)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) not in _BN_MODULES or mod.running_mean is None:
            return None
        t = node.target
        return BatchNormCall(f"{t}.running_mean", f"{t}.running_var", f"{t}.weight" if mod.affine else None,
                             f"{t}.bias" if mod.affine else None, float(mod.eps), mod.num_features)
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    names = ["running_mean", "running_var", "weight", "bias"]
    vals = [_arg(node, i + 1, n, None) for i, n in enumerate(names)]
    training, eps = _arg(node, 5, "training", False), _arg(node, 7, "eps", 1e-5)
    if training is not False or isinstance(eps, fx.Node):
        return None
    if any(v is not None and not (isinstance(v, fx.Node) and v.op == "get_attr") for v in vals):
        return None
    if vals[0] is None or vals[1] is None:
        return None
    targets = [v.target if v is not None else None for v in vals]
    return BatchNormCall(targets[0], targets[1], targets[2], targets[3], float(eps),
                         _get_attr(gm, targets[0]).numel())


# --------------------------------------------------------------------------- zero pads


def zero_pad(gm: fx.GraphModule, node: fx.Node, ndim: int) -> Pads | None:
    """The spatial padding of an explicit constant-zero pad node, or None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) not in _PAD_MODULES or getattr(mod, "value", 0.0) != 0:
            return None
        pad = mod.padding
    elif node.op == "call_function" and node.target is F.pad:
        pad = _arg(node, 1, "pad", None)
        mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
        if mode != "constant" or value not in (None, 0, 0.0) or isinstance(pad, fx.Node):
            return None
    else:
        return None
    if isinstance(pad, int):
        pad = (pad,) * (2 * ndim)
    pad = tuple(pad)
    if len(pad) > 2 * ndim or len(pad) % 2 or any(isinstance(p, fx.Node) or p < 0 for p in pad):
        return None
    return unflat_pad(pad, ndim)


# --------------------------------------------------------------------------- residual adds


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain ``a + b`` in any spelling (``+``, ``+=``,
    ``torch.add``, ``Tensor.add``), or None (scaled adds with ``alpha`` do not count)."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in ("add", "add_"):
        pass
    else:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[0], node.args[1]
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return a, b
    return None


# --------------------------------------------------------------------------- consumers


_KIND_WORDS = (("pool", "pooling"), ("cat", "concat"), ("concat", "concat"), ("stack", "concat"),
               ("mul", "multiply / SE gate"), ("interpolate", "resampling"), ("upsample", "resampling"),
               ("flatten", "reshape"), ("view", "reshape"), ("reshape", "reshape"), ("dropout", "dropout"),
               ("linear", "linear layer"), ("norm", "normalisation"), ("mean", "reduction"),
               ("permute", "layout change"), ("transpose", "layout change"), ("chunk", "split"),
               ("split", "split"), ("add", "add with a non-identity branch"))


def describe_consumer(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human-readable name of what ``node`` is, for break reasons."""
    if node.op == "output":
        return "model output"
    if conv_call(gm, node)[0] is not None:
        return f"conv '{node.name}'"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        name = type(mod).__name__
        if type(mod) in _CONV_MODULES and getattr(mod, "padding_mode", "zeros") != "zeros":
            return f"conv '{node.name}' with non-zero padding mode {mod.padding_mode!r}"
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
    else:
        name = str(node.target)
    low = name.lower()
    for word, kind in _KIND_WORDS:
        if word in low:
            return f"{kind} ('{node.name}': {name})"
    if activation_kind(gm, node):
        return f"activation '{node.name}' that is not on a single-consumer edge"
    return f"unsupported op ('{node.name}': {name})"
