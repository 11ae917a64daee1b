"""The package layout rules of issues 15 and 27, checked on the source: the core never imports the outer ring, no
import cycle exists (imports inside functions count), and no module grows past about 600 lines."""

import ast
from pathlib import Path

import edlm

ROOT = Path(edlm.__file__).parent
CORE = {"adapter", "distill", "config", "masks", "schedules", "noising", "data", "decode", "ar", "errors",
        "model", "train", "sampling", "speculative", "quant", "text", "results", "assets", "engine", "compat",
        "loading", "api", "checkpoints", "harness", "table",  # harness, table: below every outer user
        "drafter", "drafter_train"}
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
    assert "edlm.masks" in _imports(modules["edlm.config"], top_level_only=False)  # imported inside a method
    assert "edlm.masks" not in _imports(modules["edlm.config"], top_level_only=True)
    # a submodule imported from its package is that submodule, not the package's __init__
    assert "edlm.evals.isolation" in _imports(modules["edlm.evals.sandbox"], top_level_only=True)
    assert "edlm.evals" not in _imports(modules["edlm.evals.sandbox"], top_level_only=True)


def test_no_import_cycle_even_counting_imports_inside_functions():
    assert _cycle(top_level_only=True) is None
    cycle = _cycle(top_level_only=False)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# Imports inside functions (issue 27): only these, each for a reason; every other import is at the top of its module.
LAZY_PACKAGES = {"torch", "transformers", "tokenizers", "datasets", "accelerate", "peft", "safetensors", "torchao",
                 "tensorboard", "matplotlib", "tqdm", "gguf"}
"""Heavy third-party packages (or heavy submodules of torch) kept lazy for start-up time."""
OPTIONAL_PACKAGES = {"fastapi", "uvicorn", "sse_starlette", "starlette", "pydantic", "openai", "httpx", "lm_eval",
                     "reasoning_gym", "llama_cpp"}
"""Optional packages (pyproject's extras): a command checks that they are installed before it imports them, so they
and the edlm modules that need them are imported inside the function that uses them."""
LAZY_EDLM = {
    ("edlm.cli", "edlm.cli.commands"): "the CLI imports the library only when a command runs: edlm --help stays fast",
    ("edlm.config", "edlm.masks"): "the parser reads edlm.config at start-up; the registries import torch",
    ("edlm.config", "edlm.schedules"): "the same",
    ("edlm.evals.lm_eval", "edlm.evals.lm_eval"): "python -m runs the importable module (registration)",
}


def _top_level_packages(name: str, modules: dict[str, Path], seen: set[str] | None = None) -> set[str]:
    """Third-party packages importing edlm module ``name`` imports (its parent packages' and its own module-level
    imports, followed through edlm modules)."""
    seen = set() if seen is None else seen
    parts = name.split(".")
    out: set[str] = set()
    for k in range(2, len(parts) + 1):
        mod = ".".join(parts[:k])
        if mod in seen or mod not in modules:
            continue
        seen.add(mod)
        for node in ast.walk(ast.Module(body=[n for n in ast.parse(modules[mod].read_text()).body
                                               if not isinstance(n, (ast.FunctionDef, ast.ClassDef))])):
            targets = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edlm"):
                targets += [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t.startswith("edlm"):
                    out |= _top_level_packages(t, modules, seen)
                else:
                    out.add(t.split(".")[0])
    return out


def _function_level_imports(path: Path, modules: dict[str, Path]):
    """(module imported, line) of every import inside a function (``from pkg import sub``: the submodule)."""
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.module:
                    subs = [f"{node.module}.{a.name}" for a in node.names]
                    yield from ((m, node.lineno) for m in (subs if all(m in modules for m in subs) else [node.module]))
                elif isinstance(node, ast.Import):
                    yield from ((a.name, node.lineno) for a in node.names)


def test_imports_inside_functions_are_only_heavy_or_optional_packages():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, line in _function_level_imports(path, modules):
            package = target.split(".")[0]
            if target.startswith("edlm"):
                ok = (name, target) in LAZY_EDLM or bool(_top_level_packages(target, modules) & OPTIONAL_PACKAGES)
            else:
                ok = package in LAZY_PACKAGES | OPTIONAL_PACKAGES
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert bad == [], "move these imports to the top of their module (or justify them here):\n" + "\n".join(bad)


def test_the_lazy_import_rule_sees_what_needs_an_optional_package():
    modules = _modules()
    assert {"fastapi", "torch"} <= _top_level_packages("edlm.serve", modules)
    assert "lm_eval" in _top_level_packages("edlm.evals.lm_eval", modules)
    assert not _top_level_packages("edlm.decode", modules) & OPTIONAL_PACKAGES
    # every command's module imports on a core install (CI installs the extras, which would hide it)
    assert not _top_level_packages("edlm.cli.commands", modules) & OPTIONAL_PACKAGES


def test_no_module_is_longer_than_about_600_lines():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}


def test_no_module_resolves_names_lazily():
    """One name per thing (issue 36): no module-level ``__getattr__`` forwarding old or moved names."""
    lazy = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
            if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(p.read_text()).body)]
    assert lazy == []


def test_every_integration_module_exists():
    from conftest import INTEGRATION_MODULES

    tests = Path(__file__).parent
    assert {m for m in INTEGRATION_MODULES if not (tests / f"{m}.py").is_file()} == set()
