"""The package layout is the architecture: sub-packages are layers and imports point down.

Every import of a normfold module by another (at module level or inside a function)
must go to the same layer or a lower one, the module import graph has no cycle, and
only the command-line layer renders to the terminal (imports rich).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "normfold"

# lowest first; a module may import modules of its own layer or of the layers before it
LAYERS = [
    ("normfold.errors", "normfold.progress", "normfold.report"),
    ("normfold.io",),
    ("normfold.ir",),
    ("normfold.ops",),
    ("normfold.runtime",),
    ("normfold.passes",),
    ("normfold.verify",),
    ("normfold.pipeline",),
    ("normfold.tools", "normfold.nn"),
    ("normfold.cli",),
    ("normfold", "normfold.__main__", "normfold.testing"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def imported_modules(module: str) -> set[str]:
    """The normfold modules `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {m: imported_modules(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    upward = sorted(dep for dep in GRAPH[module] if layer_of(dep) > layer_of(module) and dep != "normfold")
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def test_no_module_imports_the_package_root_from_inside():
    """`from normfold import X` inside the package would make the package a cycle."""
    offenders = sorted(m for m, deps in GRAPH.items() if "normfold" in deps and m not in ("normfold", "normfold.__main__", "normfold.testing")
                       and not _only_version(m))
    assert not offenders, f"import from the package root (normfold/__init__) inside the package: {offenders}"


def _only_version(module: str) -> bool:
    tree = ast.parse(MODULES[module].read_text())
    return all(all(a.name == "__version__" for a in n.names) for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom) and n.module == "normfold" and not n.level)


def test_module_import_graph_has_no_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(GRAPH[m] - {"normfold"}):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_only_the_cli_layer_renders_to_the_terminal():
    renderers = sorted(m for m, p in MODULES.items() if not m.startswith("normfold.cli")
                       and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "rich" in
                               ([a.name.split(".")[0] for a in n.names] if isinstance(n, ast.Import)
                                else [(n.module or "").split(".")[0]])
                               for n in ast.walk(ast.parse(p.read_text()))))
    assert not renderers, f"modules outside normfold.cli import rich: {renderers}"


def test_passes_live_inside_the_package():
    root = PACKAGE.parent
    assert not (root / "passes").exists(), "a top-level passes/ folder is back"
    assert (PACKAGE / "passes" / "__init__.py").exists()


def test_every_renderer_lives_in_cli_render():
    """print_*/format_* functions (terminal output) are defined in normfold/cli/render.py only."""
    elsewhere = sorted(f"{m}.{n.name}" for m, p in MODULES.items() if m != "normfold.cli.render"
                       for n in ast.walk(ast.parse(p.read_text()))
                       if isinstance(n, ast.FunctionDef) and n.name.startswith(("print_", "format_")))
    assert not elsewhere, f"renderers outside normfold.cli.render: {elsewhere}"
