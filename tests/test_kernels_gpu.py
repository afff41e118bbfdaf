"""Every Triton kernel against its reference at Llama-3-8B shapes on a CUDA GPU, in bf16 and fp16.

Run by bench/gpu_check.sh (`pytest -m gpu`); skipped elsewhere. The comparison rule is the one of
tests/kernel_utils.py, with the float64 and same-dtype references computed on the GPU too.
"""

import os

import pytest
import torch

from lora_engine.kernels import ops_reference as ref
from tests.conftest import tol
from tests.kernel_utils import check_op

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled kernels (unset TRITON_INTERPRET)"),
]

H, F, V = 4096, 14336, 128256
LOW = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])


def ops():
    from lora_engine import dispatch

    return dispatch.triton_ops()


def _r(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64, device="cuda") * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r,bias", [(16, False), (64, True)])
def test_lora_linear_8b(dtype, r, bias):
    x, w = _r(2, 1000, H), _r(F, H, scale=H**-0.5)
    a, b, bb = _r(r, H, scale=H**-0.5), _r(F, r, scale=r**-0.5), _r(F)

    def wrap(f):
        return lambda x, w, a, b, bb: f(x, w, bb if bias else None, a, b, 2.0)

    check_op(wrap(ops().lora_linear), wrap(ref.lora_linear), [x, w, a, b, bb], [_r(2, 1000, F)], dtype, "cuda",
             needs_grad=(True, False, True, True, bias), names=["x", "lora_A", "lora_B", "bias"], ref_dev="cuda")


@LOW
def test_rms_norm_8b(dtype):
    check_op(lambda x, w: ops().rms_norm(x, w, 1e-5), lambda x, w: ref.rms_norm(x, w, 1e-5),
             [_r(4093, H), 1 + 0.1 * _r(H)], [_r(4093, H)], dtype, "cuda", names=["x", "weight"], ref_dev="cuda")


@LOW
def test_rope_8b(dtype):
    b, t, hd = 2, 1021, 128
    ang = torch.rand(b, t, hd // 2, dtype=torch.float64, device="cuda") * 100
    emb = torch.cat((ang, ang), -1)

    def wrap(f):  # the model's layout: (B, T, H, hd) viewed as (B, H, T, hd)
        return lambda q, k, c, s: f(q.transpose(1, 2), k.transpose(1, 2), c, s)

    check_op(wrap(ops().rope), wrap(ref.rope), [_r(b, t, 32, hd), _r(b, t, 8, hd), emb.cos(), emb.sin()],
             [_r(b, 32, t, hd), _r(b, 8, t, hd)], dtype, "cuda", needs_grad=(True, True, False, False),
             names=["q", "k"], ref_dev="cuda")


@LOW
def test_swiglu_8b(dtype):
    check_op(ops().swiglu, ref.swiglu, [_r(2047, F, scale=3), _r(2047, F)], [_r(2047, F)], dtype, "cuda",
             names=["gate", "up"], ref_dev="cuda")


@LOW
def test_linear_cross_entropy_8b(dtype):
    labels = torch.randint(0, V, (1000,), device="cuda")
    labels[::7] = -100

    def wrap(f):
        return lambda h, w: f(h, w, labels, -100, "mean")

    check_op(wrap(ops().linear_cross_entropy), wrap(ref.linear_cross_entropy), [_r(1000, H), _r(V, H, scale=H**-0.5)],
             None, dtype, "cuda", needs_grad=(True, False), names=["hidden"], ref_dev="cuda")


def test_cross_entropy_peak_memory_is_4x_below_unfused():
    n = 8192
    h = torch.randn(n, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
    labels = torch.randint(0, V, (n,), device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, w, labels).backward()
        torch.cuda.synchronize()
        h.grad = None
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda h, w, y: ops().linear_cross_entropy(h, w, y, -100, "mean"))
    unfused = peak(lambda h, w, y: ref.cross_entropy_unfused(h, w, y))
    assert ours * 4 <= unfused, (ours / 2**20, unfused / 2**20)


def test_dispatch_picks_triton_on_cuda():
    from lora_engine import dispatch

    assert dispatch.resolve(torch.ones(1, device="cuda"), None) == "triton"


def test_tiny_model_trains_the_same_through_the_kernels_on_cuda():
    # The CPU test's model and loop (tests/test_kernels_train.py), here with compiled kernels.
    from tests.test_kernels_train import _train

    ours, want = _train("triton"), _train("torch")
    assert want[-1] < want[0] - 0.5, want
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(want), **tol("train_fp32"))
