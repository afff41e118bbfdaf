"""The gated delta rule (chunked, kernels/delta_rule_chunked.py; Triton, kernels/delta_rule_triton.py) and
the causal conv1d against their fp64 oracles, forward and backward, through lora_engine.dispatch.

Bound (tests/kernel_utils.py's rule): |ours - ref64| <= 2 |rec32 - ref64| + rtol |ref64| + atol max|ref64|,
with rec32 the token-by-token oracle itself run in fp32. The chunked form keeps its state in fp32 like
rec32 but sums in another order (a C-token triangular solve and C-long dot products per chunk, where
rec32 makes T rank-1 updates), so the two err by the same few fp32 roundings of the state's magnitude:
twice rec32's error plus 32 ulps of the tensor's scale (TOLERANCE["kernel_fp32"]) covers the reorder.
Gradients are compared the same way, against autograd through the oracle in fp64 and in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import dispatch
from lora_engine.kernels.delta_rule_reference import gated_delta_rule_recurrent
from tests.kernel_utils import assert_accurate, device, needs_triton


def delta_inputs(B, T, H, dk, dv, with_state, seed, dtype=torch.float64):
    """q, k L2-normalised, g = -softplus (decays in (0, 1)), beta in (0, 1), a state of magnitude ~1."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k = F.normalize(rnd(B, T, H, dk), dim=-1), F.normalize(rnd(B, T, H, dk), dim=-1)
    v, g, beta = rnd(B, T, H, dv), -F.softplus(rnd(B, T, H) - 1), torch.rand(B, T, H, generator=gen).double()
    state = rnd(B, H, dk, dv) if with_state else None
    return [t if t is None else t.to(dtype) for t in (q, k, v, g, beta, state)]


