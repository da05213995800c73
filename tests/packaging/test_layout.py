"""The package's shape: imports point one way between subpackages, with no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import proxy

ROOT = Path(proxy.__file__).parent
# Lower layers never import higher ones; packages on one layer never import each other.
LAYERS: dict[str, int] = {
    "errors": 0, "log": 0,
    "config": 1, "tls": 1, "safe_fs": 1,
    "status": 2,
    "wire": 3, "credentials": 3,
    "forwarding": 4,
    "monitor": 5,
    "app": 6,
    "cli": 7,
    "__init__": 8, "__main__": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every `proxy.*` module this file imports, relative imports resolved."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.split(".")[0] != "proxy":
                continue
            for alias in node.names:  # `from . import log` names a module, not the package
                if (ROOT.parent / (module.replace(".", "/") + f"/{alias.name}.py")).exists():
                    found.add(f"{module}.{alias.name}")
                else:
                    found.add(module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "proxy")
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_belongs_to_a_layer() -> None:
    """A new top-level module or package gets a place in the layering on purpose."""
    assert {_top(m) for m in GRAPH} <= set(LAYERS), set(map(_top, GRAPH)) - set(LAYERS)


def test_imports_between_packages_point_down() -> None:
    """No module imports a higher layer or a sibling package on its own layer."""
    wrong = []
    for module, imported in GRAPH.items():
        mine = _top(module)
        for other in imported:
            theirs = _top(other)
            upward = theirs != mine and LAYERS[theirs] >= LAYERS[mine]
            if upward or (other == "proxy" and mine != "__main__"):
                wrong.append((module, other))
    assert wrong == []


def test_there_is_no_import_cycle() -> None:
    """Modules can be read bottom-up: the import graph has no cycle."""
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 2:
            return
        assert state.get(module) != 1, " -> ".join([*trail, module])
        state[module] = 1
        for other in GRAPH.get(module, ()):
            # A package's __init__ importing its own modules is how it builds its API.
            if other.startswith(module + ".") or other not in GRAPH:
                continue
            visit(other, [*trail, module])
        state[module] = 2

    for module in GRAPH:
        visit(module, [])
