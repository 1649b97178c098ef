"""Compressing parts of a model (``modules=[...]``): the named submodules are captured side by
side as one graph, so one analysis and one DP cover all of them under one budget, and the
rewritten graph is split back into one GraphModule per part, put into a copy of the model.

It serves models that cannot be captured whole (a detector's data-dependent post-processing)
and users who want to keep a head untouched. Each part runs on the inputs it receives when
the whole model runs on the example inputs (recorded with forward pre-hooks on a private
copy), so a detector's backbone is analysed at the size its transform resizes to.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
>>> parts, inputs = split_into_parts(model, (torch.randn(1, 3, 16, 16),), ["2"])
>>> [tuple(x.shape) for x in inputs]
[(1, 8, 14, 14)]
"""

from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.errors import InvalidArgumentError, UnsupportedModelError, first_line

from .model_checks import check_model
from .private_copies import private_copy

PARTS_RECORD = "fxmerge_parts"  # GraphModule.meta key: the parts and how many inputs each takes


class Parts(nn.Module):
    """Named submodules of a model side by side: ``forward(*inputs)`` runs each part on its own
    ``counts[i]`` inputs, in order, and returns their outputs as a tuple. The parts sit at their
    own qualified names, so node names in the captured graph are the whole model's."""

    def __init__(self, model: nn.Module, names: Sequence[str], counts: Sequence[int]):
        super().__init__()
        for name in names:
            _place(self, name, model.get_submodule(name))
        self.names, self.counts = list(names), list(counts)

    def layout(self) -> "PartsLayout":
        return PartsLayout(tuple(self.names), tuple(self.counts),
                           tuple(type(self.get_submodule(n)).__name__ for n in self.names),
                           tuple(tuple(_argument_names(self.get_submodule(n), c)) for n, c in zip(self.names, self.counts)))

    def forward(self, *inputs: torch.Tensor) -> tuple:
        outputs, first = [], 0
        for name, count in zip(self.names, self.counts):
            outputs.append(self.get_submodule(name)(*[inputs[first + k] for k in range(count)]))
            first += count
        return tuple(outputs)


@dataclass(frozen=True)
class PartsLayout:
    """What splitting a graph of :class:`Parts` back needs: each part's name, how many inputs it
    takes, its class name and its forward's argument names."""

    names: tuple[str, ...]
    counts: tuple[int, ...]
    class_names: tuple[str, ...]
    arguments: tuple[tuple[str, ...], ...]


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at qualified ``name`` under ``root``, making empty containers on the way."""
    *path, last = name.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(last, module)


def check_module_list(modules: Any) -> list[str]:
    """``modules=``: a non-empty list of names (whether the model has them: :func:`check_modules`)."""
    if isinstance(modules, str) or not isinstance(modules, (list, tuple)) or not modules:
        raise InvalidArgumentError(f"modules must be a non-empty list of submodule names, e.g. ['backbone']; "
                                   f"got {modules!r}")
    return list(modules)


def check_modules(model: nn.Module, modules: Any) -> list[str]:
    """``modules=``: names of distinct, non-nested submodules of ``model``."""
    modules = check_module_list(modules)
    known = dict(model.named_modules())
    for name in modules:
        if not isinstance(name, str) or name not in known or not name:
            close = sorted(n for n in known if n and isinstance(name, str) and name.split(".")[-1] in n)[:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InvalidArgumentError(f"modules: {name!r} is not a submodule of {type(model).__name__}{hint}; "
                                       "pass names as model.named_modules() gives them")
    for a in modules:
        for b in modules:
            if a != b and b.startswith(a + "."):
                raise InvalidArgumentError(f"modules: '{b}' is inside '{a}'; list one of them")
    if len(set(modules)) != len(modules):
        raise InvalidArgumentError(f"modules lists a submodule twice: {list(modules)}")
    return list(modules)


@torch.no_grad()
def split_into_parts(model: nn.Module, example_inputs: Sequence[torch.Tensor], modules: Sequence[str]
                     ) -> tuple[Parts, tuple[torch.Tensor, ...]]:
    """A private :class:`Parts` of ``model``'s named submodules (copies, eval mode) and their
    inputs, recorded by running the whole model once on ``example_inputs``."""
    private = private_copy(check_model(model)).eval()
    names = check_modules(private, modules)
    seen: dict[str, list] = {name: [] for name in names}
    hooks = [private.get_submodule(name).register_forward_pre_hook(_recorder(seen[name]), with_kwargs=True)
             for name in names]
    try:
        private(*example_inputs)
    except Exception as exc:
        raise InvalidArgumentError(f"running the example inputs through {type(model).__name__} failed: "
                                   f"{first_line(exc)}. Pass "
                                   "inputs the whole model accepts, as a tuple") from exc
    finally:
        for hook in hooks:
            hook.remove()
    inputs = [_part_inputs(name, seen[name]) for name in names]
    return Parts(private, names, [len(x) for x in inputs]).eval(), tuple(t for x in inputs for t in x)


def _recorder(calls: list):
    def record(module, args, kwargs):
        calls.append((args, kwargs))
    return record


def _part_inputs(name: str, calls: list) -> tuple[torch.Tensor, ...]:
    if len(calls) != 1:
        raise UnsupportedModelError(f"modules: '{name}' ran {len(calls)} times in one forward pass; fxmerge "
                                    "compresses a submodule that runs once (list its repeated parts instead)")
    args, kwargs = calls[0]
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        got = [type(a).__name__ for a in args] + [f"{k}=" for k in kwargs]
        raise UnsupportedModelError(f"modules: '{name}' is called with {got}; fxmerge compresses a submodule "
                                    "called with tensors only, positionally")
    return tuple(a.detach().clone() for a in args)


# --------------------------------------------------------------------------- putting parts back


def split_graph(gm: fx.GraphModule, layout: PartsLayout) -> list[tuple[fx.GraphModule, dict[str, str]]]:
    """One GraphModule per part from a (rewritten) graph of :class:`Parts`: the nodes part i's
    output depends on, reading its own inputs, with the part's own module names (the prefix
    ``name.`` dropped, so its state dict has the part's keys); each with the new names of the
    nodes it took (``{old: new}``)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = _flat_inputs(gm)
    pieces, first = [], 0
    for index, name in enumerate(layout.names):
        pieces.append(_piece(gm, flat, output.args[0][index], name, first, layout.arguments[index],
                             layout.class_names[index]))
        first += layout.counts[index]
    return pieces


