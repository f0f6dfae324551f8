"""Layers import downward only, read off the source: every `import` statement of the `deepencoder` package (function
level included; `if TYPE_CHECKING:` blocks excluded) makes an edge of the module graph. The graph has no cycle;
the model layer imports nothing from conversion / pipeline / training / integrations, lazily or not (its files are
what `save_pretrained` copies beside a checkpoint for `trust_remote_code` loading); conversion imports nothing above
it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deepencoder"
MODEL_LAYER = ("configuration_", "modeling_", "image_processing_", "layout", "attention", "freezing", "dtypes")
ABOVE_MODEL = ("conversion", "pipeline", "training", "integrations")
ABOVE_CONVERSION = ("pipeline", "training", "integrations", "cli", "export")


def module_names() -> dict[str, Path]:
    """Dotted name -> source file; folders without `__init__.py` (namespace packages) map to the folder."""
    modules = {
        ".".join(("deepencoder", *path.relative_to(PACKAGE).parts)): path
        for path in PACKAGE.rglob("*")
        if path.is_dir() and path.name != "__pycache__"
    }
    for path in PACKAGE.rglob("*.py"):
        parts = ("deepencoder", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class Imports(ast.NodeVisitor):
    """(imported module, enclosing function names) for every import statement outside `if TYPE_CHECKING:`."""

    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.scope: list[str] = []
        self.found: list[tuple[str, tuple[str, ...]]] = []

    def resolve(self, name: str) -> str | None:
        """The deepest module of the package that `name` (dotted) denotes, or None outside the package."""
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def add(self, name: str) -> None:
        target = self.resolve(name)
        if target is not None:
            self.found.append((target, tuple(self.scope)))

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:  # `from . import clip` imports the submodule
            self.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in self.modules else module)


def import_graph() -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        if path.is_dir():
            continue
        visitor = Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[name] = [(target, scope) for target, scope in visitor.found if target != name]
    return graph


def find_cycle(graph: dict[str, list[tuple[str, tuple[str, ...]]]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for target, _scope in graph.get(node, []):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_walker_sees_function_level_and_relative_imports():
    """The graph shows known edges: a function-level import (the pipeline's Ray engine, imported in `run_ray`), and
    the package's relative imports; the cycle finder finds a cycle closed by a function-level edge."""
    graph = import_graph()
    assert ("deepencoder.pipeline.ray", ("run_ray",)) in graph["deepencoder.pipeline.cli"]
    assert any(t == "deepencoder.conversion.registry" for t, _ in graph["deepencoder.conversion.detect"])
    assert find_cycle({"a": [("b", ())], "b": [("c", ("f",))], "c": [("a", ())]}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    """No cycle, lazy (function-level) imports counted."""
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_model_layer_imports_nothing_above_it():
    offending = [
        f"{module} imports {target}" + (f" in {'.'.join(scope)}" if scope else "")
        for module, imports in import_graph().items()
        if layer(module).startswith(MODEL_LAYER)
        for target, scope in imports
        if layer(target) in ABOVE_MODEL
    ]
    assert not offending, offending


def test_conversion_imports_nothing_above_it():
    offending = [
        f"{module} imports {target}"
        for module, imports in import_graph().items()
        if layer(module) == "conversion"
        for target, _ in imports
        if layer(target) in ABOVE_CONVERSION
    ]
    assert not offending, offending


def test_model_layer_files_import_each_other_flat():
    """What transformers copies for `trust_remote_code` (`custom_object_save`: a class's file and, recursively, the
    files its `from .x import` lines name) stays in the model layer, each a sibling file: no `from ..x`, no
    `from .package.x`, no absolute `deepencoder` import (the copies live in transformers' dynamic-module folder,
    without this package)."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    roots = ("configuration_deepencoder", "configuration_deepencoder_v2", "modeling_deepencoder")
    roots += ("modeling_deepencoder_v2", "image_processing_deepencoder")
    copied = set(roots)
    for root in roots:
        copied |= {Path(f).stem for f in get_relative_import_files(PACKAGE / f"{root}.py")}
    assert all(name.startswith(MODEL_LAYER) and (PACKAGE / f"{name}.py").is_file() for name in copied), copied
    for name in copied:
        source = PACKAGE / f"{name}.py"
        assert "deepencoder" not in get_imports(source), name
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module and "." not in node.module, (name, node.module)
                assert (PACKAGE / f"{node.module}.py").is_file(), (name, node.module)
