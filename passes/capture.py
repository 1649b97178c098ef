"""Capturing models torch.fx cannot trace, with ``torch.export``, in the form fxmerge analyses.

``torch.fx.symbolic_trace`` stops at Python control flow on tensors: a ``forward`` that loops
over a layer list with saved outputs (ultralytics YOLO), a loop bound or branch read from a
shape (``for _ in range(x.shape[2] // 16)``). ``torch.export`` runs such code for the example
inputs and records the ATen operators it executed. :func:`capture` exports a model and *lowers*
that ATen graph to the torch-level graph :func:`fxmerge.analyze`, ``linearize`` and ``merge``
already understand, so the rest of fxmerge works on it unchanged:

>>> import torch, torch.nn as nn, fxmerge
>>> class Looped(nn.Module):                 # fx cannot trace this: the loop reads a shape
...     def __init__(self):
...         super().__init__()
...         self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
...         self.bn, self.act = nn.BatchNorm2d(8), nn.SiLU()
...     def forward(self, x):
...         for conv in self.convs[: x.shape[2] // 8]:
...             x = self.act(self.bn(conv(x)))
...         return x
>>> x = torch.randn(1, 8, 16, 16)
>>> gm = capture(Looped().eval(), (x,))
>>> [n.name for n in gm.graph.nodes][:4]
['x', 'convs_0', 'bn', 'act']
>>> analysis = fxmerge.analyze(gm, (x,))
>>> merged = fxmerge.merge(gm, fxmerge.Plan.drop_all(analysis))
>>> bool((merged(x) - fxmerge.linearize(gm, fxmerge.Plan.drop_all(analysis))(x)).abs().max() < 1e-4)
True

What the lowering does, in order (the user's model is never touched: it is deep-copied and put
in eval mode, and run once before export so lazily built state — ultralytics' anchors — is in
place and the export is the same whether or not the model ran before):

* in-place ops become their out-of-place twins where that is provably the same (the mutated
  tensor is private and not read afterwards); anything else is functionalized by
  ``run_decompositions({})``;
* asserts and shape reads export leaves behind are removed, shape reads made concrete;
* every call of a module the analysis recognises as a unit (exact conv types and parametrized
  convs, BatchNorm in its forms, registered activation modules, dropout, zero pads) is put back
  as one ``call_module`` node on that very module, named as fx names it (``model_0_conv``), so
  parameters are the model's own and BatchNorm trains as BatchNorm;
* remaining ATen ops the analysis knows in torch form are rewritten: convolutions on
  parameters become ``nn.ConvNd`` modules holding the same Parameters (``F.convNd`` where no
  module can hold them), ``batch_norm`` an ``nn.BatchNormNd`` (else ``F.batch_norm``),
  activations the registered functions that export to the same ATen call (derived by tracing
  the registry, cached), ``aten.add`` ``+``, ``aten.pad`` ``F.pad``, ``aten.dropout``
  ``F.dropout``; everything else stays ATen (an opaque consumer to the analysis);
* the result returns the model's output structure and is checked against the model on the
  example inputs.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from fxmerge.errors import InvalidArgumentError, TraceFailedError, UnsupportedModelError, first_line

from . import patterns
from .model_checks import check_model  # the same refusals as the fx path (hooks, weight_norm)
from .private_copies import detach_from, private_copy

CAPTURE_RECORD = "fxmerge_capture"  # GraphModule.meta key: how the graph was captured
_MAX_REL_ERROR = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
_KEPT_META = ("stack_trace", "nn_module_stack")
aten = torch.ops.aten


def capture(model: nn.Module | torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor] | None = None,
            *, strict: bool = False, dynamic_batch: bool = True, check: bool = True) -> fx.GraphModule:
    """``model`` exported with ``torch.export`` at ``example_inputs`` and lowered to the
    torch-level graph fxmerge analyses (see the module docstring): a ``GraphModule`` in eval
    mode that returns what the model returns, runs eagerly, compiles, exports and goes to ONNX.

    ``model`` may be an ``ExportedProgram`` (``example_inputs`` then default to its own). Node
    names are deterministic: capturing the same model at the same shapes gives the same names,
    which is what plans record. ``strict=False`` (non-strict export: Python runs the forward,
    about twice as fast as ``strict=True`` on YOLO and names module calls by their paths) is
    the default; pass ``strict=True`` if non-strict export fails. ``dynamic_batch`` leaves
    the batch size open (exporting at batch 2 if the example has batch 1), so the linearized
    model fine-tunes on any batch; it costs up to 2x the export time, and falls back to the
    example's batch where the model fixes it. ``check`` compares the result with the model on
    the example inputs.
    """
    return detach_from(capture_sharing(model, example_inputs, strict=strict, dynamic_batch=dynamic_batch,
                                       check=check), model)


def capture_sharing(model: nn.Module | torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor] | None,
                    *, strict: bool = False, dynamic_batch: bool = True, check: bool = True) -> fx.GraphModule:
    """:func:`capture`'s graph before it owns its parameters: it shares them with ``model``,
    as the passes' private graphs do (:mod:`.private_copies`)."""
    source = _Source.of(model, example_inputs, strict, dynamic_batch)
    lowering = _Lowering(source)
    gm = lowering.run()
    if check:
        _check_same(gm, source)
    return gm


# --------------------------------------------------------------------------- the source program


