"""The package surface: `import lora_engine as le` is cheap, and every public name and public
submodule (`le.nf4`, `le.trainer`, `le.data`, ...) works without importing it first.

Checked in a fresh interpreter: in this test session other tests have long imported the
submodules, which binds them on the package and would hide a missing lazy import.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import lora_engine

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
import lora_engine as le

heavy = sorted(m for m in ("torch", "triton", "numpy", "tokenizers", "transformers", "safetensors") if m in sys.modules)
assert not heavy, f"import lora_engine imported {heavy}"

# The submodules the issue named, first thing in a fresh interpreter.
assert le.nf4.quantize and le.trainer.train_step and le.data.Batcher

assert le.generate is le.generate is sys.modules["lora_engine.generate"].generate  # the function, twice
for name in le.__all__:
    if name in le._MODULES:
        vars(le).pop(name, None)  # bound already as a side effect of an earlier import: take the lazy path anyway
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
