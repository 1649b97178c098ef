"""Recognisers for the fx nodes the passes care about: convolutions, BatchNorm, zero pads,
activations (module, function and method forms, from :mod:`.activations`), identity adds,
ops that are the identity in eval mode (``nn.Identity``, dropout) and value-free nodes (shape
reads, asserts).

Modules are matched by exact type, as ``torch.fx.experimental.optimization.fuse`` does: a
subclass with its own ``forward`` is traced through, not trusted. The exceptions compute
exactly what their base class does: parametrized convs (``torch.nn.utils.parametrizations``)
and BatchNorm's frozen and synchronised forms.
"""
from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from fxmerge.algebra import ConvGeometry, Pads, unflat_pad

from .activations import registered_activations

CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _batchnorm_modules() -> tuple[type, ...]:
    """BatchNorm in the forms model zoos use: plain, synchronised (the same in eval) and frozen
    (torchvision's detection backbones; timm re-uses it)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, FrozenBatchNorm2d)


BN_MODULES = _batchnorm_modules()

# Ops that are the identity in eval mode (fxmerge analyses and merges eval semantics).
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
                      F.feature_alpha_dropout: 2, torch.dropout: 2}  # -> index of the `training` argument
_IDENTITY_METHODS = ("contiguous",)

# Value-free nodes: they read a tensor's metadata, never its values, or compute on such reads.
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "get_device"}
_ASSERTS = {torch._assert}
_PURE_SCALAR_FUNCTIONS = {operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                          operator.ge, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                          operator.mod, operator.neg, operator.not_, builtins.getattr, math.ceil, math.floor}


# --------------------------------------------------------------------------- activations


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The registered activation ``node`` applies to its first argument, or None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    for kind in registered_activations().values():
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in kind.modules:
            return kind.name
        if node.op == "call_function" and node.target in kind.functions:
            return kind.name
        if node.op == "call_method" and node.target in kind.methods:
            return kind.name
    return None


# --------------------------------------------------------------------------- identity-in-eval and value-free nodes


def is_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that is the identity in eval mode: ``nn.Identity``, dropout in any form with
    ``training=False`` semantics, ``x.contiguous()``. The analysis sees through them; the
    rewrite leaves them where they are (dropout still trains) or removes them with a segment."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) in _IDENTITY_MODULES and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        return _arg(node, _DROPOUT_FUNCTIONS[node.target], "training" if node.target is not torch.dropout else "train",
                    True) is False
    return node.op == "call_method" and node.target in _IDENTITY_METHODS and len(node.args) == 1


def through(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node`` followed forward through transparent sole users: the last node carrying its value."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not is_transparent(gm, user) or user.args[0] is not node:
            break
        node = user
    return node


def source(gm: fx.GraphModule, node: Any) -> Any:
    """``node`` followed backward through transparent ops: the node that computed its value."""
    while isinstance(node, fx.Node) and is_transparent(gm, node):
        node = node.args[0]
    return node


def consumers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes that use ``node``'s value, looking through transparent ops."""
    out = []
    for user in node.users:
        if is_transparent(gm, user) and user.args[0] is node:
            out += consumers(gm, user)
        else:
            out.append(user)
    return out


def is_value_free(node: fx.Node) -> bool:
    """Reads only metadata (shape, dtype, ...) or computes on such reads, or is an assert."""
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
        return node.target in _ASSERTS or (node.target in _PURE_SCALAR_FUNCTIONS and not _has_tensor_args(node))
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return False


def _has_tensor_args(node: fx.Node) -> bool:
    """Whether an argument of ``node`` is a tensor (known from shape propagation or its op)."""
    for arg in node.all_input_nodes:
        if arg.op in ("placeholder", "call_module", "get_attr") or "tensor_meta" in arg.meta:
            return True
        if arg.op in ("call_function", "call_method") and not is_value_free(arg):
            return True
    return False


def is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ASSERTS


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
        ndim = CONV_MODULES.get(conv_module_type(mod))
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


def conv_module_type(mod: nn.Module) -> type:
    """The conv class ``mod`` computes as: its exact type, or the conv class a parametrization
    (``torch.nn.utils.parametrizations.weight_norm`` ...) wraps — ``mod.weight`` is then the
    computed weight, which is what merging needs."""
    if parametrize.is_parametrized(mod) and type(mod).__bases__[0] in CONV_MODULES:
        return type(mod).__bases__[0]
    return type(mod)


def is_conv_like(mod: nn.Module) -> bool:
    """A conv module of any kind, or a module holding one (an opaque leaf hides convs)."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in mod.modules())


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
        if type(mod) not in BN_MODULES or getattr(mod, "running_mean", None) is None:
            return None
        t = node.target
        affine = getattr(mod, "weight", None) is not None
        return BatchNormCall(f"{t}.running_mean", f"{t}.running_var", f"{t}.weight" if affine else None,
                             f"{t}.bias" if affine else None, float(mod.eps), mod.running_mean.numel())
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
    if is_value_free(node):
        return f"a read of its shape or metadata ('{node.name}', used to compute something)"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        name = type(mod).__name__
        if type(mod) in CONV_MODULES and getattr(mod, "padding_mode", "zeros") != "zeros":
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