@dataclass
class _Source:
    """What is lowered: the exported program, the private module it came from (None for an
    ExportedProgram given directly), the example inputs and the model's outputs on them."""

    program: torch.export.ExportedProgram
    module: nn.Module | None
    inputs: tuple
    reference: Any
    name: str
    strict: bool

    @staticmethod
    def of(model: Any, example_inputs: Sequence[torch.Tensor] | None, strict: bool, dynamic_batch: bool
           ) -> "_Source":
        if isinstance(model, torch.export.ExportedProgram):
            return _Source._of_program(model, example_inputs)
        return _Source._of_module(model, example_inputs, strict, dynamic_batch)

    @staticmethod
    def _of_module(model: Any, example_inputs: Sequence[torch.Tensor] | None, strict: bool, dynamic_batch: bool
                   ) -> "_Source":

        model = check_model(model)
        inputs = _check_inputs(example_inputs)
        if model.training:
            warnings.warn(f"{type(model).__name__} is in train mode: fxmerge captures it in eval mode (BatchNorm with "
                          "its running statistics, dropout off); the model you passed is left as it is. Call .eval() "
                          "first to silence this.", stacklevel=4)
        private, reference = _warmed_copy(model, inputs)
        program = _export_any_batch(private, inputs, strict) if dynamic_batch else None
        if program is None:  # the batch could not be left open: export at the example shapes exactly
            if dynamic_batch:  # that export may have left its own values in the copy's attributes
                private, _ = _warmed_copy(model, inputs)
            program = _export(private, inputs, strict, None)
        return _Source(program, private, inputs, reference, type(model).__name__, strict)

    @staticmethod
    def _of_program(program: torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor] | None) -> "_Source":
        if example_inputs is None:
            args, kwargs = program.example_inputs or ((), {})
            if kwargs or not args:
                raise InvalidArgumentError("this ExportedProgram has no positional example inputs: pass example_inputs")
            example_inputs = args
        inputs = _check_inputs(example_inputs)
        with torch.no_grad():
            reference = program.module()(*inputs)
        return _Source(program, None, inputs, reference, "ExportedProgram", False)


def _warmed_copy(model: nn.Module, inputs: tuple) -> tuple[nn.Module, Any]:
    """A private eval-mode copy of ``model`` that ran once on ``inputs`` (so lazily built
    state — ultralytics' anchors, caches — exists before export looks, and the export does not
    depend on whether the user's model ran before), and its outputs."""
    private = private_copy(model).eval()
    with torch.no_grad():
        reference = private(*inputs)
    return private, reference


def _export_any_batch(private: nn.Module, inputs: tuple, strict: bool) -> torch.export.ExportedProgram | None:
    """The program with its batch size left open (so the linearized model trains on other
    batches than the example's), exported at batch 2 when the example has batch 1 (export
    fixes a size-1 dimension); None if the batch ends up fixed to another size than the
    example's, or export cannot leave it open."""
    batch = {x.shape[0] if x.dim() else None for x in inputs}
    if len(batch) != 1 or None in batch:
        return None
    (size,) = batch
    example = tuple(torch.cat([x, x]) for x in inputs) if size == 1 else inputs
    try:
        program = _export(private, example, strict, tuple({0: torch.export.Dim.AUTO} for _ in inputs))
    except TraceFailedError:
        return None
    sizes = [n.meta["val"].shape[0] for n in _user_inputs(program)]
    if all(isinstance(s, int) for s in sizes) and any(s != size for s in sizes):
        return None
    return program


def _export(private: nn.Module, inputs: tuple, strict: bool, dynamic_shapes: Any) -> torch.export.ExportedProgram:
    try:
        with warnings.catch_warnings():  # export sets attributes on our private copy: nothing to tell the user
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            return torch.export.export(private, inputs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as exc:  # export raises many kinds: UserError, GuardOnDataDependent, TypeError, ...
        other = "strict=False" if strict else "strict=True"
        raise TraceFailedError(
            f"torch.export could not capture {type(private).__name__} (strict={strict}): {first_line(exc)}. Try capture(..., {other}), or make the forward exportable "
            "(https://pytorch.org/docs/stable/export.html).") from exc


def _user_inputs(program: torch.export.ExportedProgram) -> list[fx.Node]:
    users = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    return [n for n in program.graph.find_nodes(op="placeholder") if n.name in users]


def _check_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)) \
            or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise InvalidArgumentError("example_inputs must be a tuple of tensors, as for torch.export, e.g. (x,)")
    return tuple(example_inputs)


# --------------------------------------------------------------------------- the lowering


