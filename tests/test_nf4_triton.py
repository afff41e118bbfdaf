"""kernels/nf4_triton.py against kernels/nf4_reference.py (and bitsandbytes for real quantized bytes).

Dequantization is a table lookup times a scale: exact in fp32 and fp16. bf16 is exact on a GPU;
under TRITON_INTERPRET the fp32 -> bf16 conversion truncates where a GPU rounds to nearest even
(docs/triton_interpreter.md), so there each element must
be either the round-to-nearest value or the truncated one, nothing else. Matmuls follow the rule
of tests/kernel_utils.py with scale |a| @ |b|, the magnitude any rounding error of a product a @ b
scales with: |ours - fp64| <= 2 |torch same dtype - fp64| + rtol |fp64| + atol (|a| @ |b|).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.bnb_oracle import dequantize_4bit as bnb_dequantize_4bit
from tests.kernel_utils import LaunchSpy, assert_accurate

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("run with TRITON_INTERPRET=1 (CI does): the Triton kernels need it or a GPU",
                allow_module_level=True)

from lora_engine.kernels import nf4_reference as ref  # noqa: E402
from lora_engine.kernels import nf4_triton as tri  # noqa: E402
from lora_engine.kernels.nf4_format import DYNAMIC_MAP_SIGNED, NF4_CODE, NF4Tensor  # noqa: E402
from tests.conftest import require_oracle

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_nf4(n_out, n_in, blocksize, nested, seed, dtype=torch.float32):
    """An NF4Tensor with random codes and scales: every nibble value, every absmax path."""
    g = torch.Generator().manual_seed(seed)
    n = n_out * n_in
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    if not nested:
        absmax = torch.rand(n_blocks, generator=g) * 2 + 0.01
        return NF4Tensor(packed, absmax, NF4_CODE.clone(), blocksize, (n_out, n_in), dtype).to(DEVICE)
    n_groups = -(-n_blocks // 256)
    return NF4Tensor(
        packed, torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, generator=g), NF4_CODE.clone(), blocksize,
        (n_out, n_in), dtype, nested_absmax=torch.rand(n_groups, generator=g) + 0.05,
        nested_code=DYNAMIC_MAP_SIGNED.clone(), nested_offset=float(torch.rand(1, generator=g)) + 0.1,
    ).to(DEVICE)


def assert_dequant_exact(ours, w, dtype):
    exact = ref.nf4_dequantize(w, torch.float32)
    if dtype != torch.bfloat16 or not INTERPRETED:
        assert torch.equal(ours, exact.to(dtype)), (ours.float() - exact.to(dtype).float()).abs().max()
        return
    truncated = (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits zero
    ok = (ours == exact.to(dtype)) | (ours == truncated)
    assert ok.all(), f"{int((~ok).sum())} elements are neither rounded nor truncated fp32 values"


def assert_matmul_rule(ours, same, exact, scale, dtype, what):
    """ours, same: results in `dtype`; exact, scale: fp64 (the product of |a| and |b| for scale)."""
    assert_accurate(ours, exact, dtype, same=same, scale=scale, name=f"{what} {dtype}")


shapes = st.tuples(st.integers(1, 40), st.integers(1, 90), st.integers(1, 90))  # rows, in, out
blocksizes = st.sampled_from([32, 64, 128, 256])


@given(n_out=st.integers(1, 60), n_in=st.integers(1, 140), blocksize=blocksizes, nested=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_dequantize_exact(n_out, n_in, blocksize, nested, dtype, seed):
    w = random_nf4(n_out, n_in, blocksize, nested, seed)
    out = tri.nf4_dequantize(w, dtype)
    assert out.shape == (n_out, n_in) and out.dtype == dtype
    assert_dequant_exact(out, w, dtype)


def test_dequantize_spans_nested_groups():
    # 529 blocks of 32: three groups of 256 absmax, the last one short, and an odd element count.
    w = random_nf4(131, 129, 32, True, seed=1)
    assert w.n_blocks == 529 and w.numel % 2 == 1
    assert_dequant_exact(tri.nf4_dequantize(w, torch.float32), w, torch.float32)
    assert tri.nf4_dequantize(w).dtype == w.dtype  # dtype defaults to the weight's


@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_matches_bitsandbytes(nested):
    bnb = require_oracle("bitsandbytes.functional")
    x = torch.randn(48, 200)
    q, s = bnb.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4")
    kw = {}
    if nested:
        kw = {"nested_absmax": s.state2.absmax, "nested_code": s.state2.code, "nested_offset": float(s.offset)}
    w = NF4Tensor(q.view(-1), s.absmax, s.code, 64, (48, 200), torch.float32, **kw).to(DEVICE)
    expected = bnb_dequantize_4bit(q, s)  # bnb's values on every CPU (tests/bnb_oracle.py)
    assert torch.equal(tri.nf4_dequantize(w, torch.float32).cpu(), expected)


def _matmul_case(rows, n_in, n_out, blocksize, nested, dtype, seed):
    w = random_nf4(n_out, n_in, blocksize, nested, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dense = ref.nf4_dequantize(w, dtype).double()  # W' as both sides round it
    return w, dense, g


@given(shape=shapes, blocksize=blocksizes, nested=st.booleans(), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_forward(shape, blocksize, nested, dtype, bias, seed):
    rows, n_in, n_out = shape
    w, dense, g = _matmul_case(rows, n_in, n_out, blocksize, nested, dtype, seed)
    x = torch.randn(rows, n_in, generator=g).to(DEVICE, dtype)
    b = torch.randn(n_out, generator=g).to(DEVICE, dtype) if bias else None
    ours = tri.nf4_matmul(x, w, transpose=True, bias=b)
    same = ref.nf4_linear(x, w, b)
    exact = x.double() @ dense.T + (b.double() if bias else 0)
    scale = x.double().abs() @ dense.abs().T + (b.double().abs() if bias else 0)
    assert ours.shape == (rows, n_out) and ours.dtype == dtype
    assert_matmul_rule(ours, same, exact, scale, dtype, "y = x W^T")


@given(shape=shapes, blocksize=blocksizes, nested=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_fused_backward_dx(shape, blocksize, nested, dtype, seed):
    rows, n_in, n_out = shape
    w, dense, g = _matmul_case(rows, n_in, n_out, blocksize, nested, dtype, seed)
    dy = torch.randn(rows, n_out, generator=g).to(DEVICE, dtype)
    ours = tri.nf4_matmul(dy, w, transpose=False)
    same = dy @ ref.nf4_dequantize(w, dtype)
    assert ours.shape == (rows, n_in)
    assert_matmul_rule(ours, same, dy.double() @ dense, dy.double().abs() @ dense.abs(), dtype, "dX = dY W")


def test_fused_strided_input():
    # A column slice: the kernel takes strides, so no copy is needed and none may be wrong.
    w, dense, g = _matmul_case(5, 33, 20, 64, False, torch.float32, 3)
    x = torch.randn(33, 5, generator=g).to(DEVICE).T  # (5, 33), strides (1, 5)
    assert_accurate(tri.nf4_matmul(x, w, transpose=True), ref.nf4_linear(x, w))


# Row counts on both sides of FUSED_MAX_ROWS: fused up to it, dequantize + matmul above it.
@pytest.mark.parametrize("rows, fused", [(7, True), (tri.FUSED_MAX_ROWS, True), (tri.FUSED_MAX_ROWS + 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_autograd_both_paths(rows, fused, dtype, monkeypatch):
    w = random_nf4(24, 40, 64, True, seed=rows)
    x = torch.randn(1, rows, 40).to(DEVICE, dtype)
    b = torch.randn(24).to(DEVICE, dtype)
    dy = torch.randn(1, rows, 24).to(DEVICE, dtype)
    grads = []
    for impl in (tri, ref):
        xi, bi = x.clone().requires_grad_(), b.clone().requires_grad_()
        if impl is tri:  # which kernels the forward and the backward launched, with what
            matmul = LaunchSpy(monkeypatch, tri, "_nf4_matmul_kernel")
            dequant = LaunchSpy(monkeypatch, tri, "_nf4_dequant_kernel")
        y = impl.nf4_linear(xi, w, bi)
        y.backward(dy)
        grads.append((y, xi.grad, bi.grad))
    if fused:  # y = x W'^T, then dX = dY W': the fused kernel twice, W' never materialised
        assert not dequant.launches
        assert [(k["args"][0].shape, k["args"][9:12]) for k in matmul.launches] == \
            [((rows, 40), (rows, 24, 40)), ((rows, 24), (rows, 40, 24))]  # a, then (M, P, R)
    else:  # W' decoded to a dense tensor in forward and again in backward, each fed to a torch matmul
        assert not matmul.launches
        assert [(k["args"][5].shape, k["args"][5].dtype) for k in dequant.launches] == [((24, 40), dtype)] * 2
    dense = ref.nf4_dequantize(w, dtype).double()
    (y, dx, db), (y_ref, dx_ref, db_ref) = grads
    assert y.shape == (1, rows, 24) and dx.shape == x.shape
    assert_matmul_rule(y, y_ref, x.double() @ dense.T + b.double(), x.double().abs() @ dense.abs().T + b.double().abs(),
                       dtype, "nf4_linear y")
    assert_matmul_rule(dx, dx_ref, dy.double() @ dense, dy.double().abs() @ dense.abs(), dtype, "nf4_linear dX")
    assert_accurate(db, db_ref, dtype)


def _lora_fwd_bwd(linear, x, w, bias, A, B, s, keep, dy):
    """y and the grads of x, A, B through `linear`; dropout is x * keep (keep fixed, >= 0)."""
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = linear(x, w, bias, A, B, s, x * keep)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad


def _dense_lora(x, w, bias, A, B, s, xd):
    return torch.nn.functional.linear(x, w, bias) + s * ((xd @ A.T) @ B.T)


@settings(max_examples=8)
@given(shape=shapes, rank=st.sampled_from([1, 8]), nested=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_nf4_lora_linear_grads(shape, rank, nested, dtype, seed):
    rows, n_in, n_out = shape
    w, dense, g = _matmul_case(rows, n_in, n_out, 64, nested, dtype, seed)
    x, dy = torch.randn(rows, n_in, generator=g), torch.randn(rows, n_out, generator=g)
    A, B = torch.randn(rank, n_in, generator=g) / 4, torch.randn(n_out, rank, generator=g) / 4
    bias = torch.randn(n_out, generator=g)
    keep = (torch.rand(rows, n_in, generator=g) > 0.25) / 0.75
    args = [t.to(DEVICE, dtype) for t in (x, bias, A, B)]
    keep, dy = keep.to(DEVICE, dtype), dy.to(DEVICE, dtype)
    x, bias, A, B = args
    ours = _lora_fwd_bwd(tri.nf4_lora_linear, x, w, bias, A, B, 2.0, keep, dy)
    same = _lora_fwd_bwd(ref.nf4_lora_linear, x, w, bias, A, B, 2.0, keep, dy)
    d64 = [t.double() for t in (x, bias, A, B)]
    exact = _lora_fwd_bwd(_dense_lora, d64[0], dense, d64[1], d64[2], d64[3], 2.0, keep.double(), dy.double())
    a64 = [t.abs() for t in d64]
    scale = _lora_fwd_bwd(_dense_lora, a64[0], dense.abs(), a64[1], a64[2], a64[3], 2.0, keep.double(),
                          dy.double().abs())
    for name, o, s_, e, sc in zip(("y", "dx", "dA", "dB"), ours, same, exact, scale):
        assert o.dtype == dtype
        assert_matmul_rule(o, s_, e, sc, dtype, f"nf4_lora_linear {name}")


def test_dispatch_backend_triton_reaches_these_kernels(monkeypatch):
    from lora_engine import dispatch

    calls = []
    for name in ("nf4_dequantize", "nf4_linear", "nf4_lora_linear"):
        monkeypatch.setattr(tri, name, lambda *args, name=name: calls.append((name, len(args))) or name)
    w = random_nf4(12, 20, 64, True, seed=5)
    x, A, B = torch.randn(3, 20, device=DEVICE), torch.randn(4, 20, device=DEVICE), torch.randn(12, 4, device=DEVICE)
    assert dispatch.nf4_dequantize(w, torch.float16, backend="triton") == "nf4_dequantize"
    assert dispatch.nf4_linear(x, w, backend="triton") == "nf4_linear"
    assert dispatch.lora_linear(x, w, None, A, B, 0.5, backend="triton") == "nf4_lora_linear"
    assert calls == [("nf4_dequantize", 2), ("nf4_linear", 3), ("nf4_lora_linear", 7)]


def test_empty_rows():
    w = random_nf4(8, 16, 64, False, seed=0)
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    y = tri.nf4_linear(x, w)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 16)


# ---- errors a user can hit ----------------------------------------------------------------------


def _w():
    return random_nf4(8, 16, 64, False, seed=0)


def test_error_weight_not_nf4():
    with pytest.raises(TypeError, match="weight must be an NF4Tensor.*got Tensor"):
        tri.nf4_linear(torch.randn(2, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE))


def test_error_weight_not_2d():
    w = _w()
    w.shape = (128,)
    with pytest.raises(ValueError, match=r"must be 2-D \(out, in\), got shape \(128,\)"):
        tri.nf4_dequantize(w, torch.float32)


def test_error_weight_not_contiguous():
    w = _w()
    w.packed = torch.zeros(2 * w.packed.numel(), dtype=torch.uint8, device=DEVICE)[::2]
    with pytest.raises(ValueError, match=r"packed \(strides \(2,\)\) is not contiguous"):
        tri.nf4_dequantize(w, torch.float32)


def test_error_weight_parts_on_two_devices():
    w = _w()
    w.absmax = w.absmax.to("meta")
    with pytest.raises(ValueError, match="weight.absmax is on meta but weight.packed is on"):
        tri.nf4_dequantize(w, torch.float32)


def test_error_dequantize_dtype():
    with pytest.raises(ValueError, match="dtype torch.int32 not supported"):
        tri.nf4_dequantize(_w(), torch.int32)


def test_error_x_dtype():
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        tri.nf4_linear(torch.ones(2, 16, dtype=torch.long, device=DEVICE), _w())


def test_error_x_features():
    with pytest.raises(ValueError, match=r"x \(2, 3, 15\) has 15 features, the NF4 weight \(8, 16\) expects 16"):
        tri.nf4_linear(torch.randn(2, 3, 15, device=DEVICE), _w())


def test_error_x_device():
    with pytest.raises(ValueError, match="weight.packed is on .* but x is on meta"):
        tri.nf4_linear(torch.randn(2, 16, device="meta"), _w())


@pytest.mark.parametrize("bias", [torch.zeros(7), torch.zeros(8, dtype=torch.float16)])
def test_error_bias(bias):
    with pytest.raises(ValueError, match=r"bias must be \(8,\) torch.float32 like x, got"):
        tri.nf4_linear(torch.randn(2, 16, device=DEVICE), _w(), bias.to(DEVICE))


def test_error_matmul_operand():
    w = _w()
    with pytest.raises(ValueError, match=r"a must be 2-D \(rows, features\), got shape \(1, 2, 16\)"):
        tri.nf4_matmul(torch.randn(1, 2, 16, device=DEVICE), w, transpose=True)
    with pytest.raises(ValueError, match=r"a has 16 features, the NF4 weight \(8, 16\) expects 8"):
        tri.nf4_matmul(torch.randn(2, 16, device=DEVICE), w, transpose=False)
    with pytest.raises(ValueError, match="bias applies to the forward product only"):
        tri.nf4_matmul(torch.randn(2, 8, device=DEVICE), w, transpose=False, bias=torch.zeros(8, device=DEVICE))


@pytest.mark.parametrize("a_shape, b_shape", [((4, 15), (8, 4)), ((4, 16), (7, 4)), ((4, 16), (8, 3))])
def test_error_lora_shapes(a_shape, b_shape):
    x = torch.randn(2, 16, device=DEVICE)
    A, B = torch.randn(a_shape, device=DEVICE), torch.randn(b_shape, device=DEVICE)
    with pytest.raises(ValueError, match=r"lora_A must be \(r, 16\) and lora_B \(8, r\) with r >= 1 for a weight \(8, 16\)"):
        tri.nf4_lora_linear(x, _w(), None, A, B, 1.0)


def test_error_lora_dtype_and_dropped():
    x = torch.randn(2, 16, device=DEVICE)
    A, B = torch.randn(4, 16, device=DEVICE), torch.randn(8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="lora_[AB] is torch.float16 but x is torch.float32; cast them to one dtype"):
        tri.nf4_lora_linear(x, _w(), None, A.half(), B, 1.0)
    with pytest.raises(ValueError, match=r"x_dropped \(2, 15\) torch.float32 must match x \(2, 16\)"):
        tri.nf4_lora_linear(x, _w(), None, A, B, 1.0, x_dropped=torch.randn(2, 15, device=DEVICE))


def test_bench_script_smoke(tmp_path):
    """bench/nf4_triton.py end to end on tiny shapes: validation, timing, table, crossover, append."""
    if not INTERPRETED:
        pytest.skip("--smoke is the CPU check of the script; on a GPU run bench/nf4_triton.py itself")
    spec = importlib.util.spec_from_file_location("bench_nf4_triton", Path(__file__).parents[1] / "bench" /
                                                  "nf4_triton.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.md"
    out.write_text("earlier results\n")
    deq, mm = bench.main(["--smoke", "--out", str(out)])
    assert {r["impl"] for r in deq} >= {"triton", "torch reference"}
    assert {(r["op"], r["impl"]) for r in mm} == {(op, i) for op in ("fwd", "bwd dX")
                                                 for i in ("fused", "dequant+matmul", "dense matmul")}
    text = out.read_text()
    assert text.startswith("earlier results\n") and "## Dequantization" in text and "fused faster at M in" in text


@pytest.mark.parametrize("n_out, n_in", [(200, 72), (131, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_in_slabs_equals_the_whole_weight(n_out, n_in, dtype, monkeypatch):
    """Above FUSED_MAX_ROWS with a small WORKSPACE_ELEMENTS the weight is decoded slab by slab into one
    workspace (row slabs in forward, column slabs in backward): every slab is exact, and y, dX equal the
    one-matmul path's to the matmul's own rounding (each product still sums over the whole K)."""
    w = random_nf4(n_out, n_in, 64, True, seed=n_out)
    rows = tri.FUSED_MAX_ROWS + 3
    x = torch.randn(rows, n_in).to(DEVICE, dtype)
    b = torch.randn(n_out).to(DEVICE, dtype)
    dy = torch.randn(rows, n_out).to(DEVICE, dtype)
    whole = ref.nf4_dequantize(w, dtype)
    for r0, c0, shape in ((64, 0, (64, n_in)), (0, 64, (n_out, n_in - 64)), (n_out - 5, n_in - 7, (5, 7))):
        out = torch.empty(shape, dtype=dtype, device=DEVICE)
        tri.nf4_dequantize_slab(w, out, r0, c0)
        assert torch.equal(out, tri.nf4_dequantize(w, dtype)[r0:r0 + shape[0], c0:c0 + shape[1]])
    results = []
    for elements in (tri.WORKSPACE_ELEMENTS, 64 * min(n_in, n_out)):
        monkeypatch.setattr(tri, "WORKSPACE_ELEMENTS", elements)
        slabs = LaunchSpy(monkeypatch, tri, "_nf4_dequant_tile_kernel")
        xi, bi = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = tri.nf4_linear(xi, w, bi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, bi.grad, len(slabs.launches)))
    (y0, dx0, db0, n0), (y1, dx1, db1, n1) = results
    # forward: row slabs of 64; backward: column slabs of 64 (the smallest slab)
    assert n0 == 0 and n1 == -(-n_out // 64) + -(-n_in // 64) and n1 >= 4
    dense = whole.double()
    assert_matmul_rule(y1, y0, x.double() @ dense.T + b.double(), x.double().abs() @ dense.abs().T + b.double().abs(),
                       dtype, "slabbed y")
    assert_matmul_rule(dx1, dx0, dy.double() @ dense, dy.double().abs() @ dense.abs(), dtype, "slabbed dX")
    assert torch.equal(db1, db0)


def test_error_dequantize_slab_outside_the_weight():
    w = random_nf4(24, 40, 64, False, seed=0)
    with pytest.raises(ValueError, match=r"nf4_dequantize_slab: out \(8, 8\).*at \(20, 0\) is not a slab"):
        tri.nf4_dequantize_slab(w, torch.empty(8, 8, device=DEVICE), 20, 0)
