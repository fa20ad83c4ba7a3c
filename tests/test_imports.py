"""The architecture's import rules (the design's table), checked on the source: no two modules import each
other, directly or through a loop, counting imports inside functions too; and each folder keeps out of
what it must not import."""
import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
FOLDERS = ["launcher", "parallel", "kernels", "checkpoints", "training", "scaling"]
# folder -> modules (or prefixes) it must not import, from the design's table.
FORBIDDEN = {
    "training": ["ray", "keel.launcher"],
    "parallel": ["ray", "keel.launcher", "keel.training.loop", "keel.parallel.factory"],
    "kernels": ["ray", "keel.training"],
    "checkpoints": ["keel.training", "keel.launcher"],
    "scaling": ["ray"],
}


def module_files() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for file in (ROOT / folder).rglob("*.py"):
            parts = file.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("keel", *parts)).removesuffix(".__init__")
            found[name] = file
    return found


def imports_of(name: str, file: Path) -> set[str]:
    """Every module `file` imports, anywhere in it, as absolute names."""
    package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return out


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: {m for m in imports_of(name, file) if m in files and m != name} for name, file in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other_even_through_a_loop():
    assert cycles(graph()) == []


def test_the_cycle_finder_sees_a_loop_through_a_function_level_import(tmp_path):
    # The check above must be able to fail: a lazy import closing a loop counts.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    (tmp_path / "m.py").write_text("def f():\n    from .engine import Engine\n")
    assert "keel.parallel.engine" in imports_of("keel.parallel.m", tmp_path / "m.py")


def test_each_folder_keeps_out_of_what_the_design_forbids_it():
    files = module_files()
    broken = []
    for name, file in files.items():
        folder = name.split(".")[1]
        for imported in imports_of(name, file):
            for banned in FORBIDDEN.get(folder, []):
                if imported == banned or imported.startswith(banned + "."):
                    broken.append(f"{name} imports {imported}")
    assert broken == []
