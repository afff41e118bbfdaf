"""Sliding-window attention passed as a window, not a mask (dispatch.attention(window=...)):
kernels/window_attention.py (the reference, any device) and kernels/attention_cpp.py (CPU bf16) against
SDPA with the dense (T, S) window mask, forward and the three input gradients; fp32 tight, bf16 within
twice the error of the dense bf16 call against float64 plus a few ulps (for attention_cpp the dense call is
transformers' eager bf16 attention, the precision it states). And the point of it: the largest tensor made
in forward and backward grows linearly in S at a fixed window, where the dense mask's grows as S^2.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from lora_engine import dispatch
from lora_engine.kernels import ops_cpp, window_attention

needs_ops = pytest.mark.skipif(not (ops_cpp.available() and hasattr(torch.ops.lora_engine, "attn_softmax_fwd_cpu")),
                               reason="C++ extension not built (pip install --no-build-isolation -e .)")


def _mask(T, S, W):
    q_pos = torch.arange(S - T, S)[:, None]
    k_pos = torch.arange(S)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - W)


def _dense(q, k, v, W, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(q.shape[2], k.shape[2], W), scale=scale,
                                          enable_gqa=True)


def _eager(q, k, v, W):
    """transformers' eager attention with the window mask: matmuls in q's dtype, the softmax in fp32 and
    cast back: the precision attention_cpp states for bf16 (its dp and s are bf16-rounded GEMMs)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~_mask(q.shape[2], k.shape[2], W), float("-inf"))
    return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


def _inputs(B, H, Hk, T, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
               for h, n in ((H, T), (Hk, S), (Hk, S)))
    do = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], do.to(dtype)


def _run(fn, ins, do):
    ins = [t.detach().clone().requires_grad_() for t in ins]
    out = fn(*ins)
    return [out.detach(), *torch.autograd.grad(out, ins, do)]


shapes = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (4, 2), (4, 1)]), st.integers(1, 160),
                   st.integers(1, 200), st.sampled_from([4, 16]))


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(0, 3))
def test_fp32_window_equals_the_masked_sdpa(shape, extra):
    # W < S, W >= S, W = 1; queries the last T of S keys (a cache) when extra > 0.
    B, (H, Hk), S, W, D = shape
    T = max(1, S - extra)
    ins, do = _inputs(B, H, Hk, T, S, D, torch.float32, S * 7 + W)
    got = _run(lambda q, k, v: dispatch.attention(q, k, v, True, 0.3, backend="torch", window=W), ins, do)
    ref = _run(lambda q, k, v: _dense(q, k, v, W, 0.3), ins, do)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 300), st.integers(1, 64), st.integers(1, 70))
def test_any_chunk_size_gives_the_same_attention(S, W, chunk):
    ins, do = _inputs(1, 4, 2, S, S, 8, torch.float32, S + W)
    got = _run(lambda q, k, v: window_attention.attention(q, k, v, W, chunk=chunk), ins, do)
    ref = _run(lambda q, k, v: _dense(q, k, v, W), ins, do)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _bf16_within_dense_error(backend, B, H, Hk, S, W, D):
    ins, do = _inputs(B, H, Hk, S, S, D, torch.bfloat16, S + 3 * W)
    exact = _run(lambda q, k, v: _dense(q, k, v, W), [t.double() for t in ins], do.double())
    ours = _run(lambda q, k, v: dispatch.attention(q, k, v, True, None, backend=backend, window=W), ins, do)
    dense = _run(lambda q, k, v: (_eager if backend == "cpp" else _dense)(q, k, v, W), ins, do)
    for name, a, d, e in zip(("out", "dq", "dk", "dv"), ours, dense, exact):
        # Twice the dense call's error, plus 4 bf16 ulps of sqrt(D) (the size of a q.k or dO.v product of
        # ~N(0, 1) inputs) or of the largest value: dK and dV add one bf16-rounded part per chunk that reads a
        # key, and attention_cpp's dS = P (dP - delta) subtracts a bf16-rounded dP from an fp32 delta (a row
        # seeing one key, W = 1, has dQ = 0 exactly, and ours that rounding: tests/test_attention_cpp.py too).
        err, dense_err = (a.double() - e).abs().max(), (d.double() - e).abs().max()
        allowed = 2 * dense_err + 2**-6 * max(e.abs().max().item(), D**0.5)
        assert err <= allowed, f"{backend} {name}: error {err:.3g}, the dense bf16 call's {dense_err:.3g}"


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(1, 1), (4, 2)]), st.integers(1, 300), st.integers(1, 320))
def test_bf16_reference_window_within_the_dense_error(B, heads, S, W):
    _bf16_within_dense_error("torch", B, *heads, S, W, 16)


@needs_ops
@settings(max_examples=10, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(1, 1), (4, 2), (6, 3)]), st.integers(1, 600), st.integers(1, 700))
def test_bf16_cpp_window_within_the_dense_error(B, heads, S, W):
    # S up to 600 crosses several of attention_cpp's chunks; W above, at and below them.
    _bf16_within_dense_error("cpp", B, *heads, S, W, 16)


@needs_ops
def test_cpp_runs_the_window_itself(monkeypatch):
    from lora_engine.kernels import ops_reference

    monkeypatch.setattr(ops_reference, "attention", lambda *a: pytest.fail("fell back to the reference"))
    q = torch.randn(1, 2, 40, 8, dtype=torch.bfloat16)
    out = dispatch.attention(q, q, q, True, None, backend="cpp", window=5)
    assert out.shape == q.shape


def test_window_errors():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="window must be a number of keys >= 1"):
        dispatch.attention(q, q, q, True, None, backend="torch", window=0)
    with pytest.raises(ValueError, match="either as window= or inside the mask"):
        dispatch.attention(q, q, q, False, None, torch.ones(8, 8, dtype=torch.bool), backend="torch", window=3)
    with pytest.raises(ValueError, match="queries .* at most keys"):
        window_attention.attention(q, q[:, :, :4], q[:, :, :4], 2)


class _Largest(TorchDispatchMode):
    """The largest tensor any op makes while active, in elements."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest(fn, S, W):
    ins, do = _inputs(1, 2, 1, S, S, 8, torch.float32, 0)
    with _Largest() as mode:
        _run(lambda q, k, v: fn(q, k, v, W), ins, do)
    return mode.largest


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_ops)])
def test_memory_grows_linearly_in_s_at_a_fixed_window(backend):
    def ours(q, k, v, W):
        if backend == "cpp":
            q, k, v = (t.bfloat16() for t in (q, k, v))
        return dispatch.attention(q, k, v, True, None, backend=backend, window=W).float()

    small, large = _largest(ours, 1024, 64), _largest(ours, 4096, 64)
    assert large <= 4.5 * small, (small, large)  # 4x the positions, at most ~4x the largest tensor
    assert large < 4096 * 4096 // 8  # nothing near S x S
    dense_small, dense_large = _largest(_dense, 1024, 64), _largest(_dense, 4096, 64)
    assert dense_large >= 12 * dense_small  # the dense mask: S^2 (what the first assertion rules out)


def test_softcapped_window_equals_the_masked_eager_expression():
    from lora_engine.kernels import ops_reference

    ins, do = _inputs(2, 4, 2, 150, 150, 8, torch.float32, 5)
    got = _run(lambda q, k, v: dispatch.attention(q, k, v, True, 0.3, backend="torch", softcap=2.0, window=20),
               ins, do)
    ref = _run(lambda q, k, v: ops_reference.attention(q, k, v, False, 0.3, _mask(150, 150, 20), 2.0), ins, do)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
