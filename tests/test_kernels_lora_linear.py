"""The fused LoRA linear (Triton) against reference.lora_linear (PEFT's three matmuls): forward,
backward (dx, dA, dB, dbias), dropout input, ranks 1, 8, 64, weird sizes, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.kernels import ops_reference as ref
from tests.kernel_utils import assert_accurate, check_op, device, needs_triton

pytestmark = needs_triton


def ops():
    from lora_engine import dispatch

    return dispatch.triton_ops()


@settings(max_examples=10)
@given(m=st.integers(1, 70), k=st.integers(1, 100), n=st.integers(1, 90), r=st.sampled_from([1, 8, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
       lead=st.sampled_from([(), (2,)]))
def test_lora_linear(m, k, n, r, dtype, bias, lead):
    x = torch.randn(*lead, m, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64) / k**0.5
    a = torch.randn(r, k, dtype=torch.float64) / k**0.5
    b = torch.randn(n, r, dtype=torch.float64) / r**0.5
    bb = torch.randn(n, dtype=torch.float64)
    dy = torch.randn(*lead, m, n, dtype=torch.float64)
    scale = 2.0

    def wrap(f):
        return lambda x, w, a, b, bb: f(x, w, bb if bias else None, a, b, scale)

    # W frozen, as in LoRA: no weight gradient asked for.
    check_op(wrap(ops().lora_linear), wrap(ref.lora_linear), [x, w, a, b, bb], [dy], dtype, device(),
             needs_grad=(True, False, True, True, bias), names=["x", "lora_A", "lora_B", "bias"][: 4 if bias else 3])


def test_lora_linear_with_dropout_and_trained_weight():
    # x_dropped carries its own graph (the caller's dropout); the weight trains too (full fine-tune).
    dev = device()
    x = torch.randn(3, 9, 40, dtype=torch.float64)
    w = torch.randn(33, 40, dtype=torch.float64) / 6
    a, b = torch.randn(8, 40, dtype=torch.float64) / 6, torch.randn(33, 8, dtype=torch.float64) / 3
    keep = (torch.rand(3, 9, 40) > 0.3).double() / 0.7
    dy = torch.randn(3, 9, 33, dtype=torch.float64)

    def wrap(f):
        return lambda x, w, a, b, keep: f(x, w, None, a, b, 0.5, x * keep)

    check_op(wrap(ops().lora_linear), wrap(ref.lora_linear), [x, w, a, b, keep], [dy], torch.float32, dev,
             needs_grad=(True, True, True, True, False), names=["x", "weight", "lora_A", "lora_B"])


def test_every_triton_op_has_the_references_signature():
    """One public signature per op: each Triton op comes from its own file and takes the reference's
    arguments, in the reference's order."""
    import inspect

    def names(fn):
        return list(inspect.signature(fn).parameters)

    triton_ops = ops()
    assert set(vars(triton_ops)) == {"lora_linear", "rms_norm", "rope", "swiglu", "linear_cross_entropy"}
    for name, fn in vars(triton_ops).items():
        assert fn.__module__.endswith("_triton") and names(fn) == names(getattr(ref, name)), name
    dev = device()
    x, w = torch.randn(5, 16, device=dev), torch.randn(24, 16, device=dev)
    a, b, bias = torch.randn(4, 16, device=dev), torch.randn(24, 4, device=dev), torch.randn(24, device=dev)
    got = triton_ops.lora_linear(x, w, bias, a, b, 0.25)
    want = ref.lora_linear(x.cpu(), w.cpu(), bias.cpu(), a.cpu(), b.cpu(), 0.25)
    assert_accurate(got, want)


def test_lora_linear_errors():
    dev = device()
    x, w = torch.randn(5, 16, device=dev), torch.randn(24, 16, device=dev)
    a, b = torch.randn(4, 16, device=dev), torch.randn(24, 4, device=dev)
    f = ops().lora_linear
    with pytest.raises(ValueError, match=r"lora_linear: x has shape \(5, 15\) \(15 features\), weight expects 16"):
        f(x[:, :15], w, None, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must be \(r, 16\) and lora_B \(24, r\) with r >= 1 for a weight \(24, 16\); "
                                         r"got lora_A \(4, 16\) and lora_B \(24, 3\)"):
        f(x, w, None, a, b[:, :3], 1.0)
    with pytest.raises(ValueError, match="lora_linear: lora_A is torch.float16 but x is torch.float32"):
        f(x, w, None, a.half(), b, 1.0)
    with pytest.raises(ValueError, match="lora_linear: weight has dtype torch.int8"):
        f(x, w.to(torch.int8), None, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_linear: bias has shape \(23,\)"):
        f(x, w, torch.randn(23, device=dev), a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_linear: x_dropped \(5, 8\)"):
        f(x, w, None, a, b, 1.0, x[:, :8])
    with pytest.raises(ValueError, match=r"lora_linear: weight must be 2-D \(out, in\), got shape \(16,\)"):
        f(x, w[0], None, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_linear: lora_B is on meta but x is on"):
        f(x, w, None, a, b.to("meta"), 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter message")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    from lora_engine.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="lora_linear: x is a CPU tensor; Triton kernels need a CUDA device, or "
                                         "TRITON_INTERPRET=1"):
        ops().lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)
