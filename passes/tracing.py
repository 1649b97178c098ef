"""Turning a user's model into a private, canonical, shape-annotated GraphModule.

>>> import torch, torchvision
>>> gm = prepare(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),))
>>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["tensor_meta"].shape
torch.Size([1, 64, 16, 16])

The user's model is never touched: it is deep-copied (in eval mode) before tracing, so the
GraphModule's submodules are ours to modify. :func:`prepare` then

* keeps whole (fx leaves) what cannot be traced, narrowing down to the innermost failing
  submodule, and registered activation and BatchNorm modules;
* erases asserts and the value-free nodes that only fed them (timm's ``x.ndim == 4`` checks);
* makes input-size-dependent padding concrete for the example inputs: ``F.pad`` amounts
  computed from shapes, and conv subclasses that pad dynamically ("same" padding, timm's
  ``Conv2dSame``), recognised by what they compute on the example inputs;
* records every node's output shape (``node.meta['tensor_meta']``).
"""
from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxmerge.arguments import check_inputs
from fxmerge.errors import InvalidArgumentError, TraceFailedError, UnsupportedModelError, first_line

from . import patterns
from .activations import is_activation_module
from .capture import CAPTURE_RECORD, capture_sharing as export_capture
from .model_checks import check_model, is_fxmerge_output
from .parts import PARTS_RECORD, split_into_parts
from .private_copies import private_copy

TRACE_RECORD = "fxmerge_trace"  # GraphModule.meta key: what prepare kept whole or made concrete
_MAX_RETRIES = 64


@dataclass(frozen=True)
class TraceOptions:
    """How fxmerge traces a model fx cannot take as it is: a custom ``tracer`` (its class and
    settings are used), extra ``leaf_modules`` types to keep whole, ``concrete_args`` for
    ``torch.fx.Tracer.trace``. Every public entry point takes one as ``trace=``.

    >>> import torch.nn as nn
    >>> TraceOptions(leaf_modules=(nn.LSTM,)).leaf_modules
    (<class 'torch.nn.modules.rnn.LSTM'>,)
    """

    tracer: fx.Tracer | None = None
    leaf_modules: tuple[type, ...] = ()
    concrete_args: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        if self.tracer is not None and not isinstance(self.tracer, fx.Tracer):
            raise InvalidArgumentError(f"TraceOptions.tracer must be a torch.fx.Tracer; got {type(self.tracer).__name__}")
        if not all(isinstance(t, type) for t in self.leaf_modules):
            raise InvalidArgumentError("TraceOptions.leaf_modules must be module classes, e.g. (MyBlock,)")
        if self.concrete_args is not None and not isinstance(self.concrete_args, dict):
            raise InvalidArgumentError("TraceOptions.concrete_args must be a dict {argument name: value}")

    @property
    def is_default(self) -> bool:
        return self.tracer is None and not self.leaf_modules and not self.concrete_args


def check_trace(value: Any) -> TraceOptions:
    """``trace=``: None (defaults) or a :class:`TraceOptions`."""
    if value is None:
        return TraceOptions()
    if not isinstance(value, TraceOptions):
        raise InvalidArgumentError(f"trace must be fxmerge.TraceOptions(...) or None; got {type(value).__name__}")
    return value


def _check_not_aten(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) \
                and "conv" in str(node.target):
            raise UnsupportedModelError(
                f"this graph calls ATen operators ('{node.name}': {node.target}), as the module of a torch.export'ed "
                "program does: pass the ExportedProgram itself (fxmerge lowers it) or the module before "
                "torch.export, then export the compressed result.")


# --------------------------------------------------------------------------- tracing


