"""The module graph holds its layering (ARCHITECTURE.md), and global registries restore all of
their state."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxmerge
from fxmerge.passes import activations

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fxmerge": ROOT / "fxmerge", "fxmerge.passes": ROOT / "passes"}


def _project_modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``path``;
    imports under ``if TYPE_CHECKING:`` are for type checkers only and left out."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def resolve(target: str) -> str | None:
        parts = target.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        return ".".join(parts) or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                targets = [resolve(f"{base}.{a.name}") or base for a in child.names]
            else:
                targets = []
            found.extend((t, child.lineno, in_function) for t in map(resolve, targets) if t and t != name)
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def _is_command_line(name: str) -> bool:
    return name.startswith("fxmerge.cli") or name == "fxmerge.__main__"


def test_no_import_cycle_and_no_project_import_inside_a_function():
    modules = _project_modules()
    graph, lazy = {}, []
    for name, path in modules.items():
        edges = _imports(name, path, set(modules))
        graph[name] = {t for t, _, _ in edges if t not in PACKAGES}  # package roots re-export: not a layer
        lazy += [f"{path.relative_to(ROOT)}:{line} imports {t}" for t, line, inside in edges
                 if inside and not _is_command_line(name)]
    assert not lazy, "project modules imported inside functions:\n" + "\n".join(lazy)
    cycles = _cycles({n: e for n, e in graph.items() if n not in PACKAGES})
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_the_checker_sees_a_cycle_and_a_lazy_import(tmp_path):
    """The layering check would fail if the layering broke: on a cycle and on a lazy import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    module = tmp_path / "lazy.py"
    module.write_text("import fxmerge.records\n\ndef f():\n    from fxmerge import plans\n")
    found = _imports("fxmerge.lazy", module, {"fxmerge.records", "fxmerge.plans", "fxmerge"})
    assert ("fxmerge.records", 1, False) in found and ("fxmerge.plans", 4, True) in found


def test_the_command_line_answers_help_without_torch():
    code = ("import sys; from fxmerge.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_timm_activation_first_seen_inside_a_scope_is_known_after_it():
    timm = pytest.importorskip("timm")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.activations.Swish(), nn.Conv2d(4, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    fresh = activations.ActivationRegistry(activations._builtin_kinds()).snapshot()  # timm not yet registered
    with activations.activation_registry() as registry:
        registry.restore(fresh)
        with fxmerge.activation_registry():
            assert fxmerge.analyze(model, (x,)).chains[0].droppable == [1]  # timm's kinds learnt in here
        assert fxmerge.analyze(model, (x,)).chains[0].droppable == [1]  # ... and still known after


def test_backend_registry_restores_what_a_scope_registered():
    class Other(fxmerge.Backend):
        name = "other"

    before = dict(fxmerge.BACKENDS)
    with fxmerge.backend_registry():
        fxmerge.register_backend(Other())
        assert "other" in fxmerge.BACKENDS
    assert dict(fxmerge.BACKENDS) == before


def test_a_second_checkout_imports_its_own_passes(tmp_path):
    """fxmerge imported from another checkout (PYTHONPATH) loads that checkout's passes/, not
    the editable install's (whose finder answers for fxmerge.passes first)."""
    for folder in ("fxmerge", "passes"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import fxmerge.passes.dp as d; print(d.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path.parent, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "passes" / "dp.py")
