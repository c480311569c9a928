"""The import layers of `dispatcher/`, read from the source with `ast` (nothing is imported):

* the lease machine imports nothing that does I/O, directly or through the modules it imports;
* the lease layer imports nothing of the layers above it (control, session, celery, ops);
* no import cycle among the modules of `dispatcher/`.

Every import counts wherever it is written: at module level, inside a function (a lazy import
still closes a cycle, only later), and under `if TYPE_CHECKING:` for the layer rules (a layer
that names a type of the layer above depends on it). Only the cycle check leaves the
`TYPE_CHECKING` imports out: they never run, so they cannot order an import, and they are how a
module names the type of a collaborator it is given.

Written with `ast` rather than import-linter: the three rules fit in a page, and the lazy
imports inside functions, which this project uses to keep start-up cheap, are exactly what must
be seen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping, Set
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "dispatcher"

MACHINE = "dispatcher.lease.machine"
# Libraries (and standard modules) that talk to the world: the machine decides, others act.
INPUT_OUTPUT = ("redis", "httpx", "celery", "kombu", "docker", "socket", "subprocess",
                "http.client", "urllib.request", "asyncio", "uvicorn", "starlette")
LEASE = "dispatcher.lease"
ABOVE_THE_LEASE = ("dispatcher.control", "dispatcher.session", "dispatcher.celery",
                   "dispatcher.ops")

# No exception: the executor is given its collaborators (a publish function, the healthcheck).
TEMPORARY_EDGES: frozenset[tuple[str, str]] = frozenset()


def _modules(root: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, *, typing_only: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every import statement, and whether it runs only for the type checker."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, typing_only
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for inner in child.body:
                yield from _imports(ast.Module(body=[inner], type_ignores=[]), typing_only=True)
            for inner in child.orelse:
                yield from _imports(ast.Module(body=[inner], type_ignores=[]),
                                    typing_only=typing_only)
        else:
            yield from _imports(child, typing_only=typing_only)


def _named(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names an import statement reaches (`from a import b` may mean `a.b`)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        anchor = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            anchor = anchor.rpartition(".")[0]
        base = f"{anchor}.{base}" if base else anchor
    yield base
    yield from (f"{base}.{alias.name}" for alias in node.names)


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module of ours a dotted name lives in, if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: Mapping[str, Path], *, with_typing_only: bool
                 ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Edges between our modules, and every (outside too) dotted name each module imports."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    names: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, typing_only in _imports(tree):
            if typing_only and not with_typing_only:
                continue
            reached = list(_named(node, module, path.name == "__init__.py"))
            names[module].update(reached)
            if isinstance(node, ast.ImportFrom):
                # `from a import b`: the submodule a.b if there is one, else a itself.
                base, *imported = reached
                ours = {n if n in modules else _resolve(base, modules) for n in imported}
            else:
                ours = {_resolve(n, modules) for n in reached}
            edges[module].update(o for o in ours if o and o != module)
    return edges, names


def cycles(edges: Mapping[str, Set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _reachable(start: str, edges: Mapping[str, Set[str]]) -> set[str]:
    """Every module importing `start` runs: what it imports, their parent packages, onwards."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = [module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)]
        todo.extend([*edges.get(module, ()), *(p for p in parents if p in edges)])
    return seen


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = _modules(ROOT, PACKAGE)


def _without_temporary(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if (m, t) not in TEMPORARY_EDGES}
            for m, targets in edges.items()}


def test_the_lease_machine_imports_nothing_that_does_io() -> None:
    edges, names = import_graph(MODULES, with_typing_only=True)
    machine = [m for m in MODULES if _within(m, (MACHINE,))]
    assert machine, "the lease machine's package moved: update MACHINE"
    offending = sorted(
        f"{module} imports {name}"
        for module in set().union(*(_reachable(m, edges) for m in machine))
        for name in names[module] if _within(name, INPUT_OUTPUT))
    assert not offending, "the lease machine must stay pure:\n" + "\n".join(offending)


def test_the_lease_layer_imports_nothing_of_the_layers_above() -> None:
    edges, _ = import_graph(MODULES, with_typing_only=True)
    offending = sorted(
        f"{module} imports {target}" for module, targets in _without_temporary(edges).items()
        if _within(module, (LEASE,)) for target in targets if _within(target, ABOVE_THE_LEASE))
    assert not offending, "dispatcher.lease must not know the layers above:\n" + "\n".join(
        offending)


def test_no_import_cycle_in_dispatcher() -> None:
    edges, _ = import_graph(MODULES, with_typing_only=False)
    found = cycles(_without_temporary(edges))
    report = ["  " + " <-> ".join(c) + "\n    " + "\n    ".join(
        f"{m} -> {sorted(set(c) & edges[m])}" for m in c) for c in found]
    assert not found, "import cycles in dispatcher/:\n" + "\n".join(report)


def test_the_temporary_exceptions_are_still_needed() -> None:
    """An exception whose edge is gone must be deleted, not kept as a blank cheque."""
    edges, _ = import_graph(MODULES, with_typing_only=True)
    stale = sorted(f"{a} -> {b}" for a, b in TEMPORARY_EDGES if b not in edges.get(a, set()))
    assert not stale, "delete these from TEMPORARY_EDGES: " + ", ".join(stale)


# --- the check itself can fail ----------------------------------------------------------------
def test_the_checks_see_lazy_and_relative_imports_and_find_a_cycle(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
        "from .c import thing\n")
    (package / "sub" / "c.py").write_text("import socket\nimport pkg.a\nthing = 1\n")
    (package / "d.py").write_text("from pkg.sub import b\n")
    modules = _modules(tmp_path, "pkg")
    edges, names = import_graph(modules, with_typing_only=False)
    assert edges["pkg.a"] == {"pkg.sub.b"}, "a lazy import inside a function counts"
    assert edges["pkg.sub.b"] == {"pkg.sub.c"}, "relative imports resolve; typing-only left out"
    assert cycles(edges) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
    typed, _ = import_graph(modules, with_typing_only=True)
    assert "pkg.d" in typed["pkg.sub.b"]
    assert "socket" in names["pkg.sub.c"] and "pkg.sub.c" in _reachable("pkg.a", edges)
