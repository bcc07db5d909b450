"""The package graph has layers (docs/architecture.md, "Layers"): this test reads every import.

Every `import`/`from … import` of the `avobuild` package is collected from the syntax tree,
function-level imports included, so an import moved into a function to hide a cycle still
counts. Two rules:

1. A component (a subpackage such as `avobuild.bundle`, or a top-level module such as
   `avobuild.run`) imports only components of a lower layer, or components of its own layer
   along an edge listed in `SAME_LAYER`.
2. The module graph has no cycle, inside a package or across packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "avobuild"

# The layers, bottom first. docs/architecture.md draws the same table.
LAYERS: dict[str, int] = {
    # 0 foundation: error families, the external-tool chokepoint, the version
    "avobuild": 0,
    "avobuild.errors": 0,
    "avobuild.run": 0,
    # 1 model: recipes, layouts, applier configuration, parsed once into frozen objects
    "avobuild.model": 1,
    # 2 formats: byte layouts and the real tools that read and write them
    "avobuild.fs": 2,
    "avobuild.disk": 2,
    "avobuild.binaries": 2,
    "avobuild.boot": 2,
    "avobuild.bundle": 2,
    "avobuild.delta": 2,
    # 3 builders and updaters: factory images, slot images, the device boot chain, the
    # applier, recovery media, installs, the update repository and its server
    "avobuild.applier": 3,
    "avobuild.device": 3,
    "avobuild.image": 3,
    "avobuild.media": 3,
    "avobuild.update": 3,
    "avobuild.fleet": 3,
    # 4 the command line
    "avobuild.cli": 4,
}

# Edges allowed inside one layer (importer -> imported). The graph they form has no cycle.
SAME_LAYER: frozenset[tuple[str, str]] = frozenset(
    {
        ("avobuild.errors", "avobuild"),
        ("avobuild.run", "avobuild.errors"),
        ("avobuild.boot", "avobuild.fs"),
        ("avobuild.boot", "avobuild.disk"),
        ("avobuild.delta", "avobuild.bundle"),
        ("avobuild.delta", "avobuild.fs"),
        ("avobuild.disk", "avobuild.fs"),
        ("avobuild.fs", "avobuild.binaries"),
        ("avobuild.device", "avobuild.applier"),
        ("avobuild.image", "avobuild.device"),
        ("avobuild.image", "avobuild.applier"),
        ("avobuild.media", "avobuild.image"),
        ("avobuild.media", "avobuild.applier"),
        ("avobuild.fleet", "avobuild.update"),
    }
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported avobuild module, line) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "avobuild":
                    yield _existing(alias.name, known), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "avobuild":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else _existing(base, known)), node.lineno


def _existing(name: str, known: set[str]) -> str:
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def _component(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for imported, line in _imports(name, path, known):
            if imported != name:
                graph[name].setdefault(imported, line)
    return graph


def test_every_component_has_a_layer() -> None:
    components = {_component(module) for module in _modules()}
    missing = sorted(components - set(LAYERS))
    assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


def test_imports_only_go_down() -> None:
    violations = []
    for module, imports in _graph().items():
        source = _component(module)
        for imported, line in imports.items():
            target = _component(imported)
            if source == target or LAYERS[target] < LAYERS[source]:
                continue
            if LAYERS[target] == LAYERS[source] and (source, target) in SAME_LAYER:
                continue
            violations.append(f"{module} (line {line}) imports {imported}")
    assert not violations, "upward or unlisted edges:\n" + "\n".join(violations)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if colour.get(successor, black) == grey:
                return [*stack[stack.index(successor) :], successor]
            if colour.get(successor) == white:
                found = visit(successor)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_cycles() -> None:
    graph = {module: set(imports) for module, imports in _graph().items()}
    # A package's __init__ re-exporting its modules is not a cycle of the code it re-exports.
    for module in graph:
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_same_layer_edges_have_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for source, target in SAME_LAYER:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    assert _find_cycle(graph) is None


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    # The oracle for the checker itself: an import hidden in a function is found.
    source = tmp_path / "sample.py"
    source.write_text("def f():\n    from avobuild.cli import main\n    return main\n")
    found = list(_imports("avobuild.fs.sample", source, {"avobuild.cli", "avobuild.fs"}))
    assert found == [("avobuild.cli", 2)]
