"""The layering is a checked rule (issue 16, DESIGN section 2): imports point down only, no import cycles,
methods stay free of backends and formats, no getattr probing for adapter capabilities.

Every module of src/deltatune is read with `ast`: module-level AND function-local imports, relative and
absolute, each mapped to its layer (lowest first):

    errors (errors.py, naming.py) < quant < core < methods < io < compose < api < train < serve < top
    (cli.py, __init__.py, __main__.py)

Each check is a plain function of a source tree, so the self-tests at the end feed it a small fake
package with one planted fault and see it fail.
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "deltatune"

# module (dotted, without the package) -> layer; the longest matching prefix wins
LAYERS = ["errors", "quant", "core", "methods", "io", "compose", "api", "train", "serve", "top"]
PLACES = {
    "errors": "errors", "naming": "errors",
    "quant": "quant", "core": "core", "methods": "methods",
    "io": "io", "models": "io", "adapter_report": "io",  # models / adapter_report: re-exports of io/
    "compose": "compose", "api": "api", "train": "train", "serve": "serve",
    "": "top", "cli": "top", "__main__": "top",
}
METHODS_MAY_NOT_IMPORT = ("quant", "io", "compose", "api", "train", "top")
METHODS_MAY_NOT_NAME = {  # what the base-layer view (core/base.py) and io/ alone know
    "Conv1D": r"Conv1D", "compute_dtype": r"compute_dtype", "bitsandbytes": r"bitsandbytes",
    "bnb": r"\bbnb\b", "hqq": r"\bhqq\b", "safetensors": r"safetensors", "adapter_config": r"adapter_config",
    "open(": r"\bopen\(",
}
TYPE_GUARDS = ("TYPE_CHECKING", "typing.TYPE_CHECKING")
CAPABILITIES = ("uses_routing", "adds_in_place", "mixed_forward", "merged_weight", "unmerged_weight", "mergeable",
                "forward_model", "generate_model", "disk_prefix", "merge_uses_reference", "call_state", "merge_rule",
                "delta_weight", "use_dora")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted ("deltatune.core.model")
    target: str  # imported module of the same package
    file: str
    line: int
    local: bool  # inside a function
    type_only: bool = False  # under `if TYPE_CHECKING:`: never runs, so it makes no cycle (still may not point up)


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/package (a package is its __init__)."""
    found = {}
    for file in sorted((root / package).rglob("*.py")):
        parts = list(file.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: dict) -> list[str]:
    """The package's modules an import statement loads (the deepest known module per name)."""
    def deepest(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        return [m for m in (deepest(a.name) for a in node.names) if m]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    targets = []
    for alias in node.names:
        target = deepest(f"{origin}.{alias.name}") if f"{origin}.{alias.name}" in known else deepest(origin)
        if target:
            targets.append(target)
    return targets


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every import of one of the package's modules by another, module-level and function-local."""
    known = modules_of(root, package)
    edges = []
    for module, file in known.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        local = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        guards = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) in TYPE_GUARDS]
        typing_only = {id(n) for g in guards for b in g.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, file.name == "__init__.py", node, known):
                    if target != module:
                        edges.append(Edge(module, target, str(file.relative_to(root)), node.lineno,
                                          id(node) in local, id(node) in typing_only))
    return edges


def layer_of(module: str, package: str = PACKAGE, places: dict = PLACES) -> str:
    inner = module.removeprefix(package).lstrip(".")
    for prefix in sorted(places, key=len, reverse=True):
        if inner == prefix or (prefix and inner.startswith(prefix + ".")):
            return places[prefix]
    raise AssertionError(f"{module} has no layer: add it to PLACES in tests/test_layering.py")


def upward_edges(edges: list[Edge], layer=layer_of) -> list[str]:
    """'file:line: source (layer) imports target (higher layer)' for each import that points up."""
    found = []
    for e in edges:
        low, high = layer(e.source), layer(e.target)
        if LAYERS.index(high) > LAYERS.index(low):
            where = "in a function" if e.local else "at module level"
            found.append(f"{e.file}:{e.line}: {e.source} ({low}) imports {e.target} ({high}) {where}")
    return list(dict.fromkeys(found))  # `from x import a, b` is one import


