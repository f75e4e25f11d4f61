"""No import cycles in twinlm/, function-local imports included (they hide cycles rather than remove them).

The graph has an edge A -> B for every `import B` / `from B import x` / `from package import B` anywhere
in A's source, function bodies included; B is the most specific module the statement names. A cycle is a
strongly connected component of more than one module."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file for every module of `package` under `root` (`pkg/__init__.py` is `pkg`)."""
    out = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(dotted: str) -> None:
        while dotted and dotted not in known:  # `import a.b.func_or_class` -> the module a.b
            dotted = dotted.rpartition(".")[0]
        if dotted:
            found.add(dotted)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import mod` names a module; `from mod import f` does not
                full = f"{base}.{alias.name}"
                resolve(full if full in known else base)
    found.discard(name)
    return found


def import_cycles(root: Path, package: str) -> list[list[str]]:
    """Every strongly connected component of more than one module, each sorted (Tarjan's algorithm)."""
    modules = module_names(root, package)
    graph = {m: sorted(imports_of(m, p, set(modules))) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_twinlm_has_no_import_cycles() -> None:
    cycles = import_cycles(ROOT, "twinlm")
    assert cycles == [], "import cycles (break them where they come from):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_a_hidden_cycle_is_caught(tmp_path: Path) -> None:
    """The negative control: a cycle hidden in a function-local, relative import is found."""
    _write(tmp_path, {
        "cyc/__init__.py": "",
        "cyc/a.py": "from cyc.b import g\n\ndef f():\n    return g()\n",
        "cyc/b.py": "def g():\n    from . import a\n    return a\n",
        "cyc/sub/__init__.py": "",
        "cyc/sub/c.py": "import cyc.a\n",  # depends on the cycle but is not part of it
    })
    assert import_cycles(tmp_path, "cyc") == [["cyc.a", "cyc.b"]]


def test_a_package_import_of_a_module_is_an_edge(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/x.py": "def f():\n    from pkg import y\n",
        "pkg/y.py": "from pkg.x import f\n",
    })
    assert import_cycles(tmp_path, "pkg") == [["pkg.x", "pkg.y"]]
