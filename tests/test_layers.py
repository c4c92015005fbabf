"""The package keeps its layers: no import cycle between modules, and no subpackage imports
one above it. Read from the source's own import statements (ast), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. A module may import from its own layer or any layer below.
LAYERS = [
    {"sharded_pagetable.constants", "sharded_pagetable.errors"},
    {"sharded_pagetable.routing", "sharded_pagetable.yaml_loader"},
    {"sharded_pagetable.rows", "sharded_pagetable.config", "sharded_pagetable.defaults"},
    {"sharded_pagetable.table"},
    {"sharded_pagetable.shard"},
    {"sharded_pagetable.serving"},
    {"ray_actors"},
    {"sharded_pagetable.coordinator"},
    {"sharded_pagetable.cli", "sharded_pagetable.testing", "sharded_pagetable"},
]


def modules() -> dict[str, Path]:
    out = {}
    for top in ("sharded_pagetable", "ray_actors"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int:
    best, level = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{name} is in no layer"
    return level


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    graph = {n: {d for d in deps if mods[d].name != "__init__.py"} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, dep]))
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_layer_imports_a_layer_above_it():
    mods = modules()
    wrong = [
        f"{name} ({layer_of(name)}) imports {dep} ({layer_of(dep)})"
        for name, path in mods.items()
        for dep in imports_of(name, path, set(mods))
        if layer_of(dep) > layer_of(name)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_library_never_imports_its_testing_helpers():
    mods = modules()
    offenders = [
        name
        for name, path in mods.items()
        if not name.startswith("sharded_pagetable.testing")
        and any(
            d.startswith("sharded_pagetable.testing") for d in imports_of(name, path, set(mods))
        )
    ]
    assert not offenders, offenders


def test_the_single_process_table_stands_on_the_row_mechanics_alone():
    """``table/`` (the single-process table) imports no shard or coordinator code: what it
    shares with the shards lives in ``rows/``, below both."""
    mods = modules()
    wrong = [
        f"{name} imports {dep}"
        for name, path in mods.items()
        if name.startswith("sharded_pagetable.table")
        for dep in imports_of(name, path, set(mods))
        if dep.startswith(("sharded_pagetable.shard", "sharded_pagetable.coordinator"))
    ]
    assert not wrong, "\n".join(wrong)
