"""The project's layers import downwards only, with no cycles and no hidden imports.

data -> models -> training -> methods -> evaluation -> running -> analysis -> command line,
with ``core`` (errors, files) below all of them. A module may import its own layer or any layer
below; nothing imports a command-line script; project imports sit at module level (an import
inside a function is how cycles hide), except under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("core",)),
    ("data", ("datasets", "loaders")),
    ("models", ("models",)),
    ("training", ("training",)),
    ("methods", ("methods", "unlearning")),
    ("evaluation", ("metrics", "evaluation")),
    ("running", ("running",)),
    ("analysis", ("analysis",)),
    ("command line", ("cli",)),
]
# command-line scripts: the entry points a user runs; nothing may import them
SCRIPTS = ("main", "train", "report", "feature_extraction", "tsne_vis", "wasserstein", "plots")
TOP_LEVELS = {name for _, names in LAYERS for name in names} | set(SCRIPTS)


def project_modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(REPO_ROOT.rglob("*.py")):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[0] in (".venv", "tests", "bench", "docs") or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    if top in SCRIPTS:
        return len(LAYERS) - 1
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} belongs to no layer; add it to LAYERS")


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for n in node.body:
                lines.update(range(n.lineno, (n.end_lineno or n.lineno) + 1))
    return lines


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level) for every project import."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    top_nodes = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in TOP_LEVELS:
                found.append((name, node.lineno, id(node) in top_nodes))
    return found


def resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name, _, _ in imports_of(path):
            target = resolve(name, mods)
            if target is not None and target != m:
                g[m].add(target)
    return g


def test_every_module_has_a_layer() -> None:
    for m in project_modules():
        layer_of(m)


def test_imports_go_downwards_only() -> None:
    mods = project_modules()
    bad = []
    for m, path in mods.items():
        for name, line, _ in imports_of(path):
            target = resolve(name, mods)
            if target is None or target == m:
                continue
            if layer_of(target) > layer_of(m):
                bad.append(f"{path.name}:{line} ({LAYERS[layer_of(m)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]})")  # fmt: skip
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_module_imports_a_command_line_script() -> None:
    mods = project_modules()
    files = list(mods.values()) + sorted((REPO_ROOT / "tests").glob("*.py"))
    files += sorted((REPO_ROOT / "bench").glob("*.py"))
    bad = []
    for path in files:
        for name, line, _ in imports_of(path):
            if name.split(".")[0] in SCRIPTS and name.count(".") == 0:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {name}")
    assert not bad, "command-line scripts imported:\n" + "\n".join(bad)


def test_project_imports_are_at_module_level() -> None:
    bad = []
    for m, path in project_modules().items():
        for name, line, top in imports_of(path):
            if not top:
                bad.append(f"{m}:{line} imports {name} inside a function or block")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    # a package __init__ importing its own submodules is how registries fill themselves
    real = [c for c in cycles if not all(x.split(".")[0] == c[0].split(".")[0] for x in c)]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an upward import in a parsed file is found."""
    f = tmp_path / "x.py"
    f.write_text("import torch\nfrom running.runner import Runner\n\ndef f():\n    import main\n")
    found = imports_of(f)
    assert ("running.runner", 2, True) in found and ("main", 5, False) in found
    assert layer_of("running.runner") > layer_of("datasets")
