"""The package layout rules of issues 15 and 27, checked on the source: the core never imports the outer ring, no
import cycle exists (imports inside functions count), and no module grows past about 600 lines."""

import ast
from pathlib import Path

import edlm

ROOT = Path(edlm.__file__).parent
CORE = {"adapter", "distill", "config", "masks", "schedules", "noising", "data", "decode", "ar", "errors",
        "model", "train", "sampling", "speculative", "quant", "text", "results", "assets", "engine", "compat",
        "loading", "api", "checkpoints", "baseline", "generation"}  # the last two: old names of ar and sampling
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
    """The edlm modules (and names) ``path`` imports. ``from edlm.pkg import sub`` counts as an import of the
    submodule ``edlm.pkg.sub`` alone when ``sub`` is one (a package importing its own submodules is no cycle)."""
    modules = _modules()
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edlm"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            if not all(n in modules for n in names):
                found.add(node.module)
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("edlm"))
    return found


def test_every_top_level_module_is_either_core_or_outer_ring():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - {"__init__"}
    assert tops == CORE | OUTER, f"classify new modules in tests/test_layout.py: {sorted(tops ^ (CORE | OUTER))}"


def test_the_core_never_imports_the_outer_ring():
    assert "edlm.api.complete" in _imports(_modules()["edlm.model"], top_level_only=False)  # it sees local imports
    bad = []
    for name, path in _modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in CORE:
            for imp in _imports(path, top_level_only=False):
                if imp.split(".")[1:2] and imp.split(".")[1] in OUTER:
                    bad.append(f"{name} imports {imp}")
    assert bad == []


def _cycle(top_level_only: bool) -> list[str] | None:
    """An import cycle among edlm's modules, or None."""
    modules = _modules()
    graph = {name: {i for i in _imports(path, top_level_only) if i in modules and i != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:  # depth-first; state 1: on the current path, 2: done
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def test_the_import_graph_is_read_with_function_level_imports():
    modules = _modules()
    assert "edlm.config" in _imports(modules["edlm.decode"], top_level_only=True)
    assert "edlm.serve.settings" in _imports(modules["edlm.serve.engine"], top_level_only=True)
    assert "edlm.compat" in _imports(modules["edlm.decode"], top_level_only=False)  # imported inside a method
    assert "edlm.compat" not in _imports(modules["edlm.decode"], top_level_only=True)
    # a submodule imported from its package is that submodule, not the package's __init__
    assert "edlm.evals.isolation" in _imports(modules["edlm.evals.sandbox"], top_level_only=True)
    assert "edlm.evals" not in _imports(modules["edlm.evals.sandbox"], top_level_only=True)


def test_no_import_cycle_even_counting_imports_inside_functions():
    assert _cycle(top_level_only=True) is None
    cycle = _cycle(top_level_only=False)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_is_longer_than_about_600_lines():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}


def test_every_integration_module_exists():
    from conftest import INTEGRATION_MODULES

    tests = Path(__file__).parent
    assert {m for m in INTEGRATION_MODULES if not (tests / f"{m}.py").is_file()} == set()
