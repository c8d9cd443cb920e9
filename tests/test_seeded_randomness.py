"""No test draws unseeded randomness: every draw comes from a seed (the `seed`, `rng` and `jax_key` fixtures of
conftest.py, which a failing test reports, or a fixed number).

The rule, checked on the syntax tree of every tests/**/*.py (names as written, with numpy as `np` or `numpy`):
- a seedable generator made with no seed: `default_rng()`, `RandomState()`, `Generator()`, `SeedSequence()`,
  `random.Random()` (with no arguments, or with `None` alone);
- numpy's global-state functions: any call `np.random.<f>` / `numpy.random.<f>` other than those constructors
  and the bit generators, or a `from numpy.random import <f>` of one;
- the `random` module's global-state functions in a file that imports `random`: any call `random.<f>` other
  than `random.Random(seed)`, or a `from random import <f>` other than `Random`;
- torch's draws (`torch.rand`, `torch.randn`, `torch.randint`, `torch.randperm`, `torch.normal`,
  `torch.bernoulli`, `torch.multinomial`, their `_like` forms, and the in-place `.normal_()`, `.uniform_()`,
  `.random_()`, `.bernoulli_()`, `.exponential_()`, `.cauchy_()`, `.log_normal_()`, `.geometric_()`) without a
  `generator=` argument, unless `torch.manual_seed(...)` is called earlier (by line) in the same function, or
  at module level for module-level code.
JAX draws always take a key, so they are seeded by construction.
"""
import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SEEDABLE_CONSTRUCTORS = {"default_rng", "RandomState", "Generator", "SeedSequence"}
NUMPY_BIT_GENERATORS = {"BitGenerator", "PCG64", "PCG64DXSM", "Philox", "MT19937", "SFC64"}
TORCH_DRAWS = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "rand_like",
               "randn_like", "randint_like", "poisson"}
TORCH_IN_PLACE_DRAWS = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "cauchy_", "log_normal_",
                        "geometric_"}


def dotted_name(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of attributes on a name; None for anything else (a call, a subscript, ...)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _unseeded(call: ast.Call) -> bool:
    """No arguments at all, or `None` alone."""
    arguments = [*call.args, *(k.value for k in call.keywords)]
    return not arguments or (len(arguments) == 1 and isinstance(arguments[0], ast.Constant)
                             and arguments[0].value is None)


def _imports_random_module(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Import) and any(a.name == "random" and a.asname is None for a in node.names)
               for node in ast.walk(tree))


