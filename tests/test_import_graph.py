"""The import graph, as grimp reads it: no circles in the runtime or the benchmarks, and dependencies run one way
(DESIGN.md rule 2: the runtime imports nothing of the CLI, the export, the server or the benchmarks).

The folders are not laid out as the package (pyproject's package-dir maps `qwen2vl_edge` to cli/,
`qwen2vl_edge.runtime` to runtime/, ...), and an editable install shows grimp three modules only. So the
package is laid out as a wheel installs it, with symlinks, and grimp runs on that copy in a fresh interpreter
whose path starts there: the graph is then the same in an editable install and in site-packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grimp", reason="the import-graph test needs the [test] extra (grimp)")
tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "qwen2vl_edge"
RUNTIME = f"{PACKAGE}.runtime"
MIN_MODULES = {RUNTIME: 20, f"{PACKAGE}.benchmarks": 20}  # fewer: the layout is wrong and a pass means nothing

# Run in the fresh interpreter: the package's first-party imports, module -> modules it imports. Imports under
# `if TYPE_CHECKING:` are left out: they name a type for annotations and never run (session.py names the
# pipeline's type so, while the pipeline imports session.py when it opens a chat).
GRAPH_SCRIPT = f"""
import json, grimp
graph = grimp.build_graph({PACKAGE!r}, cache_dir=None, exclude_type_checking_imports=True)
print(json.dumps({{m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}}))
"""


def lay_out_package(root: Path, out: Path) -> Path:
    """pyproject's packages as an install lays them out, each module a symlink to its source file."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    sources: dict[str, Path] = {}
    for name in sorted(setuptools["packages"], key=lambda n: n.count(".")):  # parents first
        parent, _, leaf = name.rpartition(".")
        mapped = setuptools["package-dir"].get(name)
        sources[name] = root / mapped if mapped else sources[parent] / leaf
        target = out.joinpath(*name.split("."))
        target.mkdir(parents=True)
        for module in sources[name].glob("*.py"):
            (target / module.name).symlink_to(module)
    return out


def import_graph(layout: Path) -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(layout), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", GRAPH_SCRIPT], capture_output=True, text=True, env=env,
                            cwd=layout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def find_circle(graph: dict[str, list[str]], package: str) -> list[str] | None:
    """A circle of imports among the modules of `package` (depth-first search), or None."""
    edges = {m: [t for t in graph[m] if inside(t, package)] for m in graph if inside(m, package)}
    state: dict[str, str] = {}  # "open" while on the path, "done" once every path from it is explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in edges[module]:
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (circle := visit(module)):
            return circle
    return None


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> dict[str, list[str]]:
    graph = import_graph(lay_out_package(ROOT, tmp_path_factory.mktemp("layout")))
    for package, least in MIN_MODULES.items():
        count = sum(inside(m, package) for m in graph)
        assert count >= least, f"grimp saw {count} modules of {package}: the layout is not the installed one"
    return graph


@pytest.mark.parametrize("package", [RUNTIME, f"{PACKAGE}.benchmarks"])
def test_no_import_circles(graph, package):
    circle = find_circle(graph, package)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_runtime_imports_only_itself(graph):
    upward = sorted(f"{m} -> {t}" for m in graph if inside(m, RUNTIME)
                    for t in graph[m] if not inside(t, RUNTIME))
    assert not upward, "the runtime imports the CLI, export, server or benchmarks: " + "; ".join(upward)


def test_the_circle_finder_finds_circles():
    graph = {"p.a": ["p.b"], "p.b": ["p.c", "q.x"], "p.c": ["p.a"], "q.x": ["p.a"]}
    assert find_circle(graph, "p") == ["p.a", "p.b", "p.c", "p.a"]
    assert find_circle({"p.a": ["p.b"], "p.b": ["q.x"], "q.x": ["p.a"]}, "p") is None
