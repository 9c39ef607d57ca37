"""No import cycles between the project's modules (compress/, targets/, calib/, cli.py),
counting imports inside functions too: a cycle that only closes at call time still makes
the modules one unit that cannot be read, tested or replaced apart.

The graph is built from the sources with `ast`, not by importing: `import a.b` and
`from a import b` (b a submodule) are edges to a.b; `from a.b import name` is an edge to
a.b. Importing a.b also runs a/__init__.py, but that is not counted as an edge to the
package: a package's __init__ re-exporting its own submodules would otherwise make every
package a cycle with each of its modules. Imports under `if TYPE_CHECKING:` never run
and are not counted."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "targets", "calib")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {"cli": root / "cli.py"}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:
                    out.add(sub)
                elif base in mods:
                    out.add(base)
    out.discard(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = project_modules(root)
    return {n: imports_of(n, p, mods) for n, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS, deterministic order)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path, state[start] = [start], 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return None


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "cli.py").write_text("")
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "compress" / "a.py").write_text("from compress import b\n")
    (tmp_path / "compress" / "b.py").write_text("def f():\n    from targets.c import x\n")
    (tmp_path / "targets" / "c.py").write_text("import compress.a\n")
    (tmp_path / "calib" / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import compress.a\n")
    graph = import_graph(tmp_path)
    assert graph["compress.a"] == {"compress.b"} and graph["calib.d"] == set()
    assert find_cycle(graph) == ["compress.a", "compress.b", "targets.c", "compress.a"]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "compress.pipeline" in graph["cli"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_prune_reaches_no_backend_exporter_or_pipeline():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("compress.prune"):
            bad = {d for d in deps if d.startswith("targets") or d in ("compress.export", "compress.pipeline")}
            assert not bad, f"{mod} imports {sorted(bad)}"
