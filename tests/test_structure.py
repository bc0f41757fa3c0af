"""The package's shape: every module imports, the module-level imports between `lora_sweep`
modules form no cycle, and the sweeper (`lora_sweep.sweep`) imports nothing of the app."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import lora_sweep

PACKAGE_DIR = Path(lora_sweep.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their `__init__.py`)."""
    found = {"lora_sweep": PACKAGE_DIR / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="lora_sweep."):
        relative = Path(*info.name.split(".")[1:])
        path = PACKAGE_DIR / relative / "__init__.py" if info.ispkg else PACKAGE_DIR / relative.with_suffix(".py")
        found[info.name] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: top level and inside top-level if/try/with
    blocks, not inside functions or classes, not under `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif _is_type_checking(node) or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _module_level(getattr(node, field, []))


def _names(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The dotted names an import statement loads (relative imports resolved): for
    `from a.b import c` both `a.b` and `a.b.c` (c may be a module or a name in a.b)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        parts = package.split(".")
        package = ".".join(parts[: len(parts) - node.level + 1])
        base = f"{package}.{base}" if base else package
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The `lora_sweep` modules an import statement loads."""
    return {name for name in _names(module, node) if name in MODULES}


def _anywhere(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import in the file, function-local ones too (not under `if TYPE_CHECKING:`)."""
    for node in body:
        if _is_type_checking(node):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import | ast.ImportFrom):
                yield sub


def _graph(*, local_too: bool = False) -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imports = _anywhere(tree.body) if local_too else _module_level(tree.body)
        graph[module] = set().union(*(_imported(module, n) for n in imports)) - {module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first node repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_imports() -> None:
    for module in MODULES:
        importlib.import_module(module)


def test_module_level_imports_have_no_cycle() -> None:
    graph = _graph()
    assert graph["lora_sweep.cli"] >= {"lora_sweep.job", "lora_sweep.errors"}  # the graph is read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_cycle_is_dodged_by_a_function_local_import() -> None:
    """A function-local import that closes a cycle hides it from the module-level graph."""
    cycle = _cycle(_graph(local_too=True))
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_detection_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_sweeper_imports_nothing_of_the_app() -> None:
    """`lora_sweep.sweep` is app-agnostic: no import of `lora_sweep.*` outside it, anywhere
    in its files (function-local imports included)."""
    offending = []
    for module, path in MODULES.items():
        if not _in_sweep(module):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                app = sorted(name for name in _imported(module, node) if name != "lora_sweep" and not _in_sweep(name))
                offending += [f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno} imports {name}" for name in app]
    assert not offending, "; ".join(offending)


def test_notebook_side_modules_import_without_torch() -> None:
    """A notebook reading results (`analysis`, which reads samples too; `experiments`) and the sweeper's hooks
    module need no torch: importing it costs ~0.7 s, and the dashboard machine may lack it."""
    import subprocess
    import sys

    modules = "lora_sweep.analysis, lora_sweep.experiments, lora_sweep.sweep_hooks"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _in_sweep(module: str) -> bool:
    return module == "lora_sweep.sweep" or module.startswith("lora_sweep.sweep.")
