"""The package's shape: no import circle (imports inside functions included), the config layer
at the bottom, no module above ~400 lines.

The import graph is read from the source with ``ast``, so anyone can redraw it:
``python -m pytest tests/test_architecture.py -k circle`` fails with the modules of any circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "incseg"

#: what composing and checking a config must never need: the layers that run a config
ABOVE_CONFIG = ("incseg.protocol", "incseg.replay", "incseg.models", "incseg.methods",
                "incseg.checkpoints")


def _modules(pkg: Path = PKG) -> dict[str, Path]:
    mods = {}
    for p in pkg.rglob("*.py"):
        name = ".".join(p.relative_to(pkg.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its text: at module level, inside
    functions (a late import still ties the two at run time) and under ``TYPE_CHECKING``.
    ``from a.b import c`` names the module ``a.b.c`` where that is one, else ``a.b``. A package's
    ``__init__`` importing its own submodules counts too, so a submodule that imports back from
    its package's ``__init__`` is a circle."""
    root = next(iter(mods)).split(".")[0]
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                    (node.module or "").split(".")[0] == root:
                for a in node.names:
                    t = f"{node.module}.{a.name}"
                    graph[m].add(t if t in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name.split(".")[0] == root)
        graph[m] = {t for t in graph[m] if t in mods and t != m}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from toy.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from toy import a\n    import toy.c\n")
    (pkg / "c.py").write_text("")
    graph = _graph(_modules(pkg))
    assert graph == {"toy": set(), "toy.a": {"toy.b"}, "toy.b": {"toy.a", "toy.c"},
                     "toy.c": set()}
    assert _cycles(graph) == [["toy.a", "toy.b"]]


def test_no_import_circle_in_the_package():
    assert _cycles(_graph(_modules())) == []


def test_the_config_layer_imports_nothing_that_runs_a_config():
    """``incseg.config`` composes and checks a config from values alone; what needs a model,
    a method or a replay term is checked above them (``incseg.protocol.preflight``)."""
    graph = _graph(_modules())
    reach = set().union(*(_reachable(graph, m) | {m} for m in graph
                          if m == "incseg.config" or m.startswith("incseg.config.")))
    assert sorted(m for m in reach if m.startswith(ABOVE_CONFIG)) == []


def test_composing_and_checking_a_config_loads_nothing_that_runs_it(tmp_path):
    """The same at run time, in a fresh interpreter: compose and check the smoke config (with
    a labelled memory and replay on, so those checks run) and list what was imported."""
    code = (
        "import sys\n"
        "from incseg.config import compose, validate\n"
        f"cfg = compose(['experiment=smoke', 'paths.cache_dir={tmp_path}', 'memory.size=2',\n"
        "               'replay=deepinversion'])\n"
        "validate(cfg)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({ABOVE_CONFIG!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PKG.parent)
    assert out.stdout.strip() == "[]"


def test_no_module_above_400_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