def _enclosing_scopes(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    """Each node -> its innermost enclosing function (or the module)."""
    scope_of = {}

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            scope_of[child] = scope
            visit(child, child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else scope)

    visit(tree, tree)
    return scope_of


def _manual_seed_lines(tree: ast.Module, scope_of) -> dict[ast.AST, list[int]]:
    """Scope -> the lines on which it calls torch.manual_seed."""
    lines: dict[ast.AST, list[int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and dotted_name(node.func) == "torch.manual_seed":
            lines.setdefault(scope_of[node], []).append(node.lineno)
    return lines


def _torch_draw(call: ast.Call, name: str | None) -> bool:
    if name is not None and name.startswith("torch.") and name.split(".", 1)[1] in TORCH_DRAWS:
        return True
    return isinstance(call.func, ast.Attribute) and call.func.attr in TORCH_IN_PLACE_DRAWS


def unseeded_draws(source: str) -> list[tuple[int, str]]:
    """(line, what) for every unseeded draw in `source`, by the rule in this module's docstring."""
    tree = ast.parse(source)
    random_imported = _imports_random_module(tree)
    scope_of = _enclosing_scopes(tree)
    seeded_torch = _manual_seed_lines(tree, scope_of)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("random", "numpy.random"):
            allowed = {"Random"} if node.module == "random" else SEEDABLE_CONSTRUCTORS | NUMPY_BIT_GENERATORS
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                      if a.name not in allowed]
        if not isinstance(node, ast.Call):
            continue
        name = dotted_name(node.func)
        last = name.rsplit(".", 1)[-1] if name else None
        module = name.rsplit(".", 1)[0] if name and "." in name else None
        if module in ("np.random", "numpy.random"):
            if last in SEEDABLE_CONSTRUCTORS:
                if _unseeded(node):
                    found.append((node.lineno, f"{name}() without a seed"))
            elif last not in NUMPY_BIT_GENERATORS:
                found.append((node.lineno, f"{name}: numpy's global random state"))
        elif module is None and last in SEEDABLE_CONSTRUCTORS and _unseeded(node):
            found.append((node.lineno, f"{name}() without a seed"))
        elif module == "random" and random_imported:
            if last != "Random":
                found.append((node.lineno, f"{name}: the random module's global state"))
            elif _unseeded(node):
                found.append((node.lineno, "random.Random() without a seed"))
        elif _torch_draw(node, name) and not any(k.arg == "generator" for k in node.keywords):
            if not any(line < node.lineno for line in seeded_torch.get(scope_of[node], [])):
                found.append((node.lineno, f"{name or node.func.attr} without generator= or an earlier "
                                           "torch.manual_seed in its function"))
    return sorted(found)


def test_no_test_file_draws_unseeded_randomness():
    offences = [f"{path.relative_to(TESTS.parent)}:{line}: {what}"
                for path in sorted(TESTS.rglob("*.py"))
                for line, what in unseeded_draws(path.read_text())]
    assert not offences, "unseeded random draws (use the seed/rng/jax_key fixtures or a fixed seed):\n" + \
        "\n".join(offences)


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nrng = np.random.default_rng()",
    "import numpy as np\nrng = np.random.default_rng(None)",
    "import numpy\nx = numpy.random.rand(3)",
    "import numpy as np\nx = np.random.randint(1 << 30)",
    "import numpy as np\nnp.random.shuffle(items)",
    "import numpy as np\nnp.random.seed(0)",
    "import numpy as np\nstate = np.random.RandomState()",
    "from numpy.random import default_rng\nrng = default_rng()",
    "from numpy.random import randn",
    "import random\nx = random.random()",
    "import random\nrandom.shuffle(items)",
    "import random\nx = random.randrange(2**31)",
    "import random\nrng = random.Random()",
    "from random import choice",
    "import torch\nx = torch.randn(3, 4)",
    "import torch\ndef f():\n    x = torch.rand(3)\n    torch.manual_seed(0)",
    "import torch\ndef f():\n    torch.manual_seed(0)\ndef g():\n    return torch.randint(0, 5, (3,))",
    "import torch\ndef f(p):\n    p.normal_()",
])
def test_the_lint_flags_an_unseeded_draw(snippet):
    found = unseeded_draws(snippet)
    assert found, snippet
    last_line = len(snippet.splitlines())
    assert all(1 <= line <= last_line for line, _ in found)


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nrng = np.random.default_rng(seed)",
    "import numpy as np\nrng = np.random.default_rng(0)\nx = rng.random(3)",
    "import numpy as np\nrng = np.random.Generator(np.random.PCG64(7))",
    "import random\nrng = random.Random(seed)\nrng.shuffle(items)\nx = random.Random(0).randint(1, 5)",
    "from random import Random\nrng = Random(3)",
    "random = object()\nrandom.shuffle(x)",  # a name `random` that is not the module
    "import jax\nx = jax.random.normal(jax.random.key(0), (3,))",
    "import torch\ng = torch.Generator().manual_seed(1)\nx = torch.randn(3, generator=g)",
    "import torch\ndef f(p):\n    torch.manual_seed(0)\n    p.normal_()\n    return torch.rand(3)",
])
def test_the_lint_passes_a_seeded_draw(snippet):
    assert unseeded_draws(snippet) == []
