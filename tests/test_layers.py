"""Which code may import which: stages/ imports only itself, tools/ builds on stages/, bench/
on both, and a test imports the product and tests/conftest.py; no module imports a
framework's private modules (docs/design.md, "Layers")."""

import ast

from tests.conftest import ROOT

# What each package may import of the project's own packages.
ALLOWED = {
    "stages": ("stages",),
    "tools": ("stages", "tools"),
    "bench": ("stages", "tools", "bench"),
    "tests": ("stages", "tools", "tests.conftest"),
}
OWN_ALLOWED = {"tests/test_bench.py": ("bench",)}  # the benchmarks' own tests
PRIVATE = ("keras.src", "tensorflow.python")  # no stable API: any release may change them


def within(name, package):
    return name == package or name.startswith(f"{package}.")


def imported(source):
    """(line, name) of every import in `source`, in functions too: `import a.b` -> "a.b",
    `from a import b` -> "a.b" (b may be a module or a name in a)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # the project has no `from .`
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return sorted(found)


def problems(path, source):
    """One line per import of `source` (the file at `path`, relative to the root) that
    goes against its layer, or into a private module."""
    layer = path.split("/")[0]
    allowed = ALLOWED[layer] + OWN_ALLOWED.get(path, ())
    found = []
    for line, name in imported(source):
        own = name.split(".")[0] in ALLOWED
        if own and not any(within(name, a) for a in allowed):
            found.append(f"{path}:{line} imports {name}; {layer}/ may import {', '.join(allowed)}")
        if any(within(name, p) for p in PRIVATE):
            found.append(f"{path}:{line} imports {name}, a private module")
    return found


def test_every_module_imports_only_what_its_layer_may():
    files = sorted(f for layer in ALLOWED for f in (ROOT / layer).rglob("*.py"))
    assert len(files) > 40  # the walk found the code
    found = []
    for f in files:
        found += problems(f.relative_to(ROOT).as_posix(), f.read_text())
    assert not found, "\n".join(found)


def test_an_import_against_the_layers_or_into_a_private_module_is_reported():
    source = (
        "from stages import models\n"
        "from tools.paths import dvc_var\n"
        "def f():\n"
        "    from tensorflow.python.framework import config\n"
        "import keras.src.export\n"
    )
    assert problems("stages/x.py", source) == [
        "stages/x.py:2 imports tools.paths.dvc_var; stages/ may import stages",
        "stages/x.py:4 imports tensorflow.python.framework.config, a private module",
        "stages/x.py:5 imports keras.src.export, a private module",
    ]
    tests = "from tests.conftest import ROOT\nfrom tests import test_remote\nimport bench.common\n"
    assert problems("tests/test_x.py", tests) == [
        "tests/test_x.py:2 imports tests.test_remote; tests/ may import stages, tools, "
        "tests.conftest",
        "tests/test_x.py:3 imports bench.common; tests/ may import stages, tools, tests.conftest",
    ]
    assert problems("tests/test_bench.py", tests) == [  # bench's own tests import it
        "tests/test_bench.py:2 imports tests.test_remote; tests/ may import stages, tools, "
        "tests.conftest, bench",
    ]
