"""The import graph of a package, read from its source with ``ast`` (nothing is imported).

    graph = import_graph("jaxlm")            # {"jaxlm.data.sources": {"jaxlm.errors", ...}, ...}
    cycle = find_cycle(graph)                 # None, or ["a", "b", "a"]

Every ``import`` statement counts, at the top of a module or inside a function or class: an
import moved into a function still runs and still closes a circle, it only hides it until the
call. Imports under ``if TYPE_CHECKING:`` do not count: they never run. Only modules of the
package itself are nodes; ``from pkg import name`` points at the submodule ``pkg.name`` when
there is one, else at ``pkg`` (its ``__init__``). Importing ``a.b.c`` also runs ``a/__init__`` and
``a/b/__init__``; those implicit parent imports are left out, as every Python import-graph tool
does, since otherwise each ``__init__`` that re-exports its submodules would be a circle.
"""

from __future__ import annotations

import ast
import pathlib


def module_names(package_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``pkg/__init__.py`` is ``pkg``)."""
    root = pathlib.Path(package_dir).resolve()
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom in the tree, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's own modules one import statement names."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        return {_innermost_known(name, known) for name in bases} - {None}
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        target = sub if sub in known else _innermost_known(base, known)
        if target:
            out.add(target)
    return out


def _innermost_known(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(package_dir: str | pathlib.Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (top-level and function-level), itself excluded."""
    files = module_names(package_dir)
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _import_nodes(tree):
            edges |= _targets(node, module, is_package, known)
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]], within: str | None = None) -> list[str] | None:
    """One circle of imports (first module repeated at the end), or None.

    ``within`` restricts the graph to one package's modules (``"jaxlm.data"``: it and its submodules).
    """
    def inside(name: str) -> bool:
        return within is None or name == within or name.startswith(within + ".")

    nodes = sorted(n for n in graph if inside(n))
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if not inside(nxt):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in nodes:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
