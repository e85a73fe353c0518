"""The package's shape as tests: stages in pipeline order, no import circles, faces not rooms, small files.

Every import counts, also those inside functions (they are how the CLI stays fast, not a way around the rule).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "skywork_deploy"
# Pipeline order: a package may import its own modules, the base and the packages of a lower rank only.
RANKS = {
    "base": 0, "source_code": 0, "build_in": 0, "calibration": 0, "version": 0,
    "patch": 1,
    "calib": 2, "quantize": 2,
    "export": 3,
    "compile": 4,
    "runtime": 5,
    "serve": 6,
    "evaluate": 7,
    "demo_model": 8,
    "pipeline": 9,
    "cli": 10, "__main__": 11, "__init__": 11,
}
MAX_LINES = 400


def _modules():
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


MODULES = _modules()


def _imports(name):
    """Every skywork_deploy module that `name` imports, anywhere in its body."""
    path, is_pkg = MODULES[name]
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in MODULES else mod for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _area(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_area_has_a_rank():
    assert {_area(name) for name in MODULES} <= set(RANKS)


def test_no_import_circles():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert not circles, f"import circles: {circles}"


def test_stages_import_only_the_base_and_earlier_stages():
    wrong = []
    for name, targets in GRAPH.items():
        area = _area(name)
        for target in targets:
            other = _area(target)
            if other != area and RANKS[other] >= RANKS[area] and not RANKS[other] == RANKS[area] == 0:
                wrong.append(f"{name} imports {target} ({other} is not before {area})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_cli():
    users = [name for name, targets in GRAPH.items() if _area(name) not in ("cli", "__main__")
             and any(_area(t) == "cli" for t in targets)]
    assert not users


@pytest.mark.parametrize("name", sorted(n for n, (_, is_pkg) in MODULES.items() if is_pkg))
def test_package_faces_hold_no_logic(name):
    """An __init__.py names what its package offers; its functions and classes live in the modules."""
    path, _ = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    allowed = {"skywork_deploy.cli": {"LazyGroup", "cli", "main"},   # the Click group is the CLI's face
               "skywork_deploy.demo_model": {"demo_model_path", "heldout_path"}}.get(name, set())
    assert set(defs) <= allowed, f"{path}: move {sorted(set(defs) - allowed)} into a module of the package"


def test_files_stay_small():
    long = {str(path.relative_to(ROOT)): n for path, _ in MODULES.values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_torch_free_cli_face():
    """`skywork-deploy --help` imports only the CLI group: its face imports no stage at module level."""
    tree = ast.parse(MODULES["skywork_deploy.cli"][0].read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert names <= {"click", "version", "__version__"}, names
