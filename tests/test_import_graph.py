"""Imports point one way: no cycle among minidiff.* and weights_conversion.*, read with `ast` (no import runs).

Every `import` / `from ... import` in every .py file of the two packages counts, at module level
and inside functions; relative imports are resolved, and `from . import X` where X is a submodule
counts as importing that submodule. A package's `__init__` running before its submodules is Python's
doing, not an import a reader follows, so it is not an edge. Also refused: importlib.import_module /
__import__ of a project module (or of a name computed at run time), and a project import inside a
function body (optional heavy dependencies such as safetensors or huggingface_hub may be imported
there; they are not project modules).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("minidiff", "weights_conversion")
# project imports allowed inside a function body: (importing module, imported module)
FUNCTION_IMPORTS_ALLOWED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported project module
    line: int
    in_function: bool


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _module_of(name: str) -> str:
    """The project module a dotted name lives in: itself, or its longest prefix that is a module."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    if not parts:
        raise AssertionError(f"{name} names no module of {PACKAGES}")
    return ".".join(parts)


def _base(module: str, level: int) -> str:
    """The package a relative import of `level` dots in `module` starts from."""
    is_package = MODULES[module].name == "__init__.py"
    parts = module.split(".") if is_package else module.split(".")[:-1]
    return ".".join(parts[: len(parts) - (level - 1)])


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [_module_of(a.name) for a in node.names if _is_project(a.name)]
    source = node.module or ""
    if node.level:
        base = _base(module, node.level)
        source = f"{base}.{source}" if node.module else base
    if not _is_project(source):
        return []
    out = []
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        out.append(submodule if submodule in MODULES else _module_of(source))
    return out


def _is_dynamic_import(call: ast.Call) -> bool:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return name in ("import_module", "__import__")


def _scan(module: str) -> tuple[list[Import], list[str]]:
    """The module's project imports, and its dynamic imports of project (or computed) names."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    imports: list[Import] = []
    dynamic: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.extend(Import(module, t, node.lineno, in_function) for t in _targets(module, node))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            arg = node.args[0] if node.args else None
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not _is_project(arg.value)):
                dynamic.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return imports, dynamic


def _scan_all() -> tuple[list[Import], list[str]]:
    imports, dynamic = [], []
    for module in MODULES:
        i, d = _scan(module)
        imports += i
        dynamic += d
    return imports, dynamic


IMPORTS, DYNAMIC = _scan_all()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        # breadth-first back to `start` inside the component: a shortest cycle through it
        paths = {w: [start, w] for w in sorted(edges[start] & members)}
        queue = list(paths)
        while start not in paths:
            v = queue.pop(0)
            for w in sorted(edges[v] & members):
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        cycles.append(paths[start])
    return cycles


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        edges[imp.source].add(imp.target)
    return edges


def test_the_scan_sees_the_packages():
    assert "minidiff.modeling" in MODULES and "weights_conversion.rules" in MODULES
    assert any(i.source == "minidiff" and i.target == "minidiff.pipelines" for i in IMPORTS)
    # `from .configs import config_from_dict` inside weights_conversion resolves to the submodule
    assert any(i.source == "weights_conversion.unet_2d" and i.target == "weights_conversion.configs" for i in IMPORTS)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"a"}}) == [["a", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles among project modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_importlib_of_project_modules():
    assert not DYNAMIC, "dynamic imports of project modules:\n" + "\n".join(DYNAMIC)


def test_no_project_import_inside_a_function():
    hidden = sorted(
        {
            f"{i.source}:{i.line} imports {i.target}"
            for i in IMPORTS
            if i.in_function and (i.source, i.target) not in FUNCTION_IMPORTS_ALLOWED
        }
    )
    assert not hidden, "project imports inside functions (move them to the top):\n" + "\n".join(hidden)


def test_the_layers():
    """weights_conversion knows no minidiff module; no model file imports another model file."""
    models = {"minidiff.unet_2d", "minidiff.unet_2d_condition", "minidiff.autoencoder_kl", "minidiff.clip_text"}
    wrong = sorted(
        {
            f"{i.source}:{i.line} imports {i.target}"
            for i in IMPORTS
            if (i.source.startswith("weights_conversion") and i.target.startswith("minidiff"))
            or (i.source in models and i.target in models)
        }
    )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
