"""Causal self-attention on the CPU (kernels/attention_cpp.py, csrc/cpu_fused.cpp's attn_softmax ops)
against float64 attention, with the error allowed by the same computation in ours' dtype: torch's
SDPA (kernels/ops_reference.py:attention) for fp32, transformers' eager attention for bf16 (bf16
matmuls, the softmax in fp32), the precision attention_cpp states for bf16.

Forward and the three input gradients, fp32 and bf16, grouped-query heads, chunked and unchunked,
causal and not, by the accuracy rule of tests/kernel_utils.py; the C++ ops' own checks; what the
dispatch point serves and what it leaves to SDPA. The op tests skip, saying so, only where the extension was not built (CI builds it).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import dispatch
from lora_engine.kernels import attention_cpp as ac
from lora_engine.kernels import ops_cpp
from lora_engine.kernels import ops_reference as ref
from tests.kernel_utils import assert_accurate, run_with_grads

needs_ops = pytest.mark.skipif(not (ops_cpp.available() and hasattr(torch.ops.lora_engine, "attn_softmax_fwd_cpu")),
                               reason="C++ extension not built (pip install --no-build-isolation -e .)")


def _inputs(B, H, Hk, S, D, spread=1.0):
    g = torch.Generator().manual_seed(B * 1000 + H * 100 + S * 10 + D)
    q = torch.randn(B, H, S, D, dtype=torch.float64, generator=g) * spread
    k = torch.randn(B, Hk, S, D, dtype=torch.float64, generator=g) * spread
    v = torch.randn(B, Hk, S, D, dtype=torch.float64, generator=g)
    do = torch.randn(B, H, S, D, dtype=torch.float64, generator=g)
    return [q, k, v], [do]


def _magnitudes(q, k, v, do, causal):
    """What each result's rounding errors scale with, elementwise (the rule's |a| @ |b|): the sums of
    absolute terms behind out, dq, dk and dv, in float64. A gradient that cancels to ~0 (a query
    seeing one key) is then judged against the size of what cancelled, not against its own zero."""
    B, H, S, D = q.shape
    G = H // k.shape[1]
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sc = D ** -0.5
    s = q @ kr.transpose(-1, -2) * sc
    if causal:
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    o = p @ vr
    delta = (do * o).sum(-1, keepdim=True).abs()
    ds_mag = p * (do.abs() @ vr.abs().transpose(-1, -2) + delta) * sc

    def per_kv(t):
        return t.view(B, k.shape[1], G, S, D).sum(2)

    return [p @ vr.abs(), ds_mag @ kr.abs(), per_kv(ds_mag.transpose(-1, -2) @ q.abs()),
            per_kv(p.transpose(-1, -2) @ do.abs())]


def _eager(q, k, v, causal):
    """transformers' eager attention (LlamaAttention's eager_attention_forward): matmuls in q's
    dtype, the softmax in fp32 and cast back."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        S = q.shape[2]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


def _check(inputs, grads, dtype, causal, chunk):
    def ours(q, k, v):
        return ac.attention(q, k, v, causal, chunk=chunk)

    def theirs(q, k, v):
        return ref.attention(q, k, v, causal)

    def same(q, k, v):
        return ref.attention(q, k, v, causal) if q.dtype != torch.bfloat16 else _eager(q, k, v, causal)

    o_out, o_g = run_with_grads(ours, inputs, grads, dtype)
    s_out, s_g = run_with_grads(same, inputs, grads, dtype)
    r_out, r_g = run_with_grads(theirs, inputs, grads, torch.float64)
    mags = _magnitudes(*inputs, grads[0], causal)
    for name, a, b, c, m in zip(["output", "grad of q", "grad of k", "grad of v"], o_out + o_g, s_out + s_g,
                                r_out + r_g, mags):
        assert_accurate(a, c, dtype, same=b, scale=m, name=name)


@needs_ops
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Hk=st.integers(1, 3), G=st.integers(1, 3), S=st.integers(1, 70),
       D=st.sampled_from([1, 8, 16, 33, 64]), causal=st.booleans(), chunk=st.sampled_from([None, 1, 7, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), spread=st.sampled_from([1.0, 3.0]))
def test_attention_matches_sdpa(B, Hk, G, S, D, causal, chunk, dtype, spread):
    # spread 3: scores up to ~+-100 (D=64), where the softmax is nearly one-hot and lse matters.
    inputs, grads = _inputs(B, Hk * G, Hk, S, D, spread)
    _check(inputs, grads, dtype, causal, chunk)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_step_shape(dtype):
    # SmolLM2's attention at the benchmark's shape: 9 query heads over 3 key heads, head_dim 64,
    # 256 positions, q a transposed view as the decoder passes it; one chunk and several.
    inputs, grads = _inputs(2, 9, 3, 256, 64)
    inputs[0] = inputs[0].transpose(1, 2).contiguous().transpose(1, 2)
    assert ac._chunk(2, 9, 64) == 64 and ac._chunk(4, 9, 256) == 64 and ac._chunk(1, 9, 30) == 30
    assert ac._chunk(1, 9, 4096) == 128 and ac._chunk(4, 9, 4096) == 64 and ac._chunk(1, 32, 1 << 17) == 16
    for chunk in (None, 64):
        _check(inputs, grads, dtype, True, chunk)