class _Leaves:
    """What the tracer keeps whole, beyond fx's own leaves (torch.nn modules)."""

    def __init__(self, user_types: Sequence[type]):
        self.types = tuple(user_types)
        self.auto_types: set[type] = set()
        self.auto_names: set[str] = set()
        self.reasons: dict[str, str] = {}

    def is_leaf(self, module: nn.Module, qualname: str) -> bool:
        return (isinstance(module, self.types) or type(module) in self.auto_types or qualname in self.auto_names
                or type(module) in patterns.BN_MODULES or is_activation_module(module))

    def add(self, module: nn.Module, qualname: str, error: Exception) -> None:
        """Keep the failing submodule whole: every instance of a conv subclass (they are
        recognised by what they compute later), else just this instance."""
        why = first_line(error)
        if isinstance(module, nn.modules.conv._ConvNd):
            self.auto_types.add(type(module))
        else:
            self.auto_names.add(qualname)
        self.reasons[qualname] = f"could not be traced ({why}); kept whole"


def _tracer_with_context(tracer: fx.Tracer | None, leaves: _Leaves) -> fx.Tracer:
    """A tracer that honours ``leaves`` and remembers which submodule it was inside when
    tracing failed."""
    base = type(tracer) if tracer is not None else fx.Tracer

    class _ContextTracer(base):  # type: ignore[misc, valid-type]
        def is_leaf_module(self, m, qualname):
            return leaves.is_leaf(m, qualname) or super().is_leaf_module(m, qualname)

        def call_module(self, m, forward, args, kwargs):
            self._fxmerge_stack.append(self.path_of_module(m) or "")
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self._fxmerge_failed_at is None:
                    self._fxmerge_failed_at = list(self._fxmerge_stack)
                raise
            finally:
                self._fxmerge_stack.pop()

    new = _ContextTracer.__new__(_ContextTracer)
    if tracer is not None:
        new.__dict__.update(copy.copy(tracer.__dict__))
    else:
        fx.Tracer.__init__(new)
    new._fxmerge_stack, new._fxmerge_failed_at = [], None
    return new


def trace(model: nn.Module, options: TraceOptions = TraceOptions()) -> fx.GraphModule:
    """A private GraphModule of ``model`` in eval mode (a copy when it already is one; its
    parameters are the model's, shared: :mod:`.private_copies`).

    A submodule fx cannot trace is kept whole, innermost first; if the model's own
    ``forward`` cannot be traced, raises :class:`~fxmerge.TraceFailedError` naming where and
    what to try (leaf modules, ``concrete_args``, a custom tracer).
    """
    model = check_model(model)
    tracer, concrete_args = options.tracer, options.concrete_args
    if isinstance(model, fx.GraphModule) and options.is_default:
        gm = private_copy(model).eval()
        _check_not_aten(gm)
        return gm
    if model.training and not is_fxmerge_output(model):
        warnings.warn(f"{type(model).__name__} is in train mode: fxmerge analyses and rewrites it in eval mode "
                      "(BatchNorm folded with its running statistics, dropout off) and returns eval-mode modules; "
                      "the model you passed is left as it is. Call .eval() first to silence this.",
                      stacklevel=_caller_stacklevel())
    private = private_copy(model).eval()
    leaves = _Leaves(options.leaf_modules)
    for _ in range(_MAX_RETRIES):
        t = _tracer_with_context(tracer, leaves)
        try:
            graph = t.trace(private, concrete_args=concrete_args)
            break
        except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
            path = [p for p in (t._fxmerge_failed_at or []) if p]
            if not path or path[-1] in leaves.reasons:
                raise _trace_failed(model, path, exc) from exc
            leaves.add(private.get_submodule(path[-1]), path[-1], exc)
    else:
        raise TraceFailedError(f"torch.fx could not trace {type(model).__name__}: gave up after {_MAX_RETRIES} "
                               "submodules failed. Pass trace=fxmerge.TraceOptions(tracer=...) or TraceOptions(leaf_modules=[...]).")
    gm = fx.GraphModule(private, graph, type(model).__name__)
    gm.meta[TRACE_RECORD] = {"leaves": dict(leaves.reasons)}
    _check_not_aten(gm)
    return gm


