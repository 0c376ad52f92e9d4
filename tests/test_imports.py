"""The import graph of `music_dagster`, read from the source with `ast` (nothing is imported): library modules never
call up into the application layer, and no two modules import each other at module level.

Every import counts for the layering, including those inside functions (a deferred import still makes the library
depend on what it imports); the cycle check reads the module-level ones, those that run when a module is imported
(`if TYPE_CHECKING:` blocks left out)."""
import ast
from pathlib import Path

import music_dagster

PACKAGE = Path(music_dagster.__file__).parent

# The application layer: what drives Dagster and may import the assets, the definitions, the pipeline and the CLI.
# Everything else is a library module and imports none of them.
APPLICATION = {
    "music_dagster.assets": "the Dagster assets, checks, jobs and schedules themselves",
    "music_dagster.definitions": "the code location: merges every assets module's `defs`",
    "music_dagster.pipeline": "runs the code location's jobs (`music pipeline`, dvc.yaml's stage entry points)",
    "music_dagster.cli": "the `music` command: dispatches to every layer",
    "music_dagster.k8s": "the Kubernetes code location: the definitions with dagster-k8s's executor",
    "music_dagster.doctor": "`music doctor`: reads the Dagster instance and the runs the pipeline leaves behind",
    "music_dagster.bench": "benchmark commands that drive Dagster runs to time them",
}
UPWARD = ("music_dagster.assets", "music_dagster.definitions", "music_dagster.pipeline", "music_dagster.cli")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The project modules an import statement loads: each named module, or the package a name comes from."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:  # `import a.b.c` of a non-module attribute path: its longest module
            name = name.rpartition(".")[0]
        if name.startswith("music_dagster.") and name not in out:
            out.append(name)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _module_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module is imported: not in functions, classes' methods or TYPE_CHECKING."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_type_checking(node):
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _module_level_imports([n for n in getattr(node, field, []) if isinstance(n, ast.AST)])


def _graph(module_level: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        nodes = _module_level_imports(tree.body) if module_level else (
            n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        graph[name] = {t for n in nodes for t in _targets(n, name, path.name == "__init__.py") if t != name}
    return graph


def _application(name: str) -> bool:
    return any(_within(name, prefix) for prefix in APPLICATION)


def test_the_layers_are_the_modules_there_are():
    assert set(UPWARD) <= set(APPLICATION)
    for prefix in APPLICATION:
        assert prefix in MODULES, f"{prefix} is listed as the application layer but is no module"
    assert "music_dagster.evaluation.report" in MODULES and "music_dagster.tracking.dvc" in MODULES  # the scan sees them


def test_library_modules_never_import_the_application_layer():
    """Inside functions too: a library module that calls back up into Dagster's assets, the code location, the
    pipeline or the CLI ties the layers together (it is how the cycle through `dvc.run_stage` came about)."""
    graph = _graph(module_level=False)
    bad = sorted(f"{name} imports {target}" for name, targets in graph.items() if not _application(name)
                 for target in targets if any(_within(target, up) for up in UPWARD))
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    cycles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return cycles


def test_no_import_cycles_at_module_level():
    assert _cycles(_graph(module_level=True)) == []


def test_the_scan_sees_imports_inside_functions_and_refuses_an_upward_one(tmp_path):
    """The checks themselves: a deferred import is seen, and the layering rule names it."""
    tree = ast.parse("def f():\n    from music_dagster.pipeline import run_job\n")
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert _targets(node, "music_dagster.tracking.dvc", False) == ["music_dagster.pipeline"]
    assert list(_module_level_imports(tree.body)) == []
    tree = ast.parse("from music_dagster import evaluation\nif TYPE_CHECKING:\n    import music_dagster.cli\n")
    assert [t for n in _module_level_imports(tree.body) for t in _targets(n, "music_dagster.x", False)] == \
        ["music_dagster.evaluation"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
