"""The layering, enforced: an AST walk of every module of the package, lazy imports included.

Layers, bottom up (a module may import its own layer and those below, never above):

  0 kernels           torch and triton only (plus the standard library)
  1 io, dispatch, cli, registry (the store, standard library only: loaders resolve registry references)
  2 sources           GGUF import and export (gguf_write), BPE vocabularies, the embedded model
  3 models            config, decoder, tokenizer
  4 quant             NF4
  5 lora              LoRA layers, adapter files
  6 loading, export, data
  7 train             config, step, evaluation, loop, checkpoints, lineage, plot, memory
  8 eval, generate, convert, runs, registry.command, plan: the commands on top

Also: no import cycle between modules, code inside the package imports the defining module rather
than a package's re-exports (`from lora_engine.lora import LoraConfig` is for users), and the kernels
import no third-party package other than torch and triton.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lora_engine"

LAYERS = {
    "lora_engine.kernels": 0,
    "lora_engine.io": 1, "lora_engine.dispatch": 1, "lora_engine.cli": 1, "lora_engine.registry": 1,
    "lora_engine.sources": 2, "lora_engine.sources.gguf_write": 2,
    "lora_engine.models": 3,
    "lora_engine.quant": 4,
    "lora_engine.lora": 5,
    "lora_engine.loading": 6, "lora_engine.export": 6, "lora_engine.data": 6, "lora_engine.deploy": 6,
    "lora_engine.train": 7,
    "lora_engine.eval": 8, "lora_engine.generate": 8, "lora_engine.convert": 8, "lora_engine.runs": 8,
    "lora_engine.registry.command": 8, "lora_engine.registry.mlflow_link": 8, "lora_engine.registry.__main__": 8, "lora_engine.plan": 8,
    "lora_engine": 9,  # the facade: imports nothing eagerly
}
KERNEL_THIRD_PARTY = {"torch", "triton"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def layer(mod: str) -> int:
    while mod not in LAYERS:
        mod = mod.rpartition(".")[0]
        if not mod:
            raise KeyError(mod)
    return LAYERS[mod]


def imports(mod: str) -> list[tuple[int, str, str | None]]:
    """(line, imported module, name taken from a package or None) for every import in `mod`."""
    path = MODULES[mod]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = mod if mod in PACKAGES else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub, None) if sub in MODULES else (node.lineno, base, a.name))
    return out


def internal_edges() -> dict[str, set[str]]:
    return {m: {t for _, t, _ in imports(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if not any(m == k or m.startswith(k + ".") for k in LAYERS)]
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"


def test_no_upward_import():
    bad = []
    for m in MODULES:
        for line, t, name in imports(m):
            if t in MODULES and layer(t) > layer(m) and name != "__version__":
                bad.append(f"{MODULES[m].relative_to(ROOT.parent)}:{line}: {m} (layer {layer(m)}) imports "
                           f"{t} (layer {layer(t)})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_import_cycle():
    edges = internal_edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_go_to_the_defining_module():
    bad = []
    for m in MODULES:
        for line, t, name in imports(m):
            if name is not None and t in PACKAGES and t != m and not m.startswith(t + ".") and name != "__version__":
                bad.append(f"{MODULES[m].relative_to(ROOT.parent)}:{line}: from {t} import {name}")
            elif name is None and t in PACKAGES and t != m and not m.startswith(t + ".") and m != "lora_engine":
                bad.append(f"{MODULES[m].relative_to(ROOT.parent)}:{line}: import {t}")
    assert not bad, "import the defining module, not a package's re-exports:\n" + "\n".join(bad)


def test_kernels_import_torch_and_triton_only():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for m in MODULES:
        if layer(m) != 0:
            continue
        for line, t, _ in imports(m):
            top = t.split(".")[0]
            if top == "lora_engine":
                if not t.startswith("lora_engine.kernels"):
                    bad.append(f"{m}:{line}: {t}")
            elif top not in stdlib and top not in KERNEL_THIRD_PARTY and top != "__future__":
                bad.append(f"{m}:{line}: {t}")
    assert not bad, "the kernels import torch, triton and the standard library only:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from lora_engine.train import loop\n", {"lora_engine.train.loop"}),
    ("def f():\n    from lora_engine.models.config import ModelConfig\n", {"lora_engine.models.config"}),
])
def test_the_walker_sees_submodule_and_lazy_imports(tmp_path, monkeypatch, source, expected):
    """The checks above are only as good as the walk: it must see `from pkg import submodule` and
    imports inside functions, or a cycle through them would pass unnoticed."""
    fake = tmp_path / "probe.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "lora_engine.probe", fake)
    assert {t for _, t, _ in imports("lora_engine.probe")} == expected


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from lora_engine.cycle_b import g\n")
    b.write_text("from lora_engine.cycle_a import f\n")
    monkeypatch.setitem(MODULES, "lora_engine.cycle_a", a)
    monkeypatch.setitem(MODULES, "lora_engine.cycle_b", b)
    monkeypatch.setitem(LAYERS, "lora_engine.cycle_a", 5)
    monkeypatch.setitem(LAYERS, "lora_engine.cycle_b", 5)
    with pytest.raises(AssertionError, match="cycle_a -> lora_engine.cycle_b -> lora_engine.cycle_a"):
        test_no_import_cycle()
