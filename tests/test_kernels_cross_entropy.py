"""Chunked linear cross-entropy (Triton) against the reference: loss, dh, dW, reductions,
ignore_index, errors, and its memory: O(chunk x vocab), measured on CPU.

Memory on CPU (no torch.cuda.max_memory_allocated here): `LiveStorages`, a TorchDispatchMode,
sees every tensor an ATen op returns during the loss's forward and backward, keeps a weak
reference to its storage (torch's StorageWeakRef), drops it once the storage is freed, and records
the peak of the live bytes after each op. Storages of the inputs are excluded. It measures what
the loss path holds between ops, which is where a (tokens x vocab) logits tensor would show; it
does not see scratch memory inside one op, nor the Triton interpreter's numpy copies (which
exist only under the interpreter).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lora_engine.kernels import ops_reference as ref
from tests.kernel_utils import LaunchSpy, assert_accurate, check_op, device, needs_triton

pytestmark = needs_triton


def ops():
    from lora_engine import dispatch

    return dispatch.triton_ops()


@settings(max_examples=10)
@given(n=st.integers(1, 40), h=st.integers(1, 48), v=st.integers(2, 300), chunk=st.integers(1, 17),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       reduction=st.sampled_from(["mean", "sum"]), train_head=st.booleans(), ignored=st.floats(0, 1))
def test_linear_cross_entropy(n, h, v, chunk, dtype, reduction, train_head, ignored):
    hid = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) / h**0.5 * 3
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignored] = -100

    def wrap(f, **kw):
        return lambda hid, w: f(hid, w, labels, -100, reduction, **kw)

    check_op(wrap(ops().linear_cross_entropy, chunk_size=chunk), wrap(ref.linear_cross_entropy), [hid, w], None,
             dtype, device(), needs_grad=(True, train_head), names=["hidden", "weight"])


@settings(max_examples=8)
@given(block=st.sampled_from([16, 32]), blocks=st.integers(3, 5), cut=st.integers(1, 15), n=st.integers(1, 20),
       peak=st.sampled_from(["first", "middle", "last"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_online_softmax_over_several_vocabulary_blocks(block, blocks, cut, n, peak, dtype):
    # V <= 4096 fits one block, so without lowering MAX_BLOCK_V the online max/sum loop never runs twice at
    # test sizes. Here V spans `blocks` blocks, the last partly masked (cut < block columns), and the
    # largest logits sit in the first, a middle or the last block: the running max moves, or not.
    v = block * (blocks - 1) + cut
    h = 24
    hid = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) / h**0.5
    first = {"first": 0, "middle": block, "last": block * (blocks - 1)}[peak]
    w[first:first + min(block, v - first)] *= 4
    labels = torch.randint(0, v, (n,))

    def wrap(f, **kw):
        return lambda hid, w: f(hid, w, labels, -100, "mean", **kw)

    with pytest.MonkeyPatch.context() as mp:
        from lora_engine.kernels import cross_entropy_triton

        spy = LaunchSpy(mp, cross_entropy_triton, "_ce_rows")
        mp.setattr(cross_entropy_triton, "MAX_BLOCK_V", block)
        check_op(wrap(ops().linear_cross_entropy, chunk_size=7), wrap(ref.linear_cross_entropy),
                 [hid, w], None, dtype, device(), names=["hidden", "weight"])
    assert spy.launches and all(k["BLOCK_V"] == block for k in spy.launches)
    assert all(k["args"][4] == v for k in spy.launches) and -(-v // block) == blocks  # V, the loop's bound


def test_all_tokens_ignored_gives_zero_loss_and_grads():
    dev = device()
    hid = torch.randn(6, 8, device=dev, requires_grad=True)
    w = torch.randn(10, 8, device=dev, requires_grad=True)
    loss = ops().linear_cross_entropy(hid, w, torch.full((6,), -100, device=dev), -100, "mean")
    loss.backward()
    assert loss.item() == 0.0
    assert hid.grad.abs().max().item() == 0.0 and w.grad.abs().max().item() == 0.0


def test_sum_is_mean_times_count():
    dev = device()
    hid, w = torch.randn(9, 8, device=dev), torch.randn(10, 8, device=dev)
    labels = torch.tensor([1, 2, -100, 3, 4, 5, -100, 6, 7], device=dev)
    s = ops().linear_cross_entropy(hid, w, labels, -100, "sum")
    m = ops().linear_cross_entropy(hid, w, labels, -100, "mean")
    assert_accurate(s, m * 7)


def test_linear_cross_entropy_errors():
    dev = device()
    hid, w, labels = torch.randn(4, 8, device=dev), torch.randn(10, 8, device=dev), torch.arange(4, device=dev)
    f = ops().linear_cross_entropy
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        f(hid, w, labels, -100, "none")
    with pytest.raises(ValueError, match=r"shapes do not agree: hidden \(4, 8\), weight \(10, 7\), labels \(4,\)"):
        f(hid, w[:, :7], labels, -100, "mean")
    with pytest.raises(ValueError, match=r"expected hidden \(N, H\), weight \(V, H\), labels \(N,\); got \(1, 4, 8\)"):
        f(hid[None], w, labels, -100, "mean")
    with pytest.raises(ValueError, match="hidden is torch.float16 but weight is torch.float32"):
        f(hid.half(), w, labels, -100, "mean")
    with pytest.raises(ValueError, match="labels must be int64 or int32, got torch.float32"):
        f(hid, w, labels.float(), -100, "mean")
    with pytest.raises(ValueError, match=r"label 10 is outside the vocabulary \[0, 10\) and is not ignore_index \(-100\)"):
        f(hid, w, torch.tensor([1, 2, 10, -100], device=dev), -100, "mean")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        f(hid, w, labels, -100, "mean", chunk_size=0)


# ---- memory -------------------------------------------------------------------------------------

class LiveStorages(TorchDispatchMode):
    """Peak bytes of storages created by ATen ops while active and still alive (see module doc)."""

    def __init__(self, exclude: list[torch.Tensor]):
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s.data_ptr()
                if key not in self.exclude and key not in self.live and s.nbytes():
                    self.live[key] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out

    def _purge(self):
        for key in [k for k, (ref_, _) in self.live.items() if ref_.expired()]:
            del self.live[key]


def _peak_bytes(loss_fn, n, h, v):
    torch.manual_seed(0)
    hid = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    with LiveStorages([hid, w, labels]) as m:
        loss_fn(hid, w, labels).backward()
    return m.peak


@pytest.mark.skipif(device() != "cpu", reason="the CPU measurement; GPU peak memory is in bench/kernel_bench.py")
def test_memory_is_chunk_times_vocab_not_tokens_times_vocab():
    h, v, chunk = 16, 512, 8
    logits_chunk = chunk * v * 4  # one fp32 (chunk, V) block

    def chunked(hid, w, labels):
        return ops().linear_cross_entropy(hid, w, labels, -100, "mean", chunk_size=chunk)

    def unfused(hid, w, labels):
        return ref.cross_entropy_unfused(hid, w, labels)

    for n in (64, 128):
        grads = n * h * 4 + 2 * v * h * 4  # dh, and dW (fp32 accumulator + its scaled copy)
        ours = _peak_bytes(chunked, n, h, v)
        textbook = _peak_bytes(unfused, n, h, v)
        assert textbook >= n * v * 4, textbook  # the method sees a full logits tensor when there is one
        assert ours <= grads + 4 * logits_chunk, (n, ours, grads, logits_chunk)
        assert ours * 4 <= textbook, (n, ours, textbook)