@needs_ops
def test_attention_no_grad_and_fake():
    (q, k, v), _ = _inputs(1, 4, 2, 9, 8)
    q, k, v = q.float(), k.float(), v.float()
    with torch.no_grad():
        y = ac.attention(q, k, v, True, chunk=4)
    torch.testing.assert_close(y, ref.attention(q, k, v, True), rtol=1e-5, atol=1e-6)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:  # the memory plan traces the step this way
        fq, fk, fv = (mode.from_tensor(t).requires_grad_() for t in (q, k, v))
        out = ac.attention(fq, fk, fv, True, chunk=4)
        out.sum().backward()
        assert out.shape == q.shape and fk.grad.shape == k.shape
    with FakeTensorMode() as mode:  # bf16 scores: lse stays fp32, as the real op returns it
        fs = mode.from_tensor(torch.randn(6, 5).bfloat16())
        p, lse = torch.ops.lora_engine.attn_softmax_fwd_cpu(fs, 0.5, 0, 3, True, torch.bfloat16)
        assert p.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (6,)
    real = torch.ops.lora_engine.attn_softmax_fwd_cpu(torch.randn(6, 5).bfloat16(), 0.5, 0, 3, True, torch.bfloat16)
    assert real[1].dtype == torch.float32


@needs_ops
def test_softmax_ops_check_their_inputs():
    s = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        torch.ops.lora_engine.attn_softmax_fwd_cpu(s.double(), 1.0, 0, 3, True, torch.float32)
    with pytest.raises(RuntimeError, match="one of out_dtype"):  # bf16 scores make bf16 probabilities
        torch.ops.lora_engine.attn_softmax_fwd_cpu(s.bfloat16(), 1.0, 0, 3, True, torch.float32)
    with pytest.raises(RuntimeError, match="period must be >= 1"):
        torch.ops.lora_engine.attn_softmax_fwd_cpu(s, 1.0, 0, 0, True, torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype"):
        torch.ops.lora_engine.attn_softmax_fwd_cpu(s, 1.0, 0, 3, True, torch.float16)
    with pytest.raises(RuntimeError, match="one value per row"):
        torch.ops.lora_engine.attn_softmax_bwd_cpu(s, s, torch.zeros(2), torch.zeros(3), 1.0, 0, 3, True, torch.float32)
    p, lse = torch.ops.lora_engine.attn_softmax_fwd_cpu(s, 0.5, 2, 3, True, torch.float32)
    # row r sits at position 2 + r % 3 and sees keys 0..that position
    for r, lim in enumerate([3, 4, 5]):
        torch.testing.assert_close(p[r, :lim], torch.softmax(s[r, :lim] * 0.5, 0), rtol=1e-5, atol=1e-7)
        assert (p[r, lim:] == 0).all()
        torch.testing.assert_close(lse[r], torch.logsumexp(s[r, :lim] * 0.5, 0))


def test_attention_refuses_what_it_does_not_serve():
    q = torch.randn(1, 3, 4, 8)
    assert not ac.served(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))  # 3 heads over 2
    assert not ac.served(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8))  # keys from a cache
    assert not ac.served(q.half(), q.half(), q.half())
    with pytest.raises(ValueError, match="does not take"):
        ac.attention(q.double(), q.double(), q.double(), True)


def test_dispatch_attention_routes(monkeypatch):
    # bf16 without a mask: ours; fp32 (the exact path), a mask, backend "torch", keys from a cache: SDPA.
    calls = []
    monkeypatch.setattr(ac, "attention", lambda *a, **kw: calls.append("ours") or ref.attention(*a[:4]))
    q, k = torch.randn(1, 4, 6, 8).bfloat16(), torch.randn(1, 2, 6, 8).bfloat16()
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    ours = ["ours"] if ac.served(q, k, k) else []
    for qq, kk, backend, m, expect in [(q, k, None, None, ours), (q, k, "torch", None, []), (q, k, None, mask, []),
                                       (q.float(), k.float(), None, None, []), (q[:, :, -1:], k, None, None, [])]:
        calls.clear()
        y = dispatch.attention(qq, kk, kk, m is None and qq.shape[2] > 1, None, m, backend=backend)
        assert calls == expect
        torch.testing.assert_close(y, ref.attention(qq, kk, kk, m is None and qq.shape[2] > 1, None, m))


@needs_ops
@settings(max_examples=20, deadline=None)
@given(R=st.integers(1, 40), n=st.integers(1, 70), start=st.integers(0, 5), period=st.integers(1, 9),
       causal=st.booleans(), scale=st.sampled_from([0.125, 0.3]))
def test_softmax_ops_read_bf16_scores_as_their_fp32_values(R, n, start, period, causal, scale):
    # bf16 scores (attention_cpp's bf16 GEMMs) are read exactly: the results equal those of the same
    # values given as fp32, bit for bit, forward and backward.
    g = torch.Generator().manual_seed(R * 100 + n)
    s = (torch.randn(R, n, generator=g) * 4).bfloat16()
    dp = torch.randn(R, n, generator=g).bfloat16()
    delta = torch.randn(R, generator=g)
    ops = torch.ops.lora_engine
    p16, lse16 = ops.attn_softmax_fwd_cpu(s, scale, start, period, causal, torch.bfloat16)
    p32, lse32 = ops.attn_softmax_fwd_cpu(s.float(), scale, start, period, causal, torch.bfloat16)
    assert torch.equal(p16, p32) and torch.equal(lse16, lse32)
    b16 = ops.attn_softmax_bwd_cpu(s, dp, lse16, delta, scale, start, period, causal, torch.bfloat16)
    b32 = ops.attn_softmax_bwd_cpu(s.float(), dp.float(), lse16, delta, scale, start, period, causal, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(b16, b32))
