"""NF4 against bitsandbytes (the real library, on CPU): bytes of every stored tensor and dequantized values.

Also the NF4 linear layers (forward/backward against the dense layer on the dequantized weight),
the state-dict layout, and every bad input a user can hit.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.kernels import nf4_cpp
from lora_engine.kernels import nf4_reference as ref
from lora_engine.kernels.nf4_format import (
    BLOCKSIZES,
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    NF4Tensor,
    from_bnb_state_dict,
    to_bnb_state_dict,
)
from lora_engine.quant import nf4
from tests.bnb_oracle import dequantize_4bit as bnb_dequantize_4bit
from tests.conftest import require_oracle

bnbF = require_oracle("bitsandbytes.functional")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bitsandbytes' CPU dequantize of odd last dims is torch.compile'd: recompiling per shape would cost
    # seconds; run it eagerly (same operations, same results).
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _weights(kind: str, shape, dtype, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    if kind == "zeros":
        w.zero_()
    elif kind == "constant":
        w.fill_(scale)
    elif kind == "outliers":
        flat = w.view(-1)
        flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=g)] *= 1000
    elif kind == "zero_blocks":  # whole blocks of zeros between random ones
        w.view(-1)[: w.numel() // 2] = 0
    big = torch.finfo(dtype).max  # fp16 overflows at 65504: keep the outliers finite
    return w.clamp(-big, big).to(dtype)


def _bnb(w, blocksize, nested):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def _assert_same_as_bnb(w: torch.Tensor, ours: NF4Tensor, blocksize: int, nested: bool):
    packed, state = _bnb(w, blocksize, nested)
    assert torch.equal(ours.packed, packed.view(-1)), "packed bytes differ"
    assert torch.equal(ours.absmax, state.absmax), "absmax differs"
    assert torch.equal(ours.code, state.code)
    if nested:
        assert torch.equal(ours.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.nested_code, state.state2.code)
        assert ours.nested_offset == state.offset.item()
    for dtype in DTYPES:
        # Not bnbF.dequantize_4bit(packed, state) itself: on AVX512F CPUs its native kernel misplaces
        # scales when blocks cross rows (tests/bnb_oracle.py); the helper gives bnb's values on every CPU.
        theirs = bnb_dequantize_4bit(packed, state).to(dtype) if dtype == w.dtype else None
        if theirs is not None:
            assert torch.equal(ref.nf4_dequantize(ours, dtype).view(-1), theirs.view(-1)), f"dequantized {dtype}"
    # The state dict is exactly bitsandbytes' (tensor by tensor, JSON included).
    theirs_sd = {"weight": packed, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}
    ours_sd = to_bnb_state_dict(ours)
    assert sorted(ours_sd) == sorted(theirs_sd)
    for k, v in theirs_sd.items():
        assert torch.equal(ours_sd[k], v) and ours_sd[k].shape == v.shape, k


def test_tables_equal_bitsandbytes():
    assert torch.equal(DYNAMIC_MAP_SIGNED, bnbF.create_dynamic_map(signed=True))
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))


@settings(deadline=None)
@given(
    rows=st.integers(1, 40), cols=st.sampled_from([1, 3, 9, 41, 64, 65, 127, 341]),
    blocksize=st.sampled_from(BLOCKSIZES), dtype=st.sampled_from(DTYPES), nested=st.booleans(),
    kind=st.sampled_from(["randn", "zeros", "constant", "outliers", "zero_blocks"]),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 3e4]), seed=st.integers(0, 2**16),
)
def test_quantize_matches_bitsandbytes(rows, cols, blocksize, dtype, nested, kind, scale, seed):
    w = _weights(kind, (rows, cols), dtype, scale, seed)
    _assert_same_as_bnb(w, ref.nf4_quantize(w, blocksize, nested), blocksize, nested)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_many_blocks_and_nested_groups(blocksize):
    # More than 256 blocks, so the double quantization has several groups and a short last one.
    w = _weights("outliers", (257, blocksize + 3), torch.float32, 0.02, blocksize)
    _assert_same_as_bnb(w, nf4.quantize(w, blocksize, True, backend="torch"), blocksize, True)


@pytest.mark.parametrize("shape, blocksize", [((64, 112), 64), ((3, 64), 128), ((9, 48), 32)])
def test_blocks_that_cross_rows(shape, blocksize):
    # Rows that are not whole blocks, with a last dim that is a multiple of 16: the case bnb's native
    # AVX512F CPU kernel gets wrong (tests/bnb_oracle.py), so the oracle must not depend on the CPU.
    for nested in (False, True):
        w = _weights("randn", shape, torch.float32, 1.0, blocksize)
        _assert_same_as_bnb(w, ref.nf4_quantize(w, blocksize, nested), blocksize, nested)


def test_dequantize_1d_and_3d_shapes():
    for shape in [(7,), (2, 3, 5)]:
        w = torch.randn(shape)
        q = nf4.quantize(w, 32, backend="torch")
        assert nf4.dequantize(q, backend="torch").shape == shape
        _assert_same_as_bnb(w, q, 32, True)


def test_state_dict_round_trip_and_method_api():
    w = torch.randn(33, 17, dtype=torch.bfloat16)
    q = nf4.quantize(w, 64)
    back = NF4Tensor.from_state_dict(q.state_dict("layer."), "layer.")
    assert torch.equal(nf4.dequantize(back, torch.float32, backend="torch"), nf4.dequantize(q, torch.float32, backend="torch"))
    assert back.dtype == torch.bfloat16 and back.shape == (33, 17) and back.dim() == 2
    assert nf4.dequantize(q).dtype == torch.bfloat16
    # Memory accounting: 4 bits + 8/64 + 32/(64*256) per value plus the two tables.
    big = nf4.quantize(torch.randn(256, 1024), 64)
    bits = 8 * (big.nbytes - 4 * (16 + 256)) / big.numel
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3


# ---- NF4 linear layers: forward and backward against the dense layer on the dequantized weight --------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_linear_forward_backward(dtype):
    w = nf4.quantize(torch.randn(24, 40), 32)
    dense = ref.nf4_dequantize(w, dtype)
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype, requires_grad=True)
    y = ref.nf4_linear(x, w, b)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, dense, b2)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize("r", [1, 8])
def test_nf4_lora_linear_grads(r):
    w = nf4.quantize(torch.randn(24, 40), 64)
    dense = ref.nf4_dequantize(w, torch.float32)
    x = torch.randn(6, 40, requires_grad=True)
    A = torch.randn(r, 40, requires_grad=True)
    B = torch.randn(24, r, requires_grad=True)
    y = ref.nf4_lora_linear(x, w, None, A, B, 0.5)
    ys = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
    y2 = F.linear(ys[0], dense) + F.linear(F.linear(ys[0], ys[1]), ys[2]) * 0.5
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    for a, b in zip((x, A, B), ys):
        torch.testing.assert_close(a.grad, b.grad)


def test_linear4bit_module_state_dict_and_to():
    lin = torch.nn.Linear(40, 24)
    q = nf4.Linear4bit.from_linear(lin, blocksize=32)
    x = torch.randn(2, 40)
    assert torch.equal(q(x), F.linear(x, ref.nf4_dequantize(q.weight, torch.float32), lin.bias))
    sd = q.state_dict()
    assert sd["weight"].shape == (480, 1) and sd["weight.absmax"].dtype == torch.uint8
    fresh = nf4.Linear4bit(None, torch.zeros(24), 40, 24)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), q(x))
    q.half()  # a float cast must leave the 4-bit state alone
    assert q.weight.absmax.dtype == torch.uint8 and q.weight.nested_absmax.dtype == torch.float32
    q.to("cpu")
    with pytest.raises(RuntimeError, match="weight.absmax.*do not fit|absmax has"):
        bad = dict(sd)
        bad["weight.absmax"] = sd["weight.absmax"][:-1]
        fresh.load_state_dict(bad)


# ---- bad input: each with a clear message ---------------------------------------------------------------


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype torch.int64.*float32, float16 or bfloat16"):
        nf4.quantize(torch.arange(64), 64)
    with pytest.raises(ValueError, match="dtype torch.float64 not supported"):
        nf4.dequantize(nf4.quantize(torch.randn(4, 16), 32), torch.float64)


def test_bad_blocksize():
    with pytest.raises(ValueError, match="blocksize 100 not allowed.*32, 64"):
        nf4.quantize(torch.randn(4, 100), 100)
    with pytest.raises(ValueError, match="blocksize 16 not allowed"):
        NF4Tensor(torch.zeros(2, dtype=torch.uint8), torch.ones(1), NF4_CODE, 16, (4,), torch.float32)


def test_non_finite_and_empty():
    with pytest.raises(ValueError, match="1 inf/NaN values"):
        nf4.quantize(torch.tensor([1.0, float("nan")]), 64)
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.zeros(0, 4), 64)


def test_corrupted_quant_state_json():
    sd = to_bnb_state_dict(nf4.quantize(torch.randn(8, 16), 32), "m.")
    sd["m.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b'{"quant_type": "nf4", "blocks'),
                                                                dtype=torch.uint8)
    with pytest.raises(ValueError, match="model.safetensors: m.weight.quant_state.bitsandbytes__nf4 is not a valid"):
        from_bnb_state_dict(sd, "m.", "model.safetensors")
    qs = {"quant_type": "fp4", "blocksize": 32, "dtype": "float32", "shape": [8, 16]}
    sd["m.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(qs).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="quant_type 'fp4'; only 'nf4'"):
        from_bnb_state_dict(sd, "m.", "x")


def test_absmax_count_mismatch():
    q = nf4.quantize(torch.randn(8, 64), 32, double_quant=False)
    sd = to_bnb_state_dict(q, "m.")
    sd["m.weight.absmax"] = sd["m.weight.absmax"][:-3]
    with pytest.raises(ValueError, match="absmax has 13 entries but shape \\(8, 64\\) with blocksize 32 has 16"):
        from_bnb_state_dict(sd, "m.", "ckpt")
    sd = to_bnb_state_dict(q, "m.")
    del sd["m.weight.quant_map"]
    with pytest.raises(ValueError, match="ckpt: missing m.weight.quant_map"):
        from_bnb_state_dict(sd, "m.", "ckpt")


def test_linear_shape_and_backend_errors():
    w = nf4.quantize(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="x has 63 features, the NF4 weight \\(8, 64\\) expects 64"):
        ref.nf4_linear(torch.randn(2, 63), w)
    with pytest.raises(ValueError, match="backend must be one of"):
        nf4.dequantize(w, backend="cuda")
    with pytest.raises(TypeError, match="expected an NF4Tensor"):
        nf4.dequantize(torch.randn(3))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton backend needs a GPU or TRITON_INTERPRET=1 (as CI sets)")
def test_every_backend_gives_the_same_values():
    w = nf4.quantize(torch.randn(40, 72), 64)
    backends = ["torch", "triton"] + (["cpp"] if nf4_cpp.available() else [])
    # fp16 and fp32 outputs only: the Triton interpreter truncates on a bf16 store where a GPU rounds to
    # nearest even (docs/triton_interpreter.md).
    for dtype in (torch.float32, torch.float16):
        want = ref.nf4_dequantize(w, dtype)
        for backend in backends:
            assert torch.equal(nf4.dequantize(w, dtype, backend=backend), want), (backend, dtype)
    assert nf4.choose_backend("cpu") == ("cpp" if "cpp" in backends else "torch")