def import_cycles(edges: list[Edge]) -> list[str]:
    """Each strongly connected component of more than one module (Tarjan), as 'a -> b -> ... -> a' with the
    file:line of each import on the way."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        if e.type_only:
            continue
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:  # recursive Tarjan; the package has ~150 modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    described = []
    for component in components:
        members = set(component)
        start = min(component)
        path = [start] + _path_back(graph, start, start, members)  # one concrete cycle through `start`
        hops = [graph[a][b] for a, b in itertools.pairwise(path)]
        described.append(" -> ".join(path) + "  (" + ", ".join(f"{h.file}:{h.line}" for h in hops) + ")")
    return described


def _path_back(graph: dict, start: str, goal: str, members: set[str]) -> list[str]:
    """Shortest path start -> ... -> goal inside `members` (breadth first), without `start` itself."""
    previous, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt not in members:
                    continue
                if nxt == goal:
                    path = [goal]
                    while node != start:
                        path.append(node)
                        node = previous[node]
                    return list(reversed(path))
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    return [goal]


def methods_violations(root: Path, package: str, edges: list[Edge], layer=layer_of) -> list[str]:
    """methods/ modules importing a layer they may not, or naming a backend, Conv1D or a file format."""
    found = [f"{e.file}:{e.line}: {e.source} imports {e.target} ({layer(e.target)})" for e in edges
             if layer(e.source) == "methods" and layer(e.target) in METHODS_MAY_NOT_IMPORT]
    for module, file in modules_of(root, package).items():
        if layer(module) != "methods":
            continue
        for number, text in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            for name, pattern in METHODS_MAY_NOT_NAME.items():
                if re.search(pattern, text):
                    found.append(f"{file.relative_to(root)}:{number}: names {name!r}: {text.strip()[:90]}")
    return found


def capability_probes(root: Path, package: str) -> list[str]:
    """getattr/hasattr calls whose attribute is an adapter capability (the protocols say what an adapter has)."""
    found = []
    for file in sorted((root / package).rglob("*.py")):
        calls = [n for n in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file)))
                 if isinstance(n, ast.Call)]
        for node in sorted(calls, key=lambda n: (n.lineno, n.col_offset)):
            if (isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in CAPABILITIES):
                found.append(f"{file.relative_to(root)}:{node.lineno}: {node.func.id}(..., "
                             f"{node.args[1].value!r})")
    return found


def _report(what: str, found: list[str]) -> str:
    return f"{len(found)} {what}:\n  " + "\n  ".join(found)


# ---------------------------------------------------------------------------------------- the real package
@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(SRC, PACKAGE)


def test_every_module_has_a_layer():
    for module in modules_of(SRC, PACKAGE):
        layer_of(module)


def test_no_import_points_up(edges):
    found = upward_edges(edges)
    assert not found, _report("imports point to a higher layer", found)


def test_no_import_cycle(edges):
    found = import_cycles(edges)
    assert not found, _report("import cycles (function-local imports included)", found)


def test_methods_import_core_only_and_name_no_backend_or_format(edges):
    found = methods_violations(SRC, PACKAGE, edges)
    assert not found, _report("methods/ reach-outs", found)


def test_no_getattr_probing_for_adapter_capabilities():
    found = capability_probes(SRC, PACKAGE)
    assert not found, _report("getattr/hasattr probes for adapter capabilities", found)


def test_quant_is_a_leaf_and_core_imports_nothing_above_it(edges):
    """The two rules of this redesign the checks above cover in general, named on their own."""
    quant_out = [e for e in edges if layer_of(e.source) == "quant" and layer_of(e.target) not in ("errors", "quant")]
    assert not quant_out, [f"{e.file}:{e.line} -> {e.target}" for e in quant_out]
    core_up = [e for e in edges if layer_of(e.source) == "core"
               and LAYERS.index(layer_of(e.target)) > LAYERS.index("core")]
    assert not core_up, [f"{e.file}:{e.line} -> {e.target}" for e in core_up]


# ------------------------------------------------------------------------------ self-tests: each check fails
def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


FAKE_PLACES = {"errors": "errors", "core": "core", "methods": "methods", "io": "io", "": "top"}


def _fake_layer(module: str) -> str:
    return layer_of(module, "pkg", FAKE_PLACES)


def test_self_check_finds_an_upward_import_also_inside_a_function(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "errors.py": "", "io/__init__.py": "", "io/files.py": "",
        "core/__init__.py": "",
        "core/model.py": "from ..errors import x\n\ndef save():\n    from ..io.files import w\n",
    })
    found = upward_edges(import_edges(root, "pkg"), _fake_layer)
    assert found == ["pkg/core/model.py:4: pkg.core.model (core) imports pkg.io.files (io) in a function"]


def test_self_check_finds_a_cycle_through_a_function_local_import(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "core/__init__.py": "",
        "core/a.py": "from . import b\n", "core/b.py": "def f():\n    from .c import g\n",
        "core/c.py": "import pkg.core.a\n",
    })
    found = import_cycles(import_edges(root, "pkg"))
    assert len(found) == 1 and found[0].startswith("pkg.core.a -> pkg.core.b -> pkg.core.c -> pkg.core.a")
    assert "pkg/core/b.py:2" in found[0]


def test_self_check_finds_a_method_that_imports_io_or_names_a_backend(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "", "io/__init__.py": "", "io/files.py": "", "core/__init__.py": "",
        "methods/__init__.py": "", "methods/x.py": "from ..io.files import r\nfrom ..core import y\n"
                                                   "dtype = base.compute_dtype\n",
    })
    found = methods_violations(root, "pkg", import_edges(root, "pkg"), _fake_layer)
    assert found == ["pkg/methods/x.py:1: pkg.methods.x imports pkg.io.files (io)",
                     "pkg/methods/x.py:3: names 'compute_dtype': dtype = base.compute_dtype"]


def test_self_check_finds_capability_probing(tmp_path):
    root = _fake_package(tmp_path, {"__init__.py": "", "a.py": "ok = getattr(m, 'weight')\n"
                                                               "x = hasattr(adapter, 'delta_weight')\n"})
    assert capability_probes(root, "pkg") == ["pkg/a.py:2: hasattr(..., 'delta_weight')"]


def test_self_check_a_type_only_import_makes_no_cycle_but_may_not_point_up(tmp_path):
    root = _fake_package(tmp_path, {
        "core/__init__.py": "", "core/a.py": "from . import b\n",
        "core/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from . import a\n    from ..io import w\n"),
        "io/__init__.py": "", "io/w.py": "",
    })
    found = import_edges(root, "pkg")
    assert import_cycles(found) == []
    assert sorted(e.target for e in found if e.type_only) == ["pkg.core.a", "pkg.io.w"]
    assert any("pkg.io.w" in v for v in upward_edges(found, _fake_layer))


def test_self_check_refuses_a_module_without_a_layer():
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("pkg.serve.app", "pkg", {"core": "core"})
