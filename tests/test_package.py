"""The package surface: `import lora_engine as le` is cheap, and every public name and public
submodule (`le.nf4`, `le.trainer`, `le.data`, ...) works without importing it first.

Checked in a fresh interpreter: in this test session other tests have long imported the
submodules, which binds them on the package and would hide a missing lazy import.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lora_engine

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
import lora_engine as le

heavy = sorted(m for m in ("torch", "triton", "numpy", "tokenizers", "transformers", "safetensors") if m in sys.modules)
assert not heavy, f"import lora_engine imported {heavy}"

# The submodules the issue named, first thing in a fresh interpreter.
assert le.nf4.quantize and le.trainer.train_step and le.data.Batcher

# le.generate is the command module, and calling it runs its function (the README's `le.generate(model, ...)`).
import inspect
assert le.generate is sys.modules["lora_engine.generate"] and callable(le.generate)
assert inspect.signature(le.generate) == inspect.signature(le.generate.generate)
for name in le.__all__:
    if name in le._MODULES:
        vars(le).pop(name, None)  # take the lazy path even where an import bound the name already
        assert getattr(le, name) is sys.modules[le._MODULES[name]], name
    else:
        assert getattr(le, name) is getattr(sys.modules[le._EXPORTS[name]], name), name
try:
    le.no_such_thing
except AttributeError as e:
    assert str(e) == "module 'lora_engine' has no attribute 'no_such_thing'", e
else:
    raise AssertionError("le.no_such_thing did not raise")
listed = dir(le)
assert set(le.__all__) <= set(listed) and "__version__" in listed, listed
assert "import_module" not in listed, listed
print("ok")
"""


def test_public_names_and_submodules_in_a_fresh_interpreter(tmp_path):
    # Run outside the repository, so the installed package is what gets imported.
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_every_module_a_docstring_points_to_is_public():
    """`lora_engine.<module>` or `from lora_engine import <module>` in a module docstring of the
    package: the user was told to use it, so `le.<module>` must work."""
    named = set()
    for path in (ROOT / "lora_engine").rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        named |= set(re.findall(r"lora_engine\.([a-z][a-z0-9_]*)", doc))
        for names in re.findall(r"from lora_engine import ([a-z0-9_, ]+)", doc):
            named |= {n.strip() for n in names.split(",")}
    pkg = ROOT / "lora_engine"
    modules = {n for n in named if (pkg / f"{n}.py").is_file() or (pkg / n / "__init__.py").is_file()
               or n in lora_engine._MODULES}
    assert {"data", "dispatch", "nf4"} <= modules  # the scan finds what it should
    assert modules - set(lora_engine.__all__) == set()


def command_modules() -> list[str]:
    """Every module a `python -m lora_engine.<cmd>` runs: those with a `__main__` guard, and the modules
    the packages' __main__.py take their main from (a __main__.py itself would run on import)."""
    found = set()
    for path in (ROOT / "lora_engine").rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.name == "__main__.py":
            found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                      and n.module and n.module.startswith("lora_engine.") and any(a.name == "main" for a in n.names)}
        elif '__name__ == "__main__"' in path.read_text(encoding="utf-8"):
            found.add(mod)
    return sorted(found)


ORDER_CHILD = r"""
import importlib, sys
import lora_engine as le

commands = sys.argv[1:]
if commands[0] == "late":  # the facade's names first, the command modules after
    commands = commands[1:]
    registry, runs, convert, generate = le.registry, le.runs, le.convert, le.generate
for m in commands:
    importlib.import_module(m)
from lora_engine.registry.store import Registry
from lora_engine.train import lineage

assert le.registry is sys.modules["lora_engine.registry"], le.registry
assert le.registry.Registry is Registry and le.registry.resolve_ref and le.registry.RegistryError
assert le.runs is sys.modules["lora_engine.runs"], le.runs
assert le.runs.format_runs is lineage.format_runs and le.runs.read_manifest is lineage.read_manifest
assert le.runs.main is lineage.main
from lora_engine.sources import gguf
assert le.convert is sys.modules["lora_engine.convert"], le.convert
assert le.convert.convert_gguf is gguf.convert_gguf and le.convert.main is gguf.main and le.convert.GGUFFile
assert le.generate is sys.modules["lora_engine.generate"], le.generate
assert callable(le.generate) and le.generate.__call__ is le.generate.generate and le.generate.main
from lora_engine import generate
assert generate is le.generate
print("ok")
"""


@pytest.mark.parametrize("when", ["first", "late"])
def test_names_of_command_modules_mean_one_thing_whatever_was_imported_first(tmp_path, when):
    """le.registry is the registry package, le.runs, le.convert and le.generate their command modules (with
    the names they have always offered), whether every command module was imported before the facade's
    names were first read or after."""
    commands = command_modules()
    assert {"lora_engine.registry.command", "lora_engine.runs", "lora_engine.train.command",
            "lora_engine.generate"} <= set(commands)  # the scan finds what it should
    args = (["late"] if when == "late" else []) + commands
    assert "lora_engine.convert" in commands
    out = subprocess.run([sys.executable, "-c", ORDER_CHILD, *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_public_name_that_is_a_submodule_maps_to_that_submodule():
    """Importing lora_engine.<name> binds <name> on the package to that module, whatever __getattr__ said:
    a public name spelled like a submodule (le.convert, le.generate) that meant anything else would change
    meaning with import order."""
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules([str(ROOT / "lora_engine")])}
    assert {"convert", "generate", "runs", "registry", "data"} <= submodules  # the scan finds what it should
    clashes = {n: lora_engine._MODULES.get(n) or lora_engine._EXPORTS[n]
               for n in set(lora_engine.__all__) & submodules
               if lora_engine._MODULES.get(n) != f"lora_engine.{n}"}
    assert clashes == {}
