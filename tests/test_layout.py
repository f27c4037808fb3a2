"""The shape of the house: lillm's import graph (every import, also those inside functions) has no cycle, and
imports flow down the layers, from the command line to training to data and models to the run-directory
layout at the bottom."""

from __future__ import annotations

import ast

from .conftest import REPO

# Lower layers never import higher ones. Within a layer, imports may go either way, but never in a cycle.
LAYERS = [
    ["lillm.errors", "lillm.files", "lillm.runs"],
    ["lillm.config"],
    ["lillm.model", "lillm.tokenizer", "lillm.scoring"],
    ["lillm.lora", "lillm.generate", "lillm.hf", "lillm.data"],
    ["lillm.loading", "lillm.chat", "lillm.evals"],
    ["lillm.train"],
    ["lillm.cli", "lillm"],
]


def layer(module: str) -> int:
    best, level = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, level = len(name), i
    assert level >= 0, f"{module} is in no layer of tests/test_layout.py: place it"
    return level


def import_graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "lillm").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from lillm.train import posttrain` imports the module lillm.train.posttrain
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def test_imports_flow_down_the_layers():
    upward = [(m, t) for m, targets in import_graph().items() for t in targets if layer(t) > layer(m)]
    assert not upward, f"upward imports (module -> what it imports): {upward}"


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_cycles_and_upward_imports():
    graph = import_graph()
    assert "lillm.runs" in graph["lillm.loading"] and "lillm.loading" in graph["lillm.train.posttrain"]
    assert layer("lillm.data.examples") < layer("lillm.train.loss")


def test_no_function_in_lillm_is_longer_than_60_lines():
    """Long functions hide their steps; name them instead (`lillm.data.prepare.prepare` reads as its steps)."""
    long = []
    for path in sorted((REPO / "lillm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
