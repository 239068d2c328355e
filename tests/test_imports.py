"""No import circles: the graph of every import statement in the repo's packages (module level and inside
functions alike) has no cycle, and the modules that used to import each other import first in a fresh
interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "seqmix", ROOT / "kernels" / "seqmix_kernels", *sorted(ROOT.glob("plugins/*/seqmix_*"))]


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the repo's packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted(pkg.rglob("*.py")):
            parts = [pkg.name, *f.relative_to(pkg).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its text (`from pkg import name` counts as an import
    of pkg.name when that is a module, else of pkg; an import of a package's own parent is not counted: Python
    runs the parent first in any case)."""
    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets |= {resolve(f"{base}.{a.name}") for a in node.names}
        graph[mod] = {t for t in targets if t and t != mod and not mod.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    mods = {"pkg": pkg / "__init__.py", **{f"pkg.{n}": pkg / f"{n}.py" for n in "abc"}}
    assert cycles(import_graph(mods)) == [["pkg.a", "pkg.b"]]


def test_the_repo_has_no_import_cycles():
    mods = project_modules()
    graph = import_graph(mods)
    assert {"seqmix.io.loader", "seqmix.model", "seqmix_kernels.rotary.triton"} <= set(graph)
    assert "seqmix.model" in graph["seqmix.io.native"]  # edges are found (a sanity check of the graph itself)
    assert cycles(graph) == []


@pytest.mark.parametrize("module", ["seqmix.io", "seqmix.io.importers.based_repo", "seqmix.io.importers.hf",
                                    "seqmix.model", "seqmix.registry", "seqmix.train.loop", "seqmix.hf"])
def test_module_imports_first_in_a_fresh_interpreter(module):
    if module == "seqmix.hf":
        import transformers  # noqa: F401  (make install-test installs it)
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
