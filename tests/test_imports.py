"""Every module of ssb_jax imports on its own, and no modules import each other in a circle."""
import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ssb_jax"

# Run in a fresh interpreter. `import ssb_jax.x` always runs the package's own __init__ first, so a process
# that has imported `ssb_jax` and then forks is, in each child, exactly where a fresh `python -c "import
# ssb_jax.x"` would be once that first step is done; forking saves starting jax and flax once per module.
IMPORT_EACH_ALONE = r"""
import importlib, json, os, sys, traceback
failures = {}
try:
    import ssb_jax
except BaseException:
    print(json.dumps({"ssb_jax": traceback.format_exc()}))
    sys.exit(0)
sys.stdout.flush()
for name in sys.argv[1:]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        error = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status:
        failures[name] = error or f"the import ended with wait status {status}"
print(json.dumps(failures))
"""


def package_modules() -> list[str]:
    """Every module and package under ssb_jax, found on disk (pkgutil), none of them imported here;
    `__main__` modules are scripts, not imported."""
    names = []

    def walk(directory: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(directory)]):
            if info.name == "__main__":
                continue
            names.append(prefix + info.name)
            if info.ispkg:
                walk(directory / info.name, f"{prefix}{info.name}.")

    walk(PACKAGE_DIR, "ssb_jax.")
    return sorted(names)


def module_path(name: str) -> Path:
    relative = Path(*name.split(".")[1:])
    package = PACKAGE_DIR / relative / "__init__.py"
    return package if package.exists() else (PACKAGE_DIR / relative).with_suffix(".py")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(name: str, known: set[str], *, module_level_only: bool) -> set[str]:
    """The ssb_jax modules that module `name` imports: `import a.b` names a.b, `from a import b` names a.b
    when that is a module, else a. Imports under `if TYPE_CHECKING:` never run and are left out; with
    module_level_only, so are those inside functions (they run on a call, once every module is loaded)."""
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {target for target in found if target in known and target != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None when it has none."""
    state = {}  # node -> "open" while on the current path, "done" once every path from it is explored
    path = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_graph(*, module_level_only: bool, modules=None) -> dict[str, set[str]]:
    known = set(package_modules()) | {"ssb_jax"}
    modules = sorted(known) if modules is None else modules
    return {name: imported_modules(name, known, module_level_only=module_level_only) & set(modules)
            for name in modules}


def test_the_walk_finds_the_package_layout():
    modules = package_modules()
    assert {"ssb_jax.model.qwen2", "ssb_jax.model.kv_cache", "ssb_jax.sharding", "ssb_jax.toyworld",
            "ssb_jax.toyworld.world", "ssb_jax.sampling.mesh"} <= set(modules)
    assert all(module_path(name).exists() for name in modules)


@pytest.mark.slow  # a fresh interpreter imports every module of the package, one by one
def test_every_module_imports_alone():
    """Each module, imported first in its interpreter (after the package's own __init__, as Python does)."""
    modules = package_modules()
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *modules], capture_output=True, text=True,
                         timeout=600, cwd=PACKAGE_DIR.parent, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-4000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failures, "modules that do not import alone:\n" + "\n".join(
        f"--- {name}\n{error.strip().splitlines()[-1] if error.strip() else error}" for name, error in failures.items()) \
        + "\n\nfirst traceback:\n" + next(iter(failures.values()))


def test_no_import_cycle_at_module_level():
    """What a module imports as it loads (not inside its functions) never leads back to it."""
    cycle = find_cycle(import_graph(module_level_only=True))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_the_model_layer_and_sharding_import_nothing_above_them():
    """ssb_jax.sharding and ssb_jax.model.* import only each other, in no circle, counting the imports
    inside functions too: the model is built on sharding's table, never the other way round."""
    known = set(package_modules()) | {"ssb_jax"}
    layer = sorted(name for name in known if name in ("ssb_jax.sharding", "ssb_jax.model")
                   or name.startswith("ssb_jax.model."))
    for name in layer:
        outside = imported_modules(name, known, module_level_only=False) - set(layer)
        assert not outside, f"{name} imports {sorted(outside)}, above the model layer"
    cycle = find_cycle(import_graph(module_level_only=False, modules=layer))
    assert cycle is None, "import cycle in the model layer: " + " -> ".join(cycle)
    assert not imported_modules("ssb_jax.sharding", known, module_level_only=False)


def test_find_cycle_reports_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
