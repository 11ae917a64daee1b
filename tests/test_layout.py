"""The package layout rules of issue 15, checked on the source: the core never imports the outer ring, module-level
imports have no cycle, and no module grows past about 600 lines."""

import ast
from pathlib import Path

import edlm

ROOT = Path(edlm.__file__).parent
CORE = {"adapter", "distill", "config", "masks", "schedules", "noising", "data", "decode", "baseline", "errors",
        "model", "train", "generation", "speculative", "quant", "text", "results", "assets", "engine"}
OUTER = {"cli", "serve", "evals", "bench", "studies", "demo", "lm_eval_adapter"}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("edlm",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        out[name] = path
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edlm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("edlm"))
    return found


def test_every_top_level_module_is_either_core_or_outer_ring():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - {"__init__"}
    assert tops == CORE | OUTER, f"classify new modules in tests/test_layout.py: {sorted(tops ^ (CORE | OUTER))}"


def test_the_core_never_imports_the_outer_ring():
    assert "edlm.text.cut_at_stop" in _imports(_modules()["edlm.model"], top_level_only=False)  # it sees local imports
    bad = []
    for name, path in _modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in CORE:
            for imp in _imports(path, top_level_only=False):
                if imp.split(".")[1:2] and imp.split(".")[1] in OUTER:
                    bad.append(f"{name} imports {imp}")
    assert bad == []


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {name: {i for i in _imports(path, top_level_only=True) if i in modules and i != name}
             for name, path in modules.items()}
    assert "edlm.config" in graph["edlm.decode"] and "edlm.serve.settings" in graph["edlm.serve.engine"]  # it reads
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:  # depth-first; state 1: on the current path, 2: done
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_module_is_longer_than_about_600_lines():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}
