"""The MoE kernels against kernels/moe_reference.py: dispatch.moe_grouped_mm on the CPU GEMMs ("cpp") and on
Triton (interpreter or GPU), forward and backward against the per-expert loop; routing (sort_by_expert, combine)
against a direct per-token computation; the frozen base never gets dW; the custom ops' fakes; the errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import dispatch
from lora_engine.kernels import moe_grouped, moe_reference
from tests.kernel_utils import LaunchSpy, assert_accurate, check_op, device, needs_triton

BACKENDS = [pytest.param("cpp", id="cpu"), pytest.param("triton", marks=needs_triton)]


def _counts(draw_counts: list[int], pattern: str) -> list[int]:
    """The drawn counts, or every token on one expert, or a single token (the edge cases of a grouping)."""
    total = max(sum(draw_counts), 1)
    if pattern == "all":
        return [total if e == len(draw_counts) // 2 else 0 for e in range(len(draw_counts))]
    if pattern == "one":
        return [1 if e == len(draw_counts) - 1 else 0 for e in range(len(draw_counts))]
    return draw_counts


def _where(backend: str) -> str:
    return device() if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30)
@given(counts=st.lists(st.integers(0, 12), min_size=1, max_size=5), pattern=st.sampled_from(["drawn", "all", "one"]),
       k=st.integers(1, 40), n=st.integers(1, 40), r=st.sampled_from([1, 8]), lora=st.booleans(),
       bias=st.booleans(), transposed=st.booleans(), train_w=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_grouped_mm(backend, counts, pattern, k, n, r, lora, bias, transposed, train_w, dtype):
    # fp32 within 32 ulps of the scale; bf16 within twice torch's own bf16 error plus one rounding (the
    # house rule, tests/kernel_utils.py): the per-expert loop in bf16 rounds where ours accumulates in fp32.
    counts = _counts(counts, pattern)
    E, M = len(counts), sum(counts)
    x = torch.randn(M, k, dtype=torch.float64)
    w = torch.randn(E, k, n, dtype=torch.float64) / k**0.5  # gpt-oss's (E, K, N) storage, passed as a view
    w = w if transposed else w.transpose(1, 2).contiguous()
    a = torch.randn(E, r, k, dtype=torch.float64) / k**0.5
    b = torch.randn(E, n, r, dtype=torch.float64) / r**0.5
    bb = torch.randn(E, n, dtype=torch.float64)
    dy = torch.randn(M, n, dtype=torch.float64)
    cnt = torch.tensor(counts)

    def wrap(f):
        def run(x, w, a, b, bb):
            w = w.transpose(1, 2) if transposed else w
            return f(x, cnt.to(x.device), w, bb if bias else None, a if lora else None, b if lora else None, 0.5)
        return run

    ours = wrap(lambda *args: dispatch.moe_grouped_mm(*args, backend=backend))
    needs = (True, train_w, lora, lora, bias)
    names = [nm for nm, need in zip(["x", "w", "a", "b", "bias"], needs) if need]
    check_op(ours, wrap(moe_reference.grouped_lora_mm), [x, w, a, b, bb], [dy], dtype, _where(backend),
             needs_grad=needs, names=names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_end_to_end_equals_a_per_token_computation(backend):
    # sort_by_expert -> grouped matmul -> combine against, for each token, the weighted sum of its k experts
    # applied to it directly: the grouping and its inverse lose nothing and mix no tokens.
    dev = _where(backend)
    T, k, E, D, N = 11, 3, 6, 16, 9
    h = torch.randn(T, D, dtype=torch.float64)
    experts = torch.stack([torch.randperm(E)[:k] for _ in range(T)])  # distinct experts per token
    experts[:, 0] = 2  # every token on expert 2, and (by chance) some experts on none
    weights = torch.rand(T, k, dtype=torch.float64)
    w = torch.randn(E, N, D, dtype=torch.float64)
    a, b = torch.randn(E, 4, D, dtype=torch.float64), torch.randn(E, N, 4, dtype=torch.float64)

    order, counts = moe_reference.sort_by_expert(experts, E)
    assert counts.tolist() == [int((experts == e).sum()) for e in range(E)]
    flat = experts.reshape(-1)[order]
    assert torch.equal(flat, flat.sort().values)
    for e in range(E):  # stable: within an expert, assignments in token order
        rows = order[flat == e]
        assert torch.equal(rows, rows.sort().values)

    xs = h[order // k].float().to(dev)
    y = dispatch.moe_grouped_mm(xs, counts.to(dev), w.float().to(dev), None, a.float().to(dev), b.float().to(dev),
                                0.25, backend=backend)
    out = moe_reference.combine(y.cpu().double(), order, weights)
    direct = torch.zeros(T, N, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = experts[t, j]
            direct[t] += weights[t, j] * (h[t] @ w[e].T + 0.25 * (h[t] @ a[e].T) @ b[e].T)
    assert_accurate(out.float(), direct)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_base_gets_no_weight_gradient(backend, monkeypatch):
    dev = _where(backend)
    counts = torch.tensor([4, 0, 3], device=dev)
    x = torch.randn(7, 8, device=dev, requires_grad=True)
    w = torch.randn(3, 5, 8, device=dev)
    a = torch.randn(3, 2, 8, device=dev, requires_grad=True)
    b = torch.randn(3, 5, 2, device=dev, requires_grad=True)
    asked = []
    if backend == "triton":
        from lora_engine.kernels import moe_triton

        spy = LaunchSpy(monkeypatch, moe_triton, "_moe_seg_mm")
    else:
        bwd = moe_grouped.CPU[1]
        monkeypatch.setattr(moe_grouped, "CPU", (moe_grouped.CPU[0],
                                                 lambda *args: asked.append(args[-1]) or bwd(*args)))
    dispatch.moe_grouped_mm(x, counts, w, None, a, b, 2.0, backend=backend).sum().backward()
    assert w.grad is None and x.grad is not None and a.grad is not None
    assert a.grad[1].abs().sum() == 0 and b.grad[1].abs().sum() == 0  # expert 1 got no token
    if backend == "triton":
        assert len(spy.launches) == 2  # dA and dB; no third (E, N, K) reduction for dW
    else:
        assert asked == [(True, True, False, False)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_have_fakes(backend):
    # opcheck runs each op for real and under FakeTensorMode and compares shapes, dtypes and strides: what
    # torch.compile and the meta-device memory plan rely on.
    dev = _where(backend)
    counts = torch.tensor([2, 0, 5, 1], device=dev)
    x, g = torch.randn(8, 12, device=dev), torch.randn(8, 6, device=dev)
    w, bias = torch.randn(4, 6, 12, device=dev), torch.randn(4, 6, device=dev)
    a, b = torch.randn(4, 3, 12, device=dev), torch.randn(4, 6, 3, device=dev)
    if backend == "cpp":
        t = moe_grouped.cpu_forward(x, counts, w, bias, a, b, 0.5)[1]
        calls = [(torch.ops.lora_engine.moe_mm_cpu, (x, counts, w, bias, a, b, 0.5)),
                 (torch.ops.lora_engine.moe_mm_cpu, (x, counts, w, None, None, None, 1.0)),
                 (torch.ops.lora_engine.moe_mm_bwd_cpu, (g, x, counts, w, a, b, t, 0.5, [True, True, True, True])),
                 (torch.ops.lora_engine.moe_mm_bwd_cpu, (g, x, counts, w, a, b, t, 0.5, [True, False, False, False]))]
    else:
        from lora_engine.kernels import moe_triton  # noqa: F401  (registers the ops)

        calls = [(torch.ops.lora_engine.moe_lora_mm_triton, (x, counts, w.transpose(1, 2), a.transpose(1, 2),
                                                             b.transpose(1, 2), bias, 0.5)),
                 (torch.ops.lora_engine.moe_seg_mm_triton, (g, x, counts, 1.0))]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_break():
    counts = torch.tensor([3, 0, 2])
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 4, 8)
    a, b = torch.randn(3, 2, 8, requires_grad=True), torch.randn(3, 4, 2, requires_grad=True)

    def f(x, a, b):
        return dispatch.moe_grouped_mm(x, counts, w, None, a, b, 0.5, backend="cpp").square().sum()

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, a, b)
    torch.testing.assert_close(got, f(x, a, b))


def test_backend_choice():
    counts = torch.tensor([2, 1])
    x, w = torch.randn(3, 4), torch.randn(2, 5, 4)
    want = moe_reference.grouped_lora_mm(x, counts, w)
    for backend in (None, "torch", "cpp"):
        torch.testing.assert_close(dispatch.moe_grouped_mm(x, counts, w, backend=backend), want)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.moe_grouped_mm(x, counts, w, backend="loop")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_errors(backend):
    counts = torch.tensor([2, 1])
    x, w = torch.randn(3, 4), torch.randn(2, 5, 4)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 3)

    def call(**kw):
        args = dict(x=x, counts=counts, w=w, bias=None, a=None, b=None) | kw
        return dispatch.moe_grouped_mm(**args, backend=backend)

    with pytest.raises(ValueError, match=r"x must be \(M, K\) and w \(E, N, K\)"):
        call(w=w[0])
    with pytest.raises(ValueError, match="x has 3 features but w is"):
        call(x=x[:, :3])
    with pytest.raises(ValueError, match=r"counts must be an integer \(2,\) tensor"):
        call(counts=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"counts must be an integer"):
        call(counts=counts.float())
    with pytest.raises(ValueError, match="w is torch.float64 on cpu but x is torch.float32"):
        call(w=w.double())
    with pytest.raises(ValueError, match=r"bias must be \(2, 5\)"):
        call(bias=torch.zeros(5))
    with pytest.raises(ValueError, match="pass both LoRA factors"):
        call(a=a)
    with pytest.raises(ValueError, match=r"a must be \(2, r, 4\) and b \(2, 5, r\)"):
        call(a=a, b=b[:, :, :2])
    with pytest.raises(ValueError, match="a is torch.float64 and b torch.float32"):
        call(a=a.double(), b=b)


@needs_triton
def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    from lora_engine.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    x, w = torch.randn(3, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dispatch.moe_grouped_mm(x, torch.tensor([2, 1]), w, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_experts_equal_dequantize_then_matmul(backend, dtype, monkeypatch):
    # Exact: the same per-expert GEMMs on the same dequantized values; an expert without tokens is never
    # dequantized, and no more than one expert is dense at a time (the dequantize calls say which).
    from lora_engine.kernels import moe_nf4

    counts = torch.tensor([3, 0, 5, 1])
    E, N, K, r = 4, 24, 64, 4
    experts = [dispatch.nf4_quantize(torch.randn(N, K) / 8, backend=backend) for _ in range(E)]
    dense = torch.stack([dispatch.nf4_dequantize(w, dtype, backend=backend) for w in experts])
    x = torch.randn(9, K, dtype=dtype)
    a, b, bias = torch.randn(E, r, K, dtype=dtype), torch.randn(E, N, r, dtype=dtype), torch.randn(E, N, dtype=dtype)
    g = torch.randn(9, N, dtype=dtype)
    seen = []
    real = moe_nf4.MoeNF4Function.apply

    def spy(x, bias, a, b, meta):
        counts, experts_, scale, deq, transposed = meta
        return real(x, bias, a, b, (counts, experts_, scale,
                                    lambda w, dt: seen.append([v is w for v in experts_].index(True)) or deq(w, dt),
                                    transposed))

    monkeypatch.setattr(moe_nf4.MoeNF4Function, "apply", spy)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = dispatch.moe_grouped_mm(leaves[0], counts, experts, leaves[3], leaves[1], leaves[2], 0.5, backend=backend)
    got = torch.autograd.grad(y, leaves, g)
    leaves2 = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y2 = dispatch.moe_grouped_mm(leaves2[0], counts, dense, leaves2[3], leaves2[1], leaves2[2], 0.5, backend="cpp")
    want = torch.autograd.grad(y2, leaves2, g)
    assert torch.equal(y, y2)
    for p, q in zip(got, want):
        assert torch.equal(p, q)
    assert seen == [0, 2, 3, 0, 2, 3]  # forward, then backward's dx; expert 1 never


def test_nf4_experts_errors():
    w = dispatch.nf4_quantize(torch.randn(8, 64), backend="torch")
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="non-empty list of 2-D NF4Tensor"):
        dispatch.moe_grouped_mm(x, torch.tensor([3]), [torch.randn(8, 64)])
    with pytest.raises(ValueError, match=r"expected one \(N, K\) shape and one count per expert"):
        dispatch.moe_grouped_mm(x, torch.tensor([3]), [w, w])
    with pytest.raises(ValueError, match=r"does not match NF4 experts of shape \(8, 64\)"):
        dispatch.moe_grouped_mm(x[:, :32], torch.tensor([3]), [w])
