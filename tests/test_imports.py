"""The project's import graph: no cycle between its modules, imports at the top of files.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a project module, at the top of a file or inside a function, is an edge.
``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg`` (its
``__init__``).  A package's ``__init__`` that imports its submodules is fine as long as none of
them imports the package back (registries live in their own modules: ``backbones/registry.py``,
``heads/registry.py``).  At most ``MAX_FUNCTION_IMPORTS`` project imports may sit inside functions,
each with a ``# reason: ...`` comment on the line above (or on the same line).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("seg", "backbones", "heads", "datasets")
SCRIPTS = ("hparam", "train_seg", "infer_seg")
MAX_FUNCTION_IMPORTS = 3


def project_modules() -> dict[str, Path]:
    """Module name -> file, for the packages and the top-level scripts."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    for name in SCRIPTS:
        out[name] = ROOT / f"{name}.py"
    return out


MODULES = project_modules()


def _owner(name: str) -> str | None:
    """The project module ``name`` refers to (``seg.ops.conv`` -> ``seg.ops``), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules one import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return sorted({t for t in map(_owner, names) if t is not None and t != module})


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``module``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, child.lineno, in_function) for t in _targets(module, child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(MODULES[module].read_text(), str(MODULES[module])), False)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def find_cycle(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    edges = {m: sorted({t for t, _, _ in es}) for m, es in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := dfs(t)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source() -> None:
    """The reader sees top-level, relative and function-level imports (guards the checks below)."""
    targets = {t for t, _, _ in GRAPH["seg.train"]}
    assert {"seg.checkpoint", "seg.model", "datasets", "backbones.pretrained"} <= targets
    assert ("backbones.registry", False) in {(t, f) for t, _, f in GRAPH["backbones.convnext"]}
    assert ("seg.config", True) in {(t, f) for t, _, f in GRAPH["hparam"]}
    assert find_cycle({"a": [("b", 1, False)], "b": [("c", 1, True)], "c": [("a", 1, False)]}) == \
        ["a", "b", "c", "a"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_sit_at_the_top_of_files() -> None:
    """At most MAX_FUNCTION_IMPORTS project imports inside functions, each saying why."""
    inside = sorted({(m, line) for m, es in GRAPH.items() for _, line, in_function in es if in_function})
    where = [f"{MODULES[m].relative_to(ROOT)}:{line}" for m, line in inside]
    assert len(inside) <= MAX_FUNCTION_IMPORTS, f"{len(inside)} project imports inside functions: {where}"
    for (m, line), at in zip(inside, where):
        lines = MODULES[m].read_text().splitlines()
        said = "# reason:" in lines[line - 1] or lines[line - 2].strip().startswith("# reason:")
        assert said, f"{at}: an import inside a function needs a '# reason: ...' comment"
