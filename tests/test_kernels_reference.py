"""The reference's chunked linear cross-entropy (kernels/ops_reference.py) against the textbook loss
(full logits, F.cross_entropy) and its reused chunk buffers against fresh products, bit for bit.

The Triton kernel is checked against this reference in test_kernels_cross_entropy.py; this file
checks the reference itself, with no triton needed.
"""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.kernels import ops_reference as ref


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), h=st.integers(1, 24), v=st.integers(2, 200), chunk=st.integers(1, 17),
       reduction=st.sampled_from(["mean", "sum"]), train_head=st.booleans(), ignored=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_chunked_loss_and_grads_equal_the_textbook_loss(n, h, v, chunk, reduction, train_head, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, dtype=torch.float64, generator=g)
    w = torch.randn(v, h, dtype=torch.float64, generator=g) / h**0.5 * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    got, want = [], []
    for f, out in ((lambda a, b: ref.linear_cross_entropy(a, b, labels, -100, reduction, chunk_size=chunk), got),
                   (lambda a, b: ref.cross_entropy_unfused(a, b, labels, reduction=reduction), want)):
        a, b = hid.clone().requires_grad_(), w.clone().requires_grad_(train_head)
        loss = f(a, b)
        if (labels != -100).any():  # F.cross_entropy's mean over no tokens is nan; ours is 0 (tested below)
            loss.backward()
            out += [loss.double(), a.grad] + ([b.grad] if train_head else [])
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x.to(y.dtype), y, rtol=1e-6, atol=1e-6)  # fp32 softmax, fp64 oracle


def test_no_counted_token_gives_zero_loss_and_zero_grads():
    hid = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = ref.linear_cross_entropy(hid, w, torch.full((5,), -100), chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0 and not hid.grad.any() and not w.grad.any()


@settings(max_examples=10, deadline=None)
@given(rows=st.lists(st.integers(1, 12), min_size=1, max_size=4), v=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2**16))
def test_reused_chunk_buffers_hold_exactly_the_fresh_products(rows, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, 16, generator=g).to(dtype)
    bufs = ref._ChunkBuffers(max(rows), w)
    for c in rows:  # chunks of several sizes in turn, as the last chunk is shorter than the others
        h = torch.randn(c, 16, generator=g).to(dtype)
        logits = bufs.logits(h)
        assert logits.dtype == torch.float32 and logits.shape == (c, v)
        assert torch.equal(logits, (h @ w.t()).float())
        p = torch.softmax(logits, dim=-1)
        assert torch.equal(bufs.in_weight_dtype(p), p.to(dtype))


@settings(max_examples=30, deadline=None)
@given(lead=st.sampled_from([(), (5,), (2, 3), (0,)]), fin=st.integers(1, 12), fout=st.integers(1, 12),
       r=st.integers(1, 4), bias=st.booleans(), dropped=st.booleans(),
       grads=st.tuples(*[st.booleans()] * 6), seed=st.integers(0, 2**16))
def test_low_rank_linear_grads_equal_autograd_of_the_textbook_formula(lead, fin, fout, r, bias, dropped, grads, seed):
    """Every gradient LowRankLinearFunction computes by hand, against autograd of
    x W^T + b + scale (xd A^T) B^T in fp64, for every subset of inputs that wants one."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    x, w, b, A, B = t(*lead, fin), t(fout, fin), t(fout) if bias else None, t(r, fin), t(fout, r)
    xd = t(*lead, fin) if dropped else None
    dy = t(*lead, fout)
    inputs = [x, w, b, A, B, xd]
    want_grad = [flag and v is not None for flag, v in zip(grads, inputs, strict=True)]

    def run(f):
        leaves = [v.clone().requires_grad_(k) if v is not None else None for v, k in zip(inputs, want_grad, strict=True)]
        y = f(*leaves)
        if y.requires_grad:
            y.backward(dy)
        return y.detach(), [v.grad if k else None for v, k in zip(leaves, want_grad, strict=True)]

    def textbook(x, w, b, A, B, xd):
        return F.linear(x, w, b) + 1.7 * F.linear(F.linear(x if xd is None else xd, A), B)

    y, got = run(lambda *a: ref.lora_linear(*a[:5], 1.7, x_dropped=a[5]))
    y0, want = run(textbook)
    torch.testing.assert_close(y, y0)
    for name, a, e in zip(["x", "weight", "bias", "lora_A", "lora_B", "x_dropped"], got, want, strict=True):
        assert (a is None) == (e is None), name
        if a is not None:
            torch.testing.assert_close(a, e, msg=name)


def test_low_rank_linear_dequantizes_a_packed_weight_in_forward_and_backward_and_keeps_it_packed():
    calls = []

    def dequantize(packed, dtype):
        calls.append(dtype)
        return packed["dense"].to(dtype)

    w = torch.randn(6, 5)
    x = torch.randn(4, 5, requires_grad=True)
    A = torch.randn(2, 5, requires_grad=True)
    B = torch.randn(6, 2, requires_grad=True)
    y = ref.low_rank_linear(x, {"dense": w}, None, A, B, 0.5, dequantize=dequantize)
    assert calls == [torch.float32]
    y.sum().backward()
    assert calls == [torch.float32] * 2  # again in backward: the dense weight was not saved
    x0, A0, B0 = (v.detach().clone().requires_grad_() for v in (x, A, B))
    (F.linear(x0, w) + 0.5 * F.linear(F.linear(x0, A0), B0)).sum().backward()
    for got, want in ((x.grad, x0.grad), (A.grad, A0.grad), (B.grad, B0.grad)):
        torch.testing.assert_close(got, want)
