"""The package's layers, read from its imports with ast: no module imports one above it, no cycle
among launcher's modules, and only __main__ imports cli. The layer list is docs/design.md's own
(its ```layers block), so the document and the code cannot drift apart."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "launcher"


def documented_layers() -> dict[str, int]:
    """{module name: layer} from docs/design.md; `strategies/` stands for every module in it."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/design.md has no ```layers block"
    layers = {}
    for line in block.group(1).splitlines():
        number, *names = line.split()
        for name in names:
            if name.endswith("/"):
                for path in (PACKAGE / name).glob("*.py"):
                    layers[module_name(path)] = int(number)
            else:
                layers[module_name(PACKAGE / name)] = int(number)
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(("launcher",) + parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def imports(path: Path, source: str | None = None) -> set[str]:
    """The launcher modules `path` (or `source` as if it were that file) imports, at the top or
    inside functions."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "launcher"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "launcher":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import env` names a module; `from .x import f` names x
                found.add(f"{target}.{alias.name}" if is_module(f"{target}.{alias.name}") else target)
    return {name for name in found if is_module(name)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_documented_layer():
    layers = documented_layers()
    missing = sorted(set(graph()) - set(layers))
    stale = sorted(set(layers) - set(graph()))
    assert not missing, f"modules not in docs/design.md's layers block: {missing}"
    assert not stale, f"docs/design.md's layers block names modules that do not exist: {stale}"


def test_no_module_imports_a_layer_above_it():
    layers = documented_layers()
    upward = [f"{a} (layer {layers[a]}) imports {b} (layer {layers[b]})"
              for a, targets in graph().items() for b in targets if layers[b] > layers[a]]
    assert not upward, "\n".join(upward)


def test_only_main_imports_cli():
    importers = sorted(a for a, targets in graph().items() if "launcher.cli" in targets)
    assert importers == ["launcher.__main__"]


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_reader_finds_imports_inside_functions_and_cycles():
    """The checks above can fail: a function-level upward import and a cycle are both seen."""
    path = PACKAGE / "watchdog.py"
    assert imports(path) == {"launcher.errors"}
    changed = path.read_text() + "\n\ndef later():\n    from .cli import main\n    from . import trainer\n"
    assert imports(path, changed) == {"launcher.errors", "launcher.cli", "launcher.trainer"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_small_units():
    """The trainer stays a list of calls: trainer.py within 300 lines, no class over 250 lines and no
    function over 80 anywhere in the package."""
    assert len((PACKAGE / "trainer.py").read_text().splitlines()) <= 300
    big = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > (250 if isinstance(node, ast.ClassDef) else 80):
                    big.append(f"{path.relative_to(ROOT)}: {node.name} ({size} lines)")
    assert not big, big
