"""kernels/moe_nf4.py reads the expert segments once, in forward: its backward reads no tensor values, and
counts without values (fake tensors, as in the memory plan) are split evenly."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_engine import dispatch
from lora_engine.kernels import moe_nf4


def _experts(E, N, K):
    return [dispatch.nf4_quantize(torch.randn(N, K), 64, True, None) for _ in range(E)]


def test_segments_of_real_counts_skip_empty_experts():
    assert moe_nf4.segments(torch.tensor([2, 0, 3, 1]), 6) == [(0, 0, 2), (2, 2, 3), (3, 5, 1)]


def test_segments_of_fake_counts_split_the_rows_evenly():
    with FakeTensorMode():
        counts = torch.empty(4, dtype=torch.int64)
        assert moe_nf4.segments(counts, 10) == [(0, 0, 3), (1, 3, 3), (2, 6, 2), (3, 8, 2)]
        assert moe_nf4.segments(counts, 2) == [(0, 0, 1), (1, 1, 1)]


def test_backward_reads_no_counts():
    """After forward the counts may change or lose their values: backward uses the forward's segments."""
    torch.manual_seed(0)
    E, N, K, r = 3, 8, 64, 2
    experts = _experts(E, N, K)
    x = torch.randn(7, K, requires_grad=True)
    a = torch.randn(E, r, K, requires_grad=True)
    b = torch.randn(E, N, r, requires_grad=True)
    counts = torch.tensor([3, 0, 4])
    deq = dispatch._nf4_impl(x, None).nf4_dequantize
    y = moe_nf4.grouped_mm_nf4(x, counts, experts, None, a, b, 0.5, deq)
    want = torch.autograd.grad(y.sum(), (x, a, b))
    y = moe_nf4.grouped_mm_nf4(x, counts, experts, None, a, b, 0.5, deq)
    counts.fill_(-1)  # a backward that read the counts again would now index nonsense
    got = torch.autograd.grad(y.sum(), (x, a, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