def capture_graph(model: nn.Module | torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor],
                  options: TraceOptions = TraceOptions(), capture: str | None = None) -> fx.GraphModule:
    """The model's graph: torch.fx's where it traces, else torch.export's lowered to the same
    torch-level form (:mod:`.capture`); an ``ExportedProgram`` is lowered directly.

    fx goes first because it is the cheaper capture by far (a failed fx attempt costs
    milliseconds, an export seconds: ``benchmarks/capture_cost.py``) and keeps the model's own
    module calls; export is tried when fx fails, or when fx had to keep convs inside
    submodules it could not trace (export sees inside them; if it fails, fx's graph stands).
    ``capture="export"`` (what a plan made on an exported graph records) skips the fx attempt
    so a plan is re-applied to the graph it was made on (a GraphModule, such as
    :func:`.capture`'s, is taken as it is either way); explicit ``TraceOptions`` mean the user
    chose fx, so no fallback hides their tracer's failure.
    """
    already_a_graph = isinstance(model, fx.GraphModule) and options.is_default  # copied as it is
    if isinstance(model, torch.export.ExportedProgram) or (capture == "export" and not already_a_graph):
        return export_capture(model, example_inputs)
    try:
        gm = trace(model, options)
    except TraceFailedError as fx_failure:
        if not options.is_default:
            raise
        try:
            return _export_after_fx(model, example_inputs)
        except (TraceFailedError, UnsupportedModelError) as export_failure:
            raise TraceFailedError(f"{fx_failure} torch.export could not capture it either: {export_failure} "
                                   "To compress the parts that can be captured (a backbone), pass "
                                   "modules=['name', ...].") from export_failure
    if options.is_default and _hides_convs(gm):  # export may see inside what fx had to keep whole
        try:
            return _export_after_fx(model, example_inputs)
        except (TraceFailedError, UnsupportedModelError) as export_failure:
            gm.meta[TRACE_RECORD]["export"] = f"torch.export failed too ({export_failure}); fx's graph is used"
    return gm


def _export_after_fx(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    with warnings.catch_warnings():  # trace() already warned about train mode
        warnings.filterwarnings("ignore", message=".*in train mode.*", category=UserWarning)
        return export_capture(model, example_inputs)


def _hides_convs(gm: fx.GraphModule) -> bool:
    """Whether fx kept whole, because it could not trace them, submodules holding convs."""
    kept = gm.meta.get(TRACE_RECORD, {}).get("leaves", {})
    return any(isinstance(m, nn.modules.conv._ConvNd) for name in kept for m in gm.get_submodule(name).modules())


def captured_by(gm: fx.GraphModule) -> str:
    """How ``gm`` (from :func:`prepare`) was captured: ``"export"`` or ``"fx"``."""
    return "export" if CAPTURE_RECORD in gm.meta else "fx"


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside fxmerge's code (two
    folders: ``passes/`` is installed as ``fxmerge.passes``, and may sit beside ``fxmerge/``)."""
    own = tuple(os.path.dirname(os.path.abspath(sys.modules[name].__file__)) + os.sep
                for name in ("fxmerge", "fxmerge.passes"))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(own):
        frame, level = frame.f_back, level + 1
    return level


def _trace_failed(model: nn.Module, path: list[str], exc: Exception) -> TraceFailedError:
    where = " > ".join(path) or f"{type(model).__name__}.forward"
    return TraceFailedError(
        f"torch.fx could not trace {type(model).__name__}: the failure happened in '{where}': "
        f"{type(exc).__name__}: {exc}. Fix data-dependent arguments with "
        "trace=fxmerge.TraceOptions(concrete_args={...}), make the failing submodule a leaf "
        "(TraceOptions(leaf_modules=[...])), or pass a custom tracer (TraceOptions(tracer=...)).")


# --------------------------------------------------------------------------- canonical form


def remove_value_free(gm: fx.GraphModule) -> None:
    """Erase asserts, then every dead node that only read metadata (shapes, ndim, ...): on the
    private copy they would pin tensors that merging removes."""
    graph = gm.graph
    for node in list(graph.nodes):
        if patterns.is_assert(node):
            graph.erase_node(node)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if not node.users and node.op in ("call_function", "call_method") and patterns.is_value_free(node):
                graph.erase_node(node)
                changed = True


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps the values of the nodes asked for."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _pad_amount_nodes(node: fx.Node) -> list[fx.Node]:
    """The graph nodes among an ``F.pad`` node's amounts (computed padding)."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if isinstance(pad, fx.Node):
        return [pad]
    return [p for p in pad if isinstance(p, fx.Node)] if isinstance(pad, (tuple, list)) else []