def run(fn, inputs, do, dS):
    """fn's (o, final state) and the gradients of <o, do> + <S, dS> wrt every input tensor."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    o, S = fn(*leaves)
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    wrt = [t for t in leaves if t is not None]
    return [o, S, *torch.autograd.grad(loss, wrt)]


def oracle(dtype):
    def f(q, k, v, g, beta, state):
        return gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=state, output_final_state=True, dtype=dtype)
    return f


def ours(backend, chunk):
    def f(q, k, v, g, beta, state):
        return dispatch.gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                         backend=backend, chunk_size=chunk)
    return f


NAMES = ["o", "final state", "dq", "dk", "dv", "dg", "dbeta", "d initial state"]


def check_delta_rule(backend, chunk, B, T, H, dk, dv, with_state, seed, dev="cpu"):
    x64 = delta_inputs(B, T, H, dk, dv, with_state, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    do, dS = torch.randn(B, T, H, dv, generator=gen).double(), torch.randn(B, H, dk, dv, generator=gen).double()
    ref = run(oracle(torch.float64), x64, do, dS)
    same = run(oracle(torch.float32), [t if t is None else t.float() for t in x64], do, dS)
    got = run(ours(backend, chunk), [t if t is None else t.float().to(dev) for t in x64], do.to(dev), dS.to(dev))
    for name, a, r, s in zip(NAMES, got, ref, same):
        assert a.dtype == torch.float32, (name, a.dtype)
        assert_accurate(a.cpu(), r, same=s.float(), name=name)


SHAPES = dict(B=st.integers(1, 2), H=st.integers(1, 3), dk=st.sampled_from([4, 8, 16]),
              dv=st.sampled_from([4, 8, 16]), with_state=st.booleans(), seed=st.integers(0, 2**16))


@settings(deadline=None)
@given(T=st.integers(1, 150), chunk=st.sampled_from([1, 5, 16, 64]), **SHAPES)
def test_chunked_equals_the_fp64_recurrence(T, chunk, B, H, dk, dv, with_state, seed):
    check_delta_rule("torch", chunk, B, T, H, dk, dv, with_state, seed)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])  # one token, around one chunk, several chunks
def test_chunked_at_chunk_boundaries(T):
    check_delta_rule("torch", 64, 1, T, 2, 16, 32, True, T)


def test_bf16_inputs_round_once():
    # bf16 inputs are upcast per chunk and the math runs in fp32: the bf16 output is the fp32 result
    # rounded once (half an ulp of bf16), on the oracle fed the same bf16-rounded inputs.
    x = delta_inputs(1, 100, 2, 16, 16, True, 7, dtype=torch.bfloat16)
    o, S = dispatch.gated_delta_rule(*x[:5], initial_state=x[5].float(), output_final_state=True, backend="torch")
    o_ref, S_ref = gated_delta_rule_recurrent(*x[:5], initial_state=x[5], output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert_accurate(o, o_ref, name="o")
    assert_accurate(S, S_ref, torch.bfloat16, name="final state")


def test_state_carries_a_sequence_across_calls():
    # Resumable generation: two calls chained through the final state equal one call over the whole.
    q, k, v, g, beta, S0 = delta_inputs(1, 90, 2, 8, 8, True, 3, dtype=torch.float32)
    o, S = dispatch.gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True, backend="torch")
    o1, S1 = dispatch.gated_delta_rule(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37], initial_state=S0,
                                       output_final_state=True, backend="torch")
    o2, S2 = dispatch.gated_delta_rule(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], initial_state=S1,
                                       output_final_state=True, backend="torch")
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S2, S, rtol=1e-5, atol=1e-5)
    assert dispatch.gated_delta_rule(q, k, v, g, beta, backend="torch")[1] is None


def test_fake_tensors_give_shapes_without_running():
    # The custom ops' fakes: FakeTensorMode (the memory plan, torch.compile) sees the outputs' shapes.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = F.normalize(torch.randn(2, 100, 4, 16), dim=-1).requires_grad_()
        v = torch.randn(2, 100, 4, 32, dtype=torch.bfloat16)
        g, beta = torch.randn(2, 100, 4), torch.rand(2, 100, 4)
        o, S = dispatch.gated_delta_rule(q, q, v, g, beta, output_final_state=True, backend="torch")
        assert o.shape == v.shape and o.dtype == torch.bfloat16 and S.shape == (2, 4, 16, 32)
        o.float().sum().backward()
        assert q.grad.shape == q.shape


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.zeros(1, 5, 2, 7)), "q and k must be"),
    (dict(v=torch.zeros(1, 4, 2, 8)), "v must be"),
    (dict(g=torch.zeros(1, 5, 3)), "g must be"),
    (dict(initial_state=torch.zeros(1, 2, 8, 4)), "initial_state must be"),
    (dict(chunk_size=0), "chunk size"),
])
def test_delta_rule_errors_name_the_tensor(bad, match):
    args = dict(q=torch.zeros(1, 5, 2, 8), k=torch.zeros(1, 5, 2, 8), v=torch.zeros(1, 5, 2, 8),
                g=torch.zeros(1, 5, 2), beta=torch.zeros(1, 5, 2)) | bad
    with pytest.raises(ValueError, match=match):
        dispatch.gated_delta_rule(**args, backend="torch")


# ---- causal conv1d -------------------------------------------------------------------------------

def conv_oracle(x, weight, bias, activation, state):
    """The definition, token by token in fp64: y_t = act(b + sum_j w_j x_{t-K+1+j})."""
    B, T, C = x.shape
    K = weight.shape[-1]
    prev = x.new_zeros(B, K - 1, C) if state is None else state.transpose(1, 2)
    xp = torch.cat([prev, x], 1)
    y = torch.stack([(xp[:, t:t + K] * weight[:, 0].T).sum(1) for t in range(T)], 1)
    y = y if bias is None else y + bias
    return F.silu(y) if activation == "silu" else y


@settings(deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 70), C=st.integers(1, 40), K=st.integers(1, 5),
       has_bias=st.booleans(), with_state=st.booleans(), activation=st.sampled_from(["silu", None]),
       seed=st.integers(0, 2**16))
def test_conv1d_equals_its_definition(B, T, C, K, has_bias, with_state, activation, seed):
    check_conv1d("torch", B, T, C, K, has_bias, with_state, activation, seed)


def check_conv1d(backend, B, T, C, K, has_bias, with_state, activation, seed, dev="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x, w, dy = (torch.randn(*s, generator=gen).double() for s in ((B, T, C), (C, 1, K), (B, T, C)))
    b = torch.randn(C, generator=gen).double() if has_bias else None
    st_ = torch.randn(B, C, K - 1, generator=gen).double() if with_state else None
    inputs = [x, w, b, st_]

    def grads(fn, ts):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
        y = fn(*leaves)
        return [y, *torch.autograd.grad((y.double() * dy.to(y.device)).sum(), [t for t in leaves if t is not None])]

    ref = grads(lambda *a: conv_oracle(*a[:3], activation, a[3]), inputs)
    f32 = [None if t is None else t.float().to(dev) for t in inputs]
    got = grads(lambda *a: dispatch.causal_conv1d(*a[:3], activation, a[3], backend=backend), f32)
    for name, a, r in zip(["y", "dx", "dweight", "dbias/dstate", "dstate"], got, ref):
        assert a.dtype == torch.float32
        # K products summed in fp32: the summation order is all that differs (TOLERANCE["kernel_fp32"]).
        assert_accurate(a.cpu(), r, torch.float32, name=name)


def test_conv1d_state_carries_across_calls():
    x, w = torch.randn(2, 30, 6), torch.randn(6, 1, 4)
    y = dispatch.causal_conv1d(x, w, backend="torch")
    y1 = dispatch.causal_conv1d(x[:, :11], w, backend="torch")
    y2 = dispatch.causal_conv1d(x[:, 11:], w, initial_state=x[:, 8:11].transpose(1, 2), backend="torch")
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.zeros(5, 1, 4)), r"weight must be \(6, 1, K\)"),
    (dict(bias=torch.zeros(5)), r"bias must be \(6,\)"),
    (dict(initial_state=torch.zeros(2, 6, 4)), "initial_state must be"),
    (dict(activation="gelu"), "activation must be"),
    (dict(x=torch.zeros(2, 6)), "x must be"),
])
def test_conv1d_errors_name_the_tensor(bad, match):
    args = dict(x=torch.zeros(2, 9, 6), weight=torch.zeros(6, 1, 4)) | bad
    with pytest.raises(ValueError, match=match):
        dispatch.causal_conv1d(**args, backend="torch")


# ---- Triton (interpreter on CPU, or the GPU) -----------------------------------------------------

@needs_triton
@settings(deadline=None, max_examples=6)
@given(T=st.integers(1, 50), chunk=st.sampled_from([16, 32]), B=st.integers(1, 2), H=st.integers(1, 2),
       dk=st.sampled_from([16, 32]), dv=st.sampled_from([16, 32]), with_state=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_equals_the_fp64_recurrence(T, chunk, B, H, dk, dv, with_state, seed):
    check_delta_rule("triton", chunk, B, T, H, dk, dv, with_state, seed, device())


@needs_triton
@pytest.mark.parametrize("T", [1, 16, 40])  # one token, exactly one chunk, several chunks with a tail
def test_triton_at_chunk_boundaries(T):
    check_delta_rule("triton", 16, 1, T, 2, 16, 16, True, T, device())


@needs_triton
@pytest.mark.parametrize("bad, match", [
    (dict(chunk_size=24), "chunk size is 24"),
    (dict(k=torch.zeros(1, 5, 2, 8), q=torch.zeros(1, 5, 2, 8)), "dk is 8"),
    (dict(v=torch.zeros(1, 5, 2, 12)), "dv is 12"),
])
def test_triton_refuses_tiles_tl_dot_cannot_take(bad, match):
    args = dict(q=torch.zeros(1, 5, 2, 16), k=torch.zeros(1, 5, 2, 16), v=torch.zeros(1, 5, 2, 16),
                g=torch.zeros(1, 5, 2), beta=torch.zeros(1, 5, 2)) | bad
    with pytest.raises(ValueError, match=match):
        dispatch.gated_delta_rule(**{n: t.to(device()) if isinstance(t, torch.Tensor) else t for n, t in args.items()},
                                  backend="triton")


@needs_triton
@settings(deadline=None, max_examples=8)
@given(B=st.integers(1, 2), T=st.integers(1, 70), C=st.integers(1, 80), K=st.integers(1, 5),
       has_bias=st.booleans(), with_state=st.booleans(), activation=st.sampled_from(["silu", None]),
       seed=st.integers(0, 2**16))
def test_triton_conv1d_equals_its_definition(B, T, C, K, has_bias, with_state, activation, seed):
    check_conv1d("triton", B, T, C, K, has_bias, with_state, activation, seed, device())


@needs_triton
def test_triton_backward_walks_several_value_blocks():
    # dv = 128: two value blocks in the dS walk, four in the chunk kernel, which sums dq, dk, dg, dbeta over them.
    check_delta_rule("triton", 16, 1, 37, 1, 16, 128, True, 5, device())


@needs_triton
@pytest.mark.parametrize("used", ["o", "final state"])
def test_triton_backward_with_one_output_unused(used):
    # autograd hands backward None for an output the loss does not use: the other gradient alone.
    x64 = delta_inputs(2, 21, 2, 16, 16, True, 11)
    gen = torch.Generator().manual_seed(12)
    do, dS = torch.randn(2, 21, 2, 16, generator=gen).double(), torch.randn(2, 2, 16, 16, generator=gen).double()
    do, dS = (do, dS * 0) if used == "o" else (do * 0, dS)

    def grads(fn, ts, dev):
        leaves = [t.detach().clone().to(dev).requires_grad_() for t in ts]
        o, S = fn(*leaves)
        loss = (o.double() * do.to(dev)).sum() if used == "o" else (S.double() * dS.to(dev)).sum()
        # The final state does not depend on q: the oracle's graph has no path there (zero).
        got = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, got)]

    ref = grads(oracle(torch.float64), x64, "cpu")
    same = grads(oracle(torch.float32), [t.float() for t in x64], "cpu")
    got = grads(ours("triton", 16), [t.float() for t in x64], device())
    for name, a, r, s in zip(NAMES[2:], got, ref, same):
        assert_accurate(a.cpu(), r, same=s.float(), name=name)


def test_triton_fakes_give_shapes_both_ways():
    # The Triton ops' fakes (forward and backward) under FakeTensorMode: no kernel is launched.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_engine.kernels.delta_rule_triton import GatedDeltaRuleTriton

    with FakeTensorMode():
        q = F.normalize(torch.randn(2, 100, 4, 16), dim=-1).requires_grad_()
        v = torch.randn(2, 100, 4, 32, dtype=torch.bfloat16).requires_grad_()
        g, beta, S0 = torch.randn(2, 100, 4), torch.rand(2, 100, 4), torch.randn(2, 4, 16, 32, requires_grad=True)
        o, S = GatedDeltaRuleTriton.apply(q, q, v, g, beta, S0, 0.25, 32)
        assert o.shape == v.shape and o.dtype == torch.bfloat16 and S.shape == (2, 4, 16, 32)
        assert type(o.grad_fn).__name__ == "GatedDeltaRuleTritonBackward"
        (o.float().sum() + S.sum()).backward()
        assert q.grad.shape == q.shape and v.grad.dtype == torch.bfloat16 and S0.grad.shape == S0.shape
