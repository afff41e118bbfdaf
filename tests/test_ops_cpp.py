"""The fused CPU ops (csrc/cpu_fused.cpp via kernels/ops_cpp.py) against kernels/ops_reference.py.

Forward and backward of RMSNorm, RoPE and SwiGLU in fp32 and bf16, shapes drawn by hypothesis (odd
widths, one row, transposed layouts), by the accuracy rule of tests/kernel_utils.py against the
float64 reference; the ops as custom ops (opcheck); the fallback to the reference for what the C++
ops do not take; the backend choice. The op tests skip, saying so, only where the extension was not
built (CI builds it); the fallback tests always run.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import dispatch
from lora_engine.kernels import ops_cpp as cf
from lora_engine.kernels import ops_reference as ref
from tests.kernel_utils import check_op

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])

needs_ops = pytest.mark.skipif(not cf.available(), reason="C++ extension not built (pip install --no-build-isolation -e .)")


def _grad_fn_name(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__ if t.grad_fn is not None else ""


@needs_ops
@settings(max_examples=12)
@given(rows=st.integers(1, 5), cols=st.integers(1, 1500), dtype=DTYPES, big=st.booleans())
def test_swiglu(rows, cols, dtype, big):
    # big: gates up to ~+-120, where exp(-g) overflows or underflows in fp32 (the clamped polynomial).
    gate = torch.randn(rows, cols, dtype=torch.float64) * (40 if big else 4)
    up = torch.randn(rows, cols, dtype=torch.float64)
    dy = torch.randn(rows, cols, dtype=torch.float64)
    check_op(cf.swiglu, ref.swiglu, [gate, up], [dy], dtype, "cpu", names=["gate", "up"])


@needs_ops
@settings(max_examples=12)
@given(rows=st.integers(1, 19), d=st.integers(1, 700), dtype=DTYPES, weight_grad=st.booleans())
def test_rms_norm(rows, d, dtype, weight_grad):
    x = torch.randn(rows, d, dtype=torch.float64) * 3
    w = 1 + 0.3 * torch.randn(d, dtype=torch.float64)
    dy = torch.randn(rows, d, dtype=torch.float64)

    def wrap(f):
        return lambda x, w: f(x, w, 1e-6)

    check_op(wrap(cf.rms_norm), wrap(ref.rms_norm), [x, w], [dy], dtype, "cpu", needs_grad=(True, weight_grad),
             names=["x", "weight"])


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_many_tasks(dtype):
    # 4 x 75 rows of 576 (the step's width): more than one task, so the weight gradient is the sum of
    # per-task partial rows, which the small drawn sizes above (one task) never reach.
    x = torch.randn(4, 75, 576, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(576, dtype=torch.float64)
    dy = torch.randn(4, 75, 576, dtype=torch.float64)
    check_op(lambda x, w: cf.rms_norm(x, w, 1e-5), lambda x, w: ref.rms_norm(x, w, 1e-5), [x, w], [dy], dtype, "cpu",
             names=["x", "weight"])


def _fixed_order_sum(terms: torch.Tensor) -> torch.Tensor:
    """csrc/cpu_fused.cpp's fixed_order_sum over the last dimension, in fp32 one addition at a time:
    term j into partial sum j % 16 (in order of j), then the 16 partials pairwise (l + 8, 4, 2, 1)."""
    acc = torch.zeros(*terms.shape[:-1], 16)
    for j in range(terms.shape[-1]):
        acc[..., j % 16] += terms[..., j]
    for w in (8, 4, 2, 1):
        acc[..., :w] += acc[..., w:2 * w]
    return acc[..., 0]


@needs_ops
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), d=st.integers(1, 80), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_rms_norm_sums_in_one_order_on_every_cpu(rows, d, dtype, seed):
    # The row's sum of squares has a fixed order, not the vector width's of the clone the CPU runs
    # (AVX-512, AVX2, baseline): rstd equals that order's fp32 arithmetic bit for bit, so the op
    # gives the same bits on every CI machine, and for a bf16 row and the same values in fp32.
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    w = torch.ones(d, dtype=dtype)
    _, rstd = torch.ops.lora_engine.rms_norm_fwd_cpu(x, w, 1e-6)
    ss = _fixed_order_sum(x.float() * x.float()).numpy()
    one, eps = np.float32(1), np.float32(1e-6)  # numpy: IEEE fp32 division and sqrt (torch's are off by ulps)
    want = one / np.sqrt(ss / np.float32(d) + eps)
    assert want.dtype == np.float32 and np.array_equal(rstd.numpy(), want)
    if dtype == torch.bfloat16:
        assert torch.equal(rstd, torch.ops.lora_engine.rms_norm_fwd_cpu(x.float(), w.float(), 1e-6)[1])


@needs_ops
@settings(max_examples=12)
@given(b=st.integers(1, 3), hq=st.integers(1, 5), hk=st.integers(1, 3), t=st.integers(1, 20),
       half=st.integers(1, 65), dtype=DTYPES, transposed=st.booleans(), table=st.sampled_from(["BTD", "1TD", "TD"]))
def test_rope(b, hq, hk, t, half, dtype, transposed, table):
    hd = 2 * half
    q = torch.randn(b, hq, t, hd, dtype=torch.float64)
    k = torch.randn(b, hk, t, hd, dtype=torch.float64)
    tb = {"BTD": (b, t, hd), "1TD": (1, t, hd), "TD": (t, hd)}[table]
    ang = torch.randn(*tb, dtype=torch.float64)
    cos, sin = ang.cos(), ang.sin()
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def wrap(f):
        # transposed: q and k as the model passes them, (B, T, H, hd) memory seen as (B, H, T, hd).
        def call(q, k, cos, sin):
            if transposed:
                q = q.transpose(1, 2).contiguous().transpose(1, 2)
                k = k.transpose(1, 2).contiguous().transpose(1, 2)
            return f(q, k, cos, sin)
        return call

    check_op(wrap(cf.rope), wrap(ref.rope), [q, k, cos, sin], [gq, gk], dtype, "cpu",
             needs_grad=(True, True, False, False), names=["q", "k"])


@needs_ops
def test_rope_keeps_the_layout_of_its_inputs():
    q = torch.randn(2, 7, 3, 8).transpose(1, 2)  # (B, H, T, hd) view of (B, T, H, hd)
    k = torch.randn(2, 7, 1, 8).transpose(1, 2)
    cos, sin = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    qo, ko = cf.rope(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_ops_run_and_save_only_what_backward_needs(dtype):
    x = torch.randn(3, 40, dtype=dtype, requires_grad=True)
    w = torch.ones(40, dtype=dtype)
    y = cf.rms_norm(x, w, 1e-6)
    assert _grad_fn_name(y) == "RMSNormFunctionBackward"
    saved = y.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(3, 40), (40,), (3,)] and saved[2].dtype == torch.float32
    g, u = torch.randn(3, 40, dtype=dtype, requires_grad=True), torch.randn(3, 40, dtype=dtype, requires_grad=True)
    s = cf.swiglu(g, u)
    assert _grad_fn_name(s) == "SwiGLUFunctionBackward" and len(s.grad_fn.saved_tensors) == 2
    with torch.no_grad():  # no autograd node, the op itself
        torch.testing.assert_close(cf.swiglu(g, u), torch.ops.lora_engine.swiglu_fwd_cpu(g, u), rtol=0, atol=0)


def _op_samples():
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    out = {}
    for dt in (torch.float32, torch.bfloat16):
        n = str(dt).split(".")[1]
        out[f"rms_norm_fwd_cpu-{n}"] = ("rms_norm_fwd_cpu", (r(5, 48, dtype=dt), r(48, dtype=dt), 1e-6))
        out[f"rms_norm_bwd_cpu-{n}"] = ("rms_norm_bwd_cpu", (r(5, 48, dtype=dt), r(5, 48, dtype=dt), r(48, dtype=dt),
                                                             r(5).abs() + 0.5, True))
        out[f"rope_cpu-{n}"] = ("rope_cpu", (r(1, 6, 4, 16, dtype=dt).transpose(1, 2), r(1, 2, 6, 16, dtype=dt),
                                             r(1, 6, 16, dtype=dt), r(1, 6, 16, dtype=dt), False))
        out[f"swiglu_fwd_cpu-{n}"] = ("swiglu_fwd_cpu", (r(3, 41, dtype=dt), r(3, 41, dtype=dt)))
        out[f"swiglu_bwd_cpu-{n}"] = ("swiglu_bwd_cpu", (r(3, 41, dtype=dt), r(3, 41, dtype=dt), r(3, 41, dtype=dt)))
        out[f"ce_grad_cpu-{n}"] = ("ce_grad_cpu", (r(4, 37, dtype=dt), torch.tensor([0, 36, 5, 5])))
    return out


@needs_ops
@pytest.mark.parametrize("case", sorted(_op_samples()))
def test_each_op_is_a_custom_op_whose_fake_matches_it(case):
    """opcheck: the schema is right and the fake gives the real op's shapes, strides and dtypes."""
    name, args = _op_samples()[case]
    torch.library.opcheck(getattr(torch.ops.lora_engine, name), args)


