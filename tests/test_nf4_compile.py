"""Compile every NF4 Triton kernel for real GPU targets, without a GPU.

The interpreter accepts programs a GPU compiler rejects (tl.dot tiles under 16, shared memory over
the chip's limit), so the kernels of kernels/nf4_triton.py are also compiled to PTX and cubin for
sm_75, sm_80, sm_86, sm_89 and sm_90 (FACTS.md). That needs @triton.jit to produce JITFunctions,
i.e. TRITON_INTERPRET unset: it runs in one subprocess for all kernels x targets. Compiles land in
triton's usual cache, keyed by source, options and target, so a rerun is fast and still exact.
"""

import json
import os
import subprocess
import sys

import pytest

# Shared memory one block may use, per target (CUDA programming guide, "Compute capabilities").
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_engine.kernels import nf4_triton as T
from lora_engine.kernels.nf4_format import NF4Tensor, NF4_CODE

WEIGHT = "packed_ptr absmax_ptr code_ptr nabs_ptr ncode_ptr".split()
INTS = "M P R w_stride_r w_stride_p stride_am stride_ar stride_cm stride_cp".split()

def weight_sig(nested):
    return dict(zip(WEIGHT, ["*u8", "*u8" if nested else "*fp32", "*fp32", "*fp32", "*fp32"]))

def dequant(cc, nested, dt):
    sig = {**weight_sig(nested), "out_ptr": "*" + dt, "offset": "fp32", "n": "i64"}
    cx = {"BLOCKSIZE": 64, "NESTED": nested, "NESTED_BLOCKSIZE": 256, "BLOCK": T.DEQUANT_BLOCK}
    sig.update(dict.fromkeys(cx, "constexpr"))
    return triton.compile(ASTSource(T._nf4_dequant_kernel, sig, cx), target=GPUTarget("cuda", cc, 32),
                          options={"enable_fp_fusion": False, "num_warps": 4})

def matmul(cc, nested, dt, rows):
    cfg = T.matmul_config(rows)
    sig = {"a_ptr": "*" + dt, **weight_sig(nested), "bias_ptr": "*" + dt, "c_ptr": "*" + dt, "offset": "fp32",
           **dict.fromkeys(INTS, "i32")}
    cx = {"BLOCKSIZE": 64, "NESTED": nested, "NESTED_BLOCKSIZE": 256, "HAS_BIAS": True, "UPCAST": False,
          "GROUP_M": T.GROUP_M, **{k: v for k, v in cfg.items() if k.startswith("BLOCK")}}
    sig.update(dict.fromkeys(cx, "constexpr"))
    opts = {"enable_fp_fusion": False, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return triton.compile(ASTSource(T._nf4_matmul_kernel, sig, cx), target=GPUTarget("cuda", cc, 32), options=opts)

results = []
def record(kind, cc, dt, nested, rows, fn):
    k = fn()
    ptx = k.asm["ptx"]
    results.append({"kind": kind, "cc": cc, "dtype": dt, "nested": nested, "rows": rows,
                    "shared": k.metadata.shared, "ptx_fma_f32": "fma.rn.f32" in ptx, "cubin": len(k.asm["cubin"])})

# Every target: the nested bf16 dequant and the largest matmul tile (the most shared memory).
for cc in (75, 80, 86, 89, 90):
    record("dequant", cc, "bf16", True, 0, lambda: dequant(cc, True, "bf16"))
    record("matmul", cc, "bf16", True, 1024, lambda: matmul(cc, True, "bf16", 1024))
# The other dtypes and the small tiles, once each.
record("dequant", 80, "fp32", False, 0, lambda: dequant(80, False, "fp32"))
record("matmul", 80, "fp32", False, 1, lambda: matmul(80, False, "fp32", 1))
record("matmul", 86, "fp16", False, 32, lambda: matmul(86, False, "fp16", 32))
record("matmul", 90, "bf16", True, 16, lambda: matmul(90, True, "bf16", 16))

# CPU tensors without the interpreter: a clear error, not a crash inside triton.
w = NF4Tensor(torch.zeros(32, dtype=torch.uint8), torch.ones(1), NF4_CODE.clone(), 64, (8, 8), torch.float32)
try:
    T.nf4_dequantize(w, torch.float32)
    cpu_error = None
except ValueError as e:
    cpu_error = str(e)
print(json.dumps({"results": results, "cpu_error": cpu_error}))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"compiling the NF4 kernels failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_every_target(compiled):
    res = compiled["results"]
    assert {(r["kind"], r["cc"]) for r in res} >= {(k, cc) for k in ("dequant", "matmul") for cc in SHARED_LIMIT}
    for r in res:
        assert r["cubin"] > 0, r
        assert r["shared"] <= SHARED_LIMIT[r["cc"]], f"{r}: over the {SHARED_LIMIT[r['cc']]} bytes of sm_{r['cc']}"


def test_dequant_has_no_fma(compiled):
    # Exactness against the reference needs the nested absmax's mul and add rounded separately.
    for r in compiled["results"]:
        if r["kind"] == "dequant":
            assert not r["ptx_fma_f32"], r


def test_cpu_tensor_without_interpreter_says_what_to_do(compiled):
    msg = compiled["cpu_error"]
    assert msg is not None, "nf4_dequantize accepted a CPU tensor with the interpreter off"
    assert "TRITON_INTERPRET=1" in msg and "CUDA" in msg, msg
