"""The package's layout rules (docs/design.md, "Two planes"): no import cycle, and the registry as the only door to a
store. Read from the source with ast, so a rule broken anywhere (a function's own import included) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*ROOT.glob("sweeper/**/*.py"), *ROOT.glob("runner/**/*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """Every module `module` imports, at any depth of its code; TYPE_CHECKING blocks left out. `from pkg import
    sub` imports the module pkg.sub (and pkg's __init__ only where a name is not a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                names.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return names


def _nodes(tree: ast.AST):
    """Every node, leaving out the bodies of `if TYPE_CHECKING:` (imports for annotations only)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for orelse in child.orelse for n in [orelse, *_nodes(orelse)])
            continue
        yield child
        yield from _nodes(child)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {n for n in _imports(p, m, modules) if n in modules and n != m} for m, p in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles


def test_nothing_outside_storage_imports_a_backend():
    modules = _modules()
    leaks = {m: sorted(n for n in _imports(p, m, modules) if n.startswith("sweeper.storage."))
             for m, p in modules.items() if not m.startswith("sweeper.storage")}
    assert not {m: names for m, names in leaks.items() if names}


def test_every_package_is_in_the_distribution():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in [*ROOT.glob("sweeper/**/__init__.py"),
                                                                  *ROOT.glob("runner/**/__init__.py")]}
    assert found <= listed, sorted(found - listed)  # a package left out installs as a broken `sweeper`
