"""The runtime's layers point one way: errors at the bottom, the spec above them, the stages and
the command line at the top. Read from the source (every import, lazy ones included, except those
under `if TYPE_CHECKING:`), so a circle is caught before it is ever executed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "humpback_runtime"

# Lower layers never import higher ones. Same-layer imports are allowed but may not form a circle.
LAYERS: list[set[str]] = [
    {"errors", "pod_contract", "layout", "processes", "__init__"},
    {"spec", "prompts", "metrics"},
    {"plan", "crd", "storage", "sources", "lease", "manifest", "progress", "tracking"},
    {"context", "seed", "corpus", "tiny_model", "report", "inference.client", "evaluation", "status", "publishing"},
    {"inference.engines", "inference.local", "training.recipe", "training.distributed", "training.checkpoints", "training.lora",
     "training.card", "training.varlen", "training.trainer", "training.__init__", "inference.__init__"},
    {"inference.models"},
    {"stages.__init__", "stages.prepare", "stages.train", "stages.augment", "stages.rewrite", "stages.curate",
     "stages.evaluate", "stages.report", "stages.guardrails", "stages.publish"},
    {"runner", "cli", "__main__"},
]


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _module_of(target: str) -> str | None:
    """`humpback_runtime.x.y` -> the name used in LAYERS (a package is its `__init__`)."""
    if target != "humpback_runtime" and not target.startswith("humpback_runtime."):
        return None
    rel = target.removeprefix("humpback_runtime").lstrip(".")
    if not rel:
        return "__init__"
    if (PACKAGE / rel.replace(".", "/")).is_dir():
        return f"{rel}.__init__"
    return rel


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are for type checkers only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(name for target in targets if (name := _module_of(target)) in ALL)
    return out


ALL = {_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {_name(p): _imports(p) - {_name(p)} for p in PACKAGE.rglob("*.py")}
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def test_every_module_has_a_layer():
    assert ALL - set(RANK) == set(), "add the new module to LAYERS in this test"


def test_errors_import_nothing_of_the_package():
    assert GRAPH["errors"] == set()


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_point_down(module):
    up = sorted(t for t in GRAPH[module] if RANK[t] > RANK[module])
    assert not up, f"{module} (layer {RANK[module]}) imports higher layers: {up}"


def test_no_import_circle():
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(GRAPH[module]):
            if seen.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in seen:
                visit(target, path + [target])
        seen[module] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module, [module])


def test_the_check_sees_imports():
    # The graph is not empty by accident: known edges are there.
    assert "stages.__init__" in GRAPH["cli"]
    assert "errors" in GRAPH["stages.__init__"] and "spec" in GRAPH["plan"]
