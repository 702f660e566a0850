"""The layout rules of docs/architecture.md, read from the source: no import cycle between our modules (imports
inside functions included), the layers' "never" rules, and the size limits."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tdcdiff"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The tdcdiff modules `path` imports anywhere in it (top level or inside functions), as module names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import x` and `from .pkg import module` name modules too
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    # importing a.b.c runs a and a.b first: a package's __init__ counts as imported
    return {t for t in found if t != name} | {p for t in found for p in _parents(t) if p != name and p in MODULES}


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _package_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without edges from a package's __init__ to its own modules (it re-exports them; a module of the
    package importing a sibling runs the __init__ first, which is not a cycle of design)."""
    return {v: {w for w in ws if not (MODULES[v].name == "__init__.py" and w.startswith(v + "."))}
            for v, ws in graph.items()}


def test_no_import_cycles_even_through_imports_inside_functions():
    assert _cycles(_package_imports(GRAPH)) == []


def _importers(target: str) -> set[str]:
    return {v for v, ws in GRAPH.items() if any(w == target or w.startswith(target + ".") for w in ws)}


def _inside(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


GROUND = ["tdcdiff.files", "tdcdiff.settings", "tdcdiff.content_hash",  # import nothing of ours
          "tdcdiff.user_warnings", "tdcdiff.output_paths"]
BELOW = {"tdcdiff.files": {"tdcdiff.output_paths"}}  # but the ground under them (files' output_path, split off)
NEVER = [  # (modules, what they never import)
    (["tdcdiff.bundle", "tdcdiff.manifest", "tdcdiff.serialization", "tdcdiff.files", "tdcdiff.surgery"],
     ["tdcdiff.prune"]),
    (["tdcdiff.budget", "tdcdiff.grouping", "tdcdiff.router"], ["tdcdiff.prune", "tdcdiff.plots"]),
]
TOP = {"tdcdiff.run": ["tdcdiff.run", "tdcdiff.tune", "tdcdiff.cli", "tdcdiff"],  # who may import each top layer
       "tdcdiff.tune": ["tdcdiff.tune", "tdcdiff.cli", "tdcdiff"],
       "tdcdiff.cli": ["tdcdiff.cli"],
       "tdcdiff.report": ["tdcdiff.report", "tdcdiff.run", "tdcdiff.tune", "tdcdiff.cli", "tdcdiff"]}


@pytest.mark.parametrize("module", GROUND)
def test_the_ground_imports_nothing_of_ours(module):
    assert GRAPH[module] - BELOW.get(module, set()) == set()


@pytest.mark.parametrize("modules, forbidden", NEVER, ids=[",".join(m) for m, _ in NEVER])
def test_lower_layers_never_import_what_sits_above_them(modules, forbidden):
    offending = {v: sorted(w for w in GRAPH[v] if _inside(w, *forbidden)) for v in GRAPH if _inside(v, *modules)}
    assert {v: ws for v, ws in offending.items() if ws} == {}


@pytest.mark.parametrize("layer", TOP)
def test_nothing_below_run_tune_and_the_cli_imports_them(layer):
    allowed = TOP[layer]
    assert sorted(v for v in _importers(layer) if not any(v == a or v.startswith(a + ".") for a in allowed)) == []


def test_bench_imports_the_library_never_the_tests():
    for script in (ROOT / "bench").glob("*.py"):
        text = script.read_text()
        tree = ast.parse(text)
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(name == "tests" or name.startswith("tests.") or name == "conftest" for name in names), script
        assert '"tests"' not in text and "'tests'" not in text, f"{script} puts tests/ on sys.path"


@pytest.mark.parametrize("path", [p for name, p in MODULES.items() if not _inside(name, "tdcdiff.cli")],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_our_modules_are_imported_at_the_top(path):
    """Imports of our own modules sit at the top of a module, where the import graph shows them; only the CLI
    imports the library inside its commands, so that `tdcdiff --help` loads no torch."""
    inside = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.ImportFrom) and node.level and node.col_offset > 0]
    assert inside == [], f"{path.name}: imports of tdcdiff modules inside functions at lines {inside}"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *(ROOT / "bench").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    long = {f.name: f.end_lineno - f.lineno + 1 for f in _functions(ast.parse(path.read_text()))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert long == {}
