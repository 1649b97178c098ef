"""The registry of elementwise activations the analysis may drop, in their three fx forms.

>>> import torch.nn as nn
>>> with activation_registry():
...     register_activation("Softsign", modules=[nn.Softsign]).name
'Softsign'
>>> "Softsign" in registered_activations()
False

The registry is one :class:`ActivationRegistry` object: the built-in kinds, those the user
registered, and timm's activation modules — added the first time the registry is read after
the user's process imported timm (never imported here: not a dependency). A snapshot holds all
of that state, so :func:`activation_registry` restores every bit of it on exit.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ActivationKind:
    """One registered nonlinearity and the fx forms it appears in."""

    name: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Snapshot:
    kinds: dict[str, ActivationKind]
    zoo_registered: bool


class ActivationRegistry:
    """Activation kinds by name; :meth:`snapshot` / :meth:`restore` save and bring back all of it."""

    def __init__(self, builtins: Iterable[ActivationKind] = ()):
        self._kinds: dict[str, ActivationKind] = {k.name: k for k in builtins}
        self._zoo_registered = False  # timm's kinds are added once timm is imported

    def register(self, name: str, *, modules: Iterable[type] = (), functions: Iterable[Callable] = (),
                 methods: Iterable[str] = ()) -> ActivationKind:
        old = self._kinds.get(name, ActivationKind(name))
        kind = ActivationKind(name, old.modules + tuple(modules), old.functions + tuple(functions),
                              old.methods + tuple(methods))
        self._kinds[name] = kind
        return kind

    def unregister(self, name: str) -> None:
        self._kinds.pop(name, None)

    def kinds(self) -> dict[str, ActivationKind]:
        """Every registered kind (timm's included once the process imported timm)."""
        if not self._zoo_registered and "timm" in sys.modules:
            self._zoo_registered = True
            for kind in _timm_kinds():
                self.register(kind.name, modules=kind.modules, functions=kind.functions)
        return dict(self._kinds)

    def snapshot(self) -> _Snapshot:
        return _Snapshot(dict(self._kinds), self._zoo_registered)

    def restore(self, snapshot: _Snapshot) -> None:
        self._kinds, self._zoo_registered = dict(snapshot.kinds), snapshot.zoo_registered


def _builtin_kinds() -> list[ActivationKind]:
    return [
        ActivationKind("ReLU", (nn.ReLU,), (F.relu, F.relu_, torch.relu, torch.relu_), ("relu", "relu_")),
        ActivationKind("ReLU6", (nn.ReLU6,), (F.relu6,)),
        ActivationKind("LeakyReLU", (nn.LeakyReLU,), (F.leaky_relu, F.leaky_relu_)),
        ActivationKind("Hardtanh", (nn.Hardtanh,), (F.hardtanh, F.hardtanh_)),
        ActivationKind("Hardswish", (nn.Hardswish,), (F.hardswish,)),
        ActivationKind("SiLU", (nn.SiLU,), (F.silu,)),
        ActivationKind("GELU", (nn.GELU,), (F.gelu,)),
        ActivationKind("Mish", (nn.Mish,), (F.mish,)),
        ActivationKind("ELU", (nn.ELU,), (F.elu, F.elu_)),
        ActivationKind("CELU", (nn.CELU,), (F.celu,)),
        ActivationKind("SELU", (nn.SELU,), (F.selu, torch.selu)),
        ActivationKind("Sigmoid", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid", "sigmoid_")),
        ActivationKind("Hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,)),
        ActivationKind("Tanh", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh", "tanh_")),
        ActivationKind("PReLU", (nn.PReLU,)),
    ]


def _timm_kinds() -> list[ActivationKind]:
    """timm's activation modules and functions, under the kinds they compute."""
    try:
        from timm.layers import activations as a, activations_me as me
    except ImportError:  # a timm too old or too new to have these modules: nothing to add
        return []
    forms = {
        "SiLU": ([a.Swish, me.SwishMe], [a.swish, me.swish_me]),
        "Mish": ([a.Mish, me.MishMe], [a.mish, me.mish_me]),
        "Hardswish": ([a.HardSwish, me.HardSwishMe], [a.hard_swish, me.hard_swish_me]),
        "Hardsigmoid": ([a.HardSigmoid, me.HardSigmoidMe], [a.hard_sigmoid, me.hard_sigmoid_me]),
        "HardMish": ([a.HardMish, me.HardMishMe], [a.hard_mish, me.hard_mish_me]),
        "GELU": ([a.GELU], [a.gelu]),
        "GELUTanh": ([a.GELUTanh], [a.gelu_tanh]),
        "QuickGELU": ([a.QuickGELU], [a.quick_gelu]),
        "Sigmoid": ([a.Sigmoid], [a.sigmoid]),
        "Tanh": ([a.Tanh], [a.tanh]),
        "PReLU": ([a.PReLU], []),
    }
    return [ActivationKind(name, tuple(modules), tuple(functions)) for name, (modules, functions) in forms.items()]


REGISTRY = ActivationRegistry(_builtin_kinds())


def register_activation(name: str, *, modules: Iterable[type] = (), functions: Iterable[Callable] = (),
                        methods: Iterable[str] = ()) -> ActivationKind:
    """Teach the analysis a new elementwise activation (or more forms of a known one).

    Registered module types are also kept whole when tracing (fx leaves), so an activation
    written as a module with its own ``forward`` is seen as one node. The registry is global;
    undo with :func:`unregister_activation`, or scope changes with :func:`activation_registry`.
    """
    return REGISTRY.register(name, modules=modules, functions=functions, methods=methods)


def unregister_activation(name: str) -> None:
    """Forget a registered activation kind (every form of it)."""
    REGISTRY.unregister(name)


@contextlib.contextmanager
def activation_registry() -> Iterator[ActivationRegistry]:
    """Restore the whole activation registry on exit: registrations inside the block are
    undone, and so is what it learnt there (timm's kinds, if timm was first imported inside)."""
    saved = REGISTRY.snapshot()
    try:
        yield REGISTRY
    finally:
        REGISTRY.restore(saved)


def registered_activations() -> dict[str, ActivationKind]:
    """Every registered activation kind, by name."""
    return REGISTRY.kinds()


def is_activation_module(module: nn.Module) -> bool:
    """A registered activation module (traced as a leaf, so it stays one node)."""
    return any(type(module) in kind.modules for kind in registered_activations().values())
