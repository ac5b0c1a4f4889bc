"""Layers point one way, and no module imports itself back through others.

The order, from the bottom:

    spanner (core)  <-  actors  <-  serve_app
    spanner (core)  <-  scp
    spanner (core)  <-  simulator             (a tool beside the core)
    all of these    <-  cluster               (starts and wires them)
    everything      <-  cli, benchmarks       (on top; tests may import anything)

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``. The test reads the
source with ``ast``; it imports nothing it checks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each layer may import (besides the standard library and third-party packages).
ALLOWED: dict[str, frozenset[str]] = {
    "spanner": frozenset({"spanner"}),
    "simulator": frozenset({"spanner", "simulator"}),
    "actors": frozenset({"spanner", "actors"}),
    "scp": frozenset({"spanner", "scp"}),
    "serve_app": frozenset({"spanner", "actors", "serve_app"}),
    "cluster": frozenset({"spanner", "simulator", "actors", "scp", "serve_app", "cluster"}),
    "cli": frozenset({"spanner", "simulator", "actors", "scp", "serve_app", "cluster", "cli"}),
    "benchmarks": frozenset({"spanner", "simulator", "actors", "scp", "serve_app", "cluster", "benchmarks"}),
}
PACKAGES = tuple(ALLOWED)

# Cycles tolerated for now; the test fails once one is gone, so that its entry goes with it.
KNOWN_CYCLES: list[list[str]] = []


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to, or None for a module outside the project."""
    parts = module.split(".")
    return parts[0] if parts[0] in ALLOWED else None


@dataclass(frozen=True, slots=True)
class Import:
    importer: str  # dotted name of the importing module
    imported: str  # dotted name of the module it imports (a submodule where the name is one)
    path: Path
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        base = ROOT / package
        if base.is_dir():
            for path in sorted(base.rglob("*.py")):
                modules[module_name(path)] = path
    return modules


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_package, node)
            for alias in node.names:
                # ``from pkg import mod`` imports the submodule ``pkg.mod`` where there is one.
                submodule = f"{target}.{alias.name}"
                yield Import(name, submodule if submodule in modules else target, path, node.lineno)


def all_imports() -> list[Import]:
    modules = project_modules()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def layer_violations(imports: list[Import]) -> list[str]:
    found: dict[str, None] = {}  # one line per import statement, in order
    for imp in imports:
        source, target = layer_of(imp.importer), layer_of(imp.imported)
        if source is None or target is None or target in ALLOWED[source]:
            continue
        where = f"{imp.path.relative_to(ROOT)}:{imp.line}"
        found[f"{where}: {imp.importer} ({source}) imports {imp.imported} ({target})"] = None
    return list(found)


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    modules = set(project_modules())
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports:
        if imp.imported in modules and imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_layers_point_one_way() -> None:
    violations = layer_violations(all_imports())
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def missing_modules(imports: list[Import], modules: dict[str, Path]) -> list[str]:
    """Imports of a project package naming no module of it (a module moved or renamed, its caller not)."""
    found = {f"{imp.path.relative_to(ROOT)}:{imp.line}: {imp.importer} imports {imp.imported}": None
             for imp in imports if layer_of(imp.imported) is not None and imp.imported not in modules}
    return list(found)


def test_every_project_import_names_an_existing_module() -> None:
    missing = missing_modules(all_imports(), project_modules())
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_import_cycle() -> None:
    cycles = import_cycles(all_imports())
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in new)
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"no longer a cycle, remove it from KNOWN_CYCLES: {gone}"


def test_the_checks_catch_what_they_must() -> None:
    here = ROOT / "spanner" / "x.py"
    wrong = [
        Import("spanner.merge", "serve_app.services", here, 1),
        Import("actors.pool", "scp.server", here, 2),
        Import("simulator.scp", "actors.pool", here, 3),
        Import("simulator.scp", "cluster.launcher", here, 4),
        Import("spanner.query", "cli.main", here, 5),
    ]
    right = [
        Import("serve_app.services", "actors.registry", here, 6),
        Import("cli.main", "cluster.launcher", here, 7),
        Import("simulator.scp", "spanner.query", here, 8),
        Import("spanner.merge", "pydicom.dataset", here, 9),
    ]
    assert len(layer_violations(wrong + right)) == len(wrong)

    modules = project_modules()
    moved = [Import("benchmarks.x", "spanner.simulator.scp", here, 1), Import("cli.main", "cli", here, 2),
             Import("cli.main", "pydicom.dataset", here, 3)]
    assert len(missing_modules(moved, modules)) == 1

    a, b, c = sorted(modules)[:3]
    loop = [Import(a, b, here, 1), Import(b, c, here, 2), Import(c, a, here, 3)]
    assert [a, b, c] in import_cycles(loop)
    assert not import_cycles(loop[:2])
