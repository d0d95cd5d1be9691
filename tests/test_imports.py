"""The import structure of fwdkern: no import cycles, and every module imports on its own.

(a) The module graph is read from the source with ``ast``: every import statement, at module level
and inside functions, is an edge (relative imports resolved; ``from pkg import x`` is an edge to the
submodule ``pkg.x`` when x is one, else to the package ``pkg/__init__.py``). A cycle in it is an
import that works only in some orders, or a layer that points up (csrc <- ops <- nn / engine / dual
<- fl <- cli); the assertion names the path.

(b) Every module imports in an interpreter where no fwdkern module is loaded yet, so an import that
only works after some other module was imported first fails here.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "fwdkern"
# fwdkern/fl is maintained separately: a cycle among its modules alone is reported as an xfail here.
FL = "fwdkern.fl"


def _modules() -> dict:
    """module name -> path of every fwdkern/**/*.py."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PKG)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _bound_names(tree: ast.Module) -> set:
    """Names a module binds at its top level (what ``from module import name`` can find there)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


_TREES = {name: ast.parse(open(path, encoding="utf-8").read(), path) for name, path in MODULES.items()}
_BOUND = {name: _bound_names(tree) for name, tree in _TREES.items() if _is_package(name)}


def _target(base: str, name: str):
    """The module that ``from base import name`` depends on (None outside fwdkern's Python files)."""
    sub = f"{base}.{name}"
    if sub in MODULES:
        return sub
    if base in _BOUND and name not in _BOUND[base]:
        return None  # a submodule that is not Python source (the compiled fwdkern._C)
    return base if base in MODULES else None


def _edges(name: str) -> list:
    """[(imported module, line)] of every import statement of module `name`."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(_TREES[name]):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                # `import a.b.c` runs a.b.c; the deepest fwdkern module it names is the dependency.
                hit = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in MODULES),
                           None)
                if hit is not None:
                    out.append((hit, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != PKG and not base.startswith(PKG + "."):
                continue
            for a in node.names:
                t = _target(base, a.name) if a.name != "*" else (base if base in MODULES else None)
                if t is not None:
                    out.append((t, node.lineno))
    return out


GRAPH = {name: _edges(name) for name in MODULES}


def _cycles() -> list:
    """One cycle path per strongly connected component of the graph that has one (Tarjan)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(w == v for w, _ in GRAPH[v]):
                comps.append(set(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(GRAPH)))
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return [_path_in(comp) for comp in comps]


def _path_in(comp: set) -> list:
    """A cycle through the component's first module, as [(module, line of its import of the next)]."""
    start = min(comp)
    prev, frontier = {start: None}, [start]
    while frontier:  # breadth-first: the shortest way back to start
        nxt = []
        for v in frontier:
            for w, line in GRAPH[v]:
                if w == start:
                    path, u, ln = [], v, line
                    while u is not None:
                        path.append((u, ln))
                        u, ln = prev[u] if prev[u] is not None else (None, None)
                    return path[::-1]
                if w in comp and w not in prev:
                    prev[w] = (v, line)
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in component {sorted(comp)}")  # pragma: no cover


def _show(path: list) -> str:
    steps = [f"{m} (line {line})" for m, line in path]
    return " -> ".join(steps + [path[0][0]])


def test_the_graph_sees_relative_and_function_level_imports():
    """The parser itself: a relative import, a submodule import and the package import are edges."""
    ops_lora = {m for m, _ in GRAPH["fwdkern.ops.lora"]}
    assert {"fwdkern.backends", "fwdkern.ops._validate"} <= ops_lora
    assert "fwdkern.ops" in {m for m, _ in GRAPH["fwdkern"]}  # `from .ops import perturbation`
    assert "fwdkern.backends" in {m for m, _ in GRAPH["fwdkern"]}  # `from . import backends`
    cli = {m for m, _ in GRAPH["fwdkern.cli"]}
    assert PKG in cli or any(m.startswith(PKG + ".") for m in cli)


def test_no_import_cycle():
    cycles = _cycles()
    outside_fl = [c for c in cycles if not all(m == FL or m.startswith(FL + ".") for m, _ in c)]
    assert not outside_fl, "import cycles:\n" + "\n".join(_show(c) for c in outside_fl)
    if cycles:
        pytest.xfail("import cycles inside fwdkern/fl (maintained separately):\n" + "\n".join(_show(c) for c in cycles))


def _importable(name: str) -> bool:
    """Whether importing the module on its own is meaningful here: the optional dependency it needs is
    installed (flwr for the Flower apps, triton for the Triton kernels and their host code), and it is
    not ``__main__`` (importing that runs the command line)."""
    import importlib.util

    if name.endswith(".__main__"):
        return False
    if name.startswith(FL + ".flower"):
        return importlib.util.find_spec("flwr") is not None
    if name.startswith(PKG + ".triton") or name == PKG + ".ops._triton":
        return importlib.util.find_spec("triton") is not None
    return True


# One interpreter loads torch (what every module imports, and most of the start-up time), then forks
# a child per module; no fwdkern module is loaded before the child imports its module.
_RUNNER = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    import torch  # noqa: F401
    assert not [m for m in sys.modules if m == "fwdkern" or m.startswith("fwdkern.")]
    failed = {}
    for name in json.loads(sys.argv[1]):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                importlib.import_module(name)
                msg = ""
            except BaseException:
                msg = traceback.format_exc()
            with os.fdopen(w, "w") as f:
                f.write(msg)
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            msg = f.read()
        _, status = os.waitpid(pid, 0)
        if msg or status:
            failed[name] = msg or f"exit status {status}"
    print(json.dumps(failed))
""")


def test_every_module_imports_on_its_own():
    names = [m for m in sorted(MODULES) if _importable(m)]
    assert len(names) >= len(MODULES) // 2
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(names)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"import {m}:\n{msg}" for m, msg in failed.items())
