"""The package's layers: every import points down, no import cycles, short functions.

Read from the code itself with ``ast`` (imports inside functions and under ``TYPE_CHECKING``
count). The layers, lowest first; a module may import its own layer and the ones below::

    common < data < model < methods < config < training < evaluation < collect < recipes < cli < (package root)

Run as a script (``python tests/integration/test_layers.py``) to print every violation.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[2] / "preftune"
LAYERS = ("common", "data", "model", "methods", "config", "training", "evaluation", "collect", "recipes", "cli")
ROOT_RANK = len(LAYERS)  # preftune/__init__, __main__, api: above every layer
MAX_FUNCTION_LINES = 100


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name inside the package
    names: tuple[str, ...]
    path: str  # the importer's file, relative to the package's parent
    line: int


def module_files(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of ``package`` (``__init__`` files name their package)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(package: Path) -> list[Import]:
    """Every import of a module of ``package`` by a module of ``package``, wherever it is written."""
    modules = module_files(package)
    top = package.name
    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        rel = str(path.relative_to(package.parent))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = []
                for alias in node.names:  # `from pkg import module` imports the module itself
                    sub = f"{source}.{alias.name}"
                    targets.append((sub, ()) if sub in modules else (source, (alias.name,)))
            else:
                continue
            for target, names in targets:
                if target != name and (target == top or target.startswith(top + ".")):
                    while target not in modules and "." in target:  # `import pkg.mod.attr` style
                        target = target.rpartition(".")[0]
                    found.append(Import(name, target, names, rel, node.lineno))
    return found


def rank(module: str) -> int:
    """The layer of a dotted module name (package root modules rank above every layer)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return ROOT_RANK


def layer_name(module: str) -> str:
    r = rank(module)
    return LAYERS[r] if r < ROOT_RANK else "package root"


def upward_imports(package: Path) -> list[str]:
    """'file:line: a.b imports c.d (names): layer x -> higher layer y' for each import that points up."""
    return [f"{i.path}:{i.line}: {i.importer} imports {i.imported}"
            f"{' (' + ', '.join(i.names) + ')' if i.names else ''}: "
            f"layer {layer_name(i.importer)} -> higher layer {layer_name(i.imported)}"
            for i in imports_of(package) if rank(i.imported) > rank(i.importer)]


def import_cycles(package: Path) -> list[list[str]]:
    """Strongly connected groups of more than one module in the import graph (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in module_files(package)}
    for i in imports_of(package):
        graph[i.importer].add(i.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'file:line: name is N lines' for each function or method longer than ``limit`` lines."""
    out = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - first + 1
                if length > limit:
                    out.append(f"{path.relative_to(package.parent)}:{node.lineno}: {node.name} is {length} lines")
    return out


# ----------------------------------------------------------------------------- the package itself


def test_every_import_points_down():
    assert upward_imports(PACKAGE) == []


def test_no_import_cycles():
    assert import_cycles(PACKAGE) == []


def test_no_function_over_100_lines():
    assert long_functions(PACKAGE) == []


def test_top_level_holds_only_the_entry_points():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "api.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


# ----------------------------------------------------------------------------- the checker finds what it must


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "preftune"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return root


def test_a_planted_upward_import_is_named_with_its_file_and_names(tmp_path):
    root = _package(tmp_path, {
        "data/collate.py": "def f():\n    from preftune.training.loop import train  # inside a function\n",
        "training/loop.py": "from preftune.data.collate import f\n\ndef train():\n    pass\n",
        "model/masks.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..config import values\n",
        "config/values.py": "X = 1\n",
    })
    found = upward_imports(root)
    assert found == [
        "preftune/data/collate.py:2: preftune.data.collate imports preftune.training.loop (train): "
        "layer data -> higher layer training",
        "preftune/model/masks.py:3: preftune.model.masks imports preftune.config.values: "
        "layer model -> higher layer config",
    ]
    assert import_cycles(root) == [["preftune.data.collate", "preftune.training.loop"]]


def test_a_cycle_inside_one_layer_is_found(tmp_path):
    root = _package(tmp_path, {
        "model/a.py": "from preftune.model import b\n",
        "model/b.py": "import preftune.model.c\n",
        "model/c.py": "from . import a\n",
        "model/d.py": "from preftune.model.a import x\n",
    })
    assert upward_imports(root) == []
    assert import_cycles(root) == [["preftune.model.a", "preftune.model.b", "preftune.model.c"]]


def test_a_long_function_is_named(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(100))
    root = _package(tmp_path, {"data/long.py": f"def short():\n    pass\n\n\ndef long():\n{body}\n"})
    assert long_functions(root) == ["preftune/data/long.py:5: long is 101 lines"]


if __name__ == "__main__":
    for line in upward_imports(PACKAGE):
        print("UP   ", line)
    for group in import_cycles(PACKAGE):
        print("CYCLE", " <-> ".join(group))
    for line in long_functions(PACKAGE):
        print("LONG ", line)