def _flat_inputs(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """The node standing for each flat input, by index: fx keeps ``*inputs`` as one placeholder
    read by getitem, export gives one placeholder per input."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) == 1 and str(placeholders[0].target).startswith("*"):
        star = placeholders[0]
        return {n: n.args[1] for n in star.users if n.op == "call_function" and n.target is operator.getitem}
    return {n: k for k, n in enumerate(placeholders)}


def _piece(gm: fx.GraphModule, flat: dict[fx.Node, int], result: Any, name: str, first: int,
           arguments: Sequence[str], class_name: str) -> tuple[fx.GraphModule, dict[str, str]]:
    needed = _ancestors(result)
    graph, env, owned = fx.Graph(), {}, {}
    inputs = [graph.placeholder(arg) for arg in arguments]
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node in flat:
            env[node] = inputs[flat[node] - first]
            continue
        if node.op == "placeholder":
            continue
        copied = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            own = node.target[len(name) + 1:] if node.target.startswith(name + ".") else node.target
            owned[own] = _attribute(gm, node.target)
            copied.target = own
        env[node] = copied
    graph.output(fx.node.map_arg(result, lambda n: env[n]))
    piece = fx.GraphModule(owned, graph, class_name=class_name)
    piece.graph.lint()
    return piece.eval(), {old.name: new.name for old, new in env.items()}


def _ancestors(result: Any) -> set[fx.Node]:
    todo: list[fx.Node] = []
    fx.node.map_arg(result, todo.append)
    seen: set[fx.Node] = set()
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return seen


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _argument_names(module: nn.Module, count: int) -> list[str]:
    """The part's own forward argument names (its inputs keep their names), else x0, x1, ..."""
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:count] if len(params) >= count else [f"x{k}" for k in range(count)]


def replace_parts(model: nn.Module, names: Sequence[str], pieces: Sequence[nn.Module]) -> nn.Module:
    """A copy of ``model`` (eval mode) with each named submodule replaced by its piece; the parts
    themselves are not copied."""
    model = check_model(model)
    memo = {id(model.get_submodule(name)): piece for name, piece in zip(names, pieces)}
    return copy.deepcopy(model, memo).eval()
