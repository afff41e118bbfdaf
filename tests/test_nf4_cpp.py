"""The C++ NF4 ops (csrc/nf4.cpp) against the PyTorch reference, bit for bit, and the fallback without them.

The op tests skip, saying so, only where the extension was not built (LORA_ENGINE_NO_EXT=1 or no
compiler at install time); CI builds it (scripts/setup.sh installs with --no-build-isolation).
The fallback tests always run.
"""

import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import dispatch
from lora_engine.kernels import nf4_cpp
from lora_engine.kernels import nf4_reference as ref
from lora_engine.kernels.nf4_format import BLOCKSIZES, NF4_CODE
from lora_engine.quant import nf4

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


needs_ext = pytest.mark.skipif(not nf4_cpp.available(), reason="C++ extension not built (pip install --no-build-isolation -e .)")


@needs_ext
@settings(deadline=None)
@given(
    rows=st.integers(1, 33), cols=st.sampled_from([1, 7, 9, 41, 64, 341]), blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(DTYPES), nested=st.booleans(), scale=st.sampled_from([0.0, 1e-30, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_cpp_equals_reference(rows, cols, blocksize, dtype, nested, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    ours = nf4.quantize(w, blocksize, nested, backend="cpp")
    want = ref.nf4_quantize(w, blocksize, nested)
    assert torch.equal(ours.packed, want.packed) and torch.equal(ours.absmax, want.absmax)
    if nested:
        assert torch.equal(ours.nested_absmax, want.nested_absmax) and ours.nested_offset == want.nested_offset
    for out in DTYPES:
        assert torch.equal(nf4.dequantize(want, out, backend="cpp"), ref.nf4_dequantize(want, out)), out


_DEQUANTIZE_CHECK = """
import torch
from lora_engine.quant import nf4
from lora_engine.kernels import nf4_reference as ref
g = torch.Generator().manual_seed(0)
for rows, cols, bs in [(33, 341, 32), (7, 9, 64), (1536, 576, 64), (3, 1000, 128), (5, 4099, 4096), (1, 1, 32)]:
    for nested in (False, True):
        q = nf4.quantize(torch.randn(rows, cols, generator=g), bs, nested, backend="cpp")
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            assert torch.equal(nf4.dequantize(q, dt, backend="cpp"), ref.nf4_dequantize(q, dt)), (rows, cols, bs, dt)
print("ok")
"""


def _run_with_simd(level: str):
    import os
    import subprocess

    env = dict(os.environ, LORA_ENGINE_NF4_SIMD=level)
    return subprocess.run([sys.executable, "-c", _DEQUANTIZE_CHECK], capture_output=True, text=True, env=env, timeout=300)


@needs_ext
@pytest.mark.parametrize("level", ["auto", "avx2", "none"])
def test_cpp_dequantize_paths_equal_reference(level):
    """The dequantizer's vector paths (AVX-512BW: 16- and 32-bit outputs; AVX2: fp32) and its scalar
    loop, each bit for bit against the reference, at shapes whose blocks end inside a vector, short
    last blocks and an odd count. LORA_ENGINE_NF4_SIMD picks the path (a CPU without the asked
    instructions takes the next one down, so every level runs somewhere on any x86 CPU); a fresh
    process each, because the choice is made once per process."""
    p = _run_with_simd(level)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


@needs_ext
def test_cpp_dequantize_refuses_an_unknown_simd_level():
    p = _run_with_simd("sse9")
    assert p.returncode != 0 and "LORA_ENGINE_NF4_SIMD must be auto, avx2 or none, got 'sse9'" in p.stderr


@needs_ext
def test_cpp_linear_and_auto_choice():
    assert nf4.choose_backend("cpu") == "cpp"
    lin = torch.nn.Linear(64, 24)
    q = nf4.Linear4bit.from_linear(lin)
    x = torch.randn(3, 64, requires_grad=True)
    y = q(x)  # backend None on CPU: the C++ dequantize inside the autograd function
    x2 = x.detach().clone().requires_grad_(True)
    y2 = ref.nf4_linear(x2, q.weight, q.bias)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)


@needs_ext
def test_cpp_op_checks_its_inputs():
    w = ref.nf4_quantize(torch.randn(4, 64), 32, False)
    with pytest.raises(RuntimeError, match="packed has 128 bytes, 300 values need 150"):
        torch.ops.lora_engine.nf4_dequantize(w.packed, w.absmax, w.code, 32, 300, torch.float32)
    with pytest.raises(RuntimeError, match="absmax must be uint8 with 8 values"):
        torch.ops.lora_engine.nf4_dequantize(w.packed, w.absmax, w.code, 32, 256, torch.float32,
                                             torch.ones(1), torch.zeros(256), 0.0, 256)
    with pytest.raises(RuntimeError, match="code must be float32 \\(16,\\)"):
        torch.ops.lora_engine.nf4_quantize(torch.randn(64), NF4_CODE[:8], 32)


@needs_ext
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cpp_rejects_non_finite(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="weight of shape \\(4, 64\\) holds 1 inf/NaN values"):
        nf4.quantize(w, 64, backend="cpp")


def _without_extension(monkeypatch):
    """As if the extension were never built: `import lora_engine.kernels._C` raises ImportError, and the
    probe and the warn-once are fresh (monkeypatch restores the real, cached ones afterwards)."""
    monkeypatch.setitem(sys.modules, "lora_engine.kernels._C", None)
    monkeypatch.setattr(nf4_cpp, "_built", None)
    monkeypatch.setattr(nf4_cpp, "_register_fakes", lambda: None)  # the real ops keep theirs
    monkeypatch.setattr(dispatch, "_warned_no_cpp", False)


def test_fallback_without_extension(monkeypatch):
    """With the extension unavailable: one warning, then the reference everywhere, never a crash."""
    _without_extension(monkeypatch)
    with pytest.warns(UserWarning, match="C\\+\\+ extension is not built.*pip install --no-build-isolation"):
        assert nf4.choose_backend("cpu") == "torch"
    w = torch.randn(8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = nf4.quantize(w, 64)
        assert torch.equal(q.packed, ref.nf4_quantize(w, 64).packed)
        assert torch.equal(nf4.dequantize(q), ref.nf4_dequantize(q))
        lin = torch.nn.Linear(64, 8)
        assert torch.equal(nf4.Linear4bit.from_linear(lin)(w), ref.nf4_linear(w, nf4.quantize(lin.weight), lin.bias))
        with pytest.raises(RuntimeError, match="backend='cpp' requested.*not built"):
            nf4.dequantize(q, backend="cpp")


def test_fallback_warns_once(monkeypatch):
    _without_extension(monkeypatch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            nf4.dequantize(nf4.quantize(torch.randn(4, 32), 32))
    assert sum("C++ extension is not built" in str(w.message) for w in seen) == 1


@needs_ext
def test_cpp_is_a_model_backend():
    """set_backend(model, "cpp") is the reference with the C++ dequantizer: the same values as auto on CPU
    and as "torch", for a QLoRA-style model mixing NF4 and dense ops."""
    from lora_engine.dispatch import set_backend

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    x = torch.randn(5, 64)
    model = nf4.quantize_model(dense, skip=())
    outs = {}
    for backend in (None, "cpp", "torch"):
        set_backend(model, backend)
        outs[backend] = model(x)
    assert torch.equal(outs[None], outs["cpp"]) and torch.equal(outs["cpp"], outs["torch"])
    assert dispatch.choose_backend("cpu") == "cpp"
    with pytest.raises(RuntimeError, match="backend='cpp' requested for a meta tensor.*no meta kernels"):
        dispatch.choose_backend("meta", "cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend(model, "cuda")
