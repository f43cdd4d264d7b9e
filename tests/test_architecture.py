"""The package's imports follow the layers of DESIGN §1, with no cycle.

base (geometry, grid, config, io, errors, registry, checkpoint, core types) <- stage packages
(datasets, models, comm, fusion, eval: none imports another) <- the composition layer (pipeline)
<- applications (train, evaluate, bench, demo, viz, export, cli). Imports under `if TYPE_CHECKING:` are
annotations only and do not count; imports inside functions do.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "coperception"
BASE = {"coperception", "errors", "io", "geometry", "grid", "registry", "config", "checkpoint", "types", "device"}
STAGES = {"datasets", "models", "comm", "fusion", "eval"}
COMPOSITION = {"pipeline"}
APPS = {"train", "evaluate", "bench", "demo", "viz", "export", "cli", "__main__"}
LAYER_NAMES = ("base", "stage", "composition", "application")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "coperception"


def layer(module: str) -> int:
    name = top(module)
    for index, group in enumerate((BASE, STAGES, COMPOSITION, APPS)):
        if name in group:
            return index
    raise AssertionError(f"{module}: its top-level name {name!r} is in no layer; add it to this test's map")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (a `from X import Y` of a submodule Y counts as X.Y)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "coperception"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "coperception":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != own}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) for name, path in mods.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            ls, ld = layer(src), layer(dst)
            if ld > ls:
                bad.append(f"{src} ({LAYER_NAMES[ls]}) imports {dst} ({LAYER_NAMES[ld]})")
            elif ls == ld == 1 and top(src) != top(dst):
                bad.append(f"stage {src} imports another stage: {dst}")
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_follow_the_layers():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert layer_violations(graph) == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_checks_catch_what_they_are_for():
    graph = {"coperception.models.heads": {"coperception.comm.select"}, "coperception.grid": {"coperception.train"},
             "coperception.comm.select": set(), "coperception.train": set()}
    assert layer_violations(graph) == [
        "coperception.grid (base) imports coperception.train (application)",
        "stage coperception.models.heads imports another stage: coperception.comm.select"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
