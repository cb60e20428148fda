"""The import order of the suite's layers (README "Map of the house").

Low to high: the ``lit`` core (``lit/`` except ``lit/commands/``) < ``models`` <
``datamodules`` < ``callbacks`` < ``lit.commands``. Every import of every module is read
from its AST (inside functions and under ``TYPE_CHECKING`` included): a module may import
its own layer or a lower one, the files form no cycle, and no suite module is imported
inside a function (that is how a cycle hides; third-party imports may be deferred).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lit", "models", "datamodules", "callbacks")
LAYERS = ("lit", "models", "datamodules", "callbacks", "lit.commands")


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a suite module (the longest matching prefix wins)."""
    best = -1
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            if best < 0 or len(prefix) >= len(LAYERS[best]):
                best = index
    return best


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the suite's packages under ``root``."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The suite module that ``name`` (a module or ``module.attribute``) lies in, if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int, bool]]:
    """``(imported suite module, line, inside a function)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{alias.name}" for alias in child.names]
            for name in names:
                if name.split(".")[0] in PACKAGES and (target := _resolve(name, modules)) and target != module:
                    yield target, child.lineno, in_function
            yield from walk(child, nested)

    yield from walk(tree, False)


def check_layers(root: Path) -> list[str]:
    """Every violation of the layer rules under ``root``, one line each (empty: the house is in order)."""
    modules = module_files(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        where = path.relative_to(root)
        for target, line, in_function in imports(module, path, modules):
            graph[module].add(target)
            if layer_of(target) > layer_of(module):
                problems.append(f"{where}:{line}: {module} ({LAYERS[layer_of(module)]}) imports the higher "
                                f"layer {target} ({LAYERS[layer_of(target)]})")
            if in_function:
                problems.append(f"{where}:{line}: {module} imports {target} inside a function "
                                f"(a hidden import; move the shared piece down instead)")
    problems += [f"import cycle between files: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(_cycle_through(graph, set(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A real import path from the first module of ``component`` back to itself (breadth-first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def test_the_suite_imports_one_way_without_cycles() -> None:
    problems = check_layers(REPO)
    assert not problems, "\n".join(problems)


def test_every_package_is_seen() -> None:
    modules = module_files(REPO)
    assert {"lit.similarity", "models.descriptor", "models.registry", "models.preprocessing", "datamodules.procedural", "callbacks.replication",
            "lit.commands.cli"} <= set(modules)
    assert [layer_of(m) for m in ("lit.search", "models.ddpm", "datamodules.synthetic.segmix",
                                  "callbacks.retrieval", "lit.commands.scan.command")] == [0, 1, 2, 3, 4]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "lit" / "commands").mkdir(exist_ok=True)
    (tmp_path / "lit" / "commands" / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    ({"lit/core.py": "from models.net import Net\n", "models/net.py": "Net = 1\n"},
     "lit.core (lit) imports the higher layer models.net (models)"),
    ({"models/net.py": "def f():\n    from datamodules.data import D\n", "datamodules/data.py": "D = 1\n"},
     "models.net (models) imports the higher layer datamodules.data"),
    ({"callbacks/cb.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lit.commands.cli import x\n",
      "lit/commands/cli.py": "x = 1\n"},
     "callbacks.cb (callbacks) imports the higher layer lit.commands.cli"),
    ({"lit/a.py": "from lit import b\n", "lit/b.py": "def f():\n    from lit.a import x\n"},
     "import cycle between files: lit.a -> lit.b -> lit.a"),
    ({"lit/commands/cmd.py": "def f():\n    import models.net\n", "models/net.py": ""},
     "lit.commands.cmd imports models.net inside a function"),
    ({"lit/commands/cmd.py": "from ..util import y\n", "lit/util.py": "y = 1\n"}, None),
])
def test_a_planted_upward_import_or_cycle_is_reported(tmp_path: Path, files: dict[str, str],
                                                       expected: str | None) -> None:
    problems = check_layers(_tree(tmp_path, files))
    if expected is None:
        assert problems == []
    else:
        assert any(expected in line for line in problems), problems