@needs_ops
def test_bad_inputs_raise_with_the_numbers():
    ops = torch.ops.lora_engine
    with pytest.raises(RuntimeError, match="head_dim must be even, got 7"):
        ops.rope_cpu(torch.randn(1, 1, 2, 7), torch.randn(1, 1, 2, 7), torch.randn(1, 2, 7), torch.randn(1, 2, 7), False)
    with pytest.raises(RuntimeError, match="up has shape"):
        ops.swiglu_fwd_cpu(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16, got Half"):
        ops.swiglu_fwd_cpu(torch.randn(2, 3).half(), torch.randn(2, 3).half())
    with pytest.raises(RuntimeError, match=r"weight must be \(8,\)"):
        ops.rms_norm_fwd_cpu(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="weight is BFloat16 but x is Float"):
        ops.rms_norm_fwd_cpu(torch.randn(2, 8), torch.randn(8).bfloat16(), 1e-6)


@needs_ops
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 40), hidden=st.integers(1, 48), vocab=st.integers(1, 2500), chunk=st.integers(1, 40),
       dtype=DTYPES, weight_grad=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_cross_entropy(rows, hidden, vocab, chunk, dtype, weight_grad, seed):
    # bf16 with a frozen head runs ce_grad_cpu per chunk; fp32, or a head that takes a gradient, the
    # reference's loop. Some labels ignored; logits up to ~+-30 so the softmax is peaked.
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64) * 2
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * (2 / hidden ** 0.5)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.2] = -100

    def wrap(f):
        return lambda h, w: f(h, w, labels, chunk_size=chunk)

    check_op(wrap(cf.linear_cross_entropy), wrap(ref.linear_cross_entropy), [h, w], [torch.tensor(1.5)], dtype, "cpu",
             needs_grad=(True, weight_grad), names=["hidden", "weight"])


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_grad_turns_the_logits_into_softmax_minus_onehot_in_place(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3001, generator=g, dtype=torch.float64) * 8).to(dtype)  # 3001: not a multiple of 16
    labels = torch.tensor([0, 3000, 17, 17, 2999])
    x64, block = x.double(), x.clone()
    loss = torch.ops.lora_engine.ce_grad_cpu(block, labels)
    want = torch.softmax(x64, -1) - torch.nn.functional.one_hot(labels, 3001)
    assert loss.dtype == torch.float32 and block.dtype == dtype
    torch.testing.assert_close(loss.double(), torch.logsumexp(x64, -1) - x64[range(5), labels], rtol=1e-6, atol=1e-5)
    # one rounding to the dtype of values computed in fp32 (exp: a ~2 ulp polynomial)
    tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(block.double(), want, rtol=tol, atol=1e-7 if dtype == torch.float32 else 1e-9)
    # the one-hot's -1 is subtracted in fp32 before the rounding: the target entry is round(p - 1)
    p_t = torch.softmax(x64, -1)[range(5), labels]
    assert torch.equal(block[range(5), labels], (p_t - 1).to(dtype)) or dtype == torch.float32


