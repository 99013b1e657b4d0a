"""The layout as a contract: higher folders use lower ones, never the reverse, and nothing imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "personavec"

#: bottom to top; a module may import from its own layer or any below it
LAYERS = [
    {"errors", "version"},
    {"files", "stats", "cache", "endpoint", "pages"},
    {"model"},
    {"vectors"},
    {"judge"},
    {"engine"},
    {"steering"},
    {"sae"},
    {"run"},
    {"monitor"},
    {"finetuning"},
    {"screening"},
    {"serve"},
    {"vllm"},
    {"cli"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """The top-level room a dotted module ``personavec.x.y`` lives in."""
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """Absolute names of the personavec modules a file imports (module level and inside functions)."""
    package = list(path.relative_to(SRC.parent).parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.startswith("personavec"):  # ``from . import x`` imports the module x, where there is one
                submodules = {f"{name}.{a.name}" for a in node.names if _is_module(f"{name}.{a.name}")}
                out |= submodules or {name}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("personavec")}
    return out


def modules() -> dict[str, set[str]]:
    found = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = _imports(path)
    return found


def test_every_room_is_placed():
    rooms = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.name != "__init__.py"}
    assert rooms <= set(RANK), rooms - set(RANK)


def test_no_import_runs_back_up():
    wrong = []
    for module, imports in modules().items():
        here = _unit(module)
        if here == "__init__":
            continue  # the public API sits on top of everything
        for imported in imports:
            there = _unit(imported)
            if there == "__init__" or RANK[there] > RANK[here]:
                wrong.append(f"{module} -> {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_circular_imports_between_modules():
    mods = modules()
    graph = {m: {i for i in imps if i in mods and i != "personavec"} for m, imps in mods.items()}
    seen: set[str] = set()
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(" -> ".join([*stack[stack.index(node):], node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        stack.pop()

    for m in graph:
        visit(m)
    assert not cycles, "\n".join(cycles)


def test_test_files_have_unique_names():
    # pytest's default import mode keys test modules by file name: two tests/*/test_x.py cannot be collected together
    tests = Path(__file__).resolve().parent
    seen: dict[str, Path] = {}
    for path in sorted(tests.rglob("test_*.py")):
        assert path.name not in seen, f"{path.relative_to(tests)} and {seen[path.name].relative_to(tests)} share a name"
        seen[path.name] = path
