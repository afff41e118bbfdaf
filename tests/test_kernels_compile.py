"""Every Triton kernel compiles to PTX and cubin for its GPU targets (sm_75 .. sm_90), without a GPU.

The interpreter accepts programs a GPU compiler rejects (tl.dot with K < 16, bad layouts, too much
shared memory), so the property tests alone prove little about a GPU. triton.compile with an
explicit GPUTarget runs the real compiler here, without a GPU (docs/triton_interpreter.md). What to compile lives beside each
kernel: `compile_specs()` in every kernels/*_triton.py (kernels/compile_spec.py), built from the
launchers' own tile rules; this file only runs them, and fails when a kernel has none. Compiling
needs JITFunctions, i.e. a process where TRITON_INTERPRET is unset: the test runs this file as a
script in one subprocess for every spec x target, which prints one JSON line per compilation.
Compiles land in triton's cache (keyed by source, options and target): a rerun is fast and exact.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "lora_engine" / "kernels"
# Shared memory per block (bytes) each architecture allows (CUDA programming guide, opt-in maximum).
SMEM_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}
# @triton.jit functions that are neither launched nor called by a kernel, with the reason.
NOT_KERNELS = {("_common", "_probe"): "never launched: its type tells whether the interpreter is on"}


def _is_jit(dec: ast.expr) -> bool:
    dec = dec.func if isinstance(dec, ast.Call) else dec
    return isinstance(dec, ast.Attribute) and dec.attr == "jit" and getattr(dec.value, "id", None) == "triton"


def jit_functions() -> dict[str, dict[str, ast.FunctionDef]]:
    """module stem -> {name: def} of every @triton.jit function in lora_engine/kernels, by AST."""
    out = {}
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        defs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef) and any(map(_is_jit, f.decorator_list))}
        if defs:
            out[path.stem] = defs
    return out


def kernels() -> dict[str, set[str]]:
    """module stem -> the @triton.jit functions that are kernels: not device functions (called by
    name inside another @triton.jit function) and not listed in NOT_KERNELS."""
    jit = jit_functions()
    called = {n.func.id for defs in jit.values() for f in defs.values() for n in ast.walk(f)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    out = {mod: {name for name in defs if name not in called and (mod, name) not in NOT_KERNELS}
           for mod, defs in jit.items()}
    return {mod: names for mod, names in out.items() if names}


def specs() -> list:
    """Every CompileSpec of the package, module by module."""
    out = []
    for mod in kernels():
        out += importlib.import_module(f"lora_engine.kernels.{mod}").compile_specs()
    return out


def _cpu_error() -> str | None:
    """nf4_dequantize on CPU tensors with the interpreter off: a clear error, not a crash inside triton."""
    import torch

    from lora_engine.kernels import nf4_triton
    from lora_engine.kernels.nf4_format import NF4_CODE, NF4Tensor

    w = NF4Tensor(torch.zeros(32, dtype=torch.uint8), torch.ones(1), NF4_CODE.clone(), 64, (8, 8), torch.float32)
    try:
        nf4_triton.nf4_dequantize(w, torch.float32)
    except ValueError as e:
        return str(e)
    return None


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for spec in specs():
        for cc in spec.targets:
            row = {"name": spec.name, "kernel": spec.kernel.fn.__name__, "cc": cc}
            try:
                k = triton.compile(ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                                             attrs=spec.attrs), target=GPUTarget("cuda", cc, 32), options=spec.options)
                row.update(ok=True, shared=k.metadata.shared, cubin=len(k.asm.get("cubin", b"")),
                           ptx_fma_f32="fma.rn.f32" in k.asm["ptx"])
            except Exception as e:  # report every failure, not only the first
                failures += 1
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            print(json.dumps(row), flush=True)
    print(json.dumps({"cpu_error": _cpu_error()}))
    return 1 if failures else 0


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not rows or "cpu_error" not in rows[-1]:
        pytest.fail(f"the compile script died (rc {r.returncode}):\n{r.stderr[-4000:]}")
    return {"results": rows[:-1], "cpu_error": rows[-1]["cpu_error"]}


def test_every_kernel_has_a_compile_spec():
    found = kernels()
    # The AST walk sees the kernels (a walk that finds nothing would pass anything).
    assert {"_lora_mm", "_nf4_matmul_kernel", "_nf4_dequant_kernel", "_ce_rows", "_rms_fwd", "_rms_bwd",
            "_rope_kernel", "_swiglu_fwd", "_swiglu_bwd", "_gdr_fwd", "_conv_fwd", "_conv_bwd",
            "_moe_lora_mm", "_moe_seg_mm", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"} <= set().union(*found.values()), found
    for mod, names in found.items():
        m = importlib.import_module(f"lora_engine.kernels.{mod}")
        assert hasattr(m, "compile_specs"), f"kernels/{mod}.py has kernels {sorted(names)} but no compile_specs()"
        have = {s.kernel.fn.__name__ for s in m.compile_specs()}
        assert names <= have, f"kernels/{mod}.py: no compile spec for {sorted(names - have)}"


def test_the_kernel_finder_sees_a_new_kernel(tmp_path, monkeypatch):
    # A kernel file added without compile_specs() must show up as a kernel the test above demands a spec of.
    (tmp_path / "new_triton.py").write_text("import triton\n\n@triton.jit\ndef _helper(x):\n    return x\n\n"
                                            "@triton.jit\ndef _new_kernel(x_ptr):\n    _helper(x_ptr)\n")
    monkeypatch.setitem(globals(), "KERNELS", tmp_path)
    assert kernels() == {"new_triton": {"_new_kernel"}}


def test_every_spec_compiles_for_its_targets(compiled):
    res = compiled["results"]
    failed = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in res if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert len(res) == sum(len(s.targets) for s in specs())
    for r in res:
        assert r["cubin"] > 0, r
        assert r["shared"] <= SMEM_LIMIT[r["cc"]], f"{r}: over the {SMEM_LIMIT[r['cc']]} bytes of sm_{r['cc']}"
    # Every kernel at least once for every target.
    every = set(SMEM_LIMIT)
    for name in set().union(*kernels().values()):
        assert {r["cc"] for r in res if r["kernel"] == name} == every, name


def test_nf4_dequant_has_no_fma(compiled):
    # Exactness against the reference needs the nested absmax's mul and add rounded separately.
    rows = [r for r in compiled["results"] if r["kernel"] == "_nf4_dequant_kernel"]
    assert rows and not any(r.get("ptx_fma_f32", True) for r in rows), rows


def test_cpu_tensor_without_interpreter_says_what_to_do(compiled):
    msg = compiled["cpu_error"]
    assert msg is not None, "nf4_dequantize accepted a CPU tensor with the interpreter off"
    assert "TRITON_INTERPRET=1" in msg and "CUDA" in msg, msg


if __name__ == "__main__":
    sys.exit(main())
