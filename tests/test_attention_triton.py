"""The Triton flash attention (kernels/attention_triton.py) against the reference, ops_reference.attention,
forward and backward, and through dispatch.attention's "triton" backend.

Bound (tests/kernel_utils.py's rule): |ours - ref64| <= 2 |ref_d - ref64| + rtol |ref64| + atol max|ref64|,
ref_d the reference run in the same dtype d. In fp32 the kernel differs from the reference by summation
order only (its online softmax rescales partial sums, its dK/dV sum the query blocks and group heads in
another order): 32 ulps of the tensor's scale (TOLERANCE["kernel_fp32"]). In bf16 both sides round P to bf16
before P V (SDPA's bf16 kernel too), so their errors are of one size; under the interpreter the kernel keeps
P in fp32 (exact dots) and its stores truncate, one bf16 ulp of the element or the scale
(TOLERANCE["kernel_bf16"]). Tiles of 16 x 16 make several query and key blocks at these small sizes, so the
block walks, the window's skipped blocks and the padded last blocks all run.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from lora_engine import dispatch
from lora_engine.kernels import ops_reference
from tests.kernel_utils import LaunchSpy, assert_accurate, device, needs_triton, run_with_grads

pytestmark = needs_triton
BLOCKS = (16, 16)
# Shrinking replays a failure through the interpreter hundreds of times (minutes); the failing draw is printed.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def _inputs(B, H, Hk, T, S, D, seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) * spread
    k = torch.randn(B, Hk, S, D, generator=gen, dtype=torch.float64) * spread
    v = torch.randn(B, Hk, S, D, generator=gen, dtype=torch.float64)
    return [q, k, v], [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)]


def _check(dtype, B, G, Hk, T, S, D, causal, window, softcap, seed):
    from lora_engine.kernels import attention_triton

    # spread 3: scores of a few units, so a soft-cap of 1 or 2 bends them and the masks matter.
    inputs, grad_out = _inputs(B, G * Hk, Hk, T, S, D, seed, spread=3.0 if softcap else 1.0)
    # The fp64 oracle gets the inputs as rounded to dtype: with scores of tens a bf16 rounding of q or k moves
    # a softmax weight by percents, an error of the inputs that is no kernel's (torch in bf16 has it too, but
    # elementwise it may land lucky where ours does not).
    inputs = [t.to(dtype).double() for t in inputs]

    def ours(q, k, v):
        return attention_triton.attention(q, k, v, causal, None, softcap, window, blocks=BLOCKS)

    def ref(q, k, v):
        return ops_reference.attention(q, k, v, causal, None, None, softcap, window)

    o_out, o_g = run_with_grads(ours, inputs, grad_out, dtype, device())
    s_out, s_g = run_with_grads(ref, inputs, grad_out, dtype)
    r_out, r_g = run_with_grads(ref, inputs, grad_out, torch.float64)
    assert_accurate(o_out[0].cpu(), r_out[0], dtype, same=s_out[0], name="output")
    # A gradient's scale is that of the products it sums (|a| @ |b|, tests/kernel_utils.py), not its own
    # max: with one visible key dQ = dK = 0 exactly, a sum of terms ~|dO||V||K| scale that cancel.
    q, k, v = (t.detach() for t in inputs)  # run_with_grads marks the fp64 masters as leaves
    prod = (D ** -0.5) * grad_out[0].detach().abs().max() * v.abs().max()
    floors = {"dq": prod * k.abs().max(), "dk": prod * q.abs().max() * G, "dv": grad_out[0].detach().abs().max() * G}
    for (name, floor), a, b, c in zip(floors.items(), o_g, s_g, r_g):
        assert_accurate(a.cpu(), c, dtype, same=b, scale=max(float(c.detach().abs().max()), float(floor)), name=name)


def _shape(draw):
    S = draw(st.integers(1, 64))
    window = draw(st.sampled_from([None, 1, 5, 16, 23, 100]))  # 5 < a block, 100 > S
    causal = window is not None or draw(st.booleans())
    # Queries the last T positions: T < S with a window or without causality; causal alone needs T == S.
    T = draw(st.integers(1, S)) if (window is not None or not causal) and draw(st.booleans()) else S
    return dict(B=draw(st.integers(1, 2)), G=draw(st.sampled_from([1, 2, 3])), Hk=draw(st.integers(1, 2)), T=T,
                S=S, D=draw(st.sampled_from([16, 32])), causal=causal, window=window,
                softcap=draw(st.sampled_from([None, 1.0, 20.0])), seed=draw(st.integers(0, 2**16)))


@settings(deadline=None, max_examples=25, phases=NO_SHRINK)
@given(st.data())
def test_fp32_equals_the_reference(data):
    _check(torch.float32, **_shape(data.draw))


@settings(deadline=None, max_examples=12, phases=NO_SHRINK)
@given(st.data())
def test_bf16_equals_the_reference(data):
    _check(torch.bfloat16, **_shape(data.draw))


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_window_gqa_partial_blocks(softcap):
    # Fixed worst case beside the drawn ones: S = 61 (no multiple of 16), W = 7 < a block, 3 query heads a group.
    _check(torch.float32, B=2, G=3, Hk=2, T=61, S=61, D=16, causal=True, window=7, softcap=softcap, seed=1)


def test_key_blocks_outside_the_window_are_never_read():
    # The last 16 of 64 positions (48..63) with W = 8 see keys 41..63: key blocks 0..31 lie outside every
    # window. NaN there reaches the output (0 * NaN) if the kernel loads them; skipped, it cannot.
    from lora_engine.kernels import attention_triton

    (q, k, v), (do,) = _inputs(1, 2, 1, 16, 64, 16, seed=3)
    want = ops_reference.attention(q, k, v, True, None, None, None, 8)
    k, v = k.float().clone(), v.float().clone()
    k[:, :, :32], v[:, :, :32] = float("nan"), float("nan")
    q, k, v = (t.float().to(device()).requires_grad_() for t in (q, k, v))
    o = attention_triton.attention(q, k, v, True, None, None, 8, blocks=BLOCKS)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.float().to(device()))
    torch.testing.assert_close(o.double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert not dq.isnan().any()
    assert not dk[:, :, 32:].isnan().any() and not dv[:, :, 32:].isnan().any()
    assert (dk[:, :, :32] == 0).all() and (dv[:, :, :32] == 0).all()  # their dK/dV programs visit no query


def test_dispatch_triton_runs_the_kernel_and_falls_back_for_a_mask(monkeypatch):
    from lora_engine.kernels import attention_triton

    spy = LaunchSpy(monkeypatch, attention_triton, "_attn_fwd")
    (q, k, v), _ = _inputs(1, 2, 1, 20, 20, 16, seed=4)
    q, k, v = (t.float().to(device()) for t in (q, k, v))
    out = dispatch.attention(q, k, v, False, None, backend="triton", softcap=3.0, window=6)
    assert len(spy.launches) == 1 and spy.launches[0]["WINDOW"] and spy.launches[0]["SOFTCAP"]
    torch.testing.assert_close(out, ops_reference.attention(q, k, v, False, None, None, 3.0, 6), rtol=1e-5, atol=1e-5)
    mask = torch.ones(20, 20, dtype=torch.bool, device=q.device).tril()
    dispatch.attention(q, k, v, False, None, mask=mask, backend="triton")
    dispatch.attention(q[:, :, -5:], k, v, True, None, backend="triton")  # causal T < S: SDPA's own alignment
    assert len(spy.launches) == 1


def test_custom_ops_and_their_fakes_agree():
    from lora_engine.kernels import attention_triton  # noqa: F401 (registers the ops)

    (q, k, v), (do,) = _inputs(1, 2, 1, 16, 16, 16, seed=5)
    q, k, v, do = (t.float().to(device()) for t in (q, k, v, do))
    torch.library.opcheck(torch.ops.lora_engine.attention_fwd_triton, (q, k, v, True, 0.25, 0.0, 5, 16, 16))
    o, lse = torch.ops.lora_engine.attention_fwd_triton(q, k, v, True, 0.25, 0.0, 5, 16, 16)
    torch.library.opcheck(torch.ops.lora_engine.attention_bwd_triton, (do, q, k, v, o, lse, True, 0.25, 0.0, 5, 16, 16))


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=0), "window must be a number of keys >= 1"),
    (dict(softcap=-1.0), "softcap must be positive"),
    (dict(is_causal=True, q_len=4), "unsupported inputs"),
])
def test_bad_arguments_are_refused(kwargs, match):
    from lora_engine.kernels import attention_triton

    (q, k, v), _ = _inputs(1, 2, 1, 8, 8, 16, seed=6)
    q = q[:, :, -kwargs.pop("q_len", 8):]
    q, k, v = (t.float().to(device()) for t in (q, k, v))
    with pytest.raises(ValueError, match=match):
        attention_triton.attention(q, k, v, kwargs.pop("is_causal", True), None, **kwargs)
