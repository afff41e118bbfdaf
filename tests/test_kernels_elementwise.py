"""SwiGLU, RMSNorm and RoPE (Triton) against kernels/ops_reference.py: forward, backward, errors.

Shapes are drawn by hypothesis with sizes that are not multiples of the blocks; every dtype is
checked by the rule of tests/kernel_utils.py against the float64 reference.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.kernels import ops_reference as ref
from tests.kernel_utils import LaunchSpy, assert_accurate, check_op, device, needs_triton

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])

pytestmark = needs_triton


def ops():
    from lora_engine import dispatch

    return dispatch.triton_ops()


@settings(max_examples=8)
@given(rows=st.integers(1, 5), cols=st.integers(1, 1500), dtype=DTYPES)
def test_swiglu(rows, cols, dtype):
    gate = torch.randn(rows, cols, dtype=torch.float64) * 4
    up = torch.randn(rows, cols, dtype=torch.float64)
    dy = torch.randn(rows, cols, dtype=torch.float64)
    check_op(ops().swiglu, ref.swiglu, [gate, up], [dy], dtype, device(), names=["gate", "up"])


@settings(max_examples=8)
@given(rows=st.integers(1, 19), d=st.integers(1, 300), dtype=DTYPES, wide_weight=st.booleans())
def test_rms_norm(rows, d, dtype, wide_weight):
    x = torch.randn(rows, d, dtype=torch.float64) * 3
    w = 1 + 0.3 * torch.randn(d, dtype=torch.float64)
    dy = torch.randn(rows, d, dtype=torch.float64)

    def wrap(f):
        # wide_weight: an fp32 weight beside a low-precision x (output is fp32, as in transformers).
        return lambda x, w: f(x, w.float() if wide_weight else w, 1e-6)

    check_op(wrap(ops().rms_norm), wrap(ref.rms_norm), [x, w], [dy], dtype, device(), names=["x", "weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_wide_rows(dtype, monkeypatch):
    # D = 4231 > 2048: the wide branch (one row a program, 8 warps, BLOCK_D = 8192 with 3961 masked
    # columns), which the drawn sizes above (D <= 300) never reach. The spies prove the launches took it.
    from lora_engine.kernels import rms_norm_triton

    fwd = LaunchSpy(monkeypatch, rms_norm_triton, "_rms_fwd")
    bwd = LaunchSpy(monkeypatch, rms_norm_triton, "_rms_bwd")
    d = 4231
    x = torch.randn(3, d, dtype=torch.float64) * 3
    w = 1 + 0.3 * torch.randn(d, dtype=torch.float64)
    dy = torch.randn(3, d, dtype=torch.float64)
    check_op(lambda x, w: ops().rms_norm(x, w, 1e-6), lambda x, w: ref.rms_norm(x, w, 1e-6), [x, w], [dy], dtype,
             device(), names=["x", "weight"])
    for spy, extra in ((fwd, {}), (bwd, {"COMPUTE_DW": True})):
        assert [{k: launch[k] for k in ("ROWS", "BLOCK_D", "num_warps", *extra)} for launch in spy.launches] == \
            [{"ROWS": 1, "BLOCK_D": 8192, "num_warps": 8, **extra}]
    assert fwd.launches[0]["grid"] == (3,)  # a program per row


def test_rms_norm_3d_input_and_weight_grad_flag():
    dev = device()
    x = torch.randn(2, 3, 40, device=dev, requires_grad=True)
    w = torch.randn(40, device=dev)  # frozen: no dweight computed, none returned
    y = ops().rms_norm(x, w, 1e-5)
    assert y.shape == x.shape
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    xr = x.detach().cpu().requires_grad_()
    (gr,) = torch.autograd.grad(ref.rms_norm(xr, w.cpu(), 1e-5).sum(), (xr,))
    assert_accurate(gx, gr)


def _cos_sin(b, t, hd, dtype=torch.float64):
    ang = torch.randn(b, t, hd // 2, dtype=dtype) * 3
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos(), emb.sin()


@settings(max_examples=8)
@given(b=st.integers(1, 3), hq=st.integers(1, 6), groups=st.sampled_from([1, 2, 3]), t=st.integers(1, 11),
       half=st.integers(1, 40), dtype=DTYPES, layout=st.sampled_from(["bhtd", "bthd"]), shared=st.booleans())
def test_rope(b, hq, groups, t, half, dtype, layout, shared):
    hd, hk = 2 * half, max(1, hq // groups)
    cos, sin = _cos_sin(1 if shared else b, t, hd)
    q = torch.randn(b, hq, t, hd, dtype=torch.float64)
    k = torch.randn(b, hk, t, hd, dtype=torch.float64)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def wrap(f):
        def run(q, k, cos, sin):
            if layout == "bthd":  # the model's layout: transposed views of (B, T, H, hd)
                q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
            return f(q, k, cos, sin)
        return run

    check_op(wrap(ops().rope), wrap(ref.rope), [q, k, cos, sin], [dq, dk], dtype, device(),
             needs_grad=(True, True, False, False), names=["q", "k"])


def test_rope_backward_is_the_inverse_rotation():
    # With cos^2 + sin^2 = 1 the rotation is orthogonal: backward(forward(x)) = x.
    cos, sin = _cos_sin(2, 5, 16, torch.float32)
    dev = device()
    q, k = torch.randn(2, 4, 5, 16, device=dev), torch.randn(2, 2, 5, 16, device=dev)
    from lora_engine.kernels.rope_triton import rope_apply

    q2, k2 = rope_apply(q, k, cos.to(dev), sin.to(dev))
    q3, k3 = rope_apply(q2, k2, cos.to(dev), sin.to(dev), backward=True)
    assert_accurate(q3, q, name="q")
    assert_accurate(k3, k, name="k")


def test_rope_accepts_2d_tables():
    cos, sin = _cos_sin(1, 6, 8, torch.float32)
    dev = device()
    q, k = torch.randn(2, 3, 6, 8, device=dev), torch.randn(2, 1, 6, 8, device=dev)
    got = ops().rope(q, k, cos[0].to(dev), sin[0].to(dev))
    want = ref.rope(q.cpu(), k.cpu(), cos[0], sin[0])
    for g, w in zip(got, want):
        assert_accurate(g, w)


# ---- errors -------------------------------------------------------------------------------------

def test_swiglu_errors():
    dev = device()
    with pytest.raises(ValueError, match=r"swiglu: up has shape \(3, 5\) but gate has \(3, 4\)"):
        ops().swiglu(torch.randn(3, 4, device=dev), torch.randn(3, 5, device=dev))
    with pytest.raises(ValueError, match="swiglu: up is torch.float16 but gate is torch.float32"):
        ops().swiglu(torch.randn(3, 4, device=dev), torch.randn(3, 4, device=dev).half())
    with pytest.raises(ValueError, match="swiglu: gate has dtype torch.float64"):
        ops().swiglu(torch.randn(3, 4, device=dev).double(), torch.randn(3, 4, device=dev).double())
    with pytest.raises(ValueError, match="swiglu: up is on meta but gate is on"):
        ops().swiglu(torch.randn(3, 4, device=dev), torch.randn(3, 4, device="meta"))


def test_rms_norm_errors():
    dev = device()
    with pytest.raises(ValueError, match=r"rms_norm: weight has shape \(7,\), expected \(8,\) for x of shape \(2, 8\)"):
        ops().rms_norm(torch.randn(2, 8, device=dev), torch.randn(7, device=dev), 1e-6)
    with pytest.raises(ValueError, match="rms_norm: eps must be positive, got 0"):
        ops().rms_norm(torch.randn(2, 8, device=dev), torch.randn(8, device=dev), 0)
    with pytest.raises(ValueError, match="rms_norm: x has dtype torch.int64"):
        ops().rms_norm(torch.ones(2, 8, dtype=torch.long, device=dev), torch.randn(8, device=dev), 1e-6)


def test_rope_errors():
    dev = device()
    q, k = torch.randn(2, 4, 5, 8, device=dev), torch.randn(2, 2, 5, 8, device=dev)
    cos, sin = torch.randn(2, 5, 8, device=dev), torch.randn(2, 5, 8, device=dev)
    with pytest.raises(ValueError, match=r"rope: q and k must be \(B, H, T, hd\); got \(4, 5, 8\)"):
        ops().rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match=r"rope: k \(2, 2, 6, 8\) must match q \(2, 4, 5, 8\)"):
        ops().rope(q, torch.randn(2, 2, 6, 8, device=dev), cos, sin)
    with pytest.raises(ValueError, match="rope: head_dim must be even, got 7"):
        ops().rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match=r"rope: cos/sin must be \(2, 5, 8\), \(1, 5, 8\) or \(5, 8\); got \(3, 5, 8\)"):
        ops().rope(q, k, torch.randn(3, 5, 8, device=dev), torch.randn(3, 5, 8, device=dev))
    with pytest.raises(ValueError, match="rope: q is torch.float32 but k is torch.float16"):
        ops().rope(q, k.half(), cos, sin)
