"""The package's shape: its modules import each other along the data flow, never in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import dagster_taskiq_cancel

PACKAGE = Path(dagster_taskiq_cancel.__file__).parent
NAME = PACKAGE.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module's imports of the package's modules, lazy ones (inside functions) included."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m not in (name, NAME)}
    return graph


def test_no_module_imports_itself_through_others() -> None:
    graph = _imports()
    circles: list[list[str]] = []

    def visit(module: str, path: list[str], done: set[str]) -> None:
        if module in path:
            circles.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        done.add(module)
        for imported in sorted(graph[module]):
            visit(imported, [*path, module], done)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [], done)
    assert circles == []


def test_settings_know_nothing_of_what_they_configure() -> None:
    assert _imports()[f"{NAME}.settings"] == set()


def test_only_the_cli_reaches_into_the_worker() -> None:
    """The worker builds on the package (broker, metrics, settings), never the other way."""
    worker = f"{NAME}.worker"
    reaching = {
        module: sorted(m for m in imports if m.startswith(worker))
        for module, imports in _imports().items()
        if not module.startswith(worker) and module != f"{NAME}.cli"
    }
    assert {module: found for module, found in reaching.items() if found} == {}