@needs_ops
def test_ce_grad_refuses_what_it_cannot_take():
    ops = torch.ops.lora_engine
    with pytest.raises(RuntimeError, match="label 7 of row 1 is outside the vocabulary"):
        ops.ce_grad_cpu(torch.randn(2, 7), torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="label -100 of row 0"):
        ops.ce_grad_cpu(torch.randn(2, 7), torch.tensor([-100, 1]))
    with pytest.raises(RuntimeError, match="must be a contiguous"):
        ops.ce_grad_cpu(torch.randn(7, 2).t(), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="labels must be a CPU int64 tensor of 2 values"):
        ops.ce_grad_cpu(torch.randn(2, 7), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16, got Half"):
        ops.ce_grad_cpu(torch.randn(2, 7).half(), torch.tensor([0, 1]))


@needs_ops
def test_bf16_cross_entropy_keeps_no_fp32_logits(monkeypatch):
    """The fused path: one (chunk, V) bf16 buffer, no fp32 one beside it (~64 MB at SmolLM2's vocab),
    and ce_grad_cpu called once per chunk; fp32 runs the reference's loop."""
    calls, sizes = [], []
    real, real_empty = cf._ce_grad_in_place, torch.empty
    monkeypatch.setattr(cf, "_ce_grad_in_place", lambda b, lab: calls.append(b.shape) or real(b, lab))
    h = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(300, 8, dtype=torch.bfloat16)
    labels = torch.arange(10) * 7

    def spy_empty(*a, **k):
        t = real_empty(*a, **k)
        sizes.append((tuple(t.shape), t.dtype))
        return t

    monkeypatch.setattr(torch, "empty", spy_empty)
    dispatch.linear_cross_entropy(h, w, labels, chunk_size=4).backward()
    monkeypatch.setattr(torch, "empty", real_empty)
    assert calls == [(4, 300), (4, 300), (2, 300)]
    assert ((4, 300), torch.bfloat16) in sizes and ((4, 300), torch.float32) not in sizes
    calls.clear()
    dispatch.linear_cross_entropy(h.detach().float().requires_grad_(), w.float(), labels, chunk_size=4)
    assert calls == []


@pytest.mark.parametrize("case", ["fp16", "bf16 x, fp32 weight", "fp64"])
def test_inputs_the_cpp_ops_do_not_take_run_the_reference(case):
    """fp16, mixed dtypes (an fp32 norm weight beside bf16 activations, transformers' promotion) and
    fp64 are served by the reference itself: the same values, bit for bit."""
    xdt, wdt = {"fp16": (torch.float16,) * 2, "bf16 x, fp32 weight": (torch.bfloat16, torch.float32),
                "fp64": (torch.float64,) * 2}[case]
    x, w = torch.randn(4, 24).to(xdt), (1 + torch.randn(24)).to(wdt)
    assert torch.equal(cf.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    u = (2 * x).to(wdt)
    assert torch.equal(cf.swiglu(x, u), ref.swiglu(x, u))
    q, k, c = torch.randn(1, 2, 3, 8).to(xdt), torch.randn(1, 1, 3, 8).to(xdt), torch.randn(3, 8).to(wdt)
    for a, b in zip(cf.rope(q, k, c, c), ref.rope(q, k, c, c)):
        assert torch.equal(a, b)


@needs_ops
def test_cpp_backend_runs_the_fused_ops_on_bf16_cpu_tensors_and_the_exact_forward_ones_on_fp32():
    assert dispatch.choose_backend("cpu") == "cpp"
    g = torch.randn(2, 5, dtype=torch.bfloat16, requires_grad=True)
    one = torch.ones(5, dtype=torch.bfloat16)
    assert _grad_fn_name(dispatch.swiglu(g, g * 1)) == "SwiGLUFunctionBackward"
    assert dispatch._impl(g, None) is cf and dispatch._impl(g, "torch") is ref
    # Which RMSNorm ran shows in what it saved: the C++ op's rstd is (rows,), the reference's (rows, 1).
    assert dispatch.rms_norm(g, one, 1e-6).grad_fn.saved_tensors[2].shape == (2,)
    assert dispatch.rms_norm(g, one, 1e-6, backend="torch").grad_fn.saved_tensors[2].shape == (2, 1)
    # fp32 is the exact path (transformers' logits to 2e-5): the reference's forward, the fused backward.
    f = g.detach().float().requires_grad_()
    assert dispatch._impl(f, None) is cf.exact_forward_ops and dispatch._impl(f, "torch") is ref
    assert dispatch.rms_norm(f, one.float(), 1e-6).grad_fn.saved_tensors[2].shape == (2,)


@needs_ops
@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 6), d=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_fp32_through_dispatch_has_the_references_forward_bit_for_bit_and_the_fused_backward(rows, d, seed):
    """fp32 on the cpp backend: forward values equal the reference's exactly (the exact path against
    transformers), the backward runs the C++ ops, and the gradients agree with the reference's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, requires_grad=True)
    w = (1 + 0.3 * torch.randn(d, generator=g)).requires_grad_()
    u = torch.randn(rows, d, generator=g, requires_grad=True)
    q = torch.randn(1, 3, rows, 2 * d, generator=g, requires_grad=True)
    k = torch.randn(1, 1, rows, 2 * d, generator=g, requires_grad=True)
    ang = torch.randn(rows, 2 * d, generator=g)
    cos, sin = ang.cos(), ang.sin()
    cases = {  # name -> (output on the cpp backend, on the torch backend, the inputs, the C++ Function)
        "rms_norm": (lambda be: (dispatch.rms_norm(x, w, 1e-6, backend=be),), (x, w), cf.ExactForwardRMSNorm),
        "swiglu": (lambda be: (dispatch.swiglu(x, u, backend=be),), (x, u), cf.ExactForwardSwiGLU),
        "rope": (lambda be: dispatch.rope(q, k, cos, sin, backend=be), (q, k), cf.ExactForwardRope),
    }
    for name, (f, inputs, fn) in cases.items():
        outs, want = f("cpp"), f("torch")
        assert type(outs[0].grad_fn).__name__ == fn.__name__ + "Backward", name
        for a, b in zip(outs, want, strict=True):
            assert torch.equal(a, b), name
        dys = [torch.randn(o.shape, generator=g) for o in outs]
        got = torch.autograd.grad(outs, inputs, dys)
        ref_grads = torch.autograd.grad(want, inputs, dys)
        for a, b in zip(got, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():  # and without autograd, the reference itself
        assert torch.equal(dispatch.swiglu(x, u), ref.swiglu(x, u))
        assert torch.equal(dispatch.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