class _Lowering:
    """The graph being lowered, the modules and tensors its nodes will refer to by name."""

    def __init__(self, source: _Source):
        self.source = source
        self.program = source.program
        self.modules: dict[str, nn.Module] = {}  # call_module targets -> the modules
        self.tensors: dict[str, torch.Tensor] = {}  # get_attr targets -> the tensors
        self.graph = fx.Graph()
        self.output_spec: pytree.TreeSpec | None = None
        self._own_state: dict[str, torch.Tensor] | None = None
        self.paths = {id(m): name for name, m in source.module.named_modules()} if source.module is not None else {}

    def run(self) -> fx.GraphModule:
        if not _make_out_of_place(self.program.graph, dry_run=True):
            self.program = self.program.run_decompositions({})  # a mutation we cannot prove harmless
        self._copy_program()
        _make_out_of_place(self.graph)
        _remove_checks(self.graph)
        _remove_dead(self.graph)
        if self.source.module is not None:
            self._reraise_module_calls()
        self._lower_ops()
        _remove_dead(self.graph)
        return self._graph_module()

    # ------------------------------------------------------------------ reading the program

    def _copy_program(self) -> None:
        """A private copy of the program's graph with its state as ``get_attr`` nodes and its
        user outputs as the output, in the structure the model returns."""
        specs = {spec.arg.name: spec for spec in self.program.graph_signature.input_specs}
        placeholders = list(self.program.graph.find_nodes(op="placeholder"))
        env: dict[fx.Node, fx.Node] = {}
        # user inputs first (the forward's signature), then the state they are computed with
        for node in sorted(placeholders, key=lambda n: specs[n.name].kind.name != "USER_INPUT"):
            env[node] = self._input(node, specs[node.name])
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                self._output(node, env)
            else:
                env[node] = self.graph.node_copy(node, lambda n: env[n])

    def _input(self, node: fx.Node, spec: Any) -> fx.Node:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            new = self.graph.placeholder(node.name)
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            self.tensors[spec.target] = self._state(spec.target, kind)
            new = self.graph.get_attr(spec.target)
        else:
            raise UnsupportedModelError(f"the exported program takes a {kind} input ('{node.name}'); fxmerge "
                                        "captures programs whose inputs are tensors, parameters and buffers")
        new.meta = dict(node.meta)
        return new

    def _state(self, target: str, kind: str) -> torch.Tensor:
        """The private tensor behind a lifted parameter, buffer or constant: the private
        module's own (so a re-raised module and a get_attr share it), else a copy of the
        program's (an ExportedProgram given directly is never changed)."""
        if self.source.module is not None and kind != "CONSTANT_TENSOR":
            value = self.own_state().get(target)
            if value is not None:
                return value
        table = self.program.constants if kind == "CONSTANT_TENSOR" else self.program.state_dict
        value = table[target]
        if self.source.module is not None:
            return value
        return nn.Parameter(value.detach().clone(), value.requires_grad) if isinstance(value, nn.Parameter) \
            else value.detach().clone()

    def own_state(self) -> dict[str, torch.Tensor]:
        """The private module's registered parameters and buffers by every name they have
        (export may have replaced plain tensor attributes with its own fake ones)."""
        if self._own_state is None:
            module = self.source.module
            self._own_state = {**dict(module.named_parameters(remove_duplicate=False)),
                               **dict(module.named_buffers(remove_duplicate=False))}
        return self._own_state

    def _output(self, node: fx.Node, env: dict[fx.Node, fx.Node]) -> None:
        signature = self.program.graph_signature
        values = list(node.args[0])
        user = []
        for spec, value in zip(signature.output_specs, values):
            if spec.kind.name != "USER_OUTPUT":
                raise UnsupportedModelError(
                    f"the model's forward mutates state ({spec.kind.name.lower()} '{spec.target}'); fxmerge captures "
                    "pure forward passes in eval mode")
            user.append(env[value] if isinstance(value, fx.Node) else value)
        self.output_spec = self.program.call_spec.out_spec
        structure = pytree.tree_unflatten(user, self.output_spec) if self.output_spec is not None else tuple(user)
        if not _plain_containers(self.output_spec):
            raise UnsupportedModelError(
                f"the model returns {self.output_spec.type.__name__ if self.output_spec else '?'} containers; fxmerge "
                "captures models returning tensors in tuples, lists and dicts")
        self.graph.output(structure)

    # ------------------------------------------------------------------ module calls

    def _reraise_module_calls(self) -> None:
        """Put back, as one ``call_module`` node, every call of a module the analysis
        recognises as a unit, or that fx keeps whole (``torch.nn`` modules: pooling,
        upsampling, linear), outermost first (a parametrized conv swallows its
        parametrization's ops): the graph is then the one fx would trace, names included."""
        consumed: set[fx.Node] = set()
        recognised: dict[int, bool] = {}
        for call in _module_calls(self.graph):
            if consumed & set(call.nodes):
                continue
            module = _submodule(self.source.module, call.path)
            if module is None:
                continue
            if id(module) not in recognised:
                recognised[id(module)] = _is_unit(module) or _FX_TRACER.is_leaf_module(module, call.path)
            if recognised[id(module)] and self._reraise(call, module):
                consumed.update(call.nodes)

    def _reraise(self, call: "_ModuleCall", module: nn.Module) -> bool:
        members = set(call.nodes)
        own = {id(t) for t in list(module.parameters()) + list(module.buffers())}
        data, state = [], []
        for node in call.nodes:
            for arg in node.all_input_nodes:
                if arg in members:
                    continue
                if arg.op == "get_attr" and id(self.tensors.get(arg.target)) in own:
                    state.append(arg)
                elif arg not in data:
                    data.append(arg)
        leaving = [n for n in call.nodes if any(u not in members for u in n.users)]
        if len(data) != 1 or len(leaving) != 1 or not isinstance(leaving[0].meta.get("val"), torch.Tensor):
            return False  # not a one-tensor-in, one-tensor-out call: leave its ops as they are
        path = self.paths.get(id(module), call.path)  # a shared module is named where fx names it: first path
        if path in self.modules and self.modules[path] is not module:
            return False
        out = leaving[0]
        with self.graph.inserting_before(out):
            new = self.graph.call_module(path, (data[0],))
        new.meta = {"val": out.meta["val"], "nn_module_stack": call.stack, "stack_trace": out.meta.get("stack_trace")}
        out.replace_all_uses_with(new)
        for node in reversed(call.nodes):
            self.graph.erase_node(node)
        self.modules[path] = module
        return True

    # ------------------------------------------------------------------ single ops

    def _lower_ops(self) -> None:
        _replace_activation_patterns(self.graph)
        for node in list(self.graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            lower = _LOWERINGS.get(node.target.overloadpacket)
            new = lower(self, node) if lower is not None else _lower_activation(self.graph, node)
            if new is not None and new is not node:
                new.meta = {k: node.meta[k] for k in ("val", *_KEPT_META) if k in node.meta}
                node.replace_all_uses_with(new)
                self.graph.erase_node(node)
        for node in self.graph.nodes:
            if node.op == "call_function" and "conv" in str(node.target) and \
                    isinstance(node.target, torch._ops.OpOverload):
                raise UnsupportedModelError(f"could not lower '{node.name}' ({node.target}) to a torch convolution")

    def free_owner(self, target: str, field_names: Sequence[str], users_of: fx.Node) -> str | None:
        """The module path that owns ``target`` (``a.b.weight`` -> ``a.b``) if a module made
        for ``users_of`` may live there: no other module sits on or around that path and no
        other live get_attr reads a tensor under it."""
        owner, _, field_name = target.rpartition(".")
        if not owner or field_name not in field_names:
            return None
        for path in self.modules:
            if path == owner or path.startswith(owner + ".") or owner.startswith(path + "."):
                return None
        for node in self.graph.find_nodes(op="get_attr"):
            if node.target.startswith(owner + ".") and node.users and (
                    node.target.rpartition(".")[2] not in field_names or any(u is not users_of for u in node.users)):
                return None
        return owner

    def new_module(self, before: fx.Node, path: str, module: nn.Module, arg: fx.Node) -> fx.Node:
        self.modules[path] = module
        with self.graph.inserting_before(before):
            return self.graph.call_module(path, (arg,))

    def tensor(self, node: Any) -> torch.Tensor | None:
        return self.tensors.get(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None

    # ------------------------------------------------------------------ the result

    def _graph_module(self) -> fx.GraphModule:
        self.graph = _named_as_fx_names(self.graph)
        gm = fx.GraphModule(nn.Module(), fx.Graph(), self.source.name)
        for path in sorted(self.modules, key=lambda p: p.count(".")):
            _install(gm, path, self.modules[path])
        for node in self.graph.find_nodes(op="get_attr"):
            _install(gm, node.target, self.tensors[node.target])
        for node in self.graph.nodes:
            node.meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
        gm.graph = self.graph
        gm.graph.lint()
        gm.meta[CAPTURE_RECORD] = {"exporter": "torch.export", "strict": self.source.strict,
                                   "open_batch": any(not isinstance(n.meta["val"].shape[0], int)
                                                     for n in _user_inputs(self.program) if n.meta["val"].dim()),
                                   "modules": len(self.modules)}
        gm.recompile()
        return gm.eval()


# --------------------------------------------------------------------------- in-place ops


def _make_out_of_place(graph: fx.Graph, dry_run: bool = False) -> bool:
    """Replace each in-place ATen op (``relu_``, ``add_``) by its out-of-place twin where
    that computes the same: the mutated tensor is a fresh one of this graph (made by an
    out-of-place op, or an in-place op replaced before it) that nothing reads afterwards or
    aliases. Returns False, changing nothing, if some mutation is not of that kind (the caller
    then functionalizes the whole program)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    twins: dict[fx.Node, torch._ops.OpOverload] = {}
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        written = [i for i, a in enumerate(node.target._schema.arguments) if a.alias_info is not None
                   and a.alias_info.is_write]
        if not written:
            continue
        twin = _functional_twin(node.target)
        if written != [0] or twin is None or not _private_and_dead_after(node.args[0], node, order, twins):
            return False
        twins[node] = twin
    if not dry_run:
        for node, twin in twins.items():
            node.target = twin
    return True


def _functional_twin(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    name = op.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    if twin is None or len(twin._schema.arguments) != len(op._schema.arguments):
        return None
    return twin


def _returns_fresh(node: fx.Node, replaced: dict) -> bool:
    """``node`` computes a new tensor (not a view or alias of one of its inputs), counting the
    in-place ops already found replaceable as the out-of-place ops they become."""
    if node.op != "call_function":
        return False
    if node in replaced:
        return True
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _returns_fresh(node.args[0], replaced)
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    return all(r.alias_info is None for r in node.target._schema.returns)


def _private_and_dead_after(value: Any, mutation: fx.Node, order: dict[fx.Node, int], replaced: dict) -> bool:
    if not isinstance(value, fx.Node) or not _returns_fresh(value, replaced):
        return False
    for user in value.users:
        if user is mutation:
            continue
        if order[user] > order[mutation] or not _returns_fresh(user, replaced):
            return False
    return True


# --------------------------------------------------------------------------- checks export leaves behind


def _is_check(node: fx.Node) -> bool:
    """Asserts and range constraints (``_assert_scalar``, ``_assert_tensor_metadata``,
    ``sym_constrain_range``, ``torch._assert``): they compute nothing the model returns."""
    if node.op != "call_function":
        return False
    if node.target is torch._assert:
        return True
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
    return name.startswith(("_assert", "_functional_assert", "sym_constrain_range", "_functional_sym_constrain"))


def _remove_dead(graph: fx.Graph) -> None:
    """Erase nodes nothing uses (shape reads that fed asserts, unused state, BatchNorm's saved
    statistics): a dead use would count as a consumer. Calls of our modules are pure."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output"):
            continue
        if node.op in ("get_attr", "call_module") or not node.is_impure():
            graph.erase_node(node)


_SHAPE_READS = ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset")


def _remove_checks(graph: fx.Graph) -> None:
    """Erase asserts; shape reads whose value export fixed become that value."""
    for node in list(graph.nodes):
        if _is_check(node):
            graph.erase_node(node)
        elif node.op == "call_function" and getattr(getattr(node.target, "overloadpacket", None), "__name__", "") \
                in _SHAPE_READS and isinstance(node.meta.get("val"), int):
            value = node.meta["val"]
            for user in list(node.users):
                user.replace_input_with(node, value)
            graph.erase_node(node)


# --------------------------------------------------------------------------- module calls


@dataclass
class _ModuleCall:
    """The nodes one call of a module produced (export's ``nn_module_stack`` names each call:
    ``L__self__act@1`` is the second call of ``act``)."""

    key: str
    path: str
    depth: int
    nodes: list
    stack: dict


def _module_calls(graph: fx.Graph) -> list[_ModuleCall]:
    """Every module call, outermost first, then in graph order."""
    calls: dict[str, _ModuleCall] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack:
            continue
        entries = list(stack.items())
        for depth, (key, (path, _)) in enumerate(entries):
            if not path:
                continue
            if key not in calls:
                calls[key] = _ModuleCall(key, path, depth, [], dict(entries[: depth + 1]))
            calls[key].nodes.append(node)
    return sorted(calls.values(), key=lambda c: c.depth)  # stable: graph order within a depth


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


_FX_TRACER = fx.Tracer()  # only asked which modules fx keeps whole


def _is_unit(module: nn.Module) -> bool:
    """Whether the analysis recognises ``module(x)`` as one conv, BatchNorm, activation,
    identity-in-eval op or zero pad — asked of the analysis's own recognisers, so the
    lowering follows whatever they accept (registry changes included)."""
    holder = nn.Module()
    holder.add_module("m", module)
    graph = fx.Graph()
    node = graph.call_module("m", (graph.placeholder("x"),))
    call, why = patterns.conv_call(holder, node)
    return (call is not None or why is not None or patterns.batchnorm_call(holder, node) is not None
            or patterns.activation_kind(holder, node) is not None or patterns.is_transparent(holder, node)
            or any(patterns.zero_pad(holder, node, ndim) is not None for ndim in (1, 2, 3)))


# --------------------------------------------------------------------------- op lowerings


def _normalized(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in; the first is ``input``
    whatever the schema calls it (``self`` for most ops)."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        name = "input" if i == 0 else arg.name
        if i < len(node.args):
            out[name] = node.args[i]
        elif arg.name in node.kwargs:
            out[name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[name] = arg.default_value
    return out


def _spatial(value: Any, ndim: int) -> tuple:
    value = [value] if isinstance(value, int) else list(value)
    return tuple(value * ndim if len(value) == 1 else value)


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN_MODULES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _lower_conv(lowering: _Lowering, node: fx.Node) -> fx.Node | None:
    """``aten.conv*d`` / ``aten.convolution``: an ``nn.ConvNd`` holding the same Parameters
    at the weight's owner path, or ``F.conv*d`` on the same nodes (computed weights, shared
    paths): no ATen convolution is left for the analysis to refuse."""
    args = _normalized(node)
    x, weight, bias = args["input"], args["weight"], args.get("bias")
    ndim = _rank(weight) - 2
    if any(isinstance(v, fx.Node) for k, v in args.items() if k not in ("input", "weight", "bias")):
        return None
    stride, dilation = _spatial(args.get("stride", 1), ndim), _spatial(args.get("dilation", 1), ndim)
    padding = args.get("padding", 0)
    padding = padding if isinstance(padding, str) else _spatial(padding, ndim)
    groups = int(args.get("groups", 1))
    if args.get("transposed", False) or "conv_transpose" in node.target.overloadpacket.__name__:
        out_pad = _spatial(args.get("output_padding", 0), ndim)
        with lowering.graph.inserting_before(node):
            return lowering.graph.call_function(_CONV_TRANSPOSE_FUNCTIONS[ndim], (x, weight, bias, stride, padding,
                                                                                  out_pad, groups, dilation))
    module = _conv_module(lowering, node, weight, bias, stride, padding, dilation, groups, ndim)
    if module is not None:
        return lowering.new_module(node, module[0], module[1], x)
    with lowering.graph.inserting_before(node):
        return lowering.graph.call_function(_CONV_FUNCTIONS[ndim], (x, weight, bias, stride, padding, dilation, groups))


def _conv_module(lowering: _Lowering, node: fx.Node, weight: Any, bias: Any, stride: tuple, padding: Any,
                 dilation: tuple, groups: int, ndim: int) -> tuple[str, nn.Module] | None:
    w, b = lowering.tensor(weight), lowering.tensor(bias)
    if not isinstance(w, nn.Parameter) or (bias is not None and not isinstance(b, nn.Parameter)):
        return None
    owner = lowering.free_owner(weight.target, ("weight", "bias"), node)
    if owner is None or (bias is not None and bias.target != owner + ".bias"):
        return None
    conv = _CONV_MODULES[ndim](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding, dilation,
                               groups, bias=bias is not None, device="meta")
    conv.weight, conv.bias = w, b
    return owner, conv


def _lower_batch_norm(lowering: _Lowering, node: fx.Node) -> fx.Node | None:
    """``aten.batch_norm`` (eval) and ``_native_batch_norm_legit_no_training`` (whose output
    is read through ``getitem(..., 0)``): an ``nn.BatchNormNd`` holding the same tensors at
    the statistics' owner path, else ``F.batch_norm``."""
    args = _normalized(node)
    if args.get("training", False) or not all(isinstance(args.get(k), fx.Node) for k in ("running_mean",
                                                                                           "running_var")):
        return None
    target = node
    if node.target.overloadpacket is aten._native_batch_norm_legit_no_training:
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return None
        target = users[0]
    x = args["input"]
    new = _batch_norm_module(lowering, node, target, args)
    if new is None:
        with lowering.graph.inserting_before(target):
            new = lowering.graph.call_function(F.batch_norm, (x, args["running_mean"], args["running_var"],
                                                              args.get("weight"), args.get("bias"), False,
                                                              args["momentum"], args["eps"]))
    if target is not node:  # the getitem goes, then the tuple-valued node
        new.meta = {k: target.meta[k] for k in ("val", *_KEPT_META) if k in target.meta}
        target.replace_all_uses_with(new)
        lowering.graph.erase_node(target)
    return new


def _batch_norm_module(lowering: _Lowering, node: fx.Node, before: fx.Node, args: dict) -> fx.Node | None:
    mean, var = args["running_mean"], args["running_var"]
    weight, bias = args.get("weight"), args.get("bias")
    w, b = lowering.tensor(weight), lowering.tensor(bias)
    if (weight is None) != (bias is None) or (weight is not None and not (isinstance(w, nn.Parameter)
                                                                          and isinstance(b, nn.Parameter))):
        return None
    if mean.op != "get_attr" or var.op != "get_attr":
        return None
    names = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")
    owner = lowering.free_owner(mean.target, names, node)
    expected = {"running_var": var, "weight": weight, "bias": bias}
    if owner is None or any(v is not None and v.target != f"{owner}.{k}" for k, v in expected.items()):
        return None
    rank = _rank(args["input"])
    if rank not in _BN_MODULES:
        return None
    momentum = args["momentum"]
    bn = _BN_MODULES[rank](lowering.tensors[mean.target].numel(), eps=float(args["eps"]), momentum=momentum,
                           affine=weight is not None, device="meta")
    bn.weight, bn.bias = w, b
    bn.running_mean, bn.running_var = lowering.tensors[mean.target], lowering.tensors[var.target]
    tracked = lowering.tensors.get(f"{owner}.num_batches_tracked")
    bn.num_batches_tracked = tracked if tracked is not None else torch.tensor(0, dtype=torch.long)
    return lowering.new_module(before, owner, bn, args["input"])


def _rank(node: Any) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return val.dim()
    raise UnsupportedModelError(f"cannot tell the rank of '{node}' in the exported graph")


def _lower_add(lowering: _Lowering, node: fx.Node) -> fx.Node | None:
    """``aten.add.Tensor(a, b)`` without alpha: ``a + b`` (what residual recognition reads)."""
    if node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    with lowering.graph.inserting_before(node):
        return lowering.graph.call_function(operator.add, tuple(node.args))


def _lower_pad(lowering: _Lowering, node: fx.Node) -> fx.Node | None:
    """``aten.pad`` / ``aten.constant_pad_nd``: ``F.pad`` (a zero one is what merging moves)."""
    args = _normalized(node)
    amounts = args["pad"]
    if isinstance(amounts, fx.Node) or any(isinstance(p, fx.Node) for p in amounts):
        return None
    mode, value = args.get("mode", "constant"), args.get("value")
    kwargs = {}
    if mode != "constant":
        kwargs["mode"] = mode
    if value not in (None, 0, 0.0):
        kwargs["value"] = value
    with lowering.graph.inserting_before(node):
        return lowering.graph.call_function(F.pad, (args["input"], tuple(int(p) for p in amounts)), kwargs)


def _lower_dropout(lowering: _Lowering, node: fx.Node) -> fx.Node | None:
    """``aten.dropout``: ``F.dropout`` with the same ``training`` (False in eval: the analysis
    sees through it)."""
    args = _normalized(node)
    with lowering.graph.inserting_before(node):
        return lowering.graph.call_function(F.dropout, (args["input"],), {"p": args["p"], "training": args["train"]})


def _lower_prelu(lowering: _Lowering, node: fx.Node) -> fx.Node | None:
    """``aten.prelu`` on a parameter (an ExportedProgram's PReLU): an ``nn.PReLU`` holding it,
    the one registered activation with a weight (its function form would be a consumer of
    the weight, not an activation)."""
    x, weight = node.args[0], node.args[1]
    w = lowering.tensor(weight)
    owner = lowering.free_owner(weight.target, ("weight",), node) if isinstance(w, nn.Parameter) else None
    if owner is None:
        return None
    prelu = nn.PReLU(w.numel(), device="meta")
    prelu.weight = w
    return lowering.new_module(node, owner, prelu, x)


def _lower_shape_read(lowering: _Lowering, node: fx.Node) -> fx.Node | None:
    """A size export left open (the batch): ``x.size(0)``, the value-free read fx records."""
    method = {aten.sym_size: "size", aten.sym_numel: "numel", aten.sym_stride: "stride"}[node.target.overloadpacket]
    with lowering.graph.inserting_before(node):
        return lowering.graph.call_method(method, tuple(node.args))


_LOWERINGS: dict[Any, Callable[[_Lowering, fx.Node], fx.Node | None]] = {
    **{p: _lower_conv for p in (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution,
                                aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)},
    aten.batch_norm: _lower_batch_norm,
    aten._native_batch_norm_legit_no_training: _lower_batch_norm,
    aten.add: _lower_add,
    aten.pad: _lower_pad,
    aten.constant_pad_nd: _lower_pad,
    aten.dropout: _lower_dropout,
    aten.prelu: _lower_prelu,
    **{p: _lower_shape_read for p in (aten.sym_size, aten.sym_numel, aten.sym_stride)},
}


# --------------------------------------------------------------------------- activations from the registry


@dataclass(frozen=True)
class _Form:
    """One registered way of writing an activation and the single ATen call it exports to."""

    kind: str
    call: Callable | str  # a function, or a Tensor method's name
    op: torch._ops.OpOverload
    args: tuple  # the ATen call's other arguments, by schema name, defaults filled in
    is_module: bool


@dataclass
class _Forms:
    """What the registry's activations export to: single ATen calls by op, and multi-op
    patterns (timm's ``swish``: ``x * sigmoid(x)``) for functions."""

    by_op: dict
    patterns: list  # (function, fx.Graph), longest first
    resolved: dict  # (op, args) -> (callable, kwargs) or None


_FORMS_CACHE: dict[tuple, _Forms] = {}


def _registry_key() -> tuple:
    return tuple((k.name, k.modules, k.functions, k.methods) for k in patterns.registered_activations().values())


def _activation_forms() -> _Forms:
    """The registry traced once per registry state: every function, method and
    (default-constructible) module form of every kind, at the level ``torch.export`` records
    (pre-dispatch ATen)."""
    key = _registry_key()
    if key not in _FORMS_CACHE:
        forms = _Forms({}, [], {})
        for kind in patterns.registered_activations().values():
            for form, fn, is_module in _written_forms(kind):
                graph = _probe(fn)
                if graph is not None:
                    _record(forms, kind.name, form, graph, is_module)
        forms.patterns.sort(key=lambda p: -len(p[1].nodes))
        _FORMS_CACHE.clear()
        _FORMS_CACHE[key] = forms
    return _FORMS_CACHE[key]


def _written_forms(kind: Any) -> Iterator[tuple[Any, Callable, bool]]:
    for function in kind.functions:
        yield function, (lambda t, f=function: f(t)), False
    for method in kind.methods:
        yield method, (lambda t, m=method: getattr(t, m)()), False
    for module_type in kind.modules:
        try:
            module = module_type()
        except Exception:  # needs constructor arguments: only its module calls are re-raised
            continue
        if not any(True for _ in module.parameters()):
            yield module_type, module, True


def _probe(fn: Callable, **kwargs: Any) -> fx.Graph | None:
    """The pre-dispatch ATen graph of ``fn(t, **kwargs)`` on a small tensor, or None."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_fx(lambda t: fn(t, **kwargs), pre_dispatch=True)(torch.randn(2, 3, 4, 4)).graph
    except Exception:  # a form that does not run on a plain tensor is simply not recorded
        return None


def _ops_of(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output")]


def _record(forms: _Forms, kind: str, form: Any, graph: fx.Graph, is_module: bool) -> None:
    ops = _ops_of(graph)
    if not ops or any(n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) for n in ops):
        return  # get_attr (a parameter) or python calls: not a pure function of its input
    if len(ops) == 1:
        node = ops[0]
        x = next(iter(graph.find_nodes(op="placeholder")))
        args = _call_args(node)
        if node.args and node.args[0] is x and args is not None:
            forms.by_op.setdefault(node.target, []).append(_Form(kind, form, node.target, args, is_module))
    elif not is_module and callable(form):
        _make_out_of_place(graph)
        forms.patterns.append((form, graph))


def _call_args(node: fx.Node) -> tuple | None:
    """The arguments after the input, by schema name (hashable), or None if one is a node."""
    items = []
    for name, value in list(_normalized(node).items())[1:]:
        if isinstance(value, fx.Node) or (isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node)
                                                                                   for v in value)):
            return None
        items.append((name, tuple(value) if isinstance(value, list) else value))
    return tuple(items)


def _lower_activation(graph: fx.Graph, node: fx.Node) -> fx.Node | None:
    """A registered activation's ATen call, written as the registered function or method
    that exports to exactly that call."""
    forms = _activation_forms()
    if node.target not in forms.by_op or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    args = _call_args(node)
    if args is None:
        return None
    key = (node.target, args)
    if key not in forms.resolved:
        forms.resolved[key] = _resolve(forms, node.target, args)
    found = forms.resolved[key]
    if found is None:
        return None
    call, kwargs = found
    with graph.inserting_before(node):
        if isinstance(call, str):
            return graph.call_method(call, (node.args[0],))
        return graph.call_function(call, (node.args[0],), dict(kwargs))


def _resolve(forms: _Forms, op: torch._ops.OpOverload, args: tuple) -> tuple[Any, tuple] | None:
    """The form to write ``op(x, *args)`` in: a form exporting to exactly this call (a module
    form stands for its kind's plain function); else a function whose keyword parameters
    named as the differing schema arguments reproduce it (checked by tracing it)."""
    candidates = forms.by_op[op]
    for form in candidates:
        if form.args == args:
            if not form.is_module:
                return form.call, ()
            plain = _plain_form(forms, form.kind)
            if plain is not None:
                return plain, ()
    for form in candidates:
        if form.is_module or isinstance(form.call, str):
            continue
        differing = {name: value for (name, value), (_, default) in zip(args, form.args) if value != default}
        kwargs = tuple(sorted(differing.items()))
        graph = _probe(form.call, **dict(kwargs))
        ops = _ops_of(graph) if graph is not None else []
        if len(ops) == 1 and ops[0].target is op and _call_args(ops[0]) == args:
            return form.call, kwargs
    return None


def _plain_form(forms: _Forms, kind: str) -> Any:
    """A kind's function or method that traces to a single call with its own defaults."""
    for group in forms.by_op.values():
        for form in group:
            if form.kind == kind and not form.is_module:
                return form.call
    return None


def _replace_activation_patterns(graph: fx.Graph) -> None:
    """Multi-op activation functions (timm's ``swish``, ``hard_sigmoid``, ...) found as the
    exact ATen subgraph they export to become one call of the function."""
    from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

    for function, pattern in _activation_forms().patterns:
        matcher = SubgraphMatcher(pattern, match_output=False, match_placeholder=False,
                                  remove_overlapping_matches=True)
        for match in matcher.match(graph):
            if len(match.placeholder_nodes) != 1 or len(match.returning_nodes) != 1:
                continue
            if any(n._erased for n in match.nodes_map.values()):
                continue
            out = match.returning_nodes[0]
            with graph.inserting_before(out):
                new = graph.call_function(function, (match.placeholder_nodes[0],))
            new.meta = {k: out.meta[k] for k in ("val", *_KEPT_META) if k in out.meta}
            out.replace_all_uses_with(new)
            internal = [match.nodes_map[p] for p in _ops_of(pattern)]
            for node in reversed(sorted(internal, key=_graph_order(graph))):
                graph.erase_node(node)


def _graph_order(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


# --------------------------------------------------------------------------- assembling and checking


def _named_as_fx_names(graph: fx.Graph) -> fx.Graph:
    """The graph with every node renamed, in graph order, the way ``torch.fx`` names what it
    traces (``features_0_0`` for a module call, ``relu_1`` for the second ``relu``, ATen ops
    by their name without overload): names no longer depend on the export's own numbering,
    and a model fx can trace gets the node names fx gives it, which plans record."""
    new, env = fx.Graph(), {}
    for node in graph.nodes:
        if node.op == "output":
            new.output(fx.node.map_arg(node.args[0], env.__getitem__))
            continue
        name = node.name if node.op == "placeholder" else None
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            name = node.target.overloadpacket.__name__
        env[node] = new.create_node(node.op, node.target, fx.node.map_arg(node.args, env.__getitem__),
                                    fx.node.map_arg(node.kwargs, env.__getitem__), name=name)
        env[node].meta = node.meta
    return new



def _install(root: nn.Module, target: str, obj: Any) -> None:
    """Place a module or tensor at a dotted path, creating plain containers on the way (as fx
    does); a path already holding this very object is left as it is."""
    *prefix, name = target.split(".")
    parent = root
    for part in prefix:
        child = getattr(parent, part, None)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        if not isinstance(child, nn.Module):
            raise UnsupportedModelError(f"cannot place '{target}': '{part}' is not a module")
        parent = child
    existing = getattr(parent, name, None)
    if existing is obj:
        return
    if existing is not None and not (name in parent._buffers or name in parent._parameters):
        raise UnsupportedModelError(f"cannot place '{target}': the path already holds another object")
    if isinstance(obj, nn.Module):
        parent.add_module(name, obj)
    elif isinstance(obj, nn.Parameter):
        parent.register_parameter(name, obj)
    else:
        parent.register_buffer(name, obj)


def _plain_containers(spec: pytree.TreeSpec | None) -> bool:
    if spec is None or spec.is_leaf():
        return True
    return spec.type in (tuple, list, dict, type(None)) and all(_plain_containers(c) for c in spec.children())


def _check_same(gm: fx.GraphModule, source: _Source) -> None:
    """The lowered graph computes what the model does on the example inputs (same output
    structure, values within float rounding)."""
    with torch.no_grad():
        got = gm(*source.inputs)
    want_leaves, want_spec = pytree.tree_flatten(source.reference)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if got_spec != want_spec:
        raise TraceFailedError(f"the captured graph returns {got_spec}, the model {want_spec}; please report this")
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        if isinstance(w, torch.Tensor):
            same = isinstance(g, torch.Tensor) and g.shape == w.shape and g.dtype == w.dtype
            if same and w.is_floating_point() and w.numel():
                scale = w.abs().max().clamp_min(1e-30)
                err = float((g - w).abs().max() / scale)
                same = err <= _MAX_REL_ERROR.get(w.dtype, 1e-4) or bool(torch.isnan(w).any())
            elif same:
                same = bool((g == w).all())
        else:
            same = g == w
        if not same:
            raise TraceFailedError(f"the captured graph differs from the model at output {i} on the example inputs; "
                                   "please report this (capture(..., check=False) skips this check)")