def _computed_pads(gm: fx.GraphModule) -> list[fx.Node]:
    """``F.pad`` nodes whose amounts are computed in the graph from the inputs' shapes."""
    out = []
    for node in gm.graph.find_nodes(op="call_function", target=F.pad):
        amounts = _pad_amount_nodes(node)
        if amounts and all(_shape_only(a) for a in amounts) and len(node.args) > 1:
            out.append(node)
    return out


def _shape_only(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on the inputs' shapes only (never on tensor values)."""
    if not patterns.is_value_free(node):
        return False
    if (node.op == "call_function" and node.target is getattr) or node.op == "call_method":
        return True  # a metadata read: its tensor argument's values do not matter
    return all(_shape_only(a) for a in node.all_input_nodes)


def _leaf_convs(gm: fx.GraphModule) -> list[fx.Node]:
    """Call_module nodes of conv subclasses fx kept whole (they did not trace)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.conv._ConvNd) and patterns.conv_module_type(mod) not in patterns.CONV_MODULES \
                    and len(node.args) == 1 and not node.kwargs:
                out.append(node)
    return out


def _same_pads(x: torch.Tensor, conv: nn.Module) -> tuple[int, ...]:
    """TensorFlow's "SAME" padding of ``conv`` for ``x`` (extra pixel after), as F.pad wants it."""
    pads: list[int] = []
    for size, k, s, d in reversed(list(zip(x.shape[2:], conv.kernel_size, conv.stride, conv.dilation))):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def _base_conv(mod: nn.Module) -> type | None:
    return next((c for c in type(mod).__mro__ if c in patterns.CONV_MODULES), None)


@torch.no_grad()
def _resolve_leaf_conv(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, record: dict) -> None:
    """Replace a kept-whole conv subclass by what it computes on the example inputs, if that is
    a plain conv (possibly after a "same" pad fixed for this input size); else leave it."""
    mod, base = gm.get_submodule(node.target), _base_conv(gm.get_submodule(node.target))
    if base is None or getattr(mod, "padding_mode", "zeros") != "zeros":
        return
    y = mod(x)
    pads = _same_pads(x, mod)

    def candidate(inp):
        try:
            return base._conv_forward(mod, inp, mod.weight, mod.bias)
        except RuntimeError:  # e.g. the kernel does not fit the unpadded input
            return None

    plain = candidate(x)
    same = candidate(F.pad(x, pads)) if any(pads) else None
    tol = 1e-4 * max(float(y.abs().max()), 1e-12)

    def matches(z):
        return z is not None and z.shape == y.shape and float((z - y).abs().max()) <= tol

    if matches(plain):
        mod.__class__ = base
        record[node.target] = f"{type(mod).__name__} subclass: computes a plain {base.__name__}"
    elif matches(same):
        with gm.graph.inserting_before(node):
            pad = gm.graph.create_node("call_function", F.pad, (node.args[0], pads), name=f"fxmerge_same_pad_{node.name}")
        node.replace_input_with(node.args[0], pad)
        mod.__class__ = base
        size = "x".join(map(str, x.shape[2:]))
        record[node.target] = f"pads dynamically ('same'): padding {pads} fixed for {size} inputs"


def canonicalize(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Value-free nodes out; computed padding and dynamically padding conv leaves made concrete
    for ``example_inputs``. Changes ``gm`` (a private copy) in place."""
    remove_value_free(gm)
    pads, leaf_convs = _computed_pads(gm), _leaf_convs(gm)
    if pads or leaf_convs:
        wanted = {a for p in pads for a in _pad_amount_nodes(p)} | {n.args[0] for n in leaf_convs}
        recorder = _Recorder(gm, wanted)
        with torch.no_grad():
            recorder.run(*example_inputs)
        for node in pads:
            node.args = (node.args[0], _concrete(recorder.values, node.args[1]), *node.args[2:])
        record = gm.meta.setdefault(TRACE_RECORD, {"leaves": {}}).setdefault("resolved", {})
        for node in leaf_convs:
            _resolve_leaf_conv(gm, node, recorder.values[node.args[0]], record)
        remove_value_free(gm)
    gm.recompile()


def _concrete(values: dict, arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        value = values[arg]
        return tuple(int(v) for v in value) if isinstance(value, (tuple, list, torch.Size)) else int(value)
    if isinstance(arg, (tuple, list)):
        return tuple(_concrete(values, a) for a in arg)
    return arg


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and records each node's output in ``node.meta['tensor_meta']`` as
    torch's ``ShapeProp`` does, but without printing a traceback when a node fails: the
    failure is raised with the node it happened at."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeFailed(n, exc) from exc
        tensors = []

        def describe(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                return _extract_tensor_metadata(value)
            return value

        meta = map_aggregate(result, describe)
        if tensors:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


class _NodeFailed(Exception):
    def __init__(self, node: fx.Node, cause: Exception):
        super().__init__(node.name)
        self.node, self.cause = node, cause


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']`` (eval mode, no grad)."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*example_inputs)
    except _NodeFailed as failed:
        raise InvalidArgumentError(
            f"running the example inputs ({_shapes(example_inputs)}) through the traced model failed at "
            f"'{failed.node.name}' ({_target_name(failed.node)}): {first_line(failed.cause)}. Pass inputs the "
            "model accepts, as a tuple (like torch.export).") from failed.cause
    except Exception as exc:  # before any node ran (e.g. the wrong number of inputs)
        raise InvalidArgumentError(f"running the example inputs ({_shapes(example_inputs)}) through the traced model "
                                   f"failed: {first_line(exc)}. Pass inputs the model accepts, as a tuple "
                                   "(like torch.export).") from exc
    finally:
        gm.train(was_training)


def _shapes(example_inputs: Sequence[Any]) -> str:
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor)
                     else type(x).__name__ for x in example_inputs)


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def prepare(model: nn.Module | torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor],
            options: TraceOptions = TraceOptions(), *, capture: str | None = None,
            modules: Sequence[str] = ()) -> fx.GraphModule:
    """The private, canonical, shape-annotated GraphModule every pass works on (see
    :func:`capture_graph` for how it is captured). With ``modules``, the graph of those
    submodules side by side (:mod:`.parts`; ``gm.meta[PARTS_RECORD]`` holds them)."""
    example_inputs = check_inputs("example_inputs", example_inputs)
    parts = None
    if modules:
        if isinstance(model, torch.export.ExportedProgram):
            raise InvalidArgumentError("modules=[...] needs the nn.Module, not an ExportedProgram (export captures "
                                       "the whole model)")
        parts, example_inputs = split_into_parts(model, example_inputs, modules)
        model = parts
    gm = capture_graph(model, example_inputs, options, capture)
    canonicalize(gm, example_inputs)
    propagate_shapes(gm, example_inputs)
    if parts is not None:
        gm.meta[PARTS_RECORD] = parts.layout()
    return gm


def input_specs(example_inputs: Sequence[torch.Tensor]) -> list[dict]:
    """Shapes and dtypes of example inputs, as plans record them."""
    return [{"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for x in example_inputs]


def inputs_from_specs(specs: Sequence[dict], model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Random inputs of the recorded shapes, in the model's float dtype and on its device."""
    param = next(iter(model.parameters()), None)
    out = []
    for spec in specs:
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point and param is not None and param.dtype.is_floating_point:
            dtype = param.dtype
        device = param.device if param is not None else "cpu"
        g = torch.Generator().manual_seed(0)
        x = torch.randn(spec["shape"], generator=g) if dtype.is_floating_point else torch.zeros(spec["shape"])
        out.append(x.to(dtype=dtype, device=device))
    return tuple(out)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
